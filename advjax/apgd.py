"""Auto-PGD (Croce & Hein, ICML 2020) in L-inf or L2, as an IterativeAttack.

APGD is PGD with momentum and a step size that adapts per example, so it
needs no step-size tuning. It starts on the sphere of the eps ball with a step
of 2 eps; at fixed checkpoints (`checkpoints`) each example halves its step
and restarts from its best point when its loss rose in at most `rho` of the
period's steps, or when its step did not halve at the previous checkpoint and
its best loss has not improved since (`should_halve`). Each step is
`z = P(x + eta * steepest_ascent(g))`, then
`x' = P(x + momentum * (z - x) + (1 - momentum) * (x - x_prev))`.

It follows `autoattack/autopgd_base.py` (`APGDAttack.attack_single_run`,
`dlr_loss`; `APGDAttack_targeted.dlr_loss_targeted` and its choice of target),
for its L-inf and L2 branches (EoT over a randomised model is advjax.eot's). Where it departs:

- the rises of the first period start from the start point's loss, as in the
  paper's algorithm: the reference's `check_oscillation` compares the first
  step with `loss_steps[-1]`, an entry not yet written (zero);
- `finalize` returns the best-loss point where no iterate fooled the model,
  so that a restart or cascade can still pick the strongest; the reference's
  `perturb` returns the clean image there;
- every example is attacked, where `perturb` attacks only those the model
  classifies correctly: a cascade masks examples between attacks instead;
- restarts and AutoAttack's loop over targets are the caller's: APGD-T is one
  `make_apgd_targeted` per rank in `STANDARD_TARGET_RANKS`.

The checkpoints are Python ints (num_steps is static); the iteration is traced,
so the rule applies through `jnp.where` per example and the steps fit a fori_loop.
"""

import functools
from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from advjax import iterative, losses
from advjax.losses import LogitsFn
from advjax.norms import Norm, check_norm, l2_norms, per_example, per_image, project, steepest_ascent, uniform_in_ball

Loss = Literal["ce", "dlr", "dlr_targeted"]
LOSSES: tuple[str, ...] = ("ce", "dlr", "dlr_targeted")

# The reference's period lengths as fractions of num_steps: the first, the decrement, and the floor.
FIRST_PERIOD, PERIOD_DECREMENT, SHORTEST_PERIOD = 0.22, 0.03, 0.06
# The reference's first step size in eps, for L-inf and L2 alike: large, so the first steps explore.
INITIAL_STEP = 2.0
# AutoAttack's standard APGD-T: the 2nd to 10th most likely classes at the clean image, 9 targets.
STANDARD_TARGET_RANKS: tuple[int, ...] = tuple(range(2, 11))

# (points, labels, targets) -> (per-example loss, misclassified, input gradient)
Evaluate = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]


class APGDState(NamedTuple):
    """Per example, every leaf leading with the batch axis."""

    images: jax.Array  # the clean images, the centres of the eps balls
    labels: jax.Array  # the labels the attack moves away from
    targets: jax.Array  # the classes a targeted loss moves toward (the labels otherwise, unused)
    point: jax.Array  # the current iterate
    previous: jax.Array  # the iterate before the last step, for the momentum term
    gradient: jax.Array  # the loss's input gradient at `point`
    last_loss: jax.Array  # the loss of the latest iterate, which the next step's is compared with
    step_size: jax.Array  # eta, halved at checkpoints
    best_loss: jax.Array  # the highest loss so far
    best_point: jax.Array  # where it was reached
    best_gradient: jax.Array  # its gradient, so a restart from best_point needs no extra pass
    best_loss_at_check: jax.Array  # best_loss at the last checkpoint
    halved_at_check: jax.Array  # whether the step halved at the last checkpoint
    rises: jax.Array  # steps of this period whose loss rose, int32
    period_steps: jax.Array  # steps since the last checkpoint, int32
    fooled: jax.Array  # whether any iterate was misclassified
    fooling_point: jax.Array  # the latest misclassified iterate (the reference's x_best_adv)


