"""Perturbations as pure, batched functions.

Every function takes a batch of float32 images [B, 28, 28, 1] in [0, 1] and
returns perturbed images of the same shape, clipped to [0, 1]. Strengths
(`eps`, `sigma`, step sizes) may be traced scalars, so a caller can `jax.vmap`
over them; iterations run under `lax.fori_loop` / `lax.while_loop`, so the
compiled size does not grow with the number of steps.

Attacks see the model only through `logits_fn(images) -> logits`, which the
caller builds with the model in eval mode (dropout off, DESIGN.md pitfall 1).
`labels` are whatever the caller chooses to attack: the true labels, or
`predicted_labels` to avoid label leaking (pitfall 5). With `targeted=True`
they are target classes instead, and the attack descends the loss toward them;
`least_likely_labels` gives Kurakin et al.'s least-likely targets.

The attacks: `fgsm`, `fgm_l2`, `fgsm_random_start` (Wong et al. 2020), `bim`,
`pgd` (L-inf or L2, random start, restarts), `deepfool`; and `make_attack`,
which gives each of them one signature, `attack(logits_fn, images, labels,
eps, key)`, for an evaluator that vmaps over eps.
"""

import functools
import inspect
from typing import Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from advjax import objectives

LogitsFn = Callable[[jax.Array], jax.Array]


def clip_to_pixels(images: jax.Array) -> jax.Array:
    return jnp.clip(images, 0.0, 1.0)


def predicted_labels(logits_fn: LogitsFn, images: jax.Array) -> jax.Array:
    """The model's own labels: attacking them avoids label leaking (pitfall 5)."""
    return jnp.argmax(logits_fn(images), axis=-1)


def input_gradient(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array) -> jax.Array:
    """d J / d x per example, J the cross-entropy from logits (pitfall 2).

    The batch loss is a sum, not a mean, so each example's gradient is its own
    and does not shrink with the batch size.
    """

    def summed_loss(x):
        return jnp.sum(objectives.cross_entropy(logits_fn(x), labels))

    return jax.grad(summed_loss)(images)


def ascent_gradient(
    logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, targeted: bool = False
) -> jax.Array:
    """The gradient an attack climbs: +grad J(y), or -grad J(target) when targeted.

    A targeted attack descends the loss of its target class, so that every
    attack can take the same ascent step.
    """
    gradient = input_gradient(logits_fn, images, labels)
    return -gradient if targeted else gradient


