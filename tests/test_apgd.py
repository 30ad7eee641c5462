"""Tests for advjax.apgd: the checkpoint schedule and halving rule against the reference's rules, best-loss
tracking, the eps ball and [0, 1], the closed-form optimum of a two-class linear model, jit and vmap."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advjax import apgd, iterative, losses
from tests.helpers import (
    MLP_CLASSES,
    MLP_SIDE,
    assert_in_unit_interval,
    l2_norms,
    linear_logits_fn,
    linf_norms,
    mlp_logits_fn,
    mlp_params,
    random_linear_model,
    uniform_images,
)

# The AutoAttack attacks compile whole attacks per test: they run in the full tier, which CI runs.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("quick_compile_module")]

SMALL_SHAPE = (8, MLP_SIDE, MLP_SIDE, 1)
SMALL_PIXELS = MLP_SIDE * MLP_SIDE
TOLERANCE = 1e-6  # float32 rounding of x + delta - x


def run_attack(attack, images, labels, key=None):
    key = jax.random.key(0) if key is None else key
    return jax.jit(lambda x, y, k: iterative.run(attack, x, y, k))(images, labels, key)


def final_state(attack, images, labels, key):
    """The state after every step, which `run` does not expose."""
    state = attack.init(images, labels, key)
    return jax.lax.fori_loop(0, attack.num_steps, lambda i, s: attack.step(s, i), state)


def small_images(seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).uniform(0.0, 1.0, SMALL_SHAPE), jnp.float32)


# ----------------------------------------------------------------------------
# The schedule, by hand from the reference's rule: periods of int(0.22 N), each
# int(0.03 N) shorter than the last down to int(0.06 N), each at least 1 step.


@pytest.mark.parametrize(
    "num_steps, expected",
    [
        (100, (22, 41, 57, 70, 80, 87, 93, 99)),  # periods 22, 19, 16, 13, 10, 7, 6, 6
        (10, (2, 3, 4, 5, 6, 7, 8, 9, 10)),  # periods 2, then 1 (the floors of 0.6 and 0.3 are 0)
        (1000, (220, 410, 570, 700, 800, 870, 930, 990)),  # periods 220, 190, ..., 70, 60, 60
        (1, (1,)),
    ],
)
def test_checkpoints_follow_the_reference_schedule(num_steps, expected):
    assert apgd.checkpoints(num_steps) == expected


def test_checkpoints_refuse_no_steps():
    with pytest.raises(ValueError, match="at least 1"):
        apgd.checkpoints(0)


# ----------------------------------------------------------------------------
# The halving rule, alone and on scripted loss traces.


def test_should_halve_when_the_loss_rose_in_at_most_rho_of_the_period():
    rises, period = jnp.array([8, 7, 10, 0]), jnp.full(4, 10)
    halved, best = jnp.ones(4, bool), jnp.ones(4)
    halve = apgd.should_halve(rises, period, halved, best, best, 0.75)
    np.testing.assert_array_equal(halve, [False, True, False, True])


def test_should_halve_when_it_did_not_halve_last_time_and_the_best_loss_is_unchanged():
    rises, period = jnp.full(4, 9), jnp.full(4, 10)
    halved_last = jnp.array([False, False, True, True])
    best, best_at_check = jnp.array([2.0, 3.0, 2.0, 3.0]), jnp.full(4, 2.0)
    halve = apgd.should_halve(rises, period, halved_last, best, best_at_check, 0.75)
    np.testing.assert_array_equal(halve, [True, False, False, False])


def scripted_state(start_losses: np.ndarray, eps: float = 0.4) -> apgd.APGDState:
    """A state of images at 0.5 whose start has the given losses."""
    batch = len(start_losses)
    images = jnp.full((batch, 3), 0.5)
    labels = jnp.zeros(batch, jnp.int32)
    evaluate = lambda x, y, t: (jnp.asarray(start_losses, jnp.float32), jnp.zeros(batch, bool), jnp.ones_like(x))
    return apgd.initial_state(evaluate, images, labels, labels, jax.random.key(0), eps, "linf")


def follow_trace(state: apgd.APGDState, trace: np.ndarray) -> tuple[apgd.APGDState, list]:
    """Steps whose losses are the rows of `trace` [steps, B]; returns the state and each step's point."""
    points = []
    for losses_now in trace:
        evaluate = lambda x, y, t, v=losses_now: (jnp.asarray(v, jnp.float32), jnp.zeros(len(v), bool), -x)
        state = apgd.advance(evaluate, state, 0.4, "linf", 0.75)
        points.append(state.point)
    return state, points


