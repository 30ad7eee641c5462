"""Checkpoints: one orbax checkpoint per epoch to resume from, and `advjax.restore` for notebooks.

Each checkpoint is named by its epoch and holds two items:
- `state`: the TrainState (params, optimizer state, step);
- `run`: JSON with the config that wrote it and the metrics records of epochs 1..epoch.
Orbax writes a checkpoint into a temporary directory and renames it once it is
complete, so a killed run leaves either a whole checkpoint or one that
`latest_epoch` does not list. The records travel inside the checkpoint so that
it is the one source of truth on resume: metrics.jsonl is rewritten from it and
the two can never disagree.
"""

import json
import os
from typing import Any, Callable, NamedTuple

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy

from advjax import models, train
from advjax.report import write_json

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
STATE_ITEM, RUN_ITEM = "state", "run"


class WorkdirError(ValueError):
    """The workdir holds a run this launch must not continue: another config, or damaged checkpoints."""


# Configs ---------------------------------------------------------------------


def config_as_json(config: ml_collections.ConfigDict) -> dict:
    """The config as it reads back from disk (tuples become lists), so saved and live configs compare."""
    return json.loads(json.dumps(config.to_dict()))


# Sections that change how a trained model is evaluated or where it runs, not
# what is trained: a finished or interrupted run may be continued and
# re-evaluated under new values of these.
NOT_TRAINING = ("eval", "robust", "num_devices")


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


def describe_differences(saved: dict, current: dict, limit: int = 3) -> str:
    """'config.train.epochs: 3 there, 5 now' for the first few differing fields."""

    def value(tree: Any, path: str, width: int = 60) -> str:
        for part in path.split("."):
            if not isinstance(tree, dict) or part not in tree:
                return "(absent)"
            tree = tree[part]
        text = json.dumps(tree)
        return text if len(text) <= width else text[: width - 3] + "..."

    paths = config_differences(saved, current)
    parts = [f"config.{p}: {value(saved, p)} there, {value(current, p)} now" for p in paths[:limit]]
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return "; ".join(parts) + more


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
    saved = read_saved_config(workdir)
    if saved is None:
        path = os.path.join(workdir, CONFIG_FILE)
        raise FileNotFoundError(f"{path} not found: {workdir!r} is not a workdir written by launch.py")
    return ml_collections.ConfigDict(saved)


# Per-epoch checkpoints --------------------------------------------------------


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


# The metric `save_epoch` attaches to each checkpoint when the best epochs are kept.
CHECK_METRIC = "pgd_check"


def open_manager(workdir: str, keep: int | None = None, best_of_seeds: int = 0) -> ocp.CheckpointManager:
    """A manager of `workdir/checkpoints` that keeps the latest `keep` epochs (None: read only).

    With `best_of_seeds` = K > 0 it also keeps, for each of K seeds, the epoch
    whose checkpoint metric CHECK_METRIC is highest for that seed (the latest
    of ties), so that the best epoch survives however long training runs on.
    Use it as a context manager. Leftover temporary directories of a killed
    save are removed when it opens: they were never committed, so never trusted.
    """
    if keep is None:
        options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    else:
        policy, best_fn = preservation_policy.LatestN(n=keep), None
        if best_of_seeds:
            best = [
                preservation_policy.BestN(get_metric_fn=lambda metrics, seed=seed: metrics[CHECK_METRIC][seed], n=1)
                for seed in range(best_of_seeds)
            ]
            policy = preservation_policy.AnyPreservationPolicy([policy, *best])
            # Orbax writes a checkpoint's metrics to disk only when best_fn is set; without
            # them on disk, a resumed run's manager would keep every earlier epoch.
            best_fn = lambda metrics: metrics[CHECK_METRIC][0]
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, best_fn=best_fn, best_mode="max", create=True, cleanup_tmp_directories=True
        )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def saved_epochs(manager: ocp.CheckpointManager) -> list[int]:
    """Epochs with a complete (committed) checkpoint, oldest first."""
    return sorted(manager.all_steps())


def save_epoch(
    manager: ocp.CheckpointManager,
    epoch: int,
    state: train.TrainState,
    config: ml_collections.ConfigDict,
    records: list[dict],
    check: list[float] | None = None,
) -> None:
    """Checkpoints the state after `epoch` with the config and the metrics records so far,
    and `check` (one value per seed) as its CHECK_METRIC for a manager that keeps best epochs.

    Waits until the checkpoint is committed: once this returns, a killed run resumes after `epoch`.
    """
    run = {"epoch": epoch, "config": config_as_json(config), "records": records}
    metrics = None if check is None else {CHECK_METRIC: [float(v) for v in check]}
    manager.save(
        epoch, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state), RUN_ITEM: ocp.args.JsonSave(run)}),
        metrics=metrics,
    )
    manager.wait_until_finished()


