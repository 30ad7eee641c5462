"""Checkpoints: one orbax checkpoint per epoch to resume from, and `advjax.restore` for notebooks.

Each checkpoint is named by its epoch and holds two items:
- `state`: the TrainState (params, optimizer state, step; the running batch statistics of a model with BatchNorm);
- `run`: JSON with the config that wrote it and the metrics records of epochs 1..epoch.
Orbax writes a checkpoint into a temporary directory and renames it once it is
complete, so a killed run leaves either a whole checkpoint or one that
`saved_epochs` does not list. The records travel inside the checkpoint so that
it is the one source of truth on resume: metrics.jsonl is rewritten from it and
the two can never disagree. So does a digest of the state (`state_digest`): a
restore recomputes it, so a flipped bit on disk is found, never silently loaded.
"""

import contextlib
import hashlib
import logging as pylogging
import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy

from advjax import data, files, models, seeds, train, workdir
from advjax.workdir import WorkdirError

STATE_ITEM, RUN_ITEM = "state", "run"
# The metric `save_epoch` attaches to each checkpoint when the best epochs are kept.
CHECK_METRIC = "pgd_check"
DIGEST_KEY, DATA_KEY = "state_sha256", "data"


class CheckpointDamaged(Exception):
    """A checkpoint that reads back, but not as the state that was saved: its digest or its params are wrong."""


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


def _where(manager: ocp.CheckpointManager, epoch: int) -> str:
    return os.path.join(str(manager.directory), str(epoch))