def fgsm_direction(
    logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, *, targeted: bool = False
) -> jax.Array:
    """sign(grad_x J): independent of eps, so one gradient serves a whole eps sweep.

    Pixels whose gradient is exactly zero do not move (sign(0) = 0, pitfall 4).
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
    """Fast gradient sign method: x + eps * sign(grad_x J), clipped to [0, 1]."""
    return clip_to_pixels(images + eps * fgsm_direction(logits_fn, images, labels, targeted=targeted))


def gaussian(
    key: jax.Array, images: jax.Array, sigma: jax.Array | float, mean: jax.Array | float = 0.0
) -> jax.Array:
    """x + N(mean, sigma^2) per pixel, clipped to [0, 1].

    `sigma` is the std before clipping; `perturbation_stats` gives it after.
    """
    noise = mean + sigma * jax.random.normal(key, images.shape, images.dtype)
    return clip_to_pixels(images + noise)


def _per_image(fn, x: jax.Array) -> jax.Array:
    return fn(x.reshape((x.shape[0], -1)), axis=1)


def matched_gaussian(key: jax.Array, images: jax.Array, reference: jax.Array) -> jax.Array:
    """Gaussian noise with the mean and std, per image, of `reference - images`.

    The paper (section 5) compares FGSM with random noise of the same mean and
    standard deviation; `reference` is the FGSM image, and its perturbation is
    measured after clipping, since that is what the model saw.
    """
    delta = reference - images
    mean = _per_image(jnp.mean, delta)[:, None, None, None]
    std = _per_image(jnp.std, delta)[:, None, None, None]
    return gaussian(key, images, std, mean)


class PerturbationStats(NamedTuple):
    """Per-image statistics of the actual (post-clipping) perturbation, each [B]."""

    mean: jax.Array
    std: jax.Array
    linf: jax.Array
    l2: jax.Array


def perturbation_stats(images: jax.Array, perturbed: jax.Array) -> PerturbationStats:
    delta = perturbed - images
    return PerturbationStats(
        mean=_per_image(jnp.mean, delta),
        std=_per_image(jnp.std, delta),
        linf=_per_image(jnp.max, jnp.abs(delta)),
        l2=jnp.sqrt(_per_image(jnp.sum, jnp.square(delta))),
    )


# ----------------------------------------------------------------------------
# Norms, steps and projections.

Norm = Literal["linf", "l2"]
NORMS: tuple[str, ...] = ("linf", "l2")

# Inside the square root, so a zero vector gets norm sqrt(1e-12), not 0 (pitfall 4).
_L2_EPSILON = 1e-12


def _per_example(values: jax.Array, like: jax.Array) -> jax.Array:
    """[B] -> [B, 1, 1, ...], to scale each example of `like` by its own value."""
    return values.reshape((-1,) + (1,) * (like.ndim - 1))


def l2_norms(x: jax.Array) -> jax.Array:
    """Per-example L2 norm over all but the batch axis, [B]."""
    return jnp.sqrt(_per_image(jnp.sum, jnp.square(x)))


def l2_unit(x: jax.Array) -> jax.Array:
    """x / ||x||_2 per example; an all-zero example stays zero.

    The rescaling by max|x| first matters: a confidently classified example has
    gradients of ~1e-8 whose squares sum to far below the constant under the
    square root, which would otherwise shrink the step instead of normalising it.
    """
    scale = _per_example(_per_image(jnp.max, jnp.abs(x)), x)
    x = x / jnp.where(scale > 0, scale, 1.0)
    return x / _per_example(jnp.sqrt(_per_image(jnp.sum, jnp.square(x)) + _L2_EPSILON), x)


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose from {NORMS}")


def steepest_ascent(gradient: jax.Array, norm: Norm) -> jax.Array:
    """The unit-norm direction that most increases a linearised loss: sign for L-inf, g/||g|| for L2."""
    _check_norm(norm)
    return jnp.sign(gradient) if norm == "linf" else l2_unit(gradient)


def project_linf(adversarial: jax.Array, images: jax.Array, eps: jax.Array | float) -> jax.Array:
    """The nearest point of the L-inf ball around `images` that is also in [0, 1].

    Both sets are boxes, so clipping to one and then the other is the exact
    projection onto their intersection.
    """
    return clip_to_pixels(jnp.clip(adversarial, images - eps, images + eps))


def project_l2(adversarial: jax.Array, images: jax.Array, eps: jax.Array | float) -> jax.Array:
    """Shrink the perturbation onto the L2 ball, then clip to [0, 1].

    Clipping only moves pixels back toward `images` (which lie in [0, 1]), so
    it cannot leave the ball.
    """
    delta = adversarial - images
    norms = l2_norms(delta)
    factor = jnp.where(norms > eps, eps / jnp.where(norms > 0, norms, 1.0), 1.0)
    return clip_to_pixels(images + delta * _per_example(factor, delta))


def project(adversarial: jax.Array, images: jax.Array, eps: jax.Array | float, norm: Norm) -> jax.Array:
    _check_norm(norm)
    return (project_linf if norm == "linf" else project_l2)(adversarial, images, eps)


def uniform_in_ball(
    key: jax.Array, images: jax.Array, eps: jax.Array | float, norm: Norm, *, clip: bool = True
) -> jax.Array:
    """A uniform draw from the eps ball around each image, clipped to [0, 1] unless `clip=False`.

    For L2 the radius is eps * u^(1/d), which makes the draw uniform in the
    ball's volume rather than bunched at its centre.
    """
    _check_norm(norm)
    if norm == "linf":
        draw = images + eps * jax.random.uniform(key, images.shape, images.dtype, -1.0, 1.0)
    else:
        direction_key, radius_key = jax.random.split(key)
        direction = l2_unit(jax.random.normal(direction_key, images.shape, images.dtype))
        dimension = images[0].size
        radius = eps * jax.random.uniform(radius_key, images.shape[:1], images.dtype) ** (1.0 / dimension)
        draw = images + direction * _per_example(radius, images)
    return clip_to_pixels(draw) if clip else draw


# ----------------------------------------------------------------------------
# Gradient attacks.


def least_likely_labels(logits: jax.Array) -> jax.Array:
    """The class the model finds least likely: Kurakin et al.'s target for a targeted attack."""
    return jnp.argmin(logits, axis=-1)