class Resumed(NamedTuple):
    epoch: int  # the last completed epoch
    state: train.TrainState
    records: list[dict]  # metrics records of epochs 1..epoch


def restore_epoch(
    manager: ocp.CheckpointManager, epoch: int, target: train.TrainState, config: ml_collections.ConfigDict
) -> Resumed:
    """The checkpoint of `epoch`, refused unless it was written by `config`.

    `target` is a freshly created state: it gives the tree structure, the
    static fields (apply_fn, tx), and the shapes, dtypes and shardings to
    restore into.
    """
    where = os.path.join(str(manager.directory), str(epoch))
    run = manager.restore(epoch, args=ocp.args.Composite(**{RUN_ITEM: ocp.args.JsonRestore()}))[RUN_ITEM]
    differences = describe_differences(training_part(run.get("config", {})), training_part(config_as_json(config)))
    if differences:
        raise WorkdirError(
            f"the checkpoint {where} was written by a different config ({differences}); "
            "relaunch with --overwrite to discard it"
        )
    records = run["records"]
    if len(records) != epoch:
        raise ValueError(f"{where} holds {len(records)} metrics records for {epoch} epochs")
    args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target)})
    state = manager.restore(epoch, args=args)[STATE_ITEM]
    return Resumed(epoch, state, records)


def _first_words(error: Exception, limit: int = 160) -> str:
    """The start of an error's message: tensorstore's run to kilobytes of spec."""
    text = f"{type(error).__name__}: {error}".splitlines()[0]
    return text if len(text) <= limit else text[:limit] + "..."


def restore_latest(
    manager: ocp.CheckpointManager, target: train.TrainState, config: ml_collections.ConfigDict, log: Callable[[str], None]
) -> Resumed | None:
    """The newest checkpoint that restores, falling back to older kept ones; None when there is none.

    A checkpoint of another config is refused outright (WorkdirError); a
    damaged one is skipped with a warning, since an older one still resumes
    correctly, and deleted once that one is restored: the epochs after it are
    trained and saved again. If every kept checkpoint is damaged, the run is
    refused and nothing is deleted.
    """
    failures, damaged = [], []
    for epoch in reversed(saved_epochs(manager)):
        try:
            resumed = restore_epoch(manager, epoch, target, config)
        except WorkdirError:
            raise
        except Exception as e:  # orbax raises many types for missing or damaged files
            failures.append(f"epoch {epoch}: {_first_words(e)}")
            damaged.append(epoch)
            log(f"warning: the checkpoint of epoch {epoch} cannot be restored ({failures[-1]}); trying an older one")
            continue
        for epoch in damaged:
            manager.delete(epoch)
        return resumed
    if failures:
        raise WorkdirError(
            f"no checkpoint under {manager.directory} can be restored ({'; '.join(failures)}); "
            "relaunch with --overwrite to start the run afresh"
        )
    return None


# Notebooks ----------------------------------------------------------------------


def eval_apply_fn(model) -> Callable:
    """`apply_fn(params, images) -> logits` in eval mode (dropout off); jittable."""

    def apply_fn(params, images):
        return model.apply({"params": params}, images, train=False)

    return apply_fn


class Restored(NamedTuple):
    config: ml_collections.ConfigDict
    params: dict  # with a leading seed axis when config.num_seeds > 1
    apply_fn: Callable  # (params, float32 images [B, 28, 28, 1] in [0, 1]) -> logits [B, 10]


def restore(workdir: str, epoch: int | None = None) -> Restored:
    """The params of `epoch` (default: the last checkpointed) in `workdir`, with the config and an eval-mode apply function.

    A train.keep_best run evaluated other epochs than the last: they are in
    summary.json's "evaluated_epochs", one per seed, and their checkpoints are kept.
    """
    config = load_config(workdir)
    model = models.build_model(config.model)
    num_seeds = config.get("num_seeds", 1)
    keys = jax.random.split(jax.random.key(0), num_seeds) if num_seeds > 1 else jax.random.key(0)
    abstract = jax.eval_shape(lambda: train.create_states(keys, model, config.train, 1, num_seeds))
    if not os.path.isdir(checkpoint_dir(workdir)):
        raise FileNotFoundError(f"no checkpoint under {checkpoint_dir(workdir)}")
    with open_manager(workdir) as manager:
        epochs = saved_epochs(manager)
        if not epochs:
            raise FileNotFoundError(f"no checkpoint under {checkpoint_dir(workdir)}")
        if epoch is not None and epoch not in epochs:
            raise FileNotFoundError(f"no checkpoint of epoch {epoch} under {checkpoint_dir(workdir)}; kept: {epochs}")
        args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract)})
        state = manager.restore(epochs[-1] if epoch is None else epoch, args=args)[STATE_ITEM]
    return Restored(config, state.params, eval_apply_fn(model))
