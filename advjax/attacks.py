"""Gradient attacks as pure, batched functions.

Every attack takes a batch of float32 images [B, ...] in [0, 1] and returns
adversarial images of the same shape, clipped to [0, 1] (docs/design.md,
"Pixels in [0, 1]"). Strengths (`eps`, step sizes) may be traced scalars, so a
caller can `jax.vmap` over them; iterations run under `lax.fori_loop` unless
unrolled, so the compiled size need not grow with the number of steps.

Attacks see the model only through `logits_fn(images) -> logits`, which the
caller builds with the model in eval mode (docs/design.md, "Attacks in eval
mode"). `labels` are whatever the caller chooses to attack: the true labels, or
`predicted_labels` to avoid label leaking (docs/design.md, "Label leaking").
With `targeted=True` they are target classes instead, and the attack descends
the loss toward them; `least_likely_labels` gives Kurakin et al.'s targets.

The attacks: `fgsm`, `fgm_l2`, `fgsm_random_start` (Wong et al. 2020),
`noisy_fgsm` (a training attack), `bim`, `pgd` (L-inf or L2, random start,
restarts); DeepFool is advjax.deepfool, and advjax.attack_registry gives every
evaluation attack one signature. The norm-specific pieces (steps, projections,
random starts) are advjax.norms.

There is one PGD: `make_pgd`, an advjax.iterative.IterativeAttack whose step
is `ascent_step`. `pgd` runs it once per restart, `bim` from the clean image,
`fgsm` equals one step of eps from the clean image (written out, bit for bit),
`iterate` and `fgsm_random_start` from a given start, and the robustness
fold (advjax.robustness) one step per tick.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from advjax import iterative, losses
from advjax.losses import LogitsFn
from advjax.norms import (
    Norm,
    check_norm,
    clip_to_pixels,
    l2_unit,
    per_example,
    project,
    steepest_ascent,
    uniform_in_ball,
)
from advjax.restarts import RESTART_SELECTIONS, attack_outcome


def predicted_labels(logits_fn: LogitsFn, images: jax.Array) -> jax.Array:
    """The model's own labels: attacking them avoids label leaking (docs/design.md, "Label leaking").

    >>> labels = predicted_labels(logits_fn, images)  # [B]
    """
    return jnp.argmax(logits_fn(images), axis=-1)


def input_gradient(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array) -> jax.Array:
    """d J / d x per example, J the cross-entropy from logits (docs/design.md, "Loss from logits").

    The batch loss is a sum, not a mean, so each example's gradient is its own
    and does not shrink with the batch size.

    >>> gradient = input_gradient(logits_fn, images, labels)  # like images
    """

    def summed_loss(x):
        return jnp.sum(losses.cross_entropy(logits_fn(x), labels))

    return jax.grad(summed_loss)(images)


def ascent_gradient(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, targeted: bool = False) -> jax.Array:
    """The gradient an attack climbs: +grad J(y), or -grad J(target) when targeted.

    A targeted attack descends the loss of its target class, so that every
    attack can take the same ascent step.

    >>> gradient = ascent_gradient(logits_fn, images, targets, targeted=True)
    """
    gradient = input_gradient(logits_fn, images, labels)
    return -gradient if targeted else gradient


def fgsm_direction(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, *, targeted: bool = False) -> jax.Array:
    """sign(grad_x J): independent of eps, so one gradient serves a whole eps sweep.

    Pixels whose gradient is exactly zero do not move (sign(0) = 0; docs/design.md, "Zero gradients").

    >>> adversarial = clip_to_pixels(images + 0.1 * fgsm_direction(logits_fn, images, labels))
    """
    return jnp.sign(ascent_gradient(logits_fn, images, labels, targeted))


def fgsm(
    logits_fn: LogitsFn,
    images: jax.Array,
    labels: jax.Array,
    eps: jax.Array | float,
    *,
    targeted: bool = False,
) -> jax.Array:
    """Fast gradient sign method: x + eps * sign(grad_x J), clipped to [0, 1].

    It equals one PGD step of eps from the clean image (`make_pgd`), bit for bit
    (tests/test_attacks.py pins it), but is written out: inside a whole compiled
    training step the PGD form rounds differently, and FGSM training's sign
    turns that into another model (docs/design.md, "Fused rounding").

    >>> adversarial = fgsm(logits_fn, images, labels, 0.1)
    """
    return clip_to_pixels(images + eps * fgsm_direction(logits_fn, images, labels, targeted=targeted))


def least_likely_labels(logits: jax.Array) -> jax.Array:
    """The class the model finds least likely: Kurakin et al.'s target for a targeted attack.

    >>> targets = least_likely_labels(logits_fn(images))
    """
    return jnp.argmin(logits, axis=-1)


def fgm_l2(
    logits_fn: LogitsFn,
    images: jax.Array,
    labels: jax.Array,
    eps: jax.Array | float,
    *,
    targeted: bool = False,
) -> jax.Array:
    """Fast gradient method in L2: x + eps * g / ||g||_2 per example, clipped to [0, 1].

    >>> adversarial = fgm_l2(logits_fn, images, labels, 2.0)
    """
    step = l2_unit(ascent_gradient(logits_fn, images, labels, targeted))
    return clip_to_pixels(images + eps * step)


def default_step_size(eps: jax.Array | float, num_steps: int) -> jax.Array | float:
    """2.5 eps / steps (Madry et al.): enough to reach the ball's edge and still move along it.

    >>> default_step_size(0.3, 40)  # 0.01875
    """
    return 2.5 * eps / num_steps


def projected_ascent(
    adversarial: jax.Array,
    gradient: jax.Array,
    images: jax.Array,
    eps: jax.Array | float,
    step_size: jax.Array | float,
    norm: Norm,
) -> jax.Array:
    """A steepest-ascent step of `step_size` along `gradient`, back into the eps ball around `images` and [0, 1].

    >>> adversarial = projected_ascent(adversarial, gradient, images, 0.3, 0.01, "linf")
    """
    return project(adversarial + step_size * steepest_ascent(gradient, norm), images, eps, norm)


def ascent_step(
    logits_fn: LogitsFn,
    images: jax.Array,
    labels: jax.Array,
    adversarial: jax.Array,
    eps: jax.Array | float,
    step_size: jax.Array | float,
    norm: Norm = "linf",
    targeted: bool = False,
    stop_on_success: bool = False,
) -> jax.Array:
    """One projected steepest-ascent step on the cross-entropy from `adversarial`: PGD's step.

    With `stop_on_success` (untargeted), examples no longer classified as `labels`
    stay where they are, as in Wong et al.'s (2020) evaluation.

    >>> adversarial = ascent_step(logits_fn, images, labels, adversarial, 0.3, 0.01)
    """
    gradient = ascent_gradient(logits_fn, adversarial, labels, targeted)
    stepped = projected_ascent(adversarial, gradient, images, eps, step_size, norm)
    if not stop_on_success:
        return stepped
    # The same forward pass as the gradient's: XLA merges the two (the compiled
    # step has as many matrix products with stop_on_success as without).
    still_correct = jnp.argmax(logits_fn(adversarial), axis=-1) == labels
    return jnp.where(per_example(still_correct, adversarial), stepped, adversarial)


class PGDState(NamedTuple):
    """A projected-gradient attack's state; every leaf leads with the batch axis."""

    images: jax.Array  # the clean images, the centres of the eps balls
    labels: jax.Array  # what the attack climbs away from (toward, when targeted)
    adversarial: jax.Array  # the current iterate