def test_a_period_with_8_rises_in_10_keeps_the_step_and_one_with_7_halves_it_from_the_best_point():
    # Example 0 rises at every step but the 2nd and 10th (8 of 10); example 1 also falls at the 5th (7 of 10).
    rising_8 = [10.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 8.0]
    rising_7 = [10.0, 1.0, 2.0, 3.0, 2.5, 5.0, 6.0, 7.0, 8.0, 8.0]
    state, points = follow_trace(scripted_state(np.zeros(2)), np.array([rising_8, rising_7]).T)
    np.testing.assert_array_equal(state.rises, [8, 7])
    np.testing.assert_array_equal(state.period_steps, [10, 10])
    np.testing.assert_array_equal(state.best_loss, [10.0, 10.0])
    checked = apgd.check_step_size(state, jnp.array(True), 0.75)
    np.testing.assert_allclose(checked.step_size, [0.8, 0.4])  # 2 eps, and its half
    np.testing.assert_array_equal(checked.point[0], state.point[0])
    np.testing.assert_array_equal(checked.point[1], points[0][1])  # back where the loss was 10
    np.testing.assert_array_equal(checked.halved_at_check, [False, True])
    np.testing.assert_array_equal(checked.rises, [0, 0])
    np.testing.assert_array_equal(checked.period_steps, [0, 0])
    # Off a checkpoint nothing changes.
    chex.assert_trees_all_equal(apgd.check_step_size(state, jnp.array(False), 0.75), state)


def test_a_period_without_improvement_halves_after_one_that_did_not_however_often_the_loss_rose():
    first = np.array([[10.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 8.0]] * 2).T
    state, _ = follow_trace(scripted_state(np.zeros(2)), first)
    state = apgd.check_step_size(state, jnp.array(True), 0.75)
    np.testing.assert_array_equal(state.halved_at_check, [False, False])
    # Both rise at every step; only example 1 passes its best loss of 10.
    state, _ = follow_trace(state, np.array([[8.5, 9.0, 9.5, 9.9], [8.5, 9.0, 9.5, 10.5]]).T)
    checked = apgd.check_step_size(state, jnp.array(True), 0.75)
    np.testing.assert_array_equal(checked.halved_at_check, [True, False])
    np.testing.assert_allclose(checked.step_size, [0.4, 0.8])


def test_the_first_period_counts_its_first_rise_from_the_start_loss():
    state, _ = follow_trace(scripted_state(np.array([5.0, -5.0])), np.array([[0.0, 0.0]]))
    np.testing.assert_array_equal(state.rises, [0, 1])


@pytest.mark.slow  # compiles a whole attack or run: in the full tier
def test_a_constant_loss_halves_the_step_at_every_checkpoint():
    weights, bias = np.zeros((SMALL_PIXELS, 4)), np.array([1.0, 0.0, -1.0, -2.0])
    attack = apgd.make_apgd(linear_logits_fn(weights, bias), 0.1, num_steps=10)
    state = final_state(attack, small_images(), jnp.zeros(8, jnp.int32), jax.random.key(0))
    np.testing.assert_allclose(state.step_size, 0.2 / 2 ** len(apgd.checkpoints(10)))


# ----------------------------------------------------------------------------
# The attack on a random linear model and the small MLP.


@pytest.mark.slow  # compiles a whole attack or run: in the full tier
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_never_ends_below_its_start_loss(loss):
    _, _, logits_fn = random_linear_model(0)
    images = jnp.asarray(uniform_images(8))
    labels = jnp.argmax(logits_fn(images), axis=-1)
    attack = apgd.make_apgd(logits_fn, 0.01, loss=loss, num_steps=12)
    start = attack.init(images, labels, jax.random.key(1))
    state = final_state(attack, images, labels, jax.random.key(1))
    loss_at = lambda x: apgd.objective(loss)(logits_fn(x), labels, labels)
    assert np.all(state.best_loss >= start.best_loss)
    np.testing.assert_allclose(loss_at(state.best_point), state.best_loss, rtol=1e-5, atol=1e-6)
    adversarial = attack.finalize(state)
    kept = ~np.asarray(state.fooled)
    assert np.all(np.asarray(loss_at(adversarial))[kept] >= np.asarray(start.best_loss)[kept])


