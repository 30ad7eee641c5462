"""The evaluation of a trained model, as summary.json reports it: small evaluators, each adding its part.

Each evaluator takes the shared `Context` (config, model, params, data, keys,
the eval sets) and returns the summary fields it owns; `evaluate_trained`
runs them in order. A new evaluation is an `Evaluator` added to EVALUATORS,
naming the config fields its results depend on, so that a relaunch of a
finished run reuses every part whose fields did not change (a change of
`robust.*` alone reruns only the robustness report).
"""

import functools
import json
from collections.abc import Callable
from typing import NamedTuple

import jax
import ml_collections
from jax.sharding import Mesh

from advjax import autoattack_report, certify_report, data, evaluate, robustness, seeds, sharding, workdir
from advjax.eval_fold import EvalSet, eval_set_spec, make_eval_set, shard_eval_set
from advjax.models import ApplyFn

SPLITS = ("train", "validation", "test")


class Context(NamedTuple):
    config: ml_collections.ConfigDict
    apply_fn: ApplyFn  # the model in eval mode
    params: dict  # with a leading seed axis when config.num_seeds > 1; models.Variables for a model with BatchNorm
    mnist: data.MNIST
    mesh: Mesh | None
    sets: dict[str, EvalSet]  # the paper's evaluation subsets, placed on the mesh
    keys: dict[str, jax.Array]  # per split, placed on the mesh
    eval_rng: jax.Array
    built: "Built"  # the evaluations, built once
    log: Callable[[str], None] = lambda message: None  # evaluate_trained's log, for warnings


def eval_set_sizes(mnist: data.MNIST, eval_config: ml_collections.ConfigDict) -> dict[str, tuple]:
    """split -> (its data, images to evaluate, batch size): the paper's evaluation subsets (Tables 2-4: 5000 train,
    5000 validation) and the test set."""
    sizes = {"train": eval_config.num_train, "validation": eval_config.num_validation, "test": eval_config.num_test}
    return {split: (getattr(mnist, split), n, eval_config.batch_size) for split, n in sizes.items()}


def eval_sets(mnist: data.MNIST, eval_config: ml_collections.ConfigDict) -> dict[str, EvalSet]:
    """The eval sets of `eval_set_sizes`."""
    return {
        split: make_eval_set(data_split.images, data_split.labels, n, batch_size)
        for split, (data_split, n, batch_size) in eval_set_sizes(mnist, eval_config).items()
    }


def splits(ctx: Context) -> dict:
    """Every split under every perturbation: accuracies and perturbation statistics."""
    c, full = ctx.config, ctx.built.splits
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
            accuracy = ctx.built.sweep(name)(ctx.params, ctx.sets[split], ctx.keys[split], grid)  # [seeds?, grid]
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
            ctx.built.sweep(name)(ctx.params, ctx.sets[split], ctx.keys[split], eps_list), ctx.config.num_seeds
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
    """The robustness report (config.robust), when enabled, with AutoAttack's when listed. It runs on one device.

    AutoAttack's cascades run first: their final robust set joins the report's L-inf worst case.
    Its flags go to the log too, one warning line each."""
    c = ctx.config
    if not c.robust.enabled:
        return {}
    split = getattr(ctx.mnist, c.robust.split)
    robust_set = robustness.robust_eval_set(split.images, split.labels, c.robust)
    index = len(ctx.sets)
    key = seeds.fold_in(ctx.eval_rng, index, c.num_seeds)
    params = ctx.params if ctx.mesh is None else jax.device_get(ctx.params)
    cascades, extra = None, None
    if autoattack_report.requested(c.robust):
        cascades = autoattack_report.run_cascades(
            ctx.apply_fn, params, robust_set, key, c.robust, c.eval.loop, c.num_seeds, c.seed, log=ctx.log
        )
        extra = {autoattack_report.NAME: autoattack_report.final_robust(cascades, c.num_seeds)}
    report = robustness.robustness_report(
        ctx.apply_fn, params, robust_set, key, c.robust, c.eval.loop, num_seeds=c.num_seeds, extra_linf=extra
    )
    if cascades is not None:
        report = autoattack_report.with_autoattack(report, cascades, c.robust, c.num_seeds)
        for line in autoattack_report.flag_lines(report[autoattack_report.NAME]):
            ctx.log(line)
    return {"robustness": report}


def certification(ctx: Context) -> dict:
    """Randomized smoothing's certificates (config.certify, advjax/certify_report.py), when enabled, on one device."""
    c = ctx.config
    if not c.certify.enabled:
        return {}
    images, labels = certify_report.examples(getattr(ctx.mnist, c.certify.split), c.certify.num_examples)
    key = seeds.fold_in(ctx.eval_rng, len(ctx.sets) + 1, c.num_seeds)
    params = ctx.params if ctx.mesh is None else jax.device_get(ctx.params)
    clip = c.train.noise_clip  # the certified classifier sees x + delta as training saw its noisy images
    certificates = certify_report.run_certification(
        ctx.apply_fn, params, images, key, c.certify, c.num_seeds, log=ctx.log, first_seed=c.seed, clip=clip
    )
    summary = certify_report.certification_summary(certificates, labels, c.certify, c.num_seeds, clip)
    return {certify_report.NAME: summary}


class Evaluator(NamedTuple):
    run: Callable[[Context], dict]
    reads: tuple[str, ...]  # config fields (sections or dotted paths) its results depend on, beyond the model's
    owns: tuple[str, ...]  # the summary fields it writes
    # Whether the config asks for it at all: one it does not ask for neither runs nor is reused.
    enabled: Callable[[ml_collections.ConfigDict], bool] = lambda config: True