def _on_host(leaf) -> np.ndarray:
    """A leaf as a host array; of a state replicated across processes, this process's full copy."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return np.asarray(leaf.addressable_data(0))
    return np.asarray(leaf)


def state_digest(state) -> str:
    """SHA-256 over the state's arrays: each leaf's key path, dtype, shape and bytes, in tree order.

    >>> run["state_sha256"] == state_digest(restored_state)
    """
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if not isinstance(leaf, jax.Array | np.ndarray | np.generic | int | float):
            continue
        array = _on_host(leaf)
        digest.update(jax.tree_util.keystr(path).encode())
        if array.ndim == 0:
            # A Python scalar (a fresh TrainState's step) restores as a 0-d array: scalars are hashed by value.
            digest.update(f"scalar {array.item()!r}".encode())
        else:
            digest.update(f"{array.dtype.str} {array.shape}".encode() + array.tobytes())
    return digest.hexdigest()


def save_epoch(
    manager: ocp.CheckpointManager,
    epoch: int,
    state: train.TrainState,
    config: ml_collections.ConfigDict,
    records: list[dict],
    check: list[float] | None = None,
    data_identity: dict | None = None,
) -> None:
    """Checkpoints the state after `epoch` with its digest, the config, the metrics records so far,
    `data_identity` (under "data") when given, and `check` (one value per seed) as its CHECK_METRIC.

    Waits until the checkpoint is committed: once this returns, a killed run resumes after `epoch`.
    A write that fails for want of space (any OSError) raises a one-line OSError naming the checkpoint.

    >>> save_epoch(manager, 3, state, config, records)
    """
    run = {"epoch": epoch, "config": workdir.config_as_json(config), "records": records}
    run |= {DIGEST_KEY: state_digest(state)} | ({} if data_identity is None else {DATA_KEY: data_identity})
    metrics = None if check is None else {CHECK_METRIC: [float(v) for v in check]}
    items = {STATE_ITEM: ocp.args.StandardSave(state), RUN_ITEM: ocp.args.JsonSave(run)}
    try:
        manager.save(epoch, args=ocp.args.Composite(**items), metrics=metrics)
        manager.wait_until_finished()
    except Exception as e:
        reason = files.os_error_reason(e)
        if reason is None:
            raise
        raise OSError(f"cannot write the checkpoint of epoch {epoch} to {_where(manager, epoch)}: {reason}") from e


class Resumed(NamedTuple):
    epoch: int  # the last completed epoch
    state: train.TrainState
    records: list[dict]  # metrics records of epochs 1..epoch


def read_run_item(manager: ocp.CheckpointManager, epoch: int) -> dict:
    """The JSON `run` item of the checkpoint of `epoch`: "epoch", "config", "records", the digest, ...

    >>> read_run_item(manager, 3)["config"]["model"]["name"]
    """
    run = manager.restore(epoch, args=ocp.args.Composite(**{RUN_ITEM: ocp.args.JsonRestore()}))[RUN_ITEM]
    if not isinstance(run, dict):
        raise CheckpointDamaged(f"the checkpoint {_where(manager, epoch)} holds no run item")
    return run


def _restore_state(manager: ocp.CheckpointManager, epoch: int, target):
    return manager.restore(epoch, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target)}))[STATE_ITEM]


def verify_state(state, run: dict, where: str, log: Callable[[str], None] | None = None) -> None:
    """Raises CheckpointDamaged unless `state` matches the digest in its `run` item and its params are finite.

    A checkpoint written before digests were recorded is accepted, with a warning.

    >>> verify_state(state, read_run_item(manager, 3), "runs/bp/checkpoints/3")
    """
    if DIGEST_KEY in run and state_digest(state) != run[DIGEST_KEY]:
        raise CheckpointDamaged(f"the state digest does not match the one saved in the checkpoint {where}: damaged")
    if DIGEST_KEY not in run:
        (log or pylogging.warning)(f"warning: the checkpoint {where} has no state digest, so it cannot be verified")
    arrays = {"params": state.params}
    if isinstance(state, train.BatchNormState):
        arrays["batch_stats"] = state.batch_stats
    for name, tree in arrays.items():
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        bad = [jax.tree_util.keystr(path) for path, leaf in leaves if not np.isfinite(_on_host(leaf)).all()]
        if bad:
            raise CheckpointDamaged(f"the checkpoint {where} holds non-finite {name} ({name}{bad[0]}): damaged")


def restore_epoch(
    manager: ocp.CheckpointManager,
    epoch: int,
    target: train.TrainState,
    config: ml_collections.ConfigDict,
    log: Callable[[str], None] | None = None,
) -> Resumed:
    """The checkpoint of `epoch`, refused unless it was written by `config`, verified against its digest.

    `target` is a freshly created state: it gives the tree structure, the
    static fields (apply_fn, tx), and the shapes, dtypes and shardings to
    restore into. A damaged state raises CheckpointDamaged; `log` (else
    logging.warning) tells of a checkpoint too old to carry a digest.

    >>> epoch, state, records = restore_epoch(manager, 3, fresh_state, config)
    """
    where = _where(manager, epoch)
    run = read_run_item(manager, epoch)
    differences = workdir.training_differences(run["config"] if "config" in run else {}, config)
    if differences:
        raise WorkdirError(
            f"the checkpoint {where} was written by a different config ({differences}); "
            "relaunch with --overwrite to discard it"
        )
    records = run["records"]
    if len(records) != epoch:
        raise ValueError(f"{where} holds {len(records)} metrics records for {epoch} epochs")
    state = _restore_state(manager, epoch, target)
    verify_state(state, run, where, log)
    return Resumed(epoch, state, records)


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
    refused and nothing is deleted. Damaged includes a state unlike its digest or with non-finite params.

    >>> resumed = restore_latest(manager, fresh_state, config, log=print)
    """
    failures, damaged = [], []
    for epoch in reversed(saved_epochs(manager)):
        try:
            resumed = restore_epoch(manager, epoch, target, config, log)
        except WorkdirError:
            raise
        except Exception as e:  # orbax raises many types for missing or damaged files
            # Our own damage messages are one line already: cutting them could drop the path or the reason.
            failures.append(f"epoch {epoch}: {_first_words(e, 400 if isinstance(e, CheckpointDamaged) else 160)}")
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
    # With a leading seed axis when config.num_seeds > 1; models.Variables (params and running batch statistics)
    # for a model with BatchNorm.
    params: dict
    apply_fn: models.ApplyFn  # (params, float32 images [B, H, W, C] in [0, 1]) -> logits [B, classes], eval mode
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