def fgm_l2(
    logits_fn: LogitsFn,
    images: jax.Array,
    labels: jax.Array,
    eps: jax.Array | float,
    *,
    targeted: bool = False,
) -> jax.Array:
    """Fast gradient method in L2: x + eps * g / ||g||_2 per example, clipped to [0, 1]."""
    step = l2_unit(ascent_gradient(logits_fn, images, labels, targeted))
    return clip_to_pixels(images + eps * step)


def default_step_size(eps: jax.Array | float, num_steps: int) -> jax.Array | float:
    """2.5 eps / steps (Madry et al.): enough to reach the ball's edge and still move along it."""
    return 2.5 * eps / num_steps


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
    """One projected steepest-ascent step from `adversarial`, back into the eps ball around `images` and [0, 1].

    With `stop_on_success` (untargeted), examples no longer classified as `labels`
    stay where they are, as in Wong et al.'s (2020) evaluation.
    """
    gradient = ascent_gradient(logits_fn, adversarial, labels, targeted)
    stepped = project(adversarial + step_size * steepest_ascent(gradient, norm), images, eps, norm)
    if not stop_on_success:
        return stepped
    # The same forward pass as the gradient's: XLA merges the two (the compiled
    # step has as many matrix products with stop_on_success as without).
    still_correct = jnp.argmax(logits_fn(adversarial), axis=-1) == labels
    return jnp.where(_per_example(still_correct, adversarial), stepped, adversarial)


def repeat(step: Callable[[int, jax.Array], jax.Array], num_steps: int, start: jax.Array, unroll: bool = False) -> jax.Array:
    """`step` applied `num_steps` times: written out when `unroll` (or for one step), else a fori_loop.

    Written out, because XLA:CPU runs the CNN's input-gradient convolutions
    about 3x slower inside a loop (measured; DESIGN.md pitfall 9), and
    lax.fori_loop keeps even a one-trip or `unroll=True` loop as a while loop.
    The price is a compile that grows with the steps.
    """
    if unroll or num_steps == 1:
        for index in range(num_steps):
            start = step(index, start)
        return start
    return lax.fori_loop(0, num_steps, step, start)


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
    """`num_steps` projected steepest-ascent steps from `start`: the core of BIM and PGD (see `repeat` for `unroll`)."""
    _check_norm(norm)
    step = lambda _, adversarial: ascent_step(logits_fn, images, labels, adversarial, eps, step_size, norm, targeted, stop_on_success)
    return repeat(step, num_steps, start, unroll)


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
    [0.25 eps, eps]. At eps = 0.3, Wong et al.'s network trained with clipped
    starts overfits catastrophically (PGD accuracy 0); the paper's larger CNN
    fared better with clipped starts (README, "Robustness beyond the paper").
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
    each projected onto the L-inf eps ball and [0, 1]."""
    step_size = default_step_size(eps, num_steps) if step_size is None else step_size
    return iterate(logits_fn, images, labels, images, eps, step_size, num_steps, "linf", targeted, unroll)


class AttackOutcome(NamedTuple):
    """Per example, [B] each: whether the attack succeeded and the loss it climbs."""

    success: jax.Array
    objective: jax.Array


def attack_outcome(
    logits_fn: LogitsFn, adversarial: jax.Array, labels: jax.Array, targeted: bool = False
) -> AttackOutcome:
    """Success is a wrong prediction (untargeted) or the target's (targeted)."""
    logits = logits_fn(adversarial)
    loss = objectives.cross_entropy(logits, labels)
    predicted = jnp.argmax(logits, axis=-1)
    if targeted:
        return AttackOutcome(predicted == labels, -loss)
    return AttackOutcome(predicted != labels, loss)


def _keep_where(better: jax.Array, best: tuple, candidate: tuple) -> tuple:
    """Per example, the candidate's (images, outcome) where `better`, else the best's."""
    choose = lambda new, old: jnp.where(_per_example(better, new), new, old)
    return jax.tree.map(choose, candidate, best)


def keep_worst(
    best: tuple[jax.Array, AttackOutcome], candidate: tuple[jax.Array, AttackOutcome]
) -> tuple[jax.Array, AttackOutcome]:
    """Per example, the stronger of two adversarial images: success first, then the higher objective.

    Success ranks first because a restart that fools the model matters more to
    a robust accuracy than one with a higher loss that does not.
    """
    (_, best_outcome), (_, outcome) = best, candidate
    better = (outcome.success & ~best_outcome.success) | (
        (outcome.success == best_outcome.success) & (outcome.objective > best_outcome.objective)
    )
    return _keep_where(better, best, candidate)


