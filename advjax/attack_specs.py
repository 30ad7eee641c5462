"""Attacks as the robustness evaluation runs them: a spec per attack (steps, restarts, step
size, labels, restart protocol), checked before anything compiles, and built from config.robust."""

import inspect
from typing import NamedTuple

import jax

from advjax import apgd, attack_registry, attacks, iterative, restarts
from advjax.losses import LogitsFn

# The norm each attack's eps is measured in: a worst case is only taken over
# attacks of the same norm, since their eps grids mean different things.
ATTACK_NORMS: dict[str, str] = {
    "fgsm": "linf",
    "fgsm_random_start": "linf",
    "bim": "linf",
    "pgd": "linf",
    "fgm_l2": "l2",
    "pgd_l2": "l2",
    "deepfool": "l2",
    "apgd_ce": "linf",
    "autoattack": "linf",
}
# Attacks whose steps run one per tick (an IterativeAttack each, `iterative_attack`); the rest take one per batch.
ITERATIVE = ("bim", "pgd", "pgd_l2", "apgd_ce")
# Projected steps of a set size; APGD adapts its own step (2 eps, halved per example), so it takes none.
FIXED_STEP = ("bim", "pgd", "pgd_l2")
# Attacks that draw a random start and so gain from restarts (APGD always starts at a random point).
RESTARTABLE = ("pgd", "pgd_l2", "apgd_ce")
# Names of robust.attacks that are whole cascades, run by advjax.autoattack_report rather than as a spec.
CASCADES = ("autoattack",)
# 'clean' is the zero perturbation: inside every eps ball, so every worst case includes it.
NAMES = ("clean",) + tuple(attack_registry.ATTACKS)

# How PGD keeps its restarts and whether an example stops once fooled (AttackSpec).
# 'strict' is the stronger attack; 'wong2020' reproduces Wong et al.'s MNIST
# evaluation, to compare with their published figures.
PGD_PROTOCOLS = {
    "strict": {"restart_selection": "success_first", "stop_on_success": False},
    "wong2020": {"restart_selection": "highest_loss", "stop_on_success": True},
}


class AttackSpec(NamedTuple):
    """One attack as evaluated. Step sizes: give at most one of `step_size` and
    `relative_step_size`; neither means the attack's default (2.5 eps / steps
    for BIM and PGD, 1.25 eps for fgsm_random_start).

    >>> AttackSpec("pgd", num_steps=50, num_restarts=10, step_size=0.01)
    """

    name: str  # a key of attack_registry.ATTACKS, or 'clean'
    num_steps: int | None = None  # iterative: steps per restart; deepfool: max_iter; None: the attack's default
    num_restarts: int = 1  # pgd / pgd_l2 / apgd_ce only; the per-example worst restart is kept
    step_size: float | None = None  # absolute, per step (pixels for L-inf)
    relative_step_size: float | None = None  # per step, as a multiple of eps
    random_start: bool = True  # pgd / pgd_l2 only (bim starts at the clean image, fgsm_random_start always draws)
    use_predicted_labels: bool = False  # attack the model's own labels (docs/design.md, "Label leaking")
    # pgd / pgd_l2: which restart is kept per example (restarts.RESTART_SELECTIONS), and
    # whether an example stops once fooled. The defaults are the stronger choices;
    # 'highest_loss' with stop_on_success=True is Wong et al.'s (2020) evaluation.
    restart_selection: str = "success_first"
    stop_on_success: bool = False


def _attack_default(name: str, parameter: str):
    """An attack's own default for a keyword, read from attack_registry.ATTACKS, so the defaults live in one place."""
    return inspect.signature(attack_registry.ATTACKS[name]).parameters[parameter].default


def num_steps(spec: AttackSpec) -> int:
    """The steps the attack takes (for deepfool its max_iter; 1 for one-step attacks).

    >>> num_steps(AttackSpec("deepfool"))  # 50, DeepFool's max_iter
    """
    if spec.num_steps is not None:
        return spec.num_steps
    if spec.name in ITERATIVE:
        return _attack_default(spec.name, "num_steps")
    return _attack_default("deepfool", "max_iter") if spec.name == "deepfool" else 1


def _check_step_size(spec: AttackSpec) -> None:
    if spec.step_size is not None and spec.relative_step_size is not None:
        raise ValueError(f"{spec.name}: give step_size or relative_step_size, not both")
    takes_step = spec.name in FIXED_STEP or spec.name == "fgsm_random_start"
    if not takes_step and (spec.step_size is not None or spec.relative_step_size is not None):
        adapts = " (APGD adapts its own)" if spec.name == "apgd_ce" else ""
        raise ValueError(f"{spec.name} takes no step size{adapts}")


