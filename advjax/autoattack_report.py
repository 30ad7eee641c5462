"""AutoAttack in the robustness report: `config.robust.attacks` naming "autoattack" runs its cascade.

On the report's images (robustness.robust_eval_set), at every L-inf eps of
robust.eps_grid and for every seed, `advjax.autoattack` runs the attacks of
robust.autoattack_version (standard: APGD-CE, APGD-T, FAB-T and Square), each
on the points still robust. The report gains an
"autoattack" entry: each stage's cumulative robust accuracy at each eps (mean,
std and per seed, as every other attack), the budgets and AutoAttack's flags;
and the L-inf worst case takes AutoAttack's final robust set in as well: the
cascades run first, and `final_robust` goes into robustness_report's
`extra_linf`, so no attack of the report runs twice (advjax.evaluators.robust).

Key scheme: seed i's cascade uses `fold_in(its robustness key, crc32("autoattack"))`
at every eps (common random numbers, as the other attacks), so adding it to
the list changes no other attack's numbers. The whole eval set is attacked at
once, without batches: AutoAttack compacts the shrinking robust set itself.
"""

import time
import zlib
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from advjax import attacks, auto_attack, seeds
from advjax.data import to_float_images
from advjax.eval_fold import EvalSet
from advjax.models import ApplyFn

NAME = "autoattack"


def stages(version: str) -> tuple[str, ...]:
    """The summary's stages for an AutoAttack version: "clean", then its attacks in cascade order.

    >>> stages("standard")  # ('clean', 'apgd-ce', 'apgd-t', 'fab-t', 'square')
    """
    return ("clean",) + auto_attack.VERSION_ATTACKS[version]


class Cascades(NamedTuple):
    """Every seed's cascade at every eps."""

    robust: np.ndarray  # bool [K, stage, G, N]: still robust after each of `stages(version)` ("clean" first)
    flags: list[dict]  # {"seed", "eps", "flag"}: each distinct flag of a seed once, with the eps that raised it
    seconds: float


def requested(section) -> bool:
    """Whether config.robust lists AutoAttack.

    >>> requested(config.robust)  # True for robust.attacks = ("fgsm", "pgd", "autoattack")
    """
    return NAME in section.attacks


def eval_examples(eval_set: EvalSet) -> tuple[jax.Array, jax.Array]:
    """The eval set's real examples, unbatched: float images in [0, 1] [N, ...] and labels [N].

    >>> images, labels = eval_examples(robustness.robust_eval_set(mnist.test.images, mnist.test.labels, section))
    """
    mask = np.asarray(eval_set.mask).reshape(-1)
    images = np.asarray(eval_set.images).reshape((-1,) + tuple(eval_set.images.shape[2:]))[mask]
    labels = np.asarray(eval_set.labels).reshape(-1)[mask]
    return to_float_images(jnp.asarray(images)), jnp.asarray(labels)


def cascade_key(key: jax.Array, seed_index: int, num_seeds: int) -> jax.Array:
    """Seed `seed_index`'s AutoAttack key from the report's key [K?]: salted by name, as the report salts each attack.

    >>> result = advjax.autoattack(logits_fn, images, labels, eps=0.3, key=cascade_key(key, 0, 1))
    """
    return jax.random.fold_in(seeds.select_seed(key, seed_index, num_seeds), zlib.crc32(NAME.encode()))


def _one_cascade(logits_fn: Callable, images, labels, eps: float, key, section, form: str, log: Callable[[str], None]):
    """(robust [stage, N], flags) at one eps; eps 0 leaves nothing to attack, so every stage is the clean set."""
    if eps == 0:
        clean = np.asarray(attacks.predicted_labels(logits_fn, images) == labels)
        return np.stack([clean] * len(stages(section.autoattack_version))), []
    result = auto_attack.autoattack(
        logits_fn,
        images,
        labels,
        eps=eps,
        key=key,
        version=section.autoattack_version,
        num_steps=section.autoattack_steps,
        num_queries=section.autoattack_queries,
        form=form,
        log=log,
    )
    return np.stack([result.robust[stage] for stage in stages(section.autoattack_version)]), result.flags


