"""The workdir: what a run writes, how it is written, and whether a launch may continue what is there.

Files (docs/design.md, "The workdir"):
- config.json: the run's config, written before training starts;
- metrics.jsonl: one deterministic record per epoch;
- timings.json: every wall-clock figure, kept apart so that metrics.jsonl and
  summary.json are byte-identical across runs of one config;
- summary.json: the results, written last, so it marks a finished run;
- checkpoints/: advjax.checkpoint's orbax checkpoints.
Every file is written atomically (a temporary file, fsync, rename).
"""

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import ml_collections

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
TIMINGS_FILE = "timings.json"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
# Everything a run writes besides config.json. The summary comes first: it is
# the one file trusted on sight (advjax.paper reuses a run by it), so clearing a
# run removes it before anything it summarizes.
RUN_OUTPUTS = (SUMMARY_FILE, CHECKPOINT_DIR, METRICS_FILE, TIMINGS_FILE)
# Sections that change how a trained model is evaluated or where it runs, not
# what is trained: a finished or interrupted run may be continued and
# re-evaluated under new values of these.
NOT_TRAINING = ("eval", "robust", "num_devices")


class WorkdirError(ValueError):
    """The workdir holds a run this launch must not continue: another config, or damaged checkpoints."""


# Atomic writes -------------------------------------------------------------------


def write_bytes(path: str, content: bytes) -> None:
    """Writes via a temporary file and a rename, so a killed run never leaves a truncated file.

    The fsync before the rename makes this hold across a power cut too: the
    rename can reach the disk only after the content has.
    """
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path: str, records: Sequence[dict]) -> None:
    """One object per line; the whole file is rewritten atomically each time."""
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))


# Config identity ------------------------------------------------------------------


def config_as_json(config: ml_collections.ConfigDict) -> dict:
    """The config as it reads back from disk (tuples become lists), so saved and live configs compare."""
    return json.loads(json.dumps(config.to_dict()))


def training_part(config_json: dict) -> dict:
    """The fields of a JSON config that determine the trained model."""
    return {key: value for key, value in config_json.items() if key not in NOT_TRAINING}


