"""The evaluation attacks by name, with one signature: `attack(logits_fn, images, labels, eps, key)`.

An evaluator can then vmap any of them over eps and treat them alike;
`make_attack` checks an attack's keywords when it is built, not at trace time.
"""

import functools
import inspect
from collections.abc import Callable

import jax
from jax import lax

from advjax import apgd, iterative, restarts
from advjax.attacks import bim, fgm_l2, fgsm, fgsm_random_start, least_likely_labels, pgd
from advjax.deepfool import deepfool_within
from advjax.losses import LogitsFn

Attack = Callable[[LogitsFn, jax.Array, jax.Array, jax.Array | float, jax.Array | None], jax.Array]


def _fgsm_attack(logits_fn, images, labels, eps, key, *, targeted: bool = False):
    return fgsm(logits_fn, images, labels, eps, targeted=targeted)


def _fgm_l2_attack(logits_fn, images, labels, eps, key, *, targeted: bool = False):
    return fgm_l2(logits_fn, images, labels, eps, targeted=targeted)


def _fgsm_random_start_attack(logits_fn, images, labels, eps, key, *, step_size=None, targeted: bool = False):
    return fgsm_random_start(logits_fn, images, labels, eps, key, step_size, targeted=targeted)


def _bim_attack(
    logits_fn, images, labels, eps, key, *, num_steps=10, step_size=None, targeted: bool = False, unroll: bool = False
):
    return bim(
        logits_fn, images, labels, eps, num_steps=num_steps, step_size=step_size, targeted=targeted, unroll=unroll
    )


def _deepfool_attack(logits_fn, images, labels, eps, key, *, max_iter=50, overshoot=0.02):
    return deepfool_within(logits_fn, images, labels, eps, max_iter=max_iter, overshoot=overshoot)


def apgd_ce(logits_fn, images, labels, eps, key, *, num_steps=100, num_restarts=1, unroll: bool = False):
    """APGD-CE (L-inf) with restarts: restart r starts from `fold_in(key, r)`, as PGD's restarts and the
    robustness fold's ticks do; per example the restart that fools the model, else the highest loss, is kept.

    >>> adversarial = apgd_ce(logits_fn, images, labels, 0.3, jax.random.key(0), num_steps=25)
    """
    if num_restarts < 1:
        raise ValueError(f"num_restarts must be at least 1, got {num_restarts}")
    attack = apgd.make_apgd(logits_fn, eps, loss="ce", num_steps=num_steps)

    def run(restart):
        adversarial = iterative.run(attack, images, labels, jax.random.fold_in(key, restart), unroll=unroll)
        return adversarial, restarts.attack_outcome(logits_fn, adversarial, labels)

    best = lax.fori_loop(1, num_restarts, lambda restart, best: restarts.keep_worst(best, run(restart)), run(0))
    return best[0]


ATTACKS: dict[str, Callable[..., jax.Array]] = {
    "fgsm": _fgsm_attack,
    "fgm_l2": _fgm_l2_attack,
    "fgsm_random_start": _fgsm_random_start_attack,
    "bim": _bim_attack,
    "pgd": functools.partial(pgd, norm="linf"),
    "pgd_l2": functools.partial(pgd, norm="l2"),
    "deepfool": _deepfool_attack,
    "apgd_ce": apgd_ce,
}


def _accepts(fn: Callable, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def least_likely_attack(attack: Attack) -> Attack:
    """The attack, targeted at each image's least-likely class on the clean image.

    The caller's labels are ignored: the targets come from the model.

    >>> adversarial = least_likely_attack(make_attack("bim"))(logits_fn, images, labels, 0.3)
    """

    def attacked(logits_fn, images, labels, eps, key=None):
        targets = lax.stop_gradient(least_likely_labels(logits_fn(images)))
        return attack(logits_fn, images, targets, eps, key)

    return attacked


def make_attack(name: str, *, least_likely: bool = False, relative_step_size: float | None = None, **params) -> Attack:
    """`attack(logits_fn, images, labels, eps, key=None)` for any attack in `ATTACKS`.

    `params` are the attack's own keywords (`num_steps`, `num_restarts`,
    `targeted`, ...), checked here rather than at trace time.
    `relative_step_size` sets the step to that multiple of eps, so one attack
    keeps its shape across an eps sweep. `least_likely=True` targets each
    image's least-likely class. Deterministic attacks ignore `key`.

    >>> adversarial = make_attack("pgd", num_steps=40, relative_step_size=0.1)(logits_fn, images, labels, 0.3, key)
    """
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose from {sorted(ATTACKS)}")
    fn = ATTACKS[name]
    requested = set(params) | ({"step_size"} if relative_step_size is not None else set())
    requested |= {"targeted"} if least_likely else set()
    unknown = sorted(p for p in requested if not _accepts(fn, p))
    if unknown:
        raise TypeError(f"attack {name!r} takes no parameter(s) {unknown}")
    if relative_step_size is not None and "step_size" in params:
        raise TypeError("give step_size or relative_step_size, not both")
    if least_likely and params.get("targeted") is False:
        raise TypeError("least_likely attacks are targeted")

    if least_likely:
        params = {**params, "targeted": True}

    def attack(logits_fn, images, labels, eps, key=None):
        extra = {} if relative_step_size is None else {"step_size": relative_step_size * eps}
        return fn(logits_fn, images, labels, eps, key, **params, **extra)

    return least_likely_attack(attack) if least_likely else attack
