"""Accuracy of a model under perturbations, and accuracy-against-strength sweeps: per-batch
functions on the evaluation fold (advjax.eval_fold).

Each batch is perturbed in every requested way, all perturbed batches go
through the model in one forward pass, and only counts and sums leave the fold.
Accuracy is always against the true labels; the attack itself may use the true
or the model's predicted labels (`use_predicted_labels`; docs/design.md,
"Label leaking").
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from advjax import attacks, noise, seeds
from advjax.eval_fold import EvalSet, make_eval_fold
from advjax.losses import LogitsFn
from advjax.models import ApplyFn
from advjax.norms import clip_to_pixels

PERTURBATIONS = ("clean", "fgsm", "gaussian", "matched_gaussian")
STATISTICS = noise.PerturbationStats._fields


def perturb_batch(
    logits_fn: LogitsFn,
    images: jax.Array,
    attack_labels: jax.Array,
    key: jax.Array,
    eps: jax.Array,
    sigma: jax.Array,
    perturbations: Sequence[str],
) -> dict[str, jax.Array]:
    """Each requested perturbation of one batch of float images.

    >>> perturb_batch(logits_fn, x, y, key, 0.1, 0.3, ("clean", "fgsm"))["fgsm"]
    """
    out = {"clean": images}
    if "fgsm" in perturbations or "matched_gaussian" in perturbations:
        out["fgsm"] = attacks.fgsm(logits_fn, images, attack_labels, eps)
    if "gaussian" in perturbations:
        out["gaussian"] = noise.gaussian(jax.random.fold_in(key, 0), images, sigma)
    if "matched_gaussian" in perturbations:
        out["matched_gaussian"] = noise.matched_gaussian(jax.random.fold_in(key, 1), images, out["fgsm"])
    return {name: out[name] for name in perturbations}


def attack_labels(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, use_predicted_labels: bool) -> jax.Array:
    """The labels an attack climbs away from: the true ones, or the model's own prediction.

    >>> attack_labels(logits_fn, x, y, use_predicted_labels=True)  # the model's own labels
    """
    return attacks.predicted_labels(logits_fn, images) if use_predicted_labels else labels


def _zero_totals(perturbations: Sequence[str], num_seeds: int) -> dict:
    """Host arrays, as every operand a fold is called with: made on the device, each would compile."""
    lead = seeds.seed_shape(num_seeds)
    return {
        "correct": {p: np.zeros(lead, np.int32) for p in perturbations},
        "stats": {p: np.zeros(lead + (len(STATISTICS),), np.float32) for p in perturbations},
    }


def make_evaluator(
    apply_fn: ApplyFn,
    perturbations: Sequence[str] = PERTURBATIONS,
    *,
    use_predicted_labels: bool = False,
    form: str = "auto",
    chunk_size: int = 1,
    num_seeds: int = 1,
    mesh: Mesh | None = None,
) -> Callable:
    """`evaluate(params, eval_set, key, eps, sigma) -> {"accuracy", "perturbation_stats", ...}`.

    `apply_fn(params, images) -> logits` is the model in eval mode (models.eval_apply,
    or any function of that signature). Build it once and use it for every
    split and epoch: `eps` and `sigma` are traced, and splits with the same
    batch size share compiled code. With `num_seeds > 1`, `params` and `key`
    carry a leading seed axis (see `summarize`). With a `mesh`, every batch
    (and its attacks) is split across the `data` axis (eval_fold.make_eval_fold).

    >>> evaluate = make_evaluator(apply_fn)
    >>> evaluate(params, make_eval_set(images, labels, 1000, 500), jax.random.key(0), 0.1, 0.3)["accuracy"]["fgsm"]
    """
    unknown = set(perturbations) - set(PERTURBATIONS)
    if unknown:
        raise ValueError(f"unknown perturbations {sorted(unknown)}; choose from {PERTURBATIONS}")
    perturbations = tuple(perturbations)

    def per_batch(totals, batch, logits_fn, strengths):
        eps, sigma = strengths
        labels = attack_labels(logits_fn, batch.images, batch.labels, use_predicted_labels)
        perturbed = perturb_batch(logits_fn, batch.images, labels, batch.key, eps, sigma, perturbations)
        logits = jnp.split(logits_fn(jnp.concatenate([perturbed[p] for p in perturbations])), len(perturbations))
        correct, stats = dict(totals["correct"]), dict(totals["stats"])
        for name, out in zip(perturbations, logits):
            correct[name] += jnp.sum((jnp.argmax(out, -1) == batch.labels) & batch.mask)
            per_image = jnp.stack(noise.perturbation_stats(batch.images, perturbed[name]), axis=-1)
            stats[name] += jnp.sum(jnp.where(batch.mask[:, None], per_image, 0.0), axis=0)
        return {"correct": correct, "stats": stats}

    run = make_eval_fold(
        per_batch, apply_fn, form=form, chunk_size=chunk_size, num_seeds=num_seeds, mesh=mesh, name="evaluate"
    )

    def evaluate(params, eval_set: EvalSet, key, eps=0.0, sigma=0.0) -> dict:
        strengths = (np.float32(eps), np.float32(sigma))
        totals = run(params, eval_set, key, _zero_totals(perturbations, num_seeds), strengths)
        return summarize(jax.device_get(totals), eval_set.num_examples)

    strengths = (np.float32(0), np.float32(0))
    evaluate.compile_ahead = lambda params, eval_set, key: run.compile_ahead(
        params, eval_set, key, _zero_totals(perturbations, num_seeds), strengths
    )
    return evaluate


def summarize(totals: dict, num_examples: int) -> dict:
    """Counts and sums -> accuracies and mean per-image perturbation statistics (after clipping).

    Totals may carry a leading seed axis. "accuracy" is then the mean over
    seeds, "accuracy_std" the standard deviation (0 for one seed), and
    "accuracy_per_seed" lists every seed's value.

    >>> summarize({"correct": {"clean": 90}, "stats": {"clean": jnp.zeros(4)}}, 100)["accuracy"]  # {'clean': 0.9}
    """
    per_seed = {p: np.atleast_1d(np.asarray(c)) / num_examples for p, c in totals["correct"].items()}
    stats = {
        p: dict(zip(STATISTICS, (np.atleast_2d(np.asarray(sums)) / num_examples).mean(axis=0).tolist()))
        for p, sums in totals["stats"].items()
        if p != "clean"
    }
    return {
        "accuracy": {p: float(a.mean()) for p, a in per_seed.items()},
        "accuracy_std": {p: float(a.std()) for p, a in per_seed.items()},
        "accuracy_per_seed": {p: a.tolist() for p, a in per_seed.items()},
        "perturbation_stats": stats,
    }


SWEEPS = ("gaussian", "fgsm", "matched_gaussian")


def resolve_grid_chunk(grid_chunk: int, grid_length: int, backend: str | None = None) -> int:
    """How many grid points share one batched forward pass; 0 picks by backend.

    Accelerators take the whole grid at once (a plain vmap). XLA:CPU runs the
    points one after another faster than vmapped (bench/README.md), so there 0 means 1.
    """
    if grid_chunk:
        return min(grid_chunk, grid_length)
    return 1 if (backend or jax.default_backend()) == "cpu" else grid_length


def _sweep_perturbation(perturbation: str, logits_fn: LogitsFn, batch, use_predicted_labels: bool) -> Callable:
    """strength -> the batch perturbed at that strength, with everything independent of it computed once."""
    x = batch.images
    if perturbation == "gaussian":
        return lambda sigma: noise.gaussian(batch.key, x, sigma)
    labels = attack_labels(logits_fn, x, batch.labels, use_predicted_labels)
    direction = attacks.fgsm_direction(logits_fn, x, labels)
    fgsm = lambda eps: clip_to_pixels(x + eps * direction)
    if perturbation == "fgsm":
        return fgsm
    return lambda eps: noise.matched_gaussian(batch.key, x, fgsm(eps))


def make_sweep(
    apply_fn: ApplyFn,
    perturbation: str,
    *,
    use_predicted_labels: bool = False,
    form: str = "auto",
    chunk_size: int = 1,
    num_seeds: int = 1,
    grid_chunk: int = 0,
    mesh: Mesh | None = None,
) -> Callable:
    """`sweep(params, eval_set, key, grid) -> accuracy [len(grid)]`, one compiled call.

    With `num_seeds > 1`, `params` and `key` carry a leading seed axis and the
    result is [num_seeds, len(grid)].

    The grid (sigmas for 'gaussian', epsilons for 'fgsm' and for
    'matched_gaussian', noise matched to FGSM at each eps) is mapped inside
    each batch, `grid_chunk` points per vmapped pass (see `resolve_grid_chunk`),
    and batches are folded, so memory holds one batch times the grid chunk,
    never the split times the grid (docs/design.md, "Sweep memory"). A new grid
    of the same length reuses the compiled code. Noise at every grid point uses
    the same per-batch key (common random numbers), so a curve's wiggles are
    the model's, not the sampler's. FGSM's direction does not depend on eps, so
    its gradient is computed once per batch and only the step is mapped over the grid.

    >>> make_sweep(apply_fn, "gaussian")(params, eval_set, jax.random.key(0), (0.0, 0.5, 1.0))  # 3 accuracies
    """
    if perturbation not in SWEEPS:
        raise ValueError(f"cannot sweep {perturbation!r}; choose from {SWEEPS}")

    def per_batch(correct, batch, logits_fn, grid):
        perturb = _sweep_perturbation(perturbation, logits_fn, batch, use_predicted_labels)
        count = lambda value: jnp.sum((jnp.argmax(logits_fn(perturb(value)), -1) == batch.labels) & batch.mask)
        return correct + jax.lax.map(count, grid, batch_size=resolve_grid_chunk(grid_chunk, grid.shape[0]))

    run = make_eval_fold(
        per_batch,
        apply_fn,
        form=form,
        chunk_size=chunk_size,
        num_seeds=num_seeds,
        mesh=mesh,
        name=f"sweep_{perturbation}",
    )

    def fold_args(params, eval_set: EvalSet, key, grid) -> tuple:
        grid = np.asarray(grid, np.float32)
        return run.fold_args(params, eval_set, key, np.zeros(seeds.seed_shape(num_seeds) + grid.shape, np.int32), grid)

    def sweep(params, eval_set: EvalSet, key, grid) -> np.ndarray:
        return np.asarray(run.fold(*fold_args(params, eval_set, key, grid))) / eval_set.num_examples

    # Exposed so tests can inspect the compiled program: sweep.fold(*sweep.fold_args(params, eval_set, key, grid)).
    sweep.fold, sweep.fold_args = run.fold, fold_args
    sweep.compile_ahead = lambda params, eval_set, key, grid: run.fold.compile_ahead(
        *fold_args(params, eval_set, key, grid)
    )
    return sweep