def keep_highest_loss(
    best: tuple[jax.Array, AttackOutcome], candidate: tuple[jax.Array, AttackOutcome]
) -> tuple[jax.Array, AttackOutcome]:
    """Per example, the candidate if its objective is at least the best's: Wong et al.'s (2020)
    restart selection, which ignores success. A restart that fooled the model can
    lose to a later one with a higher loss that did not, so it is weaker than
    `keep_worst`; it exists to reproduce their published evaluation.
    """
    return _keep_where(candidate[1].objective >= best[1].objective, best, candidate)


RESTART_SELECTIONS = {"success_first": keep_worst, "highest_loss": keep_highest_loss}


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
    """
    _check_norm(norm)
    if random_start and key is None:
        raise ValueError("pgd with random_start needs a PRNG key")
    if num_restarts < 1:
        raise ValueError(f"num_restarts must be at least 1, got {num_restarts}")
    if restart_selection not in RESTART_SELECTIONS:
        raise ValueError(f"restart_selection must be one of {tuple(RESTART_SELECTIONS)}, got {restart_selection!r}")
    if stop_on_success and targeted:
        raise ValueError("stop_on_success is for untargeted attacks")
    step_size = default_step_size(eps, num_steps) if step_size is None else step_size
    keep = RESTART_SELECTIONS[restart_selection]

    def run(restart):
        start = uniform_in_ball(jax.random.fold_in(key, restart), images, eps, norm) if random_start else images
        adversarial = iterate(logits_fn, images, labels, start, eps, step_size, num_steps, norm, targeted, unroll, stop_on_success)
        return adversarial, attack_outcome(logits_fn, adversarial, labels, targeted)

    best = lax.fori_loop(1, num_restarts, lambda restart, best: keep(best, run(restart)), run(0))
    return best[0]


# ----------------------------------------------------------------------------
# DeepFool.


def class_gradients(logits_fn: LogitsFn, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Logits [B, K] and d logit_k / d x for every class, [B, K, D] with D the pixels.

    One backward pass per class through a single forward pass; it assumes, as
    every eval-mode model here does, that an example's logits depend on that
    example alone.
    """
    logits, vjp = jax.vjp(logits_fn, images)
    num_classes = logits.shape[-1]
    cotangents = jnp.broadcast_to(jnp.eye(num_classes, dtype=logits.dtype)[:, None, :], (num_classes, *logits.shape))
    (gradients,) = jax.vmap(vjp)(cotangents)
    return logits, jnp.moveaxis(gradients, 0, 1).reshape(logits.shape + (-1,))


def deepfool_step(logits: jax.Array, gradients: jax.Array, labels: jax.Array) -> jax.Array:
    """The linearised minimal L2 step across the nearest other class's boundary, [B, D].

    Linearised, class k overtakes `labels` at distance |f_k - f_y| / ||w_k - w_y||
    along w_k - w_y; the step goes to the nearest such boundary, plus 1e-4 in L2
    so that it does not land exactly on it (as in the authors' code).
    """
    rows = jnp.arange(logits.shape[0])
    margins = logits - logits[rows, labels][:, None]
    directions = gradients - gradients[rows, labels][:, None, :]
    norms = jnp.sqrt(jnp.sum(jnp.square(directions), axis=-1) + _L2_EPSILON)
    distances = jnp.abs(margins) / norms
    distances = distances.at[rows, labels].set(jnp.inf)
    closest = jnp.argmin(distances, axis=-1)
    length = distances[rows, closest] + 1e-4
    return (length / norms[rows, closest])[:, None] * directions[rows, closest]