def current_iterate(state: PGDState) -> jax.Array:
    """A projected-gradient attack's result: its last iterate (make_pgd's finalize, and TRADES's).

    >>> adversarial = current_iterate(attack.init(images, labels, jax.random.key(0)))  # the start
    """
    return state.adversarial


def make_pgd(
    logits_fn: LogitsFn,
    eps: jax.Array | float,
    *,
    norm: Norm = "linf",
    num_steps: int = 40,
    step_size: jax.Array | float | None = None,
    random_start: bool = True,
    targeted: bool = False,
    stop_on_success: bool = False,
) -> iterative.IterativeAttack:
    """One run of PGD (no restarts) as (init, step, finalize): the one PGD step that `pgd`, `bim`
    and the robustness fold's ticks all take (`fgsm` equals one step of it).

    init draws the start uniformly from the eps ball with the key it is given
    (the clean image with `random_start=False`); each step is `ascent_step`
    of `step_size` (2.5 eps / num_steps by default).

    >>> x_adv = iterative.run(make_pgd(logits_fn, 0.3, num_steps=40), images, labels, jax.random.key(0))
    """
    check_norm(norm)
    if stop_on_success and targeted:
        raise ValueError("stop_on_success is for untargeted attacks")
    step_size = default_step_size(eps, num_steps) if step_size is None else step_size

    def init(images, labels, key):
        return PGDState(images, labels, uniform_in_ball(key, images, eps, norm) if random_start else images)

    def step(state, iteration):
        del iteration  # every PGD step is alike
        adversarial = ascent_step(
            logits_fn, state.images, state.labels, state.adversarial, eps, step_size, norm, targeted, stop_on_success
        )
        return state._replace(adversarial=adversarial)

    return iterative.IterativeAttack(init, step, current_iterate, num_steps)


