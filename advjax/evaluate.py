"""Accuracy of a trained model under perturbations, in fixed-size batches.

An evaluation is a compiled fold (advjax.loops) over the batches of one split:
each batch is perturbed in every requested way, all perturbed batches go
through the model in one forward pass, and only counts and sums leave the loop.
Accuracy is always against the true labels; the attack itself may use the true
or the model's predicted labels (`use_predicted_labels`, pitfall 5).
"""

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from advjax import attacks, loops, sharding
from advjax.train import to_float_images

PERTURBATIONS = ("clean", "fgsm", "gaussian", "matched_gaussian")
STATISTICS = attacks.PerturbationStats._fields


class EvalSet(NamedTuple):
    """A split cut to `num_examples` and padded to whole batches, stored batch-major."""

    images: jax.Array  # uint8 [num_batches, batch_size, 28, 28, 1]
    labels: jax.Array  # int32 [num_batches, batch_size]
    mask: jax.Array  # bool [num_batches, batch_size], False on padding
    num_examples: int


def make_eval_set(images: np.ndarray | jax.Array, labels: np.ndarray | jax.Array, num_examples: int, batch_size: int) -> EvalSet:
    """The first `num_examples` of a split, zero-padded to a multiple of `batch_size`."""
    if not 0 < num_examples <= len(labels):
        raise ValueError(f"cannot evaluate on {num_examples} examples of a split of {len(labels)}")
    num_batches = -(-num_examples // batch_size)
    padding = num_batches * batch_size - num_examples

    def batched(a):
        padded = jnp.pad(jnp.asarray(a[:num_examples]), [(0, padding)] + [(0, 0)] * (a.ndim - 1))
        return padded.reshape((num_batches, batch_size) + padded.shape[1:])

    mask = (jnp.arange(num_batches * batch_size) < num_examples).reshape(num_batches, batch_size)
    return EvalSet(batched(images), batched(labels), mask, num_examples)


def shard_eval_set(eval_set: EvalSet, mesh: Mesh) -> EvalSet:
    """The eval set split along its batch dimension across the mesh's `data` axis.

    Sharded rather than replicated: an EvalSet is stored batch-major and never
    shuffled, so each device can hold exactly its share of every batch
    (1/N of the memory) and indexing a batch in the fold moves no data. The
    training images are replicated instead, because a fresh shuffle each
    epoch would make a sharded copy exchange images between devices every step.
    """
    sharding.check_batch_size(eval_set.labels.shape[1], mesh, "eval.batch_size")
    images, labels, mask = sharding.shard_batch_major((eval_set.images, eval_set.labels, eval_set.mask), mesh)
    return eval_set._replace(images=images, labels=labels, mask=mask)


def perturb_batch(
    logits_fn: attacks.LogitsFn,
    images: jax.Array,
    attack_labels: jax.Array,
    key: jax.Array,
    eps: jax.Array,
    sigma: jax.Array,
    perturbations: Sequence[str],
) -> dict[str, jax.Array]:
    """Each requested perturbation of one batch of float images."""
    out = {"clean": images}
    if "fgsm" in perturbations or "matched_gaussian" in perturbations:
        out["fgsm"] = attacks.fgsm(logits_fn, images, attack_labels, eps)
    if "gaussian" in perturbations:
        out["gaussian"] = attacks.gaussian(jax.random.fold_in(key, 0), images, sigma)
    if "matched_gaussian" in perturbations:
        out["matched_gaussian"] = attacks.matched_gaussian(jax.random.fold_in(key, 1), images, out["fgsm"])
    return {name: out[name] for name in perturbations}


def _seed_shape(num_seeds: int) -> tuple[int, ...]:
    return () if num_seeds == 1 else (num_seeds,)


def _zero_totals(perturbations: Sequence[str], num_seeds: int) -> dict:
    lead = _seed_shape(num_seeds)
    return {
        "correct": {p: jnp.zeros(lead, jnp.int32) for p in perturbations},
        "stats": {p: jnp.zeros(lead + (len(STATISTICS),), jnp.float32) for p in perturbations},
    }


def make_evaluator(
    apply_fn: Callable,
    perturbations: Sequence[str] = PERTURBATIONS,
    *,
    use_predicted_labels: bool = False,
    form: str = "auto",
    chunk_size: int = 8,
    num_seeds: int = 1,
    mesh: Mesh | None = None,
) -> Callable:
    """`evaluate(params, eval_set, key, eps, sigma) -> {"accuracy", "perturbation_stats", ...}`.

    Build it once and use it for every split and epoch: `eps` and `sigma` are
    traced, and splits with the same batch size share compiled code. With
    `num_seeds > 1`, `params` and `key` carry a leading seed axis (see `summarize`).
    With a `mesh`, every batch (and its attacks) is split across the `data`
    axis; pass params and key replicated and the eval set through `shard_eval_set`.
    """
    unknown = set(perturbations) - set(PERTURBATIONS)
    if unknown:
        raise ValueError(f"unknown perturbations {sorted(unknown)}; choose from {PERTURBATIONS}")
    perturbations = tuple(perturbations)

    def body(totals, step, params, images, labels, mask, key, eps, sigma):
        x, y, valid = sharding.constrain_batch((to_float_images(images[step]), labels[step], mask[step]), mesh)
        logits_fn = lambda z: apply_fn({"params": params}, z, train=False)
        attack_labels = attacks.predicted_labels(logits_fn, x) if use_predicted_labels else y
        perturbed = perturb_batch(logits_fn, x, attack_labels, jax.random.fold_in(key, step), eps, sigma, perturbations)
        logits = jnp.split(logits_fn(jnp.concatenate([perturbed[p] for p in perturbations])), len(perturbations))
        correct, stats = dict(totals["correct"]), dict(totals["stats"])
        for name, out in zip(perturbations, logits):
            correct[name] += jnp.sum((jnp.argmax(out, -1) == y) & valid)
            per_image = jnp.stack(attacks.perturbation_stats(x, perturbed[name]), axis=-1)
            stats[name] += jnp.sum(jnp.where(valid[:, None], per_image, 0.0), axis=0)
        return sharding.constrain_replicated({"correct": correct, "stats": stats}, mesh)

    body = loops.map_over_seeds(body, num_seeds, in_axes=(0, None, 0, None, None, None, 0, None, None))
    fold = loops.make_fold(body, form=form, chunk_size=chunk_size, num_seeds=num_seeds)

    def evaluate(params, eval_set: EvalSet, key, eps=0.0, sigma=0.0) -> dict:
        sharding.check_batch_size(eval_set.labels.shape[1], mesh, "eval.batch_size")
        totals = fold(
            eval_set.labels.shape[0],
            _zero_totals(perturbations, num_seeds),
            params,
            eval_set.images,
            eval_set.labels,
            eval_set.mask,
            key,
            jnp.float32(eps),
            jnp.float32(sigma),
        )
        return summarize(jax.device_get(totals), eval_set.num_examples)

    return evaluate


def summarize(totals: dict, num_examples: int) -> dict:
    """Counts and sums -> accuracies and mean per-image perturbation statistics (after clipping).

    Totals may carry a leading seed axis. "accuracy" is then the mean over
    seeds, "accuracy_std" the standard deviation (0 for one seed), and
    "accuracy_per_seed" lists every seed's value.
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
    points one after another 1.6-2.5x faster than vmapped (measured on the CNN
    and BP with a 21-point grid), so there 0 means 1.
    """
    if grid_chunk:
        return min(grid_chunk, grid_length)
    return 1 if (backend or jax.default_backend()) == "cpu" else grid_length


def make_sweep(
    apply_fn: Callable,
    perturbation: str,
    *,
    use_predicted_labels: bool = False,
    form: str = "auto",
    chunk_size: int = 8,
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
    never the split times the grid. A new grid of the same length reuses the
    compiled code. Noise at every grid point uses the same per-batch key
    (common random numbers), so a curve's wiggles are the model's, not the
    sampler's. FGSM's direction does not depend on eps, so its gradient is
    computed once per batch and only the step is mapped over the grid.
    With a `mesh`, each batch is split across the `data` axis (as in `make_evaluator`).
    """
    if perturbation not in SWEEPS:
        raise ValueError(f"cannot sweep {perturbation!r}; choose from {SWEEPS}")

    def body(correct, step, params, images, labels, mask, key, grid):
        x, y, valid = sharding.constrain_batch((to_float_images(images[step]), labels[step], mask[step]), mesh)
        logits_fn = lambda z: apply_fn({"params": params}, z, train=False)
        batch_key = jax.random.fold_in(key, step)
        if perturbation == "gaussian":
            perturb = lambda sigma: attacks.gaussian(batch_key, x, sigma)
        else:
            attack_labels = attacks.predicted_labels(logits_fn, x) if use_predicted_labels else y
            direction = attacks.fgsm_direction(logits_fn, x, attack_labels)
            fgsm = lambda eps: attacks.clip_to_pixels(x + eps * direction)
            matched = lambda eps: attacks.matched_gaussian(batch_key, x, fgsm(eps))
            perturb = fgsm if perturbation == "fgsm" else matched
        count = lambda value: jnp.sum((jnp.argmax(logits_fn(perturb(value)), -1) == y) & valid)
        counts = jax.lax.map(count, grid, batch_size=resolve_grid_chunk(grid_chunk, grid.shape[0]))
        return sharding.constrain_replicated(correct + counts, mesh)

    body = loops.map_over_seeds(body, num_seeds, in_axes=(0, None, 0, None, None, None, 0, None))
    fold = loops.make_fold(body, form=form, chunk_size=chunk_size, num_seeds=num_seeds)

    def sweep(params, eval_set: EvalSet, key, grid) -> np.ndarray:
        grid = jnp.asarray(grid, jnp.float32)
        sharding.check_batch_size(eval_set.labels.shape[1], mesh, "eval.batch_size")
        correct = fold(
            eval_set.labels.shape[0], jnp.zeros(_seed_shape(num_seeds) + grid.shape, jnp.int32), params,
            eval_set.images, eval_set.labels, eval_set.mask, key, grid,
        )
        return np.asarray(correct) / eval_set.num_examples

    sweep.fold = fold  # exposed so tests can inspect the compiled program's memory
    return sweep
