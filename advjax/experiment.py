"""One experiment end to end: config -> data -> train -> evaluate -> files in the workdir.

`config.num_seeds = K` trains K independently seeded models (seeds
`config.seed + i`) in one vmapped computation: init, shuffling, dropout and
noise all differ, and model i equals a K=1 run with seed `config.seed + i`.
"""

import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from advjax import checkpoint, data, evaluate, loops, models, report, train, validation

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


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


def epoch_record(epoch: int, totals: train.EpochTotals, num_steps: int, seconds: float, validation: dict) -> dict:
    loss = np.atleast_1d(totals.loss) / num_steps
    accuracy = np.atleast_1d(totals.correct) / np.atleast_1d(totals.examples)
    record = {
        "epoch": epoch,
        "train_loss": float(loss.mean()),
        "train_accuracy": float(accuracy.mean()),
        "validation_accuracy": validation["accuracy"]["clean"],
        "epoch_seconds": seconds,
        "examples_per_second": float(np.sum(totals.examples)) / seconds,
    }
    if len(loss) > 1:
        record["train_loss_per_seed"] = loss.tolist()
        record["validation_accuracy_per_seed"] = validation["accuracy_per_seed"]["clean"]
    return record


def _make_sweep(model, config: ml_collections.ConfigDict, perturbation: str) -> Callable:
    return evaluate.make_sweep(
        model.apply, perturbation, use_predicted_labels=config.eval.use_predicted_labels, form=config.train.loop,
        chunk_size=config.eval.chunk_size, num_seeds=config.num_seeds, grid_chunk=config.eval.grid_chunk,
    )


def sweep_results(model, config, params, eval_set: evaluate.EvalSet, key: jax.Array) -> dict:
    """Accuracy against each configured grid (eval.sigma_grid, eval.eps_grid)."""
    grids = {"gaussian": config.eval.sigma_grid, "fgsm": config.eval.eps_grid}
    out = {}
    for name, grid in grids.items():
        if grid:
            accuracy = np.atleast_2d(_make_sweep(model, config, name)(params, eval_set, key, grid))  # [seeds, grid]
            out[name] = {
                "grid": list(grid),
                "accuracy": accuracy.mean(axis=0).tolist(),
                "accuracy_std": accuracy.std(axis=0).tolist(),
                "accuracy_per_seed": accuracy.tolist(),
            }
    return out


