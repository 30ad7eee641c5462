"""Fitting a model: the epoch loop with its per-epoch checks, checkpoints and records, resume, and keep-best.

A run never loses more than an epoch: the train state is checkpointed after
every epoch, and a relaunch on the same workdir with the same config resumes
from the last complete one. Everything random derives from the seed, the epoch
and the optimizer step, so the resumed run ends exactly where an uninterrupted
one would.
"""

import threading
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from advjax import (
    checkpoint,
    data,
    evaluate,
    loops,
    models,
    objectives,
    overfitting,
    seeds,
    sharding,
    train,
    workdir,
)
from advjax.eval_fold import make_eval_set, shard_eval_set


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN or infinite."""


class Fitted(NamedTuple):
    state: train.TrainState
    records: list[dict]  # metrics.jsonl: one deterministic record per epoch
    timings: list[dict]  # wall-clock seconds per epoch (those of an earlier launch for resumed epochs)


class _Epochs(NamedTuple):
    """Everything the epoch loop needs, built once per fit."""

    run: Callable  # train.make_epoch_fn
    permutation: Callable  # (shuffle key, epoch) -> the epoch's order
    data: tuple  # (images uint8, labels) on the device
    keys: tuple  # (shuffle, step, eval) keys
    progress: Callable  # params -> clean accuracy on the whole validation split
    overfitting_check: Callable | None  # params -> the held-out FGSM and PGD (or APGD-CE) accuracy
    place: Callable
    compile_checks: Callable  # params -> None: compiles the per-epoch checks without running them


def _build(config: ml_collections.ConfigDict, model, mnist: data.MNIST, mesh: Mesh | None):
    """(the initial state, _Epochs): the state placed before any restore, which takes the template's placement."""
    k, place, apply_fn = config.num_seeds, sharding.placer(mesh), models.eval_apply(model.apply)
    init_rng, shuffle_rng, step_rng, eval_rng = seeds.seed_keys(config.seed, k)
    step_rng, eval_rng = place((step_rng, eval_rng))
    num_train = config.train.max_examples or len(mnist.train.labels)
    steps_per_epoch = num_train // config.train.batch_size
    state = place(train.create_states(init_rng, model, config.train, steps_per_epoch, k))
    # uint8 on the device (4x less memory and transfer than float), replicated on a mesh.
    images, labels = place((mnist.train.images[:num_train], mnist.train.labels[:num_train]))
    if mesh is None:
        images, labels = jax.device_put((images, labels))
    objective = objectives.make_objective(
        model.apply, config.train, deterministic=models.is_deterministic(config.model), steps_per_epoch=steps_per_epoch
    )
    run_epoch = train.make_epoch_fn(
        objective,
        num_train,
        config.train.batch_size,
        form=config.train.loop,
        chunk_size=config.train.chunk_size,
        num_seeds=k,
        mesh=mesh,
        convolutional=models.has_convolutions(config.model),
        augmentation=config.train.augment,
    )
    # Progress is measured on the whole validation split; the paper's tables use subsets.
    validation = mnist.validation
    progress_set = shard_eval_set(
        make_eval_set(validation.images, validation.labels, len(validation.labels), config.eval.batch_size), mesh
    )
    clean = evaluate.make_evaluator(
        apply_fn, ("clean",), form=config.eval.loop, chunk_size=config.eval.chunk_size, num_seeds=k, mesh=mesh
    )
    check = overfitting.make_configured_check(config, apply_fn, validation)

    def epoch_permutation(rng, epoch):
        return train.epoch_permutation(rng, epoch, num_train)

    def compile_checks(params) -> None:
        clean.compile_ahead(params, progress_set, eval_rng)
        if check is not None:
            check.compile_ahead(params, eval_rng)

    return state, _Epochs(
        run=run_epoch,
        permutation=loops.jit_once(seeds.map_over_seeds(epoch_permutation, k)),  # vmap keeps the name
        data=(images, labels),
        keys=(shuffle_rng, step_rng, eval_rng),
        progress=lambda params: clean(params, progress_set, eval_rng),
        overfitting_check=None if check is None else (lambda params: check(params, eval_rng)),
        place=place,
        compile_checks=compile_checks,
    )