def deepfool(
    logits_fn: LogitsFn,
    images: jax.Array,
    labels: jax.Array,
    *,
    max_iter: int = 50,
    overshoot: float = 0.02,
) -> jax.Array:
    """DeepFool in L2 for many classes (Moosavi-Dezfooli et al. 2016).

    Accumulates linearised minimal steps until the prediction leaves `labels`
    (the paper uses the model's own prediction: pass `predicted_labels`); the
    image is x + (1 + overshoot) * total step, clipped to [0, 1]. Examples stop
    one by one (a done mask), and the loop stops when all have, or after
    `max_iter` steps. An example already not predicted as its label is
    returned unchanged.
    """
    still_labelled = lambda x: jnp.argmax(logits_fn(x), axis=-1) == labels

    def active(state):
        iteration, _, _, running = state
        return (iteration < max_iter) & jnp.any(running)

    def step(state):
        iteration, total, adversarial, running = state
        logits, gradients = class_gradients(logits_fn, adversarial)
        move = deepfool_step(logits, gradients, labels).reshape(images.shape)
        total = total + jnp.where(_per_example(running, move), move, 0.0)
        adversarial = clip_to_pixels(images + (1.0 + overshoot) * total)
        return iteration + 1, total, adversarial, running & still_labelled(adversarial)

    state = (jnp.int32(0), jnp.zeros_like(images), images, still_labelled(images))
    return lax.while_loop(active, step, state)[2]


def deepfool_within(
    logits_fn: LogitsFn,
    images: jax.Array,
    labels: jax.Array,
    eps: jax.Array | float,
    *,
    max_iter: int = 50,
    overshoot: float = 0.02,
) -> jax.Array:
    """DeepFool's image where its L2 perturbation is at most eps, else the clean image.

    DeepFool has no budget of its own; this is the image an L2 attacker with
    budget eps gets from it, so accuracy against eps is the share of examples
    whose DeepFool distance exceeds eps. The search does not depend on eps, so
    under a vmap over eps it runs once.
    """
    adversarial = deepfool(logits_fn, images, labels, max_iter=max_iter, overshoot=overshoot)
    within = l2_norms(adversarial - images) <= eps
    return jnp.where(_per_example(within, images), adversarial, images)


# ----------------------------------------------------------------------------
# One signature for every attack.

Attack = Callable[[LogitsFn, jax.Array, jax.Array, jax.Array | float, jax.Array | None], jax.Array]


def _fgsm_attack(logits_fn, images, labels, eps, key, *, targeted: bool = False):
    return fgsm(logits_fn, images, labels, eps, targeted=targeted)


def _fgm_l2_attack(logits_fn, images, labels, eps, key, *, targeted: bool = False):
    return fgm_l2(logits_fn, images, labels, eps, targeted=targeted)


def _fgsm_random_start_attack(logits_fn, images, labels, eps, key, *, step_size=None, targeted: bool = False):
    return fgsm_random_start(logits_fn, images, labels, eps, key, step_size, targeted=targeted)


def _bim_attack(logits_fn, images, labels, eps, key, *, num_steps=10, step_size=None, targeted: bool = False, unroll: bool = False):
    return bim(logits_fn, images, labels, eps, num_steps=num_steps, step_size=step_size, targeted=targeted, unroll=unroll)


def _deepfool_attack(logits_fn, images, labels, eps, key, *, max_iter=50, overshoot=0.02):
    return deepfool_within(logits_fn, images, labels, eps, max_iter=max_iter, overshoot=overshoot)


ATTACKS: dict[str, Callable[..., jax.Array]] = {
    "fgsm": _fgsm_attack,
    "fgm_l2": _fgm_l2_attack,
    "fgsm_random_start": _fgsm_random_start_attack,
    "bim": _bim_attack,
    "pgd": functools.partial(pgd, norm="linf"),
    "pgd_l2": functools.partial(pgd, norm="l2"),
    "deepfool": _deepfool_attack,
}


def _accepts(fn: Callable, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def least_likely_attack(attack: Attack) -> Attack:
    """The attack, targeted at each image's least-likely class on the clean image.

    The caller's labels are ignored: the targets come from the model.
    """

    def attacked(logits_fn, images, labels, eps, key=None):
        targets = lax.stop_gradient(least_likely_labels(logits_fn(images)))
        return attack(logits_fn, images, targets, eps, key)

    return attacked


def make_attack(
    name: str, *, least_likely: bool = False, relative_step_size: float | None = None, **params
) -> Attack:
    """`attack(logits_fn, images, labels, eps, key=None)` for any attack in `ATTACKS`.

    `params` are the attack's own keywords (`num_steps`, `num_restarts`,
    `targeted`, ...), checked here rather than at trace time.
    `relative_step_size` sets the step to that multiple of eps, so one attack
    keeps its shape across an eps sweep. `least_likely=True` targets each
    image's least-likely class. Deterministic attacks ignore `key`.
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