EVALUATORS: tuple[Evaluator, ...] = (
    Evaluator(
        splits,
        ("eval", "num_devices"),
        ("eval_sizes", "accuracy", "accuracy_std", "accuracy_per_seed", "perturbation_stats"),
    ),
    Evaluator(sweeps, ("eval", "num_devices"), ("sweeps",)),
    Evaluator(by_eps, ("eval", "num_devices"), ("by_eps",)),
    Evaluator(robust, ("robust", "eval.loop"), ("robustness",), lambda config: config.robust.enabled),
    # Its sampling is one lax.scan whatever eval.loop says, so it reads the certify section alone.
    Evaluator(certification, ("certify",), (certify_report.NAME,), lambda config: config.certify.enabled),
)


def _field(config_json: dict, path: str):
    for part in path.split("."):
        config_json = config_json[part] if isinstance(config_json, dict) and part in config_json else None
    return config_json


def reusable(evaluator: Evaluator, config: ml_collections.ConfigDict, previous: dict | None) -> bool:
    """Whether `previous` (the summary of the same trained model) holds this evaluator's results for `config`.

    >>> reusable(EVALUATORS[0], config, workdir.read_summary("runs/bp_adv"))
    """
    if previous is None or not all(key in previous for key in evaluator.owns[:1]):
        return False
    current = json.loads(json.dumps(config.to_dict()))
    saved = workdir.with_added_fields(previous["config"])  # fields added since read as the older run had them
    return all(_field(saved, path) == _field(current, path) for path in evaluator.reads)


class Built(NamedTuple):
    """The evaluations of splits, sweeps and by_eps, built once per run: the same objects compile ahead while
    training runs (`compile_ahead`) and evaluate after it, so the executables are shared."""

    splits: Callable  # evaluate.make_evaluator's
    sweep: Callable  # perturbation -> its sweep (evaluate.make_sweep), built on first use

    def compile_ahead(self, config: ml_collections.ConfigDict, params, mnist: data.MNIST) -> None:
        """Compiles the splits' evaluation, the sweeps and by_eps for params of this shape, running nothing.

        >>> built.compile_ahead(config, jax.eval_shape(lambda p: p, params), mnist)
        """
        c, key = config.eval, seeds.seed_keys(config.seed, config.num_seeds)[3]
        sets = {split: eval_set_spec(*sizes) for split, sizes in eval_set_sizes(mnist, c).items()}
        self.splits.compile_ahead(params, sets["test"], key)
        for name, grid in (("gaussian", c.sigma_grid), ("fgsm", c.eps_grid)):
            if grid:
                self.sweep(name).compile_ahead(params, sets[c.sweep_split], key, grid)
        for name in ("fgsm", "matched_gaussian") if c.table_eps else ():
            self.sweep(name).compile_ahead(params, sets["train"], key, tuple(c.table_eps))


def build(config: ml_collections.ConfigDict, apply_fn: ApplyFn, mesh: Mesh | None = None) -> Built:
    """The evaluations `evaluate_trained` runs, for `compile_ahead` before it and for it.

    >>> built = build(config, models.eval_apply(model.apply))
    """
    c = config.eval
    common = dict(use_predicted_labels=c.use_predicted_labels, form=c.loop, chunk_size=c.chunk_size, mesh=mesh)

    @functools.cache
    def sweep(perturbation: str) -> Callable:
        return evaluate.make_sweep(
            apply_fn, perturbation, num_seeds=config.num_seeds, grid_chunk=c.grid_chunk, **common
        )

    return Built(evaluate.make_evaluator(apply_fn, num_seeds=config.num_seeds, **common), sweep)


def evaluate_trained(
    config: ml_collections.ConfigDict,
    apply_fn: ApplyFn,
    params,
    mnist: data.MNIST,
    mesh: Mesh | None = None,
    previous: dict | None = None,
    log: Callable[[str], None] = lambda message: None,
    built: Built | None = None,
) -> dict:
    """The summary's results: every evaluator of EVALUATORS, in order, on `params`.

    `built`: the evaluations from `build` when they were compiled ahead, else built here.

    `previous`: the summary of a finished run of these same params, whose parts are reused
    where the fields they depend on are unchanged (`reusable`). Split i's key is fold_in(eval
    key, i), the robustness report's fold_in(eval key, 3) and the certification's fold_in(eval key, 4),
    where the eval key is the fourth
    of seeds.seed_keys; the per-epoch checks use the eval key itself.

    >>> results = evaluate_trained(config, apply_fn, params, mnist)
    """
    place, k = sharding.placer(mesh), config.num_seeds
    eval_rng = seeds.seed_keys(config.seed, k)[3]
    sets = {split: shard_eval_set(s, mesh) for split, s in eval_sets(mnist, config.eval).items()}
    keys = {split: place(seeds.fold_in(eval_rng, i, k)) for i, split in enumerate(sets)}
    built = built or build(config, apply_fn, mesh)
    ctx = Context(config, apply_fn, params, mnist, mesh, sets, keys, eval_rng, built, log)
    results = {}
    for evaluator in (e for e in EVALUATORS if e.enabled(config)):
        if reusable(evaluator, config, previous):
            results.update({key: previous[key] for key in evaluator.owns if key in previous})
            log(f"reusing the {evaluator.run.__name__} results of the finished run: their settings are unchanged")
        else:
            results.update(evaluator.run(ctx))
    return results
