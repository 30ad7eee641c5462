"""One experiment end to end: config -> data -> train -> evaluate -> files in the workdir.

`config.num_seeds = K` trains K independently seeded models (seeds
`config.seed + i`) in one vmapped computation: init, shuffling, dropout and
noise all differ, and model i equals a K=1 run with seed `config.seed + i`.

A run never loses more than an epoch: the train state is checkpointed after
every epoch, and a relaunch on the same workdir with the same config resumes
from the last complete one. Everything random derives from the seed, the epoch
and the optimizer step, so the resumed run ends exactly where an uninterrupted
one would. Wall-clock times go to timings.json, never to metrics.jsonl or
summary.json, so those two are byte-identical across runs of one config.
"""

import json
import os
import shutil
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from advjax import checkpoint, data, evaluate, loops, models, report, robustness, sharding, train, validation

METRICS_FILE = "metrics.jsonl"
TIMINGS_FILE = "timings.json"
SUMMARY_FILE = "summary.json"
# Everything a run writes besides config.json. The summary comes first: it is
# the one file trusted on sight (paper.py reuses a run by it), so clearing a
# run removes it before anything it summarizes.
RUN_OUTPUTS = (SUMMARY_FILE, checkpoint.CHECKPOINT_DIR, METRICS_FILE, TIMINGS_FILE)


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN or infinite."""


def prepare_workdir(workdir: str) -> None:
    """Creates the workdir and proves it is writable before any work is done."""
    try:
        os.makedirs(workdir, exist_ok=True)
        report.write_text(os.path.join(workdir, ".write_test"), "")
        os.remove(os.path.join(workdir, ".write_test"))
    except OSError as e:
        raise OSError(f"workdir {workdir!r} is not writable: {e.strerror or e}") from e


def _holds_something(path: str) -> bool:
    """A file, or a directory that is not empty (orbax creates checkpoints/ before the first save)."""
    if os.path.isdir(path):
        return bool(os.listdir(path))
    return os.path.lexists(path)


def check_workdir(workdir: str, config: ml_collections.ConfigDict, overwrite: bool) -> None:
    """Refuses a workdir holding a run of another config, unless `overwrite`; changes nothing.

    The same config resumes. Outputs without a readable config.json are
    refused too: nothing says which config wrote them. A config.json alone
    (a run stopped before its first epoch ended) holds nothing to lose.
    """
    outputs = [name for name in RUN_OUTPUTS if _holds_something(os.path.join(workdir, name))]
    if overwrite or not outputs:
        return
    saved = checkpoint.read_saved_config(workdir)
    if saved is None:
        raise checkpoint.WorkdirError(
            f"{workdir} holds {', '.join(outputs)} but no {checkpoint.CONFIG_FILE}, so the config that wrote "
            "them is unknown; use another --workdir, or relaunch with --overwrite to discard them"
        )
    # Evaluation settings may change: the trained model is kept and evaluated anew.
    differences = checkpoint.describe_differences(checkpoint.training_part(saved), checkpoint.training_part(checkpoint.config_as_json(config)))
    if differences:
        raise checkpoint.WorkdirError(
            f"{workdir} holds a run of a different config ({differences}); "
            "use another --workdir, or relaunch with --overwrite to discard that run"
        )


def clear_run(workdir: str) -> None:
    """Deletes a previous run's outputs and config, so nothing stale is resumed or reused."""
    for name in (*RUN_OUTPUTS, checkpoint.CONFIG_FILE):
        path = os.path.join(workdir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


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
    report.write_json(os.path.join(workdir, TIMINGS_FILE), timings)


def add_timing(workdir: str, name: str, value) -> None:
    """Adds one entry to timings.json (wall-clock facts stay out of the deterministic outputs)."""
    path = os.path.join(workdir, TIMINGS_FILE)
    try:
        with open(path) as f:
            timings = json.load(f)
    except (OSError, ValueError):
        timings = {}
    timings[name] = value
    report.write_json(path, timings)


def seed_keys(seed: int, num_seeds: int) -> tuple[jax.Array, ...]:
    """(init, shuffle, step, eval) keys; each with a leading seed axis when num_seeds > 1."""
    if num_seeds == 1:
        return tuple(jax.random.split(jax.random.key(seed), 4))
    keys = jax.vmap(lambda s: jax.random.split(jax.random.key(s), 4))(jnp.arange(seed, seed + num_seeds))
    return tuple(keys[:, i] for i in range(4))


def eval_sets(mnist: data.MNIST, eval_config: ml_collections.ConfigDict) -> dict[str, evaluate.EvalSet]:
    """The paper's evaluation subsets (Tables 2-4: 5000 train, 5000 validation) and the test set."""
    sizes = {"train": eval_config.num_train, "validation": eval_config.num_validation, "test": eval_config.num_test}
    return {
        split: evaluate.make_eval_set(getattr(mnist, split).images, getattr(mnist, split).labels, n, eval_config.batch_size)
        for split, n in sizes.items()
    }


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


def _make_sweep(model, config: ml_collections.ConfigDict, perturbation: str, mesh=None) -> Callable:
    return evaluate.make_sweep(
        model.apply, perturbation, use_predicted_labels=config.eval.use_predicted_labels, form=config.eval.loop,
        chunk_size=config.eval.chunk_size, num_seeds=config.num_seeds, grid_chunk=config.eval.grid_chunk, mesh=mesh,
    )


def sweep_results(model, config, params, eval_set: evaluate.EvalSet, key: jax.Array, mesh=None) -> dict:
    """Accuracy against each configured grid (eval.sigma_grid, eval.eps_grid)."""
    grids = {"gaussian": config.eval.sigma_grid, "fgsm": config.eval.eps_grid}
    out = {}
    for name, grid in grids.items():
        if grid:
            accuracy = _make_sweep(model, config, name, mesh)(params, eval_set, key, grid)  # [seeds?, grid]
            out[name] = {"grid": list(grid), **robustness.seed_summary(accuracy, config.num_seeds)}
    return out


def eps_table(model, config, params, sets: dict, keys: dict, mesh=None) -> dict:
    """FGSM and matched-Gaussian accuracy at each eval.table_eps on the train and validation subsets.

    Computed as sweeps over the eps list: one input gradient per image serves every eps.
    """
    eps_list = tuple(config.eval.table_eps)
    if not eps_list:
        return {}
    names = ("fgsm", "matched_gaussian")
    accuracy = {
        (name, split): np.atleast_2d(_make_sweep(model, config, name, mesh)(params, sets[split], keys[split], eps_list))
        for name in names
        for split in ("train", "validation")
    }
    return {
        str(eps): {
            split: {
                "accuracy": {n: float(accuracy[n, split][:, i].mean()) for n in names},
                "accuracy_std": {n: float(accuracy[n, split][:, i].std()) for n in names},
                "accuracy_per_seed": {n: accuracy[n, split][:, i].tolist() for n in names},
            }
            for split in ("train", "validation")
        }
        for i, eps in enumerate(eps_list)
    }


class Fitted(NamedTuple):
    state: train.TrainState
    records: list[dict]  # metrics.jsonl: one deterministic record per epoch
    timings: list[dict]  # wall-clock seconds per epoch (those of an earlier launch for resumed epochs)


def fit(
    config: ml_collections.ConfigDict, model, mnist: data.MNIST, workdir: str, log: Callable[[str], None]
) -> Fitted:
    """Trains for config.train.epochs, resuming after the last epoch checkpointed in `workdir`.

    After every epoch: the checkpoint (state, config and records so far), then
    metrics.jsonl and timings.json. The workdir must hold no run of another
    config (see check_workdir). When every epoch is checkpointed already, this
    only restores the final state.
    """
    k = config.num_seeds
    mesh = sharding.data_mesh_for(config.num_devices)
    place = lambda tree: tree if mesh is None else sharding.replicate(tree, mesh)
    init_rng, shuffle_rng, step_rng, eval_rng = seed_keys(config.seed, k)
    step_rng, eval_rng = place((step_rng, eval_rng))
    num_train = config.train.max_examples or len(mnist.train.labels)
    # Placed before restoring: a restore takes the template's placement.
    state = place(train.create_states(init_rng, model, config.train, num_train // config.train.batch_size, k))
    # uint8 on the device (4x less memory and transfer than float), replicated on a mesh.
    images, labels = place((mnist.train.images[:num_train], mnist.train.labels[:num_train]))
    if mesh is None:
        images, labels = jax.device_put((images, labels))
    objective = train.make_objective(
        model.apply, config.train, deterministic=models.is_deterministic(config.model),
        steps_per_epoch=num_train // config.train.batch_size,
    )
    run_epoch = train.make_epoch_fn(
        objective, num_train, config.train.batch_size,
        form=config.train.loop, chunk_size=config.train.chunk_size, num_seeds=k, mesh=mesh,
        convolutional=models.has_convolutions(config.model),
    )
    permutation = loops.map_over_seeds(lambda rng, epoch: train.epoch_permutation(rng, epoch, num_train), k)
    # Progress is measured on the whole validation split; the paper's tables use subsets.
    progress_set = place_eval_set(evaluate.make_eval_set(
        mnist.validation.images, mnist.validation.labels, len(mnist.validation.labels), config.eval.batch_size
    ), mesh)
    clean_accuracy = evaluate.make_evaluator(
        model.apply, ("clean",), form=config.eval.loop, chunk_size=config.eval.chunk_size, num_seeds=k, mesh=mesh
    )
    overfitting_check = make_overfitting_check(config, model, mnist)
    records, timings = [], []
    keep_best = config.train.get("keep_best", False)
    with checkpoint.open_manager(workdir, keep=config.train.checkpoints_to_keep, best_of_seeds=k if keep_best else 0) as manager:
        # The fresh state is the template to restore into: structure, optimizer, shapes and placement.
        resumed = checkpoint.restore_latest(manager, state, config, log)
        if resumed is not None:
            state, records = resumed.state, resumed.records
            timings = read_epoch_timings(workdir, resumed.epoch)
            log(resume_message(resumed.epoch, config.train.epochs, manager.directory))
            # Rewritten from the checkpoint: drops records of epochs after it, restores any missing.
            report.write_jsonl(os.path.join(workdir, METRICS_FILE), records)
            write_timings(workdir, timings)
        for epoch in range(len(records) + 1, config.train.epochs + 1):
            start = time.perf_counter()
            epochs = jnp.full(() if k == 1 else (k,), epoch)
            state, totals = run_epoch(
                state, place(train.EpochTotals.zeros(k)), images, labels, place(permutation(shuffle_rng, epochs)), step_rng
            )
            totals = jax.device_get(totals)  # the epoch's only host sync
            seconds = time.perf_counter() - start
            check_finite(totals, epoch, run_epoch.num_steps, config)
            records.append(epoch_record(epoch, totals, run_epoch.num_steps, clean_accuracy(state.params, progress_set, eval_rng)))
            if overfitting_check is not None:
                records[-1]["robust_check"] = overfitting_check(state.params, eval_rng)
                warn_if_overfitting(records, log)
            timings.append(epoch_timing(epoch, totals, seconds))
            # The checkpoint first: a run killed between these writes resumes from it and rewrites the files.
            check = pgd_check_per_seed(records[-1], k) if keep_best else None
            checkpoint.save_epoch(manager, epoch, state, config, records, check)
            report.write_jsonl(os.path.join(workdir, METRICS_FILE), records)
            write_timings(workdir, timings)
            r, t = records[-1], timings[-1]
            log(
                f"epoch {epoch}/{config.train.epochs}  {seconds:6.1f}s  loss {r['train_loss']:.4f}  "
                f"train acc {r['train_accuracy']:.4f}  val acc {r['validation_accuracy']:.4f}  ({t['examples_per_second']:.0f} ex/s)"
            )
    return Fitted(state, records, timings)


def pgd_check_per_seed(record: dict, num_seeds: int) -> list[float]:
    pgd = record["robust_check"]["pgd"]
    return [float(pgd)] if num_seeds == 1 else [float(v) for v in pgd]


def best_epochs(records: list[dict], num_seeds: int) -> list[int]:
    """Per seed, the epoch of highest held-out PGD accuracy, the latest of ties (as the checkpoint manager keeps)."""
    checks = np.array([pgd_check_per_seed(r, num_seeds) for r in records])
    return [int(len(records) - np.argmax(checks[::-1, seed])) for seed in range(num_seeds)]


def restore_best_params(workdir: str, last: train.TrainState, config: ml_collections.ConfigDict, records: list[dict]):
    """(params, epochs): each seed's params from its best epoch (best_epochs), stacked as in training.
    `last` is the final state: its params when every best epoch is the last, else the template to restore into.

    Wong et al.'s early stopping: one-step training can lose its robustness
    within an epoch, and the held-out PGD check sees it.
    """
    epochs = best_epochs(records, config.num_seeds)
    if all(e == len(records) for e in epochs):
        return last.params, epochs
    distinct = sorted(set(epochs))
    with checkpoint.open_manager(workdir) as manager:
        restored = [checkpoint.restore_epoch(manager, e, last, config).state.params for e in distinct]
    if config.num_seeds == 1:
        return restored[0], epochs
    pick = lambda *per_epoch: jnp.stack([per_epoch[distinct.index(e)][seed] for seed, e in enumerate(epochs)])
    return jax.tree.map(pick, *restored), epochs


def place_eval_set(eval_set: evaluate.EvalSet, mesh) -> evaluate.EvalSet:
    return eval_set if mesh is None else evaluate.shard_eval_set(eval_set, mesh)


def make_overfitting_check(config: ml_collections.ConfigDict, model, mnist: data.MNIST) -> Callable | None:
    """For adversarial training: FGSM and PGD accuracy at train.eps on held-out validation images
    (train.overfitting_check_examples, or the whole split if smaller), each epoch.

    FGSM training can overfit catastrophically: FGSM accuracy climbs while PGD
    accuracy collapses (DESIGN.md pitfall 6). None when the mode trains on no
    attack or the check is off (train.overfitting_check_examples = 0).
    """
    n = min(config.train.overfitting_check_examples, len(mnist.validation.labels))
    if config.train.mode not in train.ADVERSARIAL_MODES or n == 0:
        return None
    # The last n validation images: the paper's tables use the first 5000.
    held_out = evaluate.make_eval_set(mnist.validation.images[-n:], mnist.validation.labels[-n:], n, min(n, config.eval.batch_size))
    check = robustness.make_overfitting_check(
        model.apply, config.train.eps, config.train.overfitting_check_steps, form=config.eval.loop, num_seeds=config.num_seeds,
    )
    return lambda params, key: check(params, held_out, key)


def warn_if_overfitting(records: list[dict], log: Callable[[str], None]) -> None:
    """Logs, in the epoch it happens, a collapse of PGD accuracy or a gap that says the gradient is masked."""
    fgsm = [r["robust_check"]["fgsm"] for r in records]
    pgd = [r["robust_check"]["pgd"] for r in records]
    epoch, now = len(records), f"PGD accuracy {np.mean(pgd[-1]):.3f}, FGSM {np.mean(fgsm[-1]):.3f} on held-out images"
    if robustness.catastrophic_overfitting_epoch(pgd) == epoch:
        log(f"WARNING: catastrophic overfitting in epoch {epoch}: {now}; FGSM accuracy no longer measures robustness")
    elif epoch in robustness.gradient_masking_epochs(fgsm, pgd):
        log(f"WARNING: signs of gradient masking in epoch {epoch}: {now}; FGSM accuracy does not measure robustness")


def overfitting_summary(records: list[dict]) -> dict | None:
    """The per-epoch robustness checks and the first epoch each warning sign appeared (None: never)."""
    if not records or "robust_check" not in records[0]:
        return None
    fgsm = [r["robust_check"]["fgsm"] for r in records]
    pgd = [r["robust_check"]["pgd"] for r in records]
    return {
        "epoch": robustness.catastrophic_overfitting_epoch(pgd),
        "gradient_masking_epochs": robustness.gradient_masking_epochs(fgsm, pgd),
        "pgd_accuracy_by_epoch": pgd,
        "fgsm_accuracy_by_epoch": fgsm,
        "rule": (
            f"catastrophic overfitting: PGD accuracy more than {robustness.OVERFITTING_DROP} below its best in an "
            f"earlier epoch; gradient masking: FGSM accuracy more than {robustness.MASKING_GAP} above PGD accuracy"
        ),
    }


def resume_message(epoch: int, epochs: int, directory: str | os.PathLike) -> str:
    if epoch == epochs:
        return f"resumed: all {epochs} epochs are checkpointed in {directory}; skipping training"
    return f"resumed after epoch {epoch}/{epochs} from the checkpoint in {directory}"


def evaluate_trained(config: ml_collections.ConfigDict, model, params, mnist: data.MNIST, mesh=None) -> dict:
    """Every split under every perturbation, the sweeps, the eps table and, when
    config.robust.enabled, the robustness report: the summary's results."""
    k = config.num_seeds
    place = lambda tree: tree if mesh is None else sharding.replicate(tree, mesh)
    eval_rng = seed_keys(config.seed, k)[3]
    sets = {split: place_eval_set(s, mesh) for split, s in eval_sets(mnist, config.eval).items()}
    full = evaluate.make_evaluator(
        model.apply, use_predicted_labels=config.eval.use_predicted_labels, form=config.eval.loop,
        chunk_size=config.eval.chunk_size, num_seeds=k, mesh=mesh,
    )
    keys = {split: place(loops.map_over_seeds(lambda key: jax.random.fold_in(key, i), k)(eval_rng)) for i, split in enumerate(sets)}
    results = {split: full(params, s, keys[split], config.eval.eps, config.eval.sigma) for split, s in sets.items()}
    sweep_split = config.eval.sweep_split
    out = {
        "eval_sizes": {split: s.num_examples for split, s in sets.items()},
        **{field: {split: r[field] for split, r in results.items()} for field in next(iter(results.values()))},
        "sweeps": {"split": sweep_split, **sweep_results(model, config, params, sets[sweep_split], keys[sweep_split], mesh)},
        "by_eps": eps_table(model, config, params, sets, keys, mesh),
    }
    if config.robust.enabled:
        split = getattr(mnist, config.robust.split)
        robust_set = robustness.robust_eval_set(split.images, split.labels, config.robust)
        robust_key = loops.map_over_seeds(lambda key: jax.random.fold_in(key, len(sets)), k)(eval_rng)
        out["robustness"] = robustness.robustness_report(
            model.apply, jax.device_get(params) if mesh is not None else params, robust_set, robust_key,
            config.robust, config.eval.loop, num_seeds=k,
        )
    return out


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    log: Callable[[str], None] = logging.info,
    overwrite: bool = False,
) -> dict:
    """Trains `config`, evaluates it, writes metrics, checkpoints, timings and summary; returns the summary.

    A workdir holding a run of the same config is resumed (a finished one is
    only evaluated again); one of another config is refused unless
    `overwrite`, which deletes that run first. The config, the workdir and the
    data are all checked before anything in the workdir changes.
    """
    validation.validate(config)
    prepare_workdir(workdir)
    check_workdir(workdir, config, overwrite)
    mnist = data.load_mnist(config.data)
    if overwrite:
        clear_run(workdir)
    checkpoint.save_config(workdir, config)
    log(f"data: {len(mnist.train.labels)} train / {len(mnist.validation.labels)} validation / {len(mnist.test.labels)} test")
    model = models.build_model(config.model)
    state, records, timings = fit(config, model, mnist, workdir, log)
    params, selected = state.params, None
    if config.train.get("keep_best", False):
        params, selected = restore_best_params(workdir, state, config, records)
        log(f"evaluating the epoch{'s' if len(selected) > 1 else ''} of best held-out PGD accuracy: {', '.join(map(str, selected))}")

    log(f"evaluating: FGSM eps={config.eval.eps}, Gaussian sigma={config.eval.sigma}, matched Gaussian, sweeps")
    start = time.perf_counter()
    mesh = sharding.data_mesh_for(config.num_devices)
    results = evaluate_trained(config, model, params, mnist, mesh)
    evaluation_seconds = time.perf_counter() - start
    # Wall-clock seconds go to timings.json; summary.json stays deterministic.
    robust_seconds = results.get("robustness", {}).pop("seconds", None)
    summary = {
        "config": config.to_dict(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "num_seeds": config.num_seeds,
        "attack_labels": "predicted" if config.eval.use_predicted_labels else "true",
        "perturbation_stats_definition": "per-image mean, std, L-inf and L2 of (perturbed - clean) after clipping to [0, 1], averaged over images",
        **sharding.describe(mesh),
        **results,
        "catastrophic_overfitting": overfitting_summary(records),
        # Per seed, the epoch whose params were evaluated (train.keep_best); None: the last.
        "evaluated_epochs": selected,
        "epochs": records,
    }
    write_timings(workdir, timings, evaluation_seconds, robust_seconds)
    # Last: a summary.json whose config matches marks a finished run (paper.py reuses it).
    report.write_json(os.path.join(workdir, SUMMARY_FILE), summary)
    log(f"evaluation took {evaluation_seconds:.1f}s")
    return summary
