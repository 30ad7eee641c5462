"""Checkpoints: one orbax checkpoint per epoch to resume from, and `advjax.restore` for notebooks.

Each checkpoint is named by its epoch and holds two items:
- `state`: the TrainState (params, optimizer state, step);
- `run`: JSON with the config that wrote it and the metrics records of epochs 1..epoch.
Orbax writes a checkpoint into a temporary directory and renames it once it is
complete, so a killed run leaves either a whole checkpoint or one that
`saved_epochs` does not list. The records travel inside the checkpoint so that
it is the one source of truth on resume: metrics.jsonl is rewritten from it and
the two can never disagree.
"""

import contextlib
import logging as pylogging
import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy

from advjax import models, seeds, train, workdir
from advjax.workdir import WorkdirError

STATE_ITEM, RUN_ITEM = "state", "run"
# The metric `save_epoch` attaches to each checkpoint when the best epochs are kept.
CHECK_METRIC = "pgd_check"


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(os.path.abspath(run_dir), workdir.CHECKPOINT_DIR)


def _best_policy(num_seeds: int) -> tuple:
    """(preservation policy, best_fn): the latest of each seed's best epochs by CHECK_METRIC."""
    best = [
        preservation_policy.BestN(get_metric_fn=lambda metrics, seed=seed: metrics[CHECK_METRIC][seed], n=1)
        for seed in range(num_seeds)
    ]
    # Orbax writes a checkpoint's metrics to disk only when best_fn is set; without
    # them on disk, a resumed run's manager would keep every earlier epoch.
    return best, lambda metrics: metrics[CHECK_METRIC][0]


def open_manager(run_dir: str, keep: int | None = None, best_of_seeds: int = 0) -> ocp.CheckpointManager:
    """A manager of `run_dir/checkpoints` that keeps the latest `keep` epochs (None: read only).

    With `best_of_seeds` = K > 0 it also keeps, for each of K seeds, the epoch
    whose checkpoint metric CHECK_METRIC is highest for that seed (the latest
    of ties), so that the best epoch survives however long training runs on.
    Use it as a context manager. Leftover temporary directories of a killed
    save are removed when it opens: they were never committed, so never trusted.
    """
    if keep is None:
        with _quiet_read():
            return ocp.CheckpointManager(
                checkpoint_dir(run_dir), options=ocp.CheckpointManagerOptions(read_only=True, create=False)
            )
    policy, best_fn = preservation_policy.LatestN(n=keep), None
    if best_of_seeds:
        best, best_fn = _best_policy(best_of_seeds)
        policy = preservation_policy.AnyPreservationPolicy([policy, *best])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, best_fn=best_fn, best_mode="max", create=True, cleanup_tmp_directories=True
    )
    return ocp.CheckpointManager(checkpoint_dir(run_dir), options=options)


class _NotReadOnlyNotices(pylogging.Filter):
    """Orbax warns, on every read-only manager, that it is read only: a read is not an event."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("read_only=True" in message or "directory is read only" in message)


@contextlib.contextmanager
def _quiet_read():
    logger, notices = pylogging.getLogger("absl"), _NotReadOnlyNotices()
    logger.addFilter(notices)
    try:
        yield
    finally:
        logger.removeFilter(notices)


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
    run = {"epoch": epoch, "config": workdir.config_as_json(config), "records": records}
    metrics = None if check is None else {CHECK_METRIC: [float(v) for v in check]}
    items = {STATE_ITEM: ocp.args.StandardSave(state), RUN_ITEM: ocp.args.JsonSave(run)}
    manager.save(epoch, args=ocp.args.Composite(**items), metrics=metrics)
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
    differences = workdir.training_differences(run["config"] if "config" in run else {}, config)
    if differences:
        raise WorkdirError(
            f"the checkpoint {where} was written by a different config ({differences}); "
            "relaunch with --overwrite to discard it"
        )
    records = run["records"]
    if len(records) != epoch:
        raise ValueError(f"{where} holds {len(records)} metrics records for {epoch} epochs")
    state = manager.restore(epoch, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target)}))
    return Resumed(epoch, state[STATE_ITEM], records)


def _first_words(error: Exception, limit: int = 160) -> str:
    """The start of an error's message: tensorstore's run to kilobytes of spec."""
    text = f"{type(error).__name__}: {error}".splitlines()[0]
    return text if len(text) <= limit else text[:limit] + "..."


def restore_latest(
    manager: ocp.CheckpointManager,
    target: train.TrainState,
    config: ml_collections.ConfigDict,
    log: Callable[[str], None],
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


class Restored(NamedTuple):
    config: ml_collections.ConfigDict
    params: dict  # with a leading seed axis when config.num_seeds > 1
    apply_fn: models.ApplyFn  # (params, float32 images [B, 28, 28, 1] in [0, 1]) -> logits [B, 10], eval mode
    epochs: list[int]  # per seed, the epoch whose params these are


def epochs_to_restore(run_dir: str, saved: list[int], num_seeds: int, epoch: int | None) -> list[int]:
    """Per seed: `epoch` if given; else the epochs summary.json evaluated (train.keep_best's choice);
    else the newest checkpoint, which a finished run without keep_best evaluated."""
    if epoch is not None:
        return [epoch] * num_seeds
    summary = workdir.read_summary(run_dir)
    evaluated = summary["evaluated_epochs"] if summary and "evaluated_epochs" in summary else None
    if evaluated and len(evaluated) != num_seeds:
        raise WorkdirError(
            f"{workdir.SUMMARY_FILE} of {run_dir} names {len(evaluated)} evaluated epochs for {num_seeds} seeds"
        )
    return [int(e) for e in evaluated] if evaluated else [saved[-1]] * num_seeds


def restore(run_dir: str, epoch: int | None = None) -> Restored:
    """The params a run's summary describes, with its config, an eval-mode apply function and the epochs.

    By default each seed's params are those summary.json reports on: with
    train.keep_best, each seed's best epoch ("evaluated_epochs"); otherwise the
    last. `epoch=E` loads that kept epoch for every seed instead.

    >>> config, params, apply_fn, epochs = advjax.restore("runs/bp_adv")
    >>> logits = jax.jit(apply_fn)(params, images)  # float32 [B, 28, 28, 1] in [0, 1]
    """
    config = workdir.load_config(run_dir)
    model = models.build_model(config.model)
    init_keys = seeds.seed_keys(0, config.num_seeds)[0]
    abstract = jax.eval_shape(lambda: train.create_states(init_keys, model, config.train, 1, config.num_seeds))
    if not os.path.isdir(checkpoint_dir(run_dir)):
        raise FileNotFoundError(f"no checkpoint under {checkpoint_dir(run_dir)}")
    with open_manager(run_dir) as manager:
        saved = saved_epochs(manager)
        if not saved:
            raise FileNotFoundError(f"no checkpoint under {checkpoint_dir(run_dir)}")
        epochs = epochs_to_restore(run_dir, saved, config.num_seeds, epoch)
        missing = sorted(set(epochs) - set(saved))
        if missing:
            raise FileNotFoundError(
                f"no checkpoint of epoch {missing[0]} under {checkpoint_dir(run_dir)}; kept: {saved}"
            )
        args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract)})
        by_epoch = {e: manager.restore(e, args=args)[STATE_ITEM].params for e in sorted(set(epochs))}
    return Restored(
        config, seeds.pick_per_seed(by_epoch, epochs, config.num_seeds), models.eval_apply(model.apply), epochs
    )