def epoch_record(epoch: int, totals: train.EpochTotals, num_steps: int, validation: dict) -> dict:
    """An epoch's metrics: deterministic, so no wall-clock time (see epoch_timing)."""
    loss = np.atleast_1d(totals.loss) / num_steps
    accuracy = np.atleast_1d(totals.correct) / np.atleast_1d(totals.examples)
    record = {
        "epoch": epoch,
        "train_loss": float(loss.mean()),
        "train_accuracy": float(accuracy.mean()),
        "validation_accuracy": validation["accuracy"]["clean"],
    }
    if len(loss) > 1:
        record["train_loss_per_seed"] = loss.tolist()
        record["validation_accuracy_per_seed"] = validation["accuracy_per_seed"]["clean"]
    return record


def epoch_timing(epoch: int, totals: train.EpochTotals, seconds: float) -> dict:
    return {"epoch": epoch, "epoch_seconds": seconds, "examples_per_second": float(np.sum(totals.examples)) / seconds}


def check_finite(totals: train.EpochTotals, epoch: int, num_steps: int, config: ml_collections.ConfigDict) -> None:
    """Raises TrainingDiverged naming the epoch, the step and (with several seeds) the seed."""
    first = np.atleast_1d(totals.first_nonfinite_step)
    diverged = np.flatnonzero(first != train.EpochTotals.NO_STEP)
    hint = f"lower train.learning_rate (now {config.train.learning_rate})"
    if diverged.size:
        seed_index = int(diverged[np.argmin(first[diverged])])
        step = int(first[seed_index])
        seed = f" of seed {config.seed + seed_index}" if len(first) > 1 else ""
        raise TrainingDiverged(
            f"the training loss{seed} became non-finite in epoch {epoch} at step {step} "
            f"(step {step - (epoch - 1) * num_steps} of the epoch's {num_steps}); {hint}"
        )
    if not np.all(np.isfinite(totals.loss)):  # every step finite, yet their sum overflowed
        raise TrainingDiverged(f"the summed training loss of epoch {epoch} is {totals.loss}; {hint}")


def resume_message(epoch: int, epochs: int, directory: str) -> str:
    if epoch == epochs:
        return f"resumed: all {epochs} epochs are checkpointed in {directory}; skipping training"
    return f"resumed after epoch {epoch}/{epochs} from the checkpoint in {directory}"


def _train_epoch(config: ml_collections.ConfigDict, loop: _Epochs, state, epoch: int):
    """One epoch and its checks: (state, its metrics record, its timing)."""
    k, (shuffle_rng, step_rng, _) = config.num_seeds, loop.keys
    start = time.perf_counter()
    epochs = np.full(seeds.seed_shape(k), epoch, np.int32)
    totals = loop.place(train.EpochTotals.zeros(k))
    state, totals = loop.run(state, totals, *loop.data, loop.place(loop.permutation(shuffle_rng, epochs)), step_rng)
    totals = jax.device_get(totals)  # the epoch's only host sync
    seconds = time.perf_counter() - start
    check_finite(totals, epoch, loop.run.num_steps, config)
    record = epoch_record(epoch, totals, loop.run.num_steps, loop.progress(train.eval_variables(state)))
    return state, record, epoch_timing(epoch, totals, seconds)


def _in_background(compile_checks: Callable, params, compile_ahead: Callable | None) -> None:
    """Runs the compilations in a daemon thread: XLA releases the GIL while it compiles (docs/design.md,
    "Counting executables"). An error there is dropped, not lost: the main thread compiles the same
    programs on first use and raises it there, with its own traceback."""

    def run() -> None:
        try:
            compile_checks(params)
            if compile_ahead is not None:
                compile_ahead(params)
        except Exception:  # noqa: BLE001 -- raised again by the main thread's own compilation
            pass

    threading.Thread(target=run, daemon=True).start()


