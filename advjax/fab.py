"""The fast adaptive boundary attack (Croce & Hein, ICML 2020), in L-inf, as an IterativeAttack: FAB-T, toward
a target class, and FAB, toward whichever class's boundary is nearest.

FAB looks for the adversarial point nearest the clean image, not for the
strongest one within a budget. Each step linearises `f_target - f_label` at
the current point (FAB: `f_k - f_label` for the class k whose linearised
boundary is nearest, `nearest_difference`), so that the decision boundary
becomes a hyperplane, and
takes the minimal L-inf step onto it inside [0, 1] from the current point
and from the clean image (`hyperplane_step`). It then moves to a convex
combination of the two, each step stretched by `eta` to cross the boundary,
weighted toward the clean image's by `step_weight` (at most `alpha_max`).
An iterate that fools the model is recorded if it is the nearest so far and
pulled back toward the clean image, `x_orig + beta (x - x_orig)`, so that the
next steps search closer. Only the nearest point within eps counts.

It follows AutoAttack's `autoattack/fab_base.py` (`FABAttack.attack_single_run`
and `perturb`, both branches), `autoattack/fab_pt.py`
(`get_diff_logits_grads_batch` and its targeted twin) and `autoattack/fab_projections.py`
(`projection_linf`), with the standard version's settings: 100 iterations,
one run per target (no random start, as `use_rand_start=(counter > 0)` gives
with `n_restarts=1`), alpha_max 0.1, eta 1.05, beta 0.9. Where it departs:

- `hyperplane_step` brackets the radius by bisection on its value and solves
  the linear piece there, where the reference sorts the breakpoints and
  bisects over them; both give the minimal step, to float32's resolution;
- every example is attacked, where the reference attacks only those the model
  classifies correctly: an example already misclassified keeps distance 0 and
  is returned unchanged, as the reference returns it, and a cascade masks
  examples between attacks;
- the loop over targets and restarts is the caller's: FAB-T is one
  `make_fab_targeted` per rank in `STANDARD_TARGET_RANKS`, and
  `random_start=True` gives the start of the reference's later restarts
  (FAB in AutoAttack's "plus" version runs five, the first from the clean image).

Images are float32 [B, ...] in [0, 1]; the state leads with the batch axis.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from advjax import apgd, iterative
from advjax.losses import LogitsFn
from advjax.norms import clip_to_pixels, per_example, per_image

# AutoAttack's standard FAB-T: the 2nd to 10th most likely classes at the clean image, 9 targets.
STANDARD_TARGET_RANKS: tuple[int, ...] = apgd.STANDARD_TARGET_RANKS
# The reference's floor on a step's norm, so that step_weight never divides zero by zero.
STEP_NORM_FLOOR = 1e-8
# The reference's floor on a gradient's norm in FAB's distance to each class's boundary.
DISTANCE_FLOOR = 1e-12
# The reference's later restarts start this fraction of eps from the clean image, inside the ball.
START_FRACTION = 0.5
# Halvings of the largest room that bracket the radius: 2^-24 of it is below float32's resolution there.
RADIUS_BISECTIONS = 24


class FABState(NamedTuple):
    """Per example, every leaf leading with the batch axis."""

    images: jax.Array  # the clean images, whose nearest adversarial point is sought
    labels: jax.Array  # the labels the attack moves away from
    targets: jax.Array  # FAB-T: the classes whose boundary with the label each step projects onto (FAB: the labels)
    point: jax.Array  # the current iterate
    best: jax.Array  # the nearest adversarial point found (the clean image while none is)
    distance: jax.Array  # its L-inf distance to the clean image: 0 if misclassified there, inf while none found


def linf_distances(points: jax.Array, images: jax.Array) -> jax.Array:
    """max |points - images| per example, [B].

    >>> linf_distances(images + 0.1, images)  # [0.1, 0.1, ...]
    """
    return per_image(jnp.max, jnp.abs(points - images))


def radius_reaching(gap: jax.Array, weights: jax.Array, room: jax.Array) -> jax.Array:
    """The least r >= 0 with sum_i weights_i min(r, room_i) >= gap over the last axis; inf where none.

    The sum is increasing and piecewise linear in r, with breakpoints at the
    rooms. Bisection on r narrows it to RADIUS_BISECTIONS halvings of the
    largest room; one division then solves the linear piece the lower end lies
    on, clamped to the bracket. It replaces a sort of the breakpoints, which
    XLA:CPU runs far slower than a few dozen elementwise sums
    (docs/design.md, "FAB's projection without a sort").

    >>> radius_reaching(jnp.array(0.3), jnp.array([1.0, 1.0]), jnp.array([0.1, 0.5]))  # 0.2
    """
    decrease = lambda r: jnp.sum(weights * jnp.minimum(r[..., None], room), axis=-1)
    top = jnp.max(room, axis=-1)

    def halve(_, bracket):
        low, high = bracket
        middle = (low + high) / 2.0
        short = decrease(middle) < gap
        return jnp.where(short, middle, low), jnp.where(short, high, middle)

    low, high = jax.lax.fori_loop(0, RADIUS_BISECTIONS, halve, (jnp.zeros_like(top), top))
    saturated = room <= low[..., None]
    base = jnp.sum(jnp.where(saturated, weights * room, 0.0), axis=-1)
    slope = jnp.sum(jnp.where(saturated, 0.0, weights), axis=-1)
    radius = jnp.clip((gap - base) / jnp.where(slope > 0, slope, 1.0), low, high)
    return jnp.where(decrease(top) >= gap, radius, jnp.inf)


def hyperplane_step(points: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """The minimal L-inf step delta with w.(points + delta) + b = 0 and points + delta in [0, 1], over the last axis.

    Where no step inside the box reaches the hyperplane, the box's corner
    nearest it: every pixel at the bound that moves w.z toward -b. The
    reference's `projection_linf`, for points [..., D], w [..., D], b [...].

    >>> delta = hyperplane_step(jnp.full((1, 2), 0.5), jnp.array([[1.0, -1.0]]), jnp.array([0.2]))  # [[-0.1, 0.1]]
    """
    value = jnp.sum(w * points, axis=-1) + b
    # Oriented so that the step lowers w.z: each pixel then moves toward 0 where w > 0 and toward 1 where w < 0.
    w = jnp.where(value[..., None] >= 0, w, -w)
    room = jnp.where(w > 0, points, 1.0 - points)
    radius = radius_reaching(jnp.abs(value), jnp.abs(w), room)
    return -jnp.sign(w) * jnp.minimum(radius[..., None], room)


def step_weight(current_norm: jax.Array, original_norm: jax.Array, alpha_max: float) -> jax.Array:
    """alpha = min(|d_current| / (|d_current| + |d_original|), alpha_max), the weight of the clean image's step.

    The farther the current point is from the boundary, the more the clean
    image's step counts, which keeps the iterates near the clean image; the
    norms are floored as in the reference.

    >>> step_weight(jnp.array([1.0, 0.01]), jnp.array([1.0, 1.0]), 0.1)  # [0.1, ~0.0099]
    """
    current = jnp.maximum(current_norm, STEP_NORM_FLOOR)
    original = jnp.maximum(original_norm, STEP_NORM_FLOOR)
    return jnp.minimum(current / (current + original), alpha_max)


def target_difference(
    logits_fn: LogitsFn, points: jax.Array, labels: jax.Array, targets: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """f_target - f_label at `points` [B] and its input gradient: one forward and one backward pass.

    The batch value is a sum, so each example's gradient is its own.

    >>> value, gradient = target_difference(logits_fn, images, labels, targets)
    """

    def summed(x):
        logits = logits_fn(x)
        pick = lambda classes: jnp.take_along_axis(logits, classes[:, None], axis=-1)[:, 0]
        difference = pick(targets) - pick(labels)
        return jnp.sum(difference), difference

    (_, value), gradient = jax.value_and_grad(summed, has_aux=True)(points)
    return value, gradient


def nearest_difference(logits_fn: LogitsFn, points: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """f_k - f_label at `points` [B] and its input gradient, for the class k != label whose linearised boundary is
    nearest in L-inf, |f_k - f_label| / ||grad (f_k - f_label)||_1: one forward and one backward pass per class.

    The reference's `get_diff_logits_grads_batch` and its choice of class; ties go to the lower class.

    >>> value, gradient = nearest_difference(logits_fn, images, labels)
    """
    logits, pullback = jax.vjp(logits_fn, points)
    num_classes = logits.shape[-1]
    # Row c of the Jacobian for every example at once: each example's logits depend on its own image alone.
    rows = jax.vmap(
        lambda c: pullback(jnp.broadcast_to(jax.nn.one_hot(c, num_classes, dtype=logits.dtype), logits.shape))[0]
    )
    jacobian = jnp.moveaxis(rows(jnp.arange(num_classes)), 0, 1)  # [B, C, ...]
    own = lambda x: jnp.take_along_axis(x, labels.reshape((-1, 1) + (1,) * (x.ndim - 2)), axis=1)
    difference, gradients = logits - own(logits), jacobian - own(jacobian)
    gradient_norms = jnp.sum(jnp.abs(gradients.reshape(gradients.shape[:2] + (-1,))), axis=-1)
    distance = jnp.abs(difference) / (DISTANCE_FLOOR + gradient_norms)
    nearest = jnp.argmin(jnp.where(jax.nn.one_hot(labels, num_classes, dtype=bool), jnp.inf, distance), axis=-1)
    pick = lambda x: jnp.take_along_axis(x, nearest.reshape((-1, 1) + (1,) * (x.ndim - 2)), axis=1)[:, 0]
    return pick(difference), pick(gradients)


def boundary_move(state: FABState, value: jax.Array, gradient: jax.Array, alpha_max: float, eta: float) -> jax.Array:
    """The next iterate: the two minimal steps onto the linearised boundary, stretched by eta, combined by alpha.

    The hyperplane w.z + b = 0 is f_target - f_label linearised at the current
    point, value + w.(z - point), for the current point and the clean image alike.

    >>> point = boundary_move(state, *target_difference(logits_fn, state.point, state.labels, state.targets), 0.1, 1.05)
    """
    flat = lambda x: x.reshape((x.shape[0], -1))
    w = flat(gradient)
    b = value - jnp.sum(w * flat(state.point), axis=-1)
    from_current = hyperplane_step(flat(state.point), w, b).reshape(state.point.shape)
    from_original = hyperplane_step(flat(state.images), w, b).reshape(state.images.shape)
    norm = lambda delta: per_image(jnp.max, jnp.abs(delta))
    alpha = per_example(step_weight(norm(from_current), norm(from_original), alpha_max), state.point)
    combined = (1.0 - alpha) * (state.point + eta * from_current) + alpha * (state.images + eta * from_original)
    return clip_to_pixels(combined)


def record(state: FABState, candidate: jax.Array, fooled: jax.Array, beta: float) -> FABState:
    """Keeps `candidate` where it fools the model nearer than the best so far, and pulls fooling ones back by beta.

    >>> state = record(state, candidate, jnp.argmax(logits_fn(candidate), axis=-1) != state.labels, 0.9)
    """
    distance = linf_distances(candidate, state.images)
    nearer = fooled & (distance < state.distance)
    pulled_back = state.images + beta * (candidate - state.images)
    return state._replace(
        point=apgd.select(fooled, pulled_back, candidate),
        best=apgd.select(nearer, candidate, state.best),
        distance=jnp.where(nearer, distance, state.distance),
    )


def fab_step(
    logits_fn: LogitsFn, state: FABState, alpha_max: float, eta: float, beta: float, targeted: bool = True
) -> FABState:
    """One FAB iteration for every example: linearise (toward the target, or the nearest boundary when not
    `targeted`), move, then check the new point with one more forward pass.

    >>> state = fab_step(logits_fn, state, 0.1, 1.05, 0.9)
    """
    if targeted:
        value, gradient = target_difference(logits_fn, state.point, state.labels, state.targets)
    else:
        value, gradient = nearest_difference(logits_fn, state.point, state.labels)
    candidate = boundary_move(state, value, gradient, alpha_max, eta)
    fooled = jnp.argmax(logits_fn(candidate), axis=-1) != state.labels
    return record(state, candidate, fooled, beta)


def restart_point(key: jax.Array, images: jax.Array, eps: jax.Array | float) -> jax.Array:
    """The start of the reference's later restarts: a uniform draw rescaled to L-inf norm eps / 2, clipped to [0, 1].

    >>> start = restart_point(jax.random.key(0), images, 0.3)  # 0.15 from each image, before clipping
    """
    draw = jax.random.uniform(key, images.shape, images.dtype, -1.0, 1.0)
    return clip_to_pixels(images + apgd.onto_sphere(draw, START_FRACTION * eps, "linf"))


def start_point(key: jax.Array, images: jax.Array, eps: jax.Array | float, random_start: bool | jax.Array) -> jax.Array:
    """The clean images, or `restart_point` where `random_start`, which may be traced (a restart's index > 0).

    >>> start = start_point(key, images, 0.3, restart > 0)
    """
    if isinstance(random_start, bool):
        return restart_point(key, images, eps) if random_start else images
    chosen = jnp.broadcast_to(jnp.asarray(random_start), images.shape[:1])
    return apgd.select(chosen, restart_point(key, images, eps), images)


def fab_init(
    logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, start: jax.Array, target_rank: int | jax.Array | None
) -> FABState:
    """The state before the first step: the targets ranked at the clean image (None, untargeted: the labels, unused),
    and distance 0 where it is misclassified.

    >>> state = fab_init(logits_fn, images, labels, images, 2)
    """
    logits = logits_fn(images)
    misclassified = jnp.argmax(logits, axis=-1) != labels
    distance = jnp.where(misclassified, 0.0, jnp.inf).astype(images.dtype)
    targets = labels if target_rank is None else apgd.ranked_class(logits, target_rank)
    return FABState(images, labels, targets, start, images, distance)


def finalize_within(state: FABState, eps: jax.Array | float) -> jax.Array:
    """The nearest adversarial point where it is within eps in L-inf, else the clean image.

    >>> adversarial = finalize_within(state, 8 / 255)
    """
    return apgd.select(state.distance <= eps, state.best, state.images)


def make_fab(
    logits_fn: LogitsFn,
    eps: jax.Array | float,
    *,
    num_steps: int = 100,
    target_rank: int | jax.Array | None = None,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    random_start: bool | jax.Array = False,
) -> iterative.IterativeAttack:
    """FAB in L-inf: untargeted by default, each step projecting onto the nearest linearised boundary
    (`nearest_difference`, one backward pass per class); toward each clean image's `target_rank`-th most likely
    class when one is given (FAB-T, `make_fab_targeted`). AutoAttack's "plus" version runs the untargeted one five
    times, the later restarts from `random_start` (which may be traced: `restart > 0`).

    The state is a FABState, so `distance`, the minimal L-inf distance found,
    can be read after any step; `finalize` returns the nearest adversarial point
    where it is within eps, else the clean image. eps enters only there and in
    the random start.

    >>> x_adv = iterative.run(make_fab(logits_fn, 0.3), images, labels, jax.random.key(0))
    """
    if target_rank is not None:
        apgd.check_target_rank(target_rank)
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")

    def init(images: jax.Array, labels: jax.Array, key: jax.Array) -> FABState:
        return fab_init(logits_fn, images, labels, start_point(key, images, eps, random_start), target_rank)

    def step(state: FABState, iteration: jax.Array) -> FABState:
        return fab_step(logits_fn, state, alpha_max, eta, beta, targeted=target_rank is not None)

    return iterative.IterativeAttack(init, step, lambda state: finalize_within(state, eps), num_steps)


def make_fab_targeted(
    logits_fn: LogitsFn, eps: jax.Array | float, *, target_rank: int | jax.Array = 2, **options
) -> iterative.IterativeAttack:
    """FAB-T in L-inf toward each clean image's `target_rank`-th most likely class (2 the runner-up); `options`
    are make_fab's. The defaults are one target of AutoAttack's standard FAB-T, which runs once per rank in
    STANDARD_TARGET_RANKS.

    >>> x_adv = iterative.run(make_fab_targeted(logits_fn, 8 / 255, target_rank=3), images, labels, jax.random.key(0))
    """
    return make_fab(logits_fn, eps, target_rank=target_rank, **options)