def iterate(
    logits_fn: LogitsFn,
    images: jax.Array,
    labels: jax.Array,
    start: jax.Array,
    eps: jax.Array | float,
    step_size: jax.Array | float,
    num_steps: int,
    norm: Norm = "linf",
    targeted: bool = False,
    unroll: bool = False,
    stop_on_success: bool = False,
) -> jax.Array:
    """`make_pgd`'s `num_steps` steps from a given `start` (see iterative.run_steps for `unroll`).

    >>> adversarial = iterate(logits_fn, images, labels, images, 0.3, 0.01, 40)
    """
    settings = dict(norm=norm, num_steps=num_steps, step_size=step_size, targeted=targeted)
    attack = make_pgd(logits_fn, eps, random_start=False, stop_on_success=stop_on_success, **settings)
    return attack.finalize(iterative.run_steps(attack, PGDState(images, labels, start), unroll=unroll))


def fgsm_random_start(
    logits_fn: LogitsFn,
    images: jax.Array,
    labels: jax.Array,
    eps: jax.Array | float,
    key: jax.Array,
    step_size: jax.Array | float | None = None,
    *,
    targeted: bool = False,
    clip_start: bool = True,
) -> jax.Array:
    """Wong et al.'s (2020) "fast" attack: a uniform start in the L-inf ball, then one
    sign step of `step_size` (1.25 eps by default), projected back to the ball and [0, 1].

    The random start is what keeps FGSM training from overfitting to FGSM's
    single, predictable step. With `clip_start=False` the start is not clipped
    to [0, 1] before the gradient is taken (only the result is), as in Wong et
    al.'s MNIST code. On MNIST's black background that matters: clipped, half
    the starts of a 0 pixel sit at 0, so a step of 1.25 eps always ends on the
    ball's corner, as plain FGSM's does; unclipped, it ends anywhere in
    [0.25 eps, eps]. Which start trains better depends on the network
    (docs/results.md, "Where the random start begins matters").

    >>> adversarial = fgsm_random_start(logits_fn, images, labels, 0.3, jax.random.key(0))
    """
    step_size = 1.25 * eps if step_size is None else step_size
    start = uniform_in_ball(key, images, eps, "linf", clip=clip_start)
    return iterate(logits_fn, images, labels, start, eps, step_size, 1, "linf", targeted)