def fit(
    config: ml_collections.ConfigDict,
    model,
    mnist: data.MNIST,
    run_dir: str,
    log: Callable[[str], None],
    mesh: Mesh | None = None,
    data_identity: dict | None = None,
    compile_ahead: Callable | None = None,
) -> Fitted:
    """Trains for config.train.epochs, resuming after the last epoch checkpointed in `run_dir`.

    After every epoch: the checkpoint (state, config and records so far), then
    metrics.jsonl and timings.json. The workdir must hold no run of another
    config (workdir.check). When every epoch is checkpointed already, this
    only restores the final state. Each checkpoint also records `data_identity`.
    While epochs remain, a thread compiles the per-epoch checks and then `compile_ahead(params shapes)`
    (the evaluation after training) as the first epoch runs.
    """
    state, loop = _build(config, model, mnist, mesh)
    records, timings, keep_best = [], [], config.train.keep_best
    keep = config.train.checkpoints_to_keep
    with checkpoint.open_manager(run_dir, keep=keep, best_of_seeds=config.num_seeds if keep_best else 0) as manager:
        # The fresh state is the template to restore into: structure, optimizer, shapes and placement.
        resumed = checkpoint.restore_latest(manager, state, config, log)
        if resumed is not None:
            state, records = resumed.state, resumed.records
            timings = workdir.read_epoch_timings(run_dir, resumed.epoch)
            log(resume_message(resumed.epoch, config.train.epochs, str(manager.directory)))
            # Rewritten from the checkpoint: drops records of epochs after it, restores any missing.
            workdir.write_metrics(run_dir, records)
            workdir.write_timings(run_dir, timings)
        if len(records) < config.train.epochs:  # the checks compile on another core while epoch 1 trains
            # Shapes only: the epoch donates the state's buffers while the thread may still be lowering.
            _in_background(loop.compile_checks, jax.eval_shape(train.eval_variables, state), compile_ahead)
        for epoch in range(len(records) + 1, config.train.epochs + 1):
            state, record, timing = _train_epoch(config, loop, state, epoch)
            records.append(record)
            if loop.overfitting_check is not None:
                record["overfitting_check"] = loop.overfitting_check(train.eval_variables(state))
                overfitting.warn_if_overfitting(records, log)
            timings.append(timing)
            # The checkpoint first: a run killed between these writes resumes from it and rewrites the files.
            check = overfitting.check_per_seed(record, config.num_seeds) if keep_best else None
            checkpoint.save_epoch(manager, epoch, state, config, records, check, data_identity=data_identity)
            workdir.write_metrics(run_dir, records)
            workdir.write_timings(run_dir, timings)
            log(
                f"epoch {epoch}/{config.train.epochs}  {timing['epoch_seconds']:6.1f}s  "
                f"loss {record['train_loss']:.4f}  "
                f"train acc {record['train_accuracy']:.4f}  val acc {record['validation_accuracy']:.4f}  "
                f"({timing['examples_per_second']:.0f} ex/s)"
            )
    return Fitted(state, records, timings)


def restore_best_params(
    run_dir: str, last: train.TrainState, config: ml_collections.ConfigDict, records: list[dict]
) -> tuple[dict, list[int]]:
    """(params, epochs): each seed's params (train.eval_variables: with the batch statistics of a model with
    BatchNorm) from its best epoch (overfitting.best_epochs), stacked as in training.
    `last` is the final state: its params when every best epoch is the last, else the template to restore into.

    Wong et al.'s early stopping: one-step training can lose its robustness
    within an epoch, and the held-out PGD (or APGD-CE) check sees it.
    """
    epochs = overfitting.best_epochs(records, config.num_seeds)
    if all(e == len(records) for e in epochs):
        return train.eval_variables(last), epochs
    with checkpoint.open_manager(run_dir) as manager:
        restored = {e: checkpoint.restore_epoch(manager, e, last, config).state for e in sorted(set(epochs))}
    by_epoch = {e: train.eval_variables(state) for e, state in restored.items()}
    return seeds.pick_per_seed(by_epoch, epochs, config.num_seeds), epochs