def group_flags(raised: list[tuple[int, float, str]]) -> list[dict]:
    """(seed, eps, flag) triples -> one entry per seed and distinct flag, listing the eps that raised it.

    >>> group_flags([(0, 0.1, "zero gradients"), (0, 0.3, "zero gradients")])  # one entry, eps [0.1, 0.3]
    """
    grouped: dict[tuple[int, str], list[float]] = {}
    for seed, eps, flag in raised:
        grouped.setdefault((seed, flag), []).append(eps)
    return [{"seed": seed, "eps": eps, "flag": flag} for (seed, flag), eps in grouped.items()]


def run_cascades(
    apply_fn: ApplyFn,
    params,
    eval_set: EvalSet,
    key: jax.Array,
    section,
    form: str,
    num_seeds: int,
    first_seed: int,
    log: Callable[[str], None] = lambda line: None,
) -> Cascades:
    """AutoAttack on the eval set at each eps of section.eps_grid, for each seed (params and key carry a seed axis
    when num_seeds > 1); the flags name seeds as first_seed + index. `log` gets a line after each attack.

    >>> cascades = run_cascades(apply_fn, params, eval_set, key, config.robust, "auto", 1, config.seed)
    """
    images, labels = eval_examples(eval_set)
    grid = [float(e) for e in section.eps_grid]
    robust = np.zeros((num_seeds, len(stages(section.autoattack_version)), len(grid), len(labels)), bool)
    raised, start = [], time.perf_counter()
    for i in range(num_seeds):
        seed_params = seeds.select_seed(params, i, num_seeds)
        logits_fn = lambda x, p=seed_params: apply_fn(p, x)
        key_i = cascade_key(key, i, num_seeds)
        for g, eps in enumerate(grid):
            progress = lambda line, where=f"seed {first_seed + i}, eps {eps:g}": log(f"{where}: {line}")
            robust[i, :, g], flags = _one_cascade(logits_fn, images, labels, eps, key_i, section, form, progress)
            raised += [(first_seed + i, eps, flag) for flag in flags]
    return Cascades(robust, group_flags(raised), time.perf_counter() - start)


def autoattack_summary(cascades: Cascades, section, num_seeds: int) -> dict:
    """The report's "autoattack" entry: budgets, and each stage's cumulative robust accuracy per eps and seed.

    >>> autoattack_summary(cascades, config.robust, 1)["stages"]["square"]["accuracy"]  # [G]
    """
    return {
        "version": section.autoattack_version,
        "norm": "linf",
        "eps": [float(e) for e in section.eps_grid],
        "num_examples": int(cascades.robust.shape[-1]),
        "num_steps": section.autoattack_steps,
        "num_queries": section.autoattack_queries,
        "stages": {
            stage: seeds.seed_summary(cascades.robust[:, s].mean(-1), num_seeds)
            for s, stage in enumerate(stages(section.autoattack_version))
        },
        "flags": cascades.flags,
    }


def final_robust(cascades: Cascades, num_seeds: int) -> np.ndarray:
    """AutoAttack's final robust set as robustness_report's `extra_linf` takes it: bool [K?, G, N].

    >>> robustness_report(apply_fn, params, eval_set, key, section, extra_linf={NAME: final_robust(cascades, 1)})
    """
    final = cascades.robust[:, -1]
    return final.reshape(seeds.seed_shape(num_seeds) + final.shape[1:])


def with_autoattack(report: dict, cascades: Cascades, section, num_seeds: int) -> dict:
    """`report` (robustness_report's, given `final_robust(cascades)` in extra_linf) with AutoAttack's entry
    and its seconds.

    >>> report = with_autoattack(report, cascades, config.robust, 1)  # report["autoattack"]["stages"]
    """
    return {
        **report,
        NAME: autoattack_summary(cascades, section, num_seeds),
        "seconds": {**report["seconds"], NAME: cascades.seconds},
    }


def flag_lines(entry: dict) -> list[str]:
    """The "autoattack" entry's flags as log lines, one per flag, naming seed and eps.

    >>> flag_lines(report["autoattack"])  # ['warning: AutoAttack, seed 0, eps 0.3: Square lowered ...']
    """
    return [
        f"warning: AutoAttack, seed {f['seed']}, eps {', '.join(f'{e:g}' for e in f['eps'])}: {f['flag']}"
        for f in entry["flags"]
    ]