def _check_restarts(spec: AttackSpec) -> None:
    if spec.num_restarts < 1:
        raise ValueError(f"{spec.name}: num_restarts must be at least 1, got {spec.num_restarts}")
    if spec.restart_selection not in restarts.RESTART_SELECTIONS:
        raise ValueError(
            f"{spec.name}: restart_selection must be one of {tuple(restarts.RESTART_SELECTIONS)}, "
            f"got {spec.restart_selection!r}"
        )
    if spec.name not in ITERATIVE and (spec.stop_on_success or spec.restart_selection != "success_first"):
        raise ValueError(
            f"{spec.name} is a one-step attack: stop_on_success and restart_selection apply to bim, pgd and pgd_l2"
        )
    if spec.name == "apgd_ce" and (spec.stop_on_success or not spec.random_start):
        raise ValueError(
            "apgd_ce always starts at a random point of the eps sphere and takes every step (it keeps the "
            "first point that fools the model): random_start must be True and stop_on_success False"
        )
    restartable = spec.name in RESTARTABLE and spec.random_start
    if spec.num_restarts > 1 and not restartable:
        # Without a random draw every restart repeats the same deterministic attack.
        raise ValueError(
            f"{spec.name}: restarts need a random start (pgd or pgd_l2 with random_start=True, or apgd_ce)"
        )


def check_spec(spec: AttackSpec) -> None:
    """Raises ValueError for a spec that would silently compute something else than it says.

    >>> check_spec(AttackSpec("fgsm", num_restarts=2))  # ValueError: restarts need a random start
    """
    if spec.name not in NAMES:
        raise ValueError(f"unknown attack {spec.name!r}; choose from {NAMES}")
    steps = num_steps(spec)
    if steps < 1:
        raise ValueError(f"{spec.name}: num_steps must be at least 1, got {steps}")
    if spec.name not in ITERATIVE + ("deepfool",) and steps != 1:
        raise ValueError(f"{spec.name} is a one-step attack; num_steps must be 1 or None, got {steps}")
    _check_step_size(spec)
    _check_restarts(spec)


def step_size(spec: AttackSpec, eps: jax.Array) -> jax.Array | float:
    """The step at `eps`: the spec's absolute or relative step, else 2.5 eps / steps.

    >>> step_size(AttackSpec("pgd", num_steps=40), 0.3)  # 0.01875
    """
    if spec.step_size is not None:
        return spec.step_size
    if spec.relative_step_size is not None:
        return spec.relative_step_size * eps
    return attacks.default_step_size(eps, num_steps(spec))


def describe_step_size(spec: AttackSpec) -> float | str | None:
    """The step size as a report states it: a number, or its rule in terms of eps.

    >>> describe_step_size(AttackSpec("pgd"))  # '2.5 * eps / num_steps'
    """
    if spec.name == "apgd_ce":
        return "2 * eps, halved per example at APGD's checkpoints"
    if spec.name not in ITERATIVE and spec.name != "fgsm_random_start":
        return None
    if spec.step_size is not None:
        return float(spec.step_size)
    if spec.relative_step_size is not None:
        return f"{spec.relative_step_size} * eps"
    return "2.5 * eps / num_steps" if spec.name in ITERATIVE else "1.25 * eps"


def attack_specs(section) -> dict[str, AttackSpec]:
    """config.robust's attacks as specs (CASCADES left out). All attack the true labels; the label-leaking check
    adds predicted labels.

    >>> attack_specs(config.robust)["pgd"].num_restarts  # 10
    """
    specs = {}
    for name in section.attacks:
        if name in CASCADES:
            continue
        if name == "apgd_ce":
            # PGD's step and restart counts; APGD adapts its step, and the protocol's options are PGD's.
            specs[name] = AttackSpec(name, num_steps=section.pgd_steps, num_restarts=section.pgd_restarts)
        elif name in ITERATIVE:
            # The absolute step is in L-inf pixels; L2 PGD keeps its relative default.
            absolute = section.pgd_step_size if section.pgd_step_size > 0 and ATTACK_NORMS[name] == "linf" else None
            specs[name] = AttackSpec(
                name,
                num_steps=section.pgd_steps,
                num_restarts=1 if name == "bim" else section.pgd_restarts,
                step_size=absolute,
                random_start=name != "bim",
                **(PGD_PROTOCOLS[section.pgd_protocol] if name != "bim" else {}),
            )
        elif name == "deepfool":
            specs[name] = AttackSpec(name, num_steps=section.deepfool_max_iter)
        else:
            specs[name] = AttackSpec(name)
    return specs


def iterative_attack(spec: AttackSpec, logits_fn: LogitsFn, eps: jax.Array | float) -> iterative.IterativeAttack:
    """The one run (no restarts) of an ITERATIVE spec at `eps` as (init, step, finalize): what the
    robustness fold's ticks take, and what `attack_registry.make_attack(spec.name)` runs per restart.

    >>> attack = iterative_attack(AttackSpec("apgd_ce", num_steps=25), logits_fn, 0.3)  # apgd.make_apgd's
    """
    norm, steps = ATTACK_NORMS[spec.name], num_steps(spec)
    if spec.name == "apgd_ce":
        return apgd.make_apgd(logits_fn, eps, norm=norm, loss="ce", num_steps=steps)
    return attacks.make_pgd(
        logits_fn,
        eps,
        norm=norm,
        num_steps=steps,
        step_size=step_size(spec, eps),
        random_start=spec.random_start and spec.name != "bim",
        stop_on_success=spec.stop_on_success,
    )