def checkpoints(num_steps: int) -> tuple[int, ...]:
    """The step counts after which the step size may halve, rounded as the reference rounds them.

    Periods start at int(0.22 N) steps and shrink by int(0.03 N) down to int(0.06 N), each at least 1.

    >>> checkpoints(100)  # (22, 41, 57, 70, 80, 87, 93, 99)
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    period = max(int(FIRST_PERIOD * num_steps), 1)
    decrement = max(int(PERIOD_DECREMENT * num_steps), 1)
    shortest = max(int(SHORTEST_PERIOD * num_steps), 1)
    marks = [period]
    period = max(period - decrement, shortest)
    while marks[-1] + period <= num_steps:
        marks.append(marks[-1] + period)
        period = max(period - decrement, shortest)
    return tuple(marks)


def should_halve(
    rises: jax.Array,
    period_steps: jax.Array,
    halved_at_check: jax.Array,
    best_loss: jax.Array,
    best_loss_at_check: jax.Array,
    rho: float = 0.75,
) -> jax.Array:
    """At a checkpoint, per example: the loss rose in at most rho of the period's steps,
    or the step did not halve last time and the best loss has not improved since.

    >>> should_halve(jnp.array([8, 7]), jnp.array([10, 10]), jnp.array([True, True]), jnp.ones(2), jnp.ones(2))
    """
    oscillating = rises <= rho * period_steps
    stalled = ~halved_at_check & (best_loss_at_check >= best_loss)
    return oscillating | stalled


def ranked_class(logits: jax.Array, rank: int | jax.Array) -> jax.Array:
    """The class with the rank-th largest logit per example (1 the prediction): APGD-T's targets.

    `rank` may be traced, so that one compiled attack serves every target rank;
    ties go to the lower class index, as top_k breaks them.

    >>> targets = ranked_class(logits_fn(images), 2)  # the runner-up class of each clean image
    """
    order = jnp.argsort(-logits, axis=-1, stable=True)
    return jnp.take_along_axis(order, jnp.full(logits.shape[:-1] + (1,), rank - 1, jnp.int32), axis=-1)[..., 0]


def check_target_rank(target_rank: int | jax.Array) -> None:
    """Refuses a Python rank below 2 (1 is the prediction); a traced rank is the caller's to check.

    >>> check_target_rank(2)
    """
    if isinstance(target_rank, int) and target_rank < 2:
        raise ValueError(f"target_rank must be at least 2 (1 is the prediction), got {target_rank}")


def onto_sphere(delta: jax.Array, eps: jax.Array | float, norm: Norm) -> jax.Array:
    """Each example's `delta` rescaled along its ray to norm exactly eps; a zero delta stays zero.

    >>> onto_sphere(jnp.array([[0.1, -0.05]]), 0.3, "linf")  # [[0.3, -0.15]]
    """
    size = per_image(jnp.max, jnp.abs(delta)) if norm == "linf" else l2_norms(delta)
    return eps * delta / per_example(jnp.where(size > 0, size, 1.0), delta)


def random_start(key: jax.Array, images: jax.Array, eps: jax.Array | float, norm: Norm) -> jax.Array:
    """The reference's start: a uniform draw from the ball pushed onto its sphere, then into [0, 1].

    Pushed out, a uniform draw from the L-inf cube is the reference's t / max|t|,
    and one from the L2 ball its normalised Gaussian.

    >>> start = random_start(jax.random.key(0), images, 0.3, "linf")
    """
    draw = uniform_in_ball(key, images, eps, norm, clip=False) - images
    return project(images + onto_sphere(draw, eps, norm), images, eps, norm)


def select(mask: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
    """`new` for the examples where `mask` [B] holds, `old` elsewhere.

    >>> select(jnp.array([True, False]), jnp.ones((2, 3)), jnp.zeros((2, 3)))  # row 0 ones, row 1 zeros
    """
    return jnp.where(per_example(mask, old), new, old)


def objective(loss: Loss) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """The per-example loss APGD climbs, as a function of (logits, labels, targets).

    >>> objective("dlr")(logits, labels, labels)  # losses.dlr_loss(logits, labels)
    """
    return {
        "ce": lambda logits, labels, targets: losses.cross_entropy(logits, labels),
        "dlr": lambda logits, labels, targets: losses.dlr_loss(logits, labels),
        "dlr_targeted": losses.targeted_dlr_loss,
    }[loss]


def loss_and_gradient(
    logits_fn: LogitsFn, loss: Loss, points: jax.Array, labels: jax.Array, targets: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The per-example loss at `points`, whether each is misclassified, and the input gradient: one pass.

    The batch loss is a sum, so each example's gradient is its own.

    >>> loss, misclassified, gradient = loss_and_gradient(logits_fn, "ce", images, labels, labels)
    """

    def summed(x):
        logits = logits_fn(x)
        per_example_loss = objective(loss)(logits, labels, targets)
        return jnp.sum(per_example_loss), (per_example_loss, jnp.argmax(logits, axis=-1) != labels)

    (_, (values, misclassified)), gradient = jax.value_and_grad(summed, has_aux=True)(points)
    return values, misclassified, gradient