# Each loss with each norm: two of the six in the quick tier, which between them cover both norms and two losses.
BALL_CASES = [
    ("linf", 0.1, "ce"),
    ("l2", 0.5, "dlr_targeted"),
    *(pytest.param(*case, marks=pytest.mark.slow) for case in [("linf", 0.1, "dlr"), ("linf", 0.1, "dlr_targeted")]),
    *(pytest.param(*case, marks=pytest.mark.slow) for case in [("l2", 0.5, "ce"), ("l2", 0.5, "dlr")]),
]


@pytest.mark.parametrize("norm, eps, loss", BALL_CASES)
def test_every_result_is_inside_the_eps_ball_and_in_the_unit_interval(norm, eps, loss):
    logits_fn = mlp_logits_fn(mlp_params())
    images = small_images(1)
    labels = jnp.argmax(logits_fn(images), axis=-1)
    targets = (labels + 1) % MLP_CLASSES if loss == "dlr_targeted" else None
    attack = apgd.make_apgd(logits_fn, eps, norm=norm, loss=loss, num_steps=10, targets=targets)
    adversarial = run_attack(attack, images, labels)
    chex.assert_tree_all_finite(adversarial)
    assert_in_unit_interval(adversarial)
    distance = (linf_norms if norm == "linf" else l2_norms)(np.asarray(adversarial) - np.asarray(images))
    assert np.all(distance <= eps + TOLERANCE), distance.max()


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 0.5)])
def test_the_start_lies_on_the_sphere_of_the_ball(norm, eps):
    images = jnp.full(SMALL_SHAPE, 0.5)  # far enough from 0 and 1 that nothing is clipped
    start = apgd.random_start(jax.random.key(3), images, eps, norm)
    distance = (linf_norms if norm == "linf" else l2_norms)(np.asarray(start) - 0.5)
    np.testing.assert_allclose(distance, eps, rtol=1e-5)


@pytest.mark.slow  # compiles a whole attack or run: in the full tier
def test_ranked_class_takes_a_traced_rank_and_breaks_ties_as_top_k_does():
    logits = jnp.array([[0.5, 2.0, 2.0, -1.0], [3.0, 1.0, 2.0, 0.0]])
    traced = jax.jit(apgd.ranked_class)
    for rank in range(1, 5):
        expected = jax.lax.top_k(logits, rank)[1][:, rank - 1]
        np.testing.assert_array_equal(traced(logits, jnp.int32(rank)), expected, err_msg=str(rank))
    np.testing.assert_array_equal(apgd.ranked_class(logits, 2), [2, 2])  # the tie at 2.0 goes to class 1 first


def test_apgd_targeted_aims_at_the_ranked_class_and_fools_the_mlp_as_often_as_the_loss_says():
    logits_fn = mlp_logits_fn(mlp_params())
    images = small_images(2)
    clean_logits = logits_fn(images)
    labels = jnp.argmax(clean_logits, axis=-1)
    np.testing.assert_array_equal(apgd.ranked_class(clean_logits, 1), labels)
    attack = apgd.make_apgd_targeted(logits_fn, 0.2, num_steps=10, target_rank=3)
    state = final_state(attack, images, labels, jax.random.key(0))
    np.testing.assert_array_equal(state.targets, jnp.argsort(-clean_logits, axis=-1)[:, 2])
    # A positive targeted DLR means the target beats the label: the example is fooled.
    assert np.all(np.asarray(state.fooled)[np.asarray(state.best_loss) > 0])


@pytest.mark.slow  # compiles the attack twice over: in the full tier
def test_the_state_leads_with_the_batch_axis_and_unrolling_changes_nothing():
    logits_fn = mlp_logits_fn(mlp_params())
    images, labels = small_images(3), jnp.arange(8) % MLP_CLASSES
    attack = apgd.make_apgd(logits_fn, 0.1, loss="dlr", num_steps=4)
    for leaf in jax.tree.leaves(attack.init(images, labels, jax.random.key(0))):
        assert leaf.shape[0] == 8, leaf.shape
    looped = run_attack(attack, images, labels)
    unrolled = jax.jit(lambda x, y, k: iterative.run(attack, x, y, k, unroll=True))(images, labels, jax.random.key(0))
    np.testing.assert_allclose(looped, unrolled, atol=1e-6)


# ----------------------------------------------------------------------------
# A two-class linear model (two more classes that never win), whose worst case in the
# L-inf ball is closed-form: the margin (w_y - w_o) x + b_y - b_o is least at clip(x - eps sign(w_y - w_o)).


