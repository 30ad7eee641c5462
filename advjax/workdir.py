"""The workdir: what a run writes, how it is written, and whether a launch may continue what is there.

Files (docs/design.md, "The workdir"):
- config.json: the run's config, written before training starts;
- metrics.jsonl: one deterministic record per epoch;
- timings.json: every wall-clock figure, kept apart so that metrics.jsonl and
  summary.json are byte-identical across runs of one config;
- summary.json: the results, written last, so it marks a finished run;
- checkpoints/: advjax.checkpoint's orbax checkpoints;
- .lock: while a run holds the workdir's lock (`locked`), which process it is.
Every file is written by advjax.files: atomically, with the mode the umask gives.
"""

import contextlib
import datetime
import fcntl
import json
import os
import shutil
import socket
from collections.abc import Iterator, Sequence
from typing import Any

import ml_collections

from advjax import files

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
TIMINGS_FILE = "timings.json"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = ".lock"
DATA_KEY = "data_identity"  # config.json's entry for the data's name, source, location and SHA-256
# Everything a run writes besides config.json. The summary comes first: it is
# the one file trusted on sight (advjax.paper reuses a run by it), so clearing a
# run removes it before anything it summarizes.
RUN_OUTPUTS = (SUMMARY_FILE, CHECKPOINT_DIR, METRICS_FILE, TIMINGS_FILE)
# Fields (top-level sections or dotted paths) that change how a trained model is
# evaluated, where it runs, what is kept or where the data lie, not what is
# trained: a finished or interrupted run may be continued and re-evaluated under
# new values of these. The data themselves are checked by content (check_data).
NOT_TRAINING = (
    "eval",
    "robust",
    "certify",
    "num_devices",
    "train.checkpoints_to_keep",
    "data.source",
    "data.dir",
    "data.cache_dir",
    "data.tfds_data_dir",
)


def _fields(section: str, **values) -> dict:
    return {f"{section}.{name}": value for name, value in values.items()}


# Config fields added after runs were written, each with the value that does what those runs did: a saved
# config without one reads as holding it, so a relaunch of an older run still resumes, re-evaluates or reuses.
# Older runs never ran AutoAttack, certified, trained in mode consistency nor a PreAct ResNet: those need only
# equal default.py's. Every older run trained with Adam, without weight decay or augmentation.
ADDED_FIELDS = {
    "data.name": "mnist",  # every run before data.name read MNIST
    "model.width": 64,
    **_fields("train", overfitting_check_attack="pgd", consistency_copies=2, consistency_lambda=10.0),
    **_fields("train", consistency_eta=0.5, optimizer="adam", momentum=0.9, weight_decay=0.0, augment="none"),
    **_fields("train", cyclic_peak=0.4, noise_clip=True),
    **_fields("model", dtype="float32"),
    **_fields("robust", autoattack_version="standard", autoattack_steps=100, autoattack_queries=5000),
    **_fields("certify", enabled=False, sigma=(0.25,), n0=100, n=10_000, alpha=0.001, split="test"),
    **_fields("certify", num_examples=500, batch=50, chunk_size=50),
    "certify.radii": (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5),
}


class WorkdirError(ValueError):
    """The workdir holds a run this launch must not continue: another config or data, damaged
    checkpoints, or another process's live run."""


# One writer per workdir --------------------------------------------------------------


def _lock_holder(workdir: str) -> str:
    try:
        with open(os.path.join(workdir, LOCK_FILE)) as f:
            return f.read().strip() or "another process"
    except OSError:
        return "another process (it has not written its name yet)"


@contextlib.contextmanager
def locked(workdir: str) -> Iterator[None]:
    """Holds `workdir`'s advisory lock for the block; refuses at once, naming the holder, if another process has it.

    The lock is a kernel flock on the directory itself, not a PID file: it dies
    with its process, SIGKILL included, so a killed run never leaves the workdir
    locked. workdir/.lock names the holder while it runs, for the message.

    >>> with workdir.locked("runs/bp_adv"):
    ...     train_and_evaluate(config, "runs/bp_adv")
    """
    fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirError(
                f"{workdir} is in use by {_lock_holder(workdir)}; wait for that run to end, or use another --workdir"
            ) from None
        since = datetime.datetime.now().isoformat(timespec="seconds")
        holder = os.path.join(workdir, LOCK_FILE)
        files.write_text(holder, f"process {os.getpid()} on {socket.gethostname()} (since {since})\n")
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.remove(holder)
    finally:
        os.close(fd)  # releases the lock


# Config identity ------------------------------------------------------------------


def config_as_json(config: ml_collections.ConfigDict) -> dict:
    """The config as it reads back from disk (tuples become lists), so saved and live configs compare."""
    return json.loads(json.dumps(config.to_dict()))


def _section_of(config_json: dict, path: str) -> tuple[dict | None, str]:
    """(the dict that holds the dotted `path`'s last part, that part); None where a section is missing."""
    *parents, leaf = path.split(".")
    node = config_json
    for key in parents:
        node = node.get(key) if isinstance(node, dict) else None
    return (node if isinstance(node, dict) else None), leaf


def with_added_fields(config_json: dict) -> dict:
    """A JSON config with every field of ADDED_FIELDS it lacks set to the value older runs had.

    >>> with_added_fields({"train": {"epochs": 3}})  # {"train": {"epochs": 3, "overfitting_check_attack": "pgd"}}
    """
    filled = json.loads(json.dumps(config_json))
    # An experiment's config gains a section added whole; a paper config (its runs under "runs") gains none.
    experiment = isinstance(filled, dict) and "model" in filled
    for path, value in ADDED_FIELDS.items():
        node, leaf = _section_of(filled, path)
        if node is None and experiment and path.count(".") == 1 and path.split(".")[0] not in filled:
            node = filled.setdefault(path.split(".")[0], {})
        if node is not None:
            node.setdefault(leaf, value)
    return json.loads(json.dumps(filled))  # tuples read as lists, as the saved fields do


