"""The evaluation of a trained model, as summary.json reports it: small evaluators, each adding its part.

Each evaluator takes the shared `Context` (config, model, params, data, keys,
the eval sets) and returns the summary fields it owns; `evaluate_trained`
runs them in order. A new evaluation is a function added to EVALUATORS.
"""

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import ml_collections
from jax.sharding import Mesh

from advjax import data, evaluate, robustness, seeds, sharding
from advjax.eval_fold import EvalSet, make_eval_set, shard_eval_set
from advjax.models import ApplyFn

SPLITS = ("train", "validation", "test")


class Context(NamedTuple):
    config: ml_collections.ConfigDict
    apply_fn: ApplyFn  # the model in eval mode
    params: dict  # with a leading seed axis when config.num_seeds > 1
    mnist: data.MNIST
    mesh: Mesh | None
    sets: dict[str, EvalSet]  # the paper's evaluation subsets, placed on the mesh
    keys: dict[str, jax.Array]  # per split, placed on the mesh
    eval_rng: jax.Array
    sweep: Callable  # perturbation -> its sweep (evaluate.make_sweep), built once


def eval_sets(mnist: data.MNIST, eval_config: ml_collections.ConfigDict) -> dict[str, EvalSet]:
    """The paper's evaluation subsets (Tables 2-4: 5000 train, 5000 validation) and the test set."""
    sizes = {"train": eval_config.num_train, "validation": eval_config.num_validation, "test": eval_config.num_test}
    return {
        split: make_eval_set(getattr(mnist, split).images, getattr(mnist, split).labels, n, eval_config.batch_size)
        for split, n in sizes.items()
    }


def splits(ctx: Context) -> dict:
    """Every split under every perturbation: accuracies and perturbation statistics."""
    c = ctx.config
    full = evaluate.make_evaluator(
        ctx.apply_fn,
        use_predicted_labels=c.eval.use_predicted_labels,
        form=c.eval.loop,
        chunk_size=c.eval.chunk_size,
        num_seeds=c.num_seeds,
        mesh=ctx.mesh,
    )
    results = {split: full(ctx.params, s, ctx.keys[split], c.eval.eps, c.eval.sigma) for split, s in ctx.sets.items()}
    fields = next(iter(results.values()))
    return {
        "eval_sizes": {split: s.num_examples for split, s in ctx.sets.items()},
        **{field: {split: r[field] for split, r in results.items()} for field in fields},
    }


def sweeps(ctx: Context) -> dict:
    """Accuracy against each configured grid (eval.sigma_grid, eval.eps_grid) on eval.sweep_split."""
    split, c = ctx.config.eval.sweep_split, ctx.config
    out = {"split": split}
    for name, grid in (("gaussian", c.eval.sigma_grid), ("fgsm", c.eval.eps_grid)):
        if grid:
            accuracy = ctx.sweep(name)(ctx.params, ctx.sets[split], ctx.keys[split], grid)  # [seeds?, grid]
            out[name] = {"grid": list(grid), **seeds.seed_summary(accuracy, c.num_seeds)}
    return {"sweeps": out}


def by_eps(ctx: Context) -> dict:
    """FGSM and matched-Gaussian accuracy at each eval.table_eps on the train and validation subsets.

    Computed as sweeps over the eps list: one input gradient per image serves every eps.
    """
    eps_list, names, table_splits = tuple(ctx.config.eval.table_eps), ("fgsm", "matched_gaussian"), SPLITS[:2]
    if not eps_list:
        return {"by_eps": {}}
    accuracy = {
        (name, split): seeds.per_seed(
            ctx.sweep(name)(ctx.params, ctx.sets[split], ctx.keys[split], eps_list), ctx.config.num_seeds
        )
        for name in names
        for split in table_splits
    }

    def at(i: int, split: str) -> dict:
        column = {n: accuracy[n, split][:, i] for n in names}
        return {
            "accuracy": {n: float(a.mean()) for n, a in column.items()},
            "accuracy_std": {n: float(a.std()) for n, a in column.items()},
            "accuracy_per_seed": {n: a.tolist() for n, a in column.items()},
        }

    return {"by_eps": {str(eps): {split: at(i, split) for split in table_splits} for i, eps in enumerate(eps_list)}}


def robust(ctx: Context) -> dict:
    """The robustness report (config.robust), when enabled. It runs on one device."""
    c = ctx.config
    if not c.robust.enabled:
        return {}
    split = getattr(ctx.mnist, c.robust.split)
    robust_set = robustness.robust_eval_set(split.images, split.labels, c.robust)
    index = len(ctx.sets)
    key = seeds.map_over_seeds(lambda k: jax.random.fold_in(k, index), c.num_seeds)(ctx.eval_rng)
    params = ctx.params if ctx.mesh is None else jax.device_get(ctx.params)
    report = robustness.robustness_report(
        ctx.apply_fn, params, robust_set, key, c.robust, c.eval.loop, num_seeds=c.num_seeds
    )
    return {"robustness": report}


EVALUATORS: tuple[Callable[[Context], dict], ...] = (splits, sweeps, by_eps, robust)


def _sweep_builder(config: ml_collections.ConfigDict, apply_fn: ApplyFn, mesh: Mesh | None) -> Callable:
    @functools.cache
    def sweep(perturbation: str) -> Callable:
        return evaluate.make_sweep(
            apply_fn,
            perturbation,
            use_predicted_labels=config.eval.use_predicted_labels,
            form=config.eval.loop,
            chunk_size=config.eval.chunk_size,
            num_seeds=config.num_seeds,
            grid_chunk=config.eval.grid_chunk,
            mesh=mesh,
        )

    return sweep


def evaluate_trained(
    config: ml_collections.ConfigDict, apply_fn: ApplyFn, params, mnist: data.MNIST, mesh: Mesh | None = None
) -> dict:
    """The summary's results: every evaluator of EVALUATORS, in order, on `params`.

    Split i's key is fold_in(eval key, i) and the robustness report's fold_in(eval key, 3), where the
    eval key is the fourth of seeds.seed_keys; the per-epoch checks use the eval key itself.
    """
    place, k = sharding.placer(mesh), config.num_seeds
    eval_rng = seeds.seed_keys(config.seed, k)[3]
    sets = {split: shard_eval_set(s, mesh) for split, s in eval_sets(mnist, config.eval).items()}
    keys = {
        split: place(seeds.map_over_seeds(lambda key, i=i: jax.random.fold_in(key, i), k)(eval_rng))
        for i, split in enumerate(sets)
    }
    ctx = Context(config, apply_fn, params, mnist, mesh, sets, keys, eval_rng, _sweep_builder(config, apply_fn, mesh))
    results = {}
    for evaluator in EVALUATORS:
        results.update(evaluator(ctx))
    return results