def eps_table(model, config, params, sets: dict, keys: dict) -> dict:
    """FGSM and matched-Gaussian accuracy at each eval.table_eps on the train and validation subsets.

    Computed as sweeps over the eps list: one input gradient per image serves every eps.
    """
    eps_list = tuple(config.eval.table_eps)
    if not eps_list:
        return {}
    names = ("fgsm", "matched_gaussian")
    accuracy = {
        (name, split): np.atleast_2d(_make_sweep(model, config, name)(params, sets[split], keys[split], eps_list))
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


def fit(
    config: ml_collections.ConfigDict, model, mnist: data.MNIST, workdir: str, log: Callable[[str], None]
) -> tuple[train.TrainState, list[dict]]:
    """Trains for config.train.epochs, writing metrics.jsonl after every epoch."""
    k = config.num_seeds
    init_rng, shuffle_rng, step_rng, eval_rng = seed_keys(config.seed, k)
    num_train = config.train.max_examples or len(mnist.train.labels)
    state = train.create_states(init_rng, model, config.train, num_train // config.train.batch_size, k)
    images = jax.device_put(mnist.train.images[:num_train])  # uint8 on the device: 4x less memory and transfer
    labels = jax.device_put(mnist.train.labels[:num_train])
    run_epoch = train.make_epoch_fn(
        train.make_objective(model.apply, config.train), num_train, config.train.batch_size,
        form=config.train.loop, chunk_size=config.train.chunk_size, num_seeds=k,
    )
    permutation = loops.map_over_seeds(lambda rng, epoch: train.epoch_permutation(rng, epoch, num_train), k)
    # Progress is measured on the whole validation split; the paper's tables use subsets.
    progress_set = evaluate.make_eval_set(
        mnist.validation.images, mnist.validation.labels, len(mnist.validation.labels), config.eval.batch_size
    )
    clean_accuracy = evaluate.make_evaluator(
        model.apply, ("clean",), form=config.train.loop, chunk_size=config.eval.chunk_size, num_seeds=k
    )
    records = []
    for epoch in range(1, config.train.epochs + 1):
        start = time.perf_counter()
        epochs = jnp.full(() if k == 1 else (k,), epoch)
        state, totals = run_epoch(state, train.EpochTotals.zeros(k), images, labels, permutation(shuffle_rng, epochs), step_rng)
        totals = jax.device_get(totals)  # the epoch's only host sync
        seconds = time.perf_counter() - start
        if not np.all(np.isfinite(totals.loss)):
            raise TrainingDiverged(f"training loss is {totals.loss} in epoch {epoch}; lower train.learning_rate")
        records.append(epoch_record(epoch, totals, run_epoch.num_steps, seconds, clean_accuracy(state.params, progress_set, eval_rng)))
        report.write_jsonl(os.path.join(workdir, METRICS_FILE), records)
        r = records[-1]
        log(
            f"epoch {epoch}/{config.train.epochs}  {seconds:6.1f}s  loss {r['train_loss']:.4f}  "
            f"train acc {r['train_accuracy']:.4f}  val acc {r['validation_accuracy']:.4f}  ({r['examples_per_second']:.0f} ex/s)"
        )
    return state, records


def evaluate_trained(config: ml_collections.ConfigDict, model, params, mnist: data.MNIST) -> dict:
    """Every split under every perturbation, the sweeps and the eps table: the summary's results."""
    k = config.num_seeds
    eval_rng = seed_keys(config.seed, k)[3]
    sets = eval_sets(mnist, config.eval)
    full = evaluate.make_evaluator(
        model.apply, use_predicted_labels=config.eval.use_predicted_labels, form=config.train.loop,
        chunk_size=config.eval.chunk_size, num_seeds=k,
    )
    keys = {split: loops.map_over_seeds(lambda key: jax.random.fold_in(key, i), k)(eval_rng) for i, split in enumerate(sets)}
    results = {split: full(params, s, keys[split], config.eval.eps, config.eval.sigma) for split, s in sets.items()}
    sweep_split = config.eval.sweep_split
    return {
        "eval_sizes": {split: s.num_examples for split, s in sets.items()},
        **{field: {split: r[field] for split, r in results.items()} for field in next(iter(results.values()))},
        "sweeps": {"split": sweep_split, **sweep_results(model, config, params, sets[sweep_split], keys[sweep_split])},
        "by_eps": eps_table(model, config, params, sets, keys),
    }


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, log: Callable[[str], None] = logging.info
) -> dict:
    """Trains `config`, evaluates it, writes metrics, checkpoint and summary; returns the summary."""
    validation.validate(config)
    prepare_workdir(workdir)
    checkpoint.save_config(workdir, config)
    mnist = data.load_mnist(config.data)
    log(f"data: {len(mnist.train.labels)} train / {len(mnist.validation.labels)} validation / {len(mnist.test.labels)} test")
    model = models.build_model(config.model)
    state, records = fit(config, model, mnist, workdir, log)
    checkpoint.save(workdir, state)

    log(f"evaluating: FGSM eps={config.eval.eps}, Gaussian sigma={config.eval.sigma}, matched Gaussian, sweeps")
    start = time.perf_counter()
    results = evaluate_trained(config, model, state.params, mnist)
    summary = {
        "config": config.to_dict(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "num_seeds": config.num_seeds,
        "attack_labels": "predicted" if config.eval.use_predicted_labels else "true",
        "perturbation_stats_definition": "per-image mean, std, L-inf and L2 of (perturbed - clean) after clipping to [0, 1], averaged over images",
        **results,
        "epochs": records,
        "evaluation_seconds": time.perf_counter() - start,
    }
    report.write_json(os.path.join(workdir, SUMMARY_FILE), summary)
    log(f"evaluation took {summary['evaluation_seconds']:.1f}s")
    return summary