def training_part(config_json: dict) -> dict:
    """The fields of a JSON config that determine the trained model (NOT_TRAINING left out)."""
    part = with_added_fields(config_json)
    for path in NOT_TRAINING:
        node, leaf = _section_of(part, path)
        if node is not None:
            node.pop(leaf, None)
    return part


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


def save_config(workdir: str, config: ml_collections.ConfigDict, data_identity: dict | None = None) -> None:
    """config.json: the config's fields, and under DATA_KEY the identity of the data it was trained on."""
    saved = config.to_dict()
    if data_identity is not None:
        saved[DATA_KEY] = data_identity
    files.write_json(os.path.join(workdir, CONFIG_FILE), saved)


def _read_config_file(workdir: str) -> dict | None:
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


def read_saved_config(workdir: str) -> dict | None:
    """The config of `workdir`'s config.json as JSON (its data identity left out), None when there is none;
    a damaged one is refused."""
    saved = _read_config_file(workdir)
    return None if saved is None else with_added_fields({k: v for k, v in saved.items() if k != DATA_KEY})


def read_data_identity(workdir: str) -> dict | None:
    """The identity of the data `workdir`'s run was trained on; None for a run that recorded none."""
    saved = _read_config_file(workdir)
    return saved[DATA_KEY] if saved is not None and DATA_KEY in saved else None


def describe_data(identity: dict) -> str:
    return f"sha256 {identity['sha256'][:16]}... from {identity['location']}"


def check_data(workdir: str, identity: dict) -> None:
    """Refuses to continue a run on data other than its own: a relaunch must resume, or re-evaluate, the same data.

    >>> check_data("runs/bp_adv", data.identity(config.data, mnist))
    """
    if not any(_holds_something(os.path.join(workdir, name)) for name in RUN_OUTPUTS):
        return  # a config.json alone holds nothing trained on the old data
    saved = read_data_identity(workdir)
    if saved is not None and saved["sha256"] != identity["sha256"]:
        raise WorkdirError(
            f"{workdir} holds a run trained on other data ({describe_data(saved)}; now {describe_data(identity)}); "
            "point the data back, use another --workdir, or relaunch with --overwrite to discard that run"
        )


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config that wrote `workdir`, as a ConfigDict."""
    saved = read_saved_config(workdir)
    if saved is None:
        path = os.path.join(workdir, CONFIG_FILE)
        raise FileNotFoundError(f"{path} not found: {workdir!r} is not a workdir written by launch.py")
    return ml_collections.ConfigDict(saved)


# Refuse, resume or clear ---------------------------------------------------------------


def prepare(workdir: str) -> None:
    """Creates the workdir and proves it is writable before any work is done.

    >>> prepare("runs/bp_adv")
    """
    if os.path.lexists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"workdir {workdir!r} is a file, not a directory; name a directory as --workdir")
    checkpoints = os.path.join(workdir, CHECKPOINT_DIR)
    if os.path.lexists(checkpoints) and not os.path.isdir(checkpoints):
        raise WorkdirError(f"{checkpoints} is a file, not the checkpoint directory; move it away or delete it")
    probe = os.path.join(workdir, ".write_test")
    try:
        os.makedirs(workdir, exist_ok=True)
        with open(probe, "wb"):
            pass
        os.remove(probe)
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


def read_finished_summary(
    workdir: str, config: ml_collections.ConfigDict, data_identity: dict | None = None
) -> dict | None:
    """The summary.json of a finished run of exactly `config` (and, if given, on that data); None when absent,
    unreadable, of another config or of other data."""
    summary = read_summary(workdir)
    try:
        saved = with_added_fields(summary["config"])
        same = json.dumps(saved, sort_keys=True) == json.dumps(config_as_json(config), sort_keys=True)
        if data_identity is not None:
            same = same and summary["data"]["sha256"] == data_identity["sha256"]
    except (KeyError, TypeError):  # not a summary (or one without its data): not trusted, the run is resumed or redone
        return None
    return summary if same else None


# Metrics, timings and the summary ---------------------------------------------------


def write_metrics(workdir: str, records: Sequence[dict]) -> None:
    files.write_jsonl(os.path.join(workdir, METRICS_FILE), records)


def write_summary(workdir: str, summary: dict) -> None:
    """Written last: a summary.json whose config matches marks a finished run."""
    files.write_json(os.path.join(workdir, SUMMARY_FILE), summary)


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
    workdir: str, epochs: list[dict], evaluation_seconds: float | None = None, **reports: dict | None
) -> None:
    """timings.json; `reports`: each report's wall-clock figures (robustness_seconds, certification_seconds)."""
    timings = {"epochs": epochs, "evaluation_seconds": evaluation_seconds}
    files.write_json(os.path.join(workdir, TIMINGS_FILE), {**timings, **{k: v for k, v in reports.items() if v}})


def add_timing(workdir: str, name: str, value) -> None:
    """Adds one entry to timings.json (wall-clock facts stay out of the deterministic outputs)."""
    path = os.path.join(workdir, TIMINGS_FILE)
    try:
        with open(path) as f:
            timings = json.load(f)
    except (OSError, ValueError):
        timings = {}
    timings[name] = value
    files.write_json(path, timings)