def _load_run_config(run_dir: str) -> ml_collections.ConfigDict:
    """config.json of `run_dir`; a paper run's top directory, which has none, is told apart by its runs."""
    has_config = lambda d: os.path.isfile(os.path.join(d, workdir.CONFIG_FILE))
    runs = [] if has_config(run_dir) or not os.path.isdir(run_dir) else sorted(os.listdir(run_dir))
    runs = [os.path.join(run_dir, name) for name in runs if has_config(os.path.join(run_dir, name))]
    if runs:
        raise FileNotFoundError(f"{run_dir} is a paper run's directory; restore one of its runs: {', '.join(runs)}")
    return workdir.load_config(run_dir)


def _checked_params(manager: ocp.CheckpointManager, epoch: int, abstract, run_dir: str, config) -> dict:
    """The params of `epoch`, once its config agrees with config.json and its state with its digest."""
    where, config_path = _where(manager, epoch), os.path.join(run_dir, workdir.CONFIG_FILE)
    try:
        run = read_run_item(manager, epoch)
        differences = workdir.training_differences(run["config"], config) if "config" in run else ""
        if differences:
            raise WorkdirError(
                f"{config_path} and the checkpoint {where} disagree ({differences}); "
                "config.json no longer describes the run that wrote the checkpoint"
            )
        state = _restore_state(manager, epoch, abstract)
    except WorkdirError:
        raise
    except Exception as e:  # orbax raises many types for missing or damaged files
        # Orbax's own account of a tree mismatch lists every key: the model named says it in one line.
        mismatch = isinstance(e, ValueError) and ("mismatch" in str(e) or "do not match" in str(e))
        model = f"its arrays are not those of the {config.model.name} model {config_path} describes"
        raise WorkdirError(
            f"the checkpoint {where} cannot be restored ({model if mismatch else _first_words(e)})"
        ) from e
    try:
        verify_state(state, run, where)
    except CheckpointDamaged as e:
        raise WorkdirError(f"{e}; its params cannot be trusted") from e
    return train.eval_variables(state)


def restore(run_dir: str, epoch: int | None = None) -> Restored:
    """The params a run's summary describes, with its config, an eval-mode apply function and the epochs.

    By default each seed's params are those summary.json reports on: with
    train.keep_best, each seed's best epoch ("evaluated_epochs"); otherwise the
    last. `epoch=E` loads that kept epoch for every seed instead. Each epoch
    loaded is verified against its digest and config.json (WorkdirError if not).

    >>> config, params, apply_fn, epochs = advjax.restore("runs/bp_adv")
    >>> logits = jax.jit(apply_fn)(params, images)  # float32 [B, H, W, C] in [0, 1], the data's shape
    """
    config = _load_run_config(run_dir)
    model = models.build_model(config.model, data.dataset_info(config.data))
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
        by_epoch = {e: _checked_params(manager, e, abstract, run_dir, config) for e in sorted(set(epochs))}
    return Restored(
        config, seeds.pick_per_seed(by_epoch, epochs, config.num_seeds), models.eval_apply(model.apply), epochs
    )


def newest_run_item(run_dir: str) -> dict | None:
    """The `run` item ("epoch", "config", "records", ...) of the newest checkpoint whose run item restores
    (what recovers a lost config.json); None without checkpoints.

    >>> config = ml_collections.ConfigDict(newest_run_item("runs/bp_adv")["config"])
    """
    if not os.path.isdir(checkpoint_dir(run_dir)):
        return None
    with open_manager(run_dir) as manager:
        for epoch in reversed(saved_epochs(manager)):
            try:
                return read_run_item(manager, epoch)
            except Exception:  # a damaged run item: an older checkpoint's may still read
                continue
    return None