def binary_like_model(seed: int = 0):
    rng = np.random.default_rng(seed)
    weights = np.zeros((SMALL_PIXELS, 4))
    weights[:, :2] = 0.5 * rng.standard_normal((SMALL_PIXELS, 2))
    bias = np.array([0.0, 0.0, -50.0, -50.0])
    return weights, bias


def closed_form_least_margin(weights, bias, images, labels, eps) -> np.ndarray:
    x = np.asarray(images, np.float64).reshape(len(labels), -1)
    other = 1 - labels
    difference = (weights[:, labels] - weights[:, other]).T
    worst = np.clip(x - eps * np.sign(difference), 0.0, 1.0)
    return np.sum(difference * worst, axis=1) + bias[labels] - bias[other]


@pytest.mark.parametrize("loss", ["ce", "dlr", "dlr_targeted"])
def test_apgd_fools_the_linear_model_exactly_where_the_closed_form_says_it_can(loss):
    weights, bias = binary_like_model()
    logits_fn = linear_logits_fn(weights, bias)
    images = jnp.asarray(np.random.default_rng(4).uniform(0.0, 1.0, (32, MLP_SIDE, MLP_SIDE, 1)), jnp.float32)
    labels = jnp.argmax(logits_fn(images), axis=-1)
    eps = 0.05
    least = closed_form_least_margin(weights, bias, images, np.asarray(labels), eps)
    clear = np.abs(least) > 1e-3  # leave out the examples float32 could put on either side
    assert 4 <= np.sum(least[clear] < 0) <= 28, least  # both outcomes occur
    if loss == "dlr_targeted":
        attack = apgd.make_apgd_targeted(logits_fn, eps, num_steps=20, target_rank=2)
    else:
        attack = apgd.make_apgd(logits_fn, eps, loss=loss, num_steps=20)
    adversarial = run_attack(attack, images, labels)
    fooled = np.asarray(jnp.argmax(logits_fn(adversarial), axis=-1) != labels)
    np.testing.assert_array_equal(fooled[clear], least[clear] < 0)


# ----------------------------------------------------------------------------
# jit, vmap over a seed axis of parameters, and bad arguments.


@pytest.mark.slow  # compiles the attack twice over: in the full tier
def test_apgd_vmapped_over_seeds_of_parameters_equals_separate_calls():
    models = [binary_like_model(seed) for seed in range(3)]
    stacked = [jnp.asarray(np.stack(parts), jnp.float32) for parts in zip(*models)]
    images, labels = small_images(5), jnp.arange(8) % 2

    def attack_with(weights, bias):
        attack = apgd.make_apgd(linear_logits_fn(weights, bias), 0.05, loss="dlr", num_steps=5)
        return iterative.run(attack, images, labels, jax.random.key(0))

    batched = jax.jit(jax.vmap(attack_with))(*stacked)
    for index, (weights, bias) in enumerate(models):
        np.testing.assert_allclose(batched[index], jax.jit(attack_with)(weights, bias), atol=1e-6)


def test_make_apgd_refuses_bad_arguments():
    logits_fn = mlp_logits_fn(mlp_params())
    with pytest.raises(ValueError, match="targets"):
        apgd.make_apgd(logits_fn, 0.1, loss="dlr_targeted")
    with pytest.raises(ValueError, match="targets"):
        apgd.make_apgd(logits_fn, 0.1, loss="ce", targets=jnp.zeros(8, jnp.int32))
    with pytest.raises(ValueError, match="unknown loss"):
        apgd.make_apgd(logits_fn, 0.1, loss="margin")
    with pytest.raises(ValueError, match="unknown norm"):
        apgd.make_apgd(logits_fn, 0.1, norm="l1")
    with pytest.raises(ValueError, match="target_rank"):
        apgd.make_apgd_targeted(logits_fn, 0.1, target_rank=1)


@pytest.mark.slow  # compiles a whole attack or run: in the full tier
def test_the_objectives_are_the_losses_module_s():
    logits = jnp.asarray(np.random.default_rng(6).standard_normal((5, 6)), jnp.float32)
    labels, targets = jnp.arange(5), jnp.arange(5) + 1
    np.testing.assert_array_equal(apgd.objective("ce")(logits, labels, targets), losses.cross_entropy(logits, labels))
    np.testing.assert_array_equal(apgd.objective("dlr")(logits, labels, targets), losses.dlr_loss(logits, labels))
    np.testing.assert_array_equal(
        apgd.objective("dlr_targeted")(logits, labels, targets), losses.targeted_dlr_loss(logits, labels, targets)
    )