def noisy_fgsm(
    logits_fn: LogitsFn,
    images: jax.Array,
    labels: jax.Array,
    eps: jax.Array | float,
    key: jax.Array,
    noise: float = 2.0,
    step_size: jax.Array | float | None = None,
    *,
    targeted: bool = False,
) -> jax.Array:
    """N-FGSM (de Jorge et al. 2022), a training attack: uniform noise of `noise` eps,
    clipped to [0, 1], then one sign step of `step_size` (eps by default), clipped
    to [0, 1] but *not* projected back into the eps ball.

    Its perturbation reaches (noise * eps + step_size) in L-inf, 3 eps by default:
    more than the budget, on purpose. The larger noise is what keeps single-step
    training from catastrophic overfitting where Wong et al.'s start does not,
    and skipping the projection keeps the step's full size. Not an evaluation
    attack: it leaves the threat model (hence not in ATTACKS).

    >>> adversarial = noisy_fgsm(logits_fn, images, labels, 0.3, jax.random.key(0))  # up to 0.9 from images
    """
    step_size = eps if step_size is None else step_size
    start = uniform_in_ball(key, images, noise * eps, "linf")
    gradient = ascent_gradient(logits_fn, start, labels, targeted)
    return clip_to_pixels(start + step_size * jnp.sign(gradient))


def bim(
    logits_fn: LogitsFn,
    images: jax.Array,
    labels: jax.Array,
    eps: jax.Array | float,
    *,
    num_steps: int = 10,
    step_size: jax.Array | float | None = None,
    targeted: bool = False,
    unroll: bool = False,
) -> jax.Array:
    """Basic iterative method (I-FGSM, Kurakin et al.): sign steps from the clean image,
    each projected onto the L-inf eps ball and [0, 1].

    >>> adversarial = bim(logits_fn, images, labels, 0.3, num_steps=10)
    """
    attack = make_pgd(logits_fn, eps, num_steps=num_steps, step_size=step_size, random_start=False, targeted=targeted)
    return iterative.run(attack, images, labels, None, unroll=unroll)


def pgd(
    logits_fn: LogitsFn,
    images: jax.Array,
    labels: jax.Array,
    eps: jax.Array | float,
    key: jax.Array | None = None,
    *,
    norm: Norm = "linf",
    num_steps: int = 40,
    step_size: jax.Array | float | None = None,
    num_restarts: int = 1,
    random_start: bool = True,
    targeted: bool = False,
    unroll: bool = False,
    restart_selection: str = "success_first",
    stop_on_success: bool = False,
) -> jax.Array:
    """Projected gradient descent (Madry et al.) in L-inf or L2, with restarts.

    Each restart starts from its own uniform draw in the eps ball (or from the
    clean image with `random_start=False`) and takes `num_steps` projected
    steps of `step_size` (2.5 eps / num_steps by default). Per example, the
    restart that fools the model, or failing that has the highest loss, is
    kept, so more restarts never make the attack weaker.
    `restart_selection="highest_loss", stop_on_success=True` is Wong et al.'s
    (2020) weaker evaluation instead (untargeted only), for comparing with their figures.

    >>> adversarial = pgd(logits_fn, images, labels, 0.3, jax.random.key(0), num_steps=50, num_restarts=10)
    """
    if random_start and key is None:
        raise ValueError("pgd with random_start needs a PRNG key")
    if num_restarts < 1:
        raise ValueError(f"num_restarts must be at least 1, got {num_restarts}")
    if restart_selection not in RESTART_SELECTIONS:
        raise ValueError(f"restart_selection must be one of {tuple(RESTART_SELECTIONS)}, got {restart_selection!r}")
    attack = make_pgd(
        logits_fn,
        eps,
        norm=norm,
        num_steps=num_steps,
        step_size=step_size,
        random_start=random_start,
        targeted=targeted,
        stop_on_success=stop_on_success,
    )
    keep = RESTART_SELECTIONS[restart_selection]

    def run(restart):
        restart_key = None if key is None else jax.random.fold_in(key, restart)  # the robustness fold's draw too
        adversarial = iterative.run(attack, images, labels, restart_key, unroll=unroll)
        return adversarial, attack_outcome(logits_fn, adversarial, labels, targeted)

    best = lax.fori_loop(1, num_restarts, lambda restart, best: keep(best, run(restart)), run(0))
    return best[0]