def momentum_step(state: APGDState, eps: jax.Array | float, norm: Norm, weight: jax.Array | float) -> jax.Array:
    """z = P(x + eta * steepest_ascent(g)), then P(x + weight * (z - x) + (1 - weight) * (x - x_prev)).

    >>> point = momentum_step(state, 0.3, "linf", 0.75)
    """
    x = state.point
    z = project(x + per_example(state.step_size, x) * steepest_ascent(state.gradient, norm), state.images, eps, norm)
    return project(x + weight * (z - x) + (1.0 - weight) * (x - state.previous), state.images, eps, norm)


def initial_state(
    evaluate: Evaluate,
    images: jax.Array,
    labels: jax.Array,
    targets: jax.Array,
    key: jax.Array,
    eps: jax.Array | float,
    norm: Norm,
) -> APGDState:
    """The state before the first step: the random start, its loss and gradient, a step of 2 eps.

    >>> state = initial_state(evaluate, images, labels, labels, jax.random.key(0), 0.3, "linf")
    """
    start = random_start(key, images, eps, norm)
    loss, misclassified, gradient = evaluate(start, labels, targets)
    zeros = jnp.zeros(labels.shape, jnp.int32)
    return APGDState(
        images=images,
        labels=labels,
        targets=targets,
        point=start,
        previous=start,
        gradient=gradient,
        last_loss=loss,
        step_size=INITIAL_STEP * eps * jnp.ones(labels.shape, images.dtype),
        best_loss=loss,
        best_point=start,
        best_gradient=gradient,
        best_loss_at_check=loss,
        # True, as the reference starts: the "no improvement" branch waits for a first checkpoint.
        halved_at_check=jnp.ones(labels.shape, bool),
        rises=zeros,
        period_steps=zeros,
        fooled=misclassified,
        fooling_point=start,
    )


def advance(
    evaluate: Evaluate, state: APGDState, eps: jax.Array | float, norm: Norm, weight: jax.Array | float
) -> APGDState:
    """One momentum step, and the per-example records it updates: bests, rises, the fooling point.

    >>> state = advance(evaluate, state, 0.3, "linf", 0.75)
    """
    point = momentum_step(state, eps, norm, weight)
    loss, misclassified, gradient = evaluate(point, state.labels, state.targets)
    improved = loss > state.best_loss
    return state._replace(
        point=point,
        previous=state.point,
        gradient=gradient,
        last_loss=loss,
        best_loss=jnp.where(improved, loss, state.best_loss),
        best_point=select(improved, point, state.best_point),
        best_gradient=select(improved, gradient, state.best_gradient),
        rises=state.rises + (loss > state.last_loss).astype(jnp.int32),
        period_steps=state.period_steps + 1,
        fooled=state.fooled | misclassified,
        fooling_point=select(misclassified, point, state.fooling_point),
    )


def check_step_size(state: APGDState, at_checkpoint: jax.Array, rho: float) -> APGDState:
    """At a checkpoint, halve the step of the examples `should_halve` picks and restart them from their best point.

    >>> state = check_step_size(state, jnp.array(True), 0.75)
    """
    halve = at_checkpoint & should_halve(
        state.rises, state.period_steps, state.halved_at_check, state.best_loss, state.best_loss_at_check, rho
    )
    return state._replace(
        step_size=jnp.where(halve, state.step_size / 2.0, state.step_size),
        point=select(halve, state.best_point, state.point),
        gradient=select(halve, state.best_gradient, state.gradient),
        halved_at_check=jnp.where(at_checkpoint, halve, state.halved_at_check),
        best_loss_at_check=jnp.where(at_checkpoint, state.best_loss, state.best_loss_at_check),
        rises=jnp.where(at_checkpoint, 0, state.rises),
        period_steps=jnp.where(at_checkpoint, 0, state.period_steps),
    )