def config_differences(saved: Any, current: Any, path: str = "") -> list[str]:
    """Dotted paths of the fields that differ between two JSON configs (changed, added or removed)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        differences = []
        for key in sorted(set(saved) | set(current), key=str):
            child = f"{path}.{key}" if path else str(key)
            if key not in saved or key not in current:
                differences.append(child)
            else:
                differences += config_differences(saved[key], current[key], child)
        return differences
    return [] if saved == current else [path or "(the whole config)"]


def _value_at(tree: Any, path: str, width: int = 60) -> str:
    for part in path.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return "(absent)"
        tree = tree[part]
    text = json.dumps(tree)
    return text if len(text) <= width else text[: width - 3] + "..."


def describe_differences(saved: dict, current: dict, limit: int = 3) -> str:
    """'config.train.epochs: 3 there, 5 now' for the first few differing fields."""
    paths = config_differences(saved, current)
    parts = [f"config.{p}: {_value_at(saved, p)} there, {_value_at(current, p)} now" for p in paths[:limit]]
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return "; ".join(parts) + more


def training_differences(saved: dict, config: ml_collections.ConfigDict) -> str:
    """How `config` differs from a saved JSON config in what it trains ('' when it does not)."""
    return describe_differences(training_part(saved), training_part(config_as_json(config)))


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    write_json(os.path.join(workdir, CONFIG_FILE), config.to_dict())


def read_saved_config(workdir: str) -> dict | None:
    """The config.json of `workdir` as JSON, None when there is none; a damaged one is refused."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise WorkdirError(f"{path} cannot be read ({e}); relaunch with --overwrite to start the run afresh") from e
    if not isinstance(saved, dict):
        raise WorkdirError(f"{path} does not hold a config; relaunch with --overwrite to start the run afresh")
    return saved


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config that wrote `workdir`, as a ConfigDict."""
    saved = read_saved_config(workdir)
    if saved is None:
        path = os.path.join(workdir, CONFIG_FILE)
        raise FileNotFoundError(f"{path} not found: {workdir!r} is not a workdir written by launch.py")
    return ml_collections.ConfigDict(saved)


# Refuse, resume or clear ---------------------------------------------------------------


def prepare(workdir: str) -> None:
    """Creates the workdir and proves it is writable before any work is done."""
    try:
        os.makedirs(workdir, exist_ok=True)
        write_text(os.path.join(workdir, ".write_test"), "")
        os.remove(os.path.join(workdir, ".write_test"))
    except OSError as e:
        raise OSError(f"workdir {workdir!r} is not writable: {e.strerror or e}") from e


def _holds_something(path: str) -> bool:
    """A file, or a directory that is not empty (orbax creates checkpoints/ before the first save)."""
    if os.path.isdir(path):
        return bool(os.listdir(path))
    return os.path.lexists(path)


def check(workdir: str, config: ml_collections.ConfigDict, overwrite: bool) -> None:
    """Refuses a workdir holding a run of another config, unless `overwrite`; changes nothing.

    The same config resumes; evaluation settings may change (NOT_TRAINING). Outputs without a
    readable config.json are refused too: nothing says which config wrote them. A config.json
    alone (a run stopped before its first epoch ended) holds nothing to lose.
    """
    outputs = [name for name in RUN_OUTPUTS if _holds_something(os.path.join(workdir, name))]
    if overwrite or not outputs:
        return
    saved = read_saved_config(workdir)
    if saved is None:
        raise WorkdirError(
            f"{workdir} holds {', '.join(outputs)} but no {CONFIG_FILE}, so the config that wrote "
            "them is unknown; use another --workdir, or relaunch with --overwrite to discard them"
        )
    differences = training_differences(saved, config)
    if differences:
        raise WorkdirError(
            f"{workdir} holds a run of a different config ({differences}); "
            "use another --workdir, or relaunch with --overwrite to discard that run"
        )


def clear_run(workdir: str) -> None:
    """Deletes a previous run's outputs and config, so nothing stale is resumed or reused."""
    for name in (*RUN_OUTPUTS, CONFIG_FILE):
        path = os.path.join(workdir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


def read_summary(workdir: str) -> dict | None:
    """summary.json as written, or None when the run has not finished."""
    try:
        with open(os.path.join(workdir, SUMMARY_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_finished_summary(workdir: str, config: ml_collections.ConfigDict) -> dict | None:
    """The summary.json of a finished run of exactly `config`; None when absent, unreadable or of another config."""
    summary = read_summary(workdir)
    try:
        same = json.dumps(summary["config"], sort_keys=True) == json.dumps(config_as_json(config), sort_keys=True)
    except (KeyError, TypeError):  # not a summary: not trusted, the run is resumed or redone
        return None
    return summary if same else None


# Metrics, timings and the summary ---------------------------------------------------


def write_metrics(workdir: str, records: Sequence[dict]) -> None:
    write_jsonl(os.path.join(workdir, METRICS_FILE), records)


def write_summary(workdir: str, summary: dict) -> None:
    """Written last: a summary.json whose config matches marks a finished run."""
    write_json(os.path.join(workdir, SUMMARY_FILE), summary)


def read_epoch_timings(workdir: str, last_epoch: int) -> list[dict]:
    """The epoch timings of a previous launch, up to `last_epoch`.

    Timings only inform, nothing is computed from them: an unreadable file is
    simply started afresh.
    """
    try:
        with open(os.path.join(workdir, TIMINGS_FILE)) as f:
            epochs = json.load(f)["epochs"]
        return [t for t in epochs if t["epoch"] <= last_epoch]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def write_timings(
    workdir: str, epochs: list[dict], evaluation_seconds: float | None = None, robustness_seconds: dict | None = None
) -> None:
    timings = {"epochs": epochs, "evaluation_seconds": evaluation_seconds}
    if robustness_seconds:
        timings["robustness_seconds"] = robustness_seconds
    write_json(os.path.join(workdir, TIMINGS_FILE), timings)


def add_timing(workdir: str, name: str, value) -> None:
    """Adds one entry to timings.json (wall-clock facts stay out of the deterministic outputs)."""
    path = os.path.join(workdir, TIMINGS_FILE)
    try:
        with open(path) as f:
            timings = json.load(f)
    except (OSError, ValueError):
        timings = {}
    timings[name] = value
    write_json(path, timings)