def finalize(state: APGDState) -> jax.Array:
    """The latest iterate that fooled the model where one did, else the highest-loss point.

    >>> adversarial = finalize(state)
    """
    return select(state.fooled, state.fooling_point, state.best_point)


def build_apgd(
    logits_fn: LogitsFn,
    eps: jax.Array | float,
    norm: Norm,
    loss: Loss,
    num_steps: int,
    momentum: float,
    rho: float,
    choose_targets: Callable[[jax.Array, jax.Array], jax.Array],
) -> iterative.IterativeAttack:
    """APGD as (init, step, finalize), with the targets drawn from (images, labels) at init.

    >>> attack = build_apgd(logits_fn, 0.3, "linf", "ce", 100, 0.75, 0.75, lambda images, labels: labels)
    """
    check_norm(norm)
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose from {LOSSES}")
    evaluate = functools.partial(loss_and_gradient, logits_fn, loss)

    def init(images, labels, key):
        return initial_state(evaluate, images, labels, choose_targets(images, labels), key, eps, norm)

    def step(state, iteration):
        return apgd_step(evaluate, state, iteration, eps, norm, num_steps, momentum, rho)

    return iterative.IterativeAttack(init, step, finalize, num_steps)


def apgd_step(
    evaluate: Evaluate,
    state: APGDState,
    iteration: jax.Array,
    eps: jax.Array | float,
    norm: Norm,
    num_steps: int,
    momentum: float,
    rho: float,
) -> APGDState:
    """APGD's step `iteration` of `num_steps`: a momentum step, then the checkpoint's rule where one falls.

    >>> state = apgd_step(evaluate, state, jnp.int32(0), 0.3, "linf", 100, 0.75, 0.75)
    """
    # The first step has no previous step to carry, as in the reference.
    weight = jnp.where(iteration == 0, 1.0, momentum)
    state = advance(evaluate, state, eps, norm, weight)
    return check_step_size(state, jnp.any(iteration + 1 == jnp.asarray(checkpoints(num_steps))), rho)


def make_apgd(
    logits_fn: LogitsFn,
    eps: jax.Array | float,
    *,
    norm: Norm = "linf",
    loss: Loss = "ce",
    num_steps: int = 100,
    momentum: float = 0.75,
    rho: float = 0.75,
    targets: jax.Array | None = None,
) -> iterative.IterativeAttack:
    """APGD on cross-entropy ("ce", APGD-CE), DLR ("dlr") or targeted DLR ("dlr_targeted", with `targets` [B]).

    `momentum` is the reference's alpha: the weight of the fresh step, 1 - momentum
    that of the last one. With the defaults it is AutoAttack's standard APGD-CE.

    >>> x_adv = iterative.run(make_apgd(logits_fn, 8 / 255), images, labels, jax.random.key(0))
    """
    if (loss == "dlr_targeted") != (targets is not None):
        raise ValueError("targets are for loss='dlr_targeted', which needs them")
    if targets is None:
        choose_targets = lambda images, labels: labels
    else:
        choose_targets = lambda images, labels: jnp.broadcast_to(jnp.asarray(targets), labels.shape)
    return build_apgd(logits_fn, eps, norm, loss, num_steps, momentum, rho, choose_targets)


def make_apgd_targeted(
    logits_fn: LogitsFn,
    eps: jax.Array | float,
    *,
    norm: Norm = "linf",
    num_steps: int = 100,
    target_rank: int = 2,
    momentum: float = 0.75,
    rho: float = 0.75,
) -> iterative.IterativeAttack:
    """APGD-T on targeted DLR toward each clean image's `target_rank`-th most likely class (2 the runner-up).

    AutoAttack's standard version runs it once per rank in STANDARD_TARGET_RANKS.

    >>> attack = make_apgd_targeted(logits_fn, 8 / 255, target_rank=3)
    """
    check_target_rank(target_rank)
    choose_targets = lambda images, labels: ranked_class(logits_fn(images), target_rank)
    return build_apgd(logits_fn, eps, norm, "dlr_targeted", num_steps, momentum, rho, choose_targets)
