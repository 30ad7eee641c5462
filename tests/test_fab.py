"""Tests for advjax.fab: the L-inf projection onto a hyperplane inside [0, 1] against its closed form and a
bisection, FAB-T's minimal distance to a linear boundary, the eps rule of finalize, jit, vmap and the state."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advjax import apgd, fab, iterative
from tests.helpers import (
    MLP_CLASSES,
    MLP_SIDE,
    assert_in_unit_interval,
    linf_norms,
    mlp_logits_fn,
    mlp_params,
    random_linear_model,
    uniform_images,
)

# The AutoAttack attacks compile whole attacks per test: they run in the full tier, which CI runs.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("quick_compile_module")]

SMALL_SHAPE = (8, MLP_SIDE, MLP_SIDE, 1)
TOLERANCE = 1e-6  # float32 rounding of x + delta - x
project = jax.jit(fab.hyperplane_step)


def final_state(attack, images, labels, key=None):
    """The state after every step, which `run` does not expose."""
    key = jax.random.key(0) if key is None else key
    state = attack.init(images, labels, key)
    return jax.lax.fori_loop(0, attack.num_steps, lambda i, s: attack.step(s, i), state)


def small_images(seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).uniform(0.0, 1.0, SMALL_SHAPE), jnp.float32)


# ----------------------------------------------------------------------------
# The projection alone, on random instances [N, D].


def random_hyperplanes(seed: int, num: int = 64, dim: int = 50, low: float = 0.0, high: float = 1.0):
    rng = np.random.default_rng(seed)
    points = rng.uniform(low, high, (num, dim)).astype(np.float32)
    w = rng.standard_normal((num, dim)).astype(np.float32)
    w[:, :5] = 0.0  # pixels the hyperplane ignores must not move
    return rng, points, w


def offsets_for(points, w, values) -> np.ndarray:
    """The b that gives each instance the value w.x + b asked for."""
    return (values - np.sum(np.float64(w) * points, axis=1)).astype(np.float32)


def residual(points, w, b, delta) -> np.ndarray:
    return np.sum(np.float64(w) * (np.float64(points) + np.asarray(delta, np.float64)), axis=1) + b


def bisection_radius(points, w, values) -> np.ndarray:
    """The least r with sum |w| min(r, room) = |w.x + b|, by bisection in float64: a check independent of the sort."""
    w = np.where(values[:, None] >= 0, w, -w).astype(np.float64)
    room = np.where(w > 0, points, 1.0 - points)
    low, high = np.zeros(len(values)), np.ones(len(values))
    for _ in range(60):
        middle = (low + high) / 2
        reached = np.sum(np.abs(w) * np.minimum(middle[:, None], room), axis=1) >= np.abs(values)
        low, high = np.where(reached, low, middle), np.where(reached, middle, high)
    return high


def assert_in_box_and_still(points, w, delta):
    moved = np.asarray(points + delta, np.float64)  # added in float32, as the attack adds them
    assert moved.min() >= -TOLERANCE and moved.max() <= 1.0 + TOLERANCE, (moved.min(), moved.max())
    np.testing.assert_array_equal(np.asarray(delta)[w == 0], 0.0)


def test_away_from_the_box_the_step_has_the_closed_form_norm_and_reaches_the_hyperplane():
    rng, points, w = random_hyperplanes(0, low=0.3, high=0.7)
    l1 = np.sum(np.abs(np.float64(w)), axis=1)
    # Radii below 0.3, the least room: the box does not bind. One instance lies on the hyperplane already.
    values = rng.uniform(-0.25, 0.25, len(points)) * l1
    values[0] = 0.0
    b = offsets_for(points, w, values)
    delta = project(points, w, b)
    chex.assert_shape(delta, points.shape)
    value = residual(points, w, b, np.zeros_like(points))
    np.testing.assert_allclose(linf_norms(delta), np.abs(value) / l1, atol=1e-5)
    np.testing.assert_allclose(residual(points, w, b, delta), 0.0, atol=1e-5 * l1.max())
    assert_in_box_and_still(points, w, delta)


def reachable(points, w, sign) -> np.ndarray:
    """The most a step inside [0, 1] can move w.x by, downward (sign 1) or upward (sign -1)."""
    return np.sum(np.abs(w) * np.where(sign * w > 0, points, 1.0 - points), axis=1)


def test_where_the_box_binds_the_step_is_still_minimal_and_reaches_the_hyperplane():
    rng, points, w = random_hyperplanes(1)
    sign = np.where(np.arange(len(points)) % 2 == 0, 1.0, -1.0)  # hyperplanes on both sides of the points
    values = sign * rng.uniform(0.05, 0.95, len(points)) * reachable(points, w, sign[:, None])
    b = offsets_for(points, w, values)
    value = residual(points, w, b, np.zeros_like(points))
    delta = project(points, w, b)
    radius = bisection_radius(points, w, value)
    least_room = np.min(np.where(w != 0, np.minimum(points, 1.0 - points), 1.0), axis=1)
    assert np.sum(radius > least_room) >= len(points) // 2  # the box binds in most instances
    np.testing.assert_allclose(linf_norms(delta), radius, atol=1e-5)
    np.testing.assert_allclose(residual(points, w, b, delta), 0.0, atol=1e-4)
    assert_in_box_and_still(points, w, delta)


def test_out_of_reach_the_step_goes_to_the_corner_of_the_box_nearest_the_hyperplane():
    _, points, w = random_hyperplanes(2)
    b = offsets_for(points, w, 1.5 * reachable(points, w, 1.0))
    delta = project(points, w, b)
    corner = np.where(w > 0, 0.0, np.where(w < 0, 1.0, points))
    np.testing.assert_allclose(np.asarray(delta) + points, corner, atol=TOLERANCE)
    assert np.all(residual(points, w, b, delta) > 0)  # as near as the box allows, on the same side


def test_the_projection_takes_one_example_as_well_as_a_batch():
    _, points, w = random_hyperplanes(3)
    b = offsets_for(points, w, np.full(len(points), 0.5))
    np.testing.assert_allclose(project(points[5], w[5], b[5]), project(points, w, b)[5], atol=TOLERANCE)


def test_step_weight_is_the_current_step_s_share_capped_at_alpha_max():
    current, original = jnp.array([0.02, 1.0, 0.0]), jnp.array([1.0, 1.0, 0.0])
    expected = [0.02 / 1.02, 0.1, 0.1]  # the last: both steps at the floor, so half, capped
    np.testing.assert_allclose(fab.step_weight(current, original, 0.1), expected, rtol=1e-6)


# ----------------------------------------------------------------------------
# A two-class linear model: the boundary is the hyperplane (w_1 - w_0).x + b_1 - b_0 = 0, and the least
# L-inf distance from x to it, where the box does not bind, is |(w_1 - w_0).x + b_1 - b_0| / ||w_1 - w_0||_1.


def images_at_distances(weights, bias, distances, seed: int = 0) -> np.ndarray:
    """Images in [0.3, 0.7] on class 0's side, each moved along the boundary's normal to lie at `distances`."""
    w, b = weights[:, 1] - weights[:, 0], bias[1] - bias[0]
    flat = np.float64(uniform_images(len(distances), 0.3, 0.7, seed).reshape(len(distances), -1))
    wanted = -np.asarray(distances) * np.sum(np.abs(w))
    flat += ((wanted - (flat @ w + b)) / np.sum(np.abs(w)))[:, None] * np.sign(w)
    return flat.reshape((len(distances), 28, 28, 1)).astype(np.float32)


def least_distance(weights, bias, images) -> np.ndarray:
    w, b = weights[:, 1] - weights[:, 0], bias[1] - bias[0]
    return np.abs(np.float64(images).reshape(len(images), -1) @ w + b) / np.sum(np.abs(w))


def fab_overshoot(eta: float = 1.05, beta: float = 0.9) -> float:
    """The relative excess of FAB's best point on a linear boundary away from the box, from its updates by hand.

    With exact linearisations every iterate lies on x + s d, d the minimal step: the first stretches to
    s = eta and fools the model, its pull-back to beta eta is left 1 - beta eta short, and the next lands
    at 1 + 2 (eta - 1) alpha with alpha = (1 - beta eta) / (2 - beta eta); later ones land farther.
    """
    short = 1.0 - beta * eta
    return 2.0 * (eta - 1.0) * short / (1.0 + short)


def test_fab_t_finds_the_least_linf_distance_to_a_linear_boundary():
    weights, bias, logits_fn = random_linear_model(0, num_classes=2)
    distances = np.linspace(0.002, 0.012, 8)
    images = jnp.asarray(images_at_distances(weights, bias, distances))
    labels = jnp.zeros(8, jnp.int32)
    np.testing.assert_array_equal(jnp.argmax(logits_fn(images), axis=-1), labels)
    least = least_distance(weights, bias, images)
    # The second step already lands nearest (fab_overshoot); later ones land farther, so 20 steps show it.
    attack = fab.make_fab_targeted(logits_fn, 0.05, num_steps=20)
    state = jax.jit(lambda x, y: final_state(attack, x, y))(images, labels)
    found = np.asarray(state.distance, np.float64)
    np.testing.assert_allclose(found, least, atol=1e-4)
    assert np.all(found >= least - TOLERANCE)  # no adversarial point is nearer than the boundary
    np.testing.assert_allclose(found, least * (1.0 + fab_overshoot()), rtol=1e-3)
    np.testing.assert_array_equal(jnp.argmax(logits_fn(state.best), axis=-1), 1 - labels)
    np.testing.assert_allclose(linf_norms(state.best - images), found, atol=TOLERANCE)


def nearest_boundaries(weights, bias, images, labels) -> tuple[np.ndarray, np.ndarray]:
    """Per image, the class k != label of least |f_k - f_label| / ||w_k - w_label||_1, and that distance."""
    logits = np.float64(images).reshape(len(images), -1) @ weights + bias
    own = logits[np.arange(len(labels)), labels][:, None]
    norms = np.abs(weights[:, None, :] - weights[:, :, None]).sum(axis=0)[labels]  # [B, C]: ||w_k - w_label||_1
    own_class = np.arange(weights.shape[1]) == labels[:, None]  # 0 / 0 there: the class itself is no boundary
    distance = np.where(own_class, np.inf, np.abs(logits - own) / np.where(own_class, 1.0, norms))
    return distance.argmin(axis=1), distance.min(axis=1)


def test_fab_finds_the_least_linf_distance_to_the_nearest_of_several_linear_boundaries():
    weights, bias, logits_fn = random_linear_model(1, num_classes=4)
    images = jnp.asarray(uniform_images(8, 0.3, 0.7, seed=3))
    labels = jnp.argmax(logits_fn(images), axis=-1)
    nearest, least = nearest_boundaries(weights, bias, np.asarray(images), np.asarray(labels))
    assert len(set(nearest.tolist())) > 1  # the nearest boundary is not the same class for every image
    value, gradient = jax.jit(fab.nearest_difference, static_argnums=0)(logits_fn, images, labels)
    logits = np.asarray(logits_fn(images), np.float64)
    rows = np.arange(8)
    np.testing.assert_allclose(value, logits[rows, nearest] - logits[rows, labels], atol=1e-5)
    expected_gradient = (weights[:, nearest] - weights[:, labels]).T.reshape(gradient.shape)
    np.testing.assert_allclose(gradient, expected_gradient, atol=1e-6)
    state = jax.jit(lambda x, y: final_state(fab.make_fab(logits_fn, 0.5, num_steps=20), x, y))(images, labels)
    found = np.asarray(state.distance, np.float64)
    np.testing.assert_allclose(found, least, atol=1e-4)
    assert np.all(found >= least - TOLERANCE)
    np.testing.assert_allclose(found, least * (1.0 + fab_overshoot()), rtol=1e-3)  # as FAB-T toward that class
    assert np.all(np.asarray(jnp.argmax(logits_fn(state.best), axis=-1)) != np.asarray(labels))


def test_fab_s_random_start_may_be_traced_as_a_restart_index_is():
    logits_fn = mlp_logits_fn(mlp_params())
    images, labels, key = jnp.full(SMALL_SHAPE, 0.5), jnp.zeros(8, jnp.int32), jax.random.key(4)
    init = jax.jit(lambda restart: fab.make_fab(logits_fn, 0.2, random_start=restart > 0).init(images, labels, key))
    np.testing.assert_array_equal(init(0).point, images)
    np.testing.assert_allclose(init(3).point, fab.restart_point(key, images, 0.2), atol=1e-7)  # fused in jit
    np.testing.assert_array_equal(init(0).targets, labels)  # untargeted: the labels stand in for targets


# ----------------------------------------------------------------------------
# The small MLP: the eps rule of finalize, the targets, examples already misclassified.


MLP_STEPS = 10


@jax.jit
def mlp_fab(images, labels, eps):
    """FAB-T on the small MLP toward the 3rd most likely class: its final state and result, compiled once."""
    attack = fab.make_fab_targeted(mlp_logits_fn(mlp_params()), eps, num_steps=MLP_STEPS, target_rank=3)
    state = final_state(attack, images, labels)
    return state, attack.finalize(state)


@pytest.fixture(scope="module")
def mlp_run():
    logits_fn = mlp_logits_fn(mlp_params())
    images = small_images(1)
    labels = jnp.argmax(logits_fn(images), axis=-1)
    state, _ = mlp_fab(images, labels, 0.1)
    return logits_fn, images, labels, state


@pytest.mark.slow  # compiles a whole attack or run: in the full tier
def test_every_result_is_in_the_unit_interval_and_the_clean_image_or_within_eps(mlp_run):
    logits_fn, images, labels, state = mlp_run
    distance = np.asarray(state.distance)
    found = np.isfinite(distance)
    assert np.any(found)
    np.testing.assert_array_equal(jnp.argmax(logits_fn(state.best), axis=-1)[found] != labels[found], True)
    np.testing.assert_allclose(linf_norms(state.best - images)[found], distance[found], atol=TOLERANCE)
    eps = float(np.median(distance[found]))  # some examples within eps and, where any is farther, some not
    adversarial = jax.jit(fab.finalize_within)(state, eps)
    chex.assert_tree_all_finite(adversarial)
    assert_in_unit_interval(adversarial)
    within = distance <= eps
    np.testing.assert_array_equal(np.asarray(adversarial)[~within], np.asarray(images)[~within])
    np.testing.assert_array_equal(np.asarray(adversarial)[within], np.asarray(state.best)[within])
    assert np.all(linf_norms(adversarial - images) <= eps + TOLERANCE)


def test_the_targets_are_the_ranked_classes_of_the_clean_images(mlp_run):
    logits_fn, images, _, state = mlp_run
    np.testing.assert_array_equal(state.targets, jnp.argsort(-logits_fn(images), axis=-1)[:, 2])


@pytest.mark.slow  # compiles a whole attack or run: in the full tier
def test_an_example_already_misclassified_keeps_distance_zero_and_comes_back_unchanged():
    logits_fn = mlp_logits_fn(mlp_params())
    images = small_images(2)
    predicted = jnp.argmax(logits_fn(images), axis=-1)
    wrong = jnp.arange(8) % 2 == 1
    labels = jnp.where(wrong, (predicted + 1) % MLP_CLASSES, predicted)
    state, adversarial = mlp_fab(images, labels, 0.0)
    np.testing.assert_array_equal(np.asarray(state.distance)[np.asarray(wrong)], 0.0)
    assert np.all(np.asarray(state.distance)[~np.asarray(wrong)] > 0)
    np.testing.assert_array_equal(adversarial, images)  # eps 0: nothing else is within it


# ----------------------------------------------------------------------------
# jit, vmap, the state's shape, the random start and bad arguments.


def test_the_state_leads_with_the_batch_axis_and_finalize_vmaps_over_eps(mlp_run):
    _, images, _, state = mlp_run
    for leaf in jax.tree.leaves(state):
        assert leaf.shape[0] == 8, leaf.shape
    over_eps = jax.jit(jax.vmap(fab.finalize_within, in_axes=(None, 0)))(state, jnp.array([0.1, 0.0]))
    np.testing.assert_array_equal(over_eps[0], fab.finalize_within(state, 0.1))
    np.testing.assert_array_equal(over_eps[1], images)  # at eps 0 every example is returned clean


@pytest.mark.slow
def test_the_whole_run_vmaps_over_eps_and_unrolling_changes_nothing():
    logits_fn = mlp_logits_fn(mlp_params())
    images = small_images(3)
    labels = jnp.argmax(logits_fn(images), axis=-1)
    attack = fab.make_fab_targeted(logits_fn, 0.1, num_steps=MLP_STEPS, target_rank=3)
    state, looped = mlp_fab(images, labels, 0.1)
    unrolled = jax.jit(lambda x, y, k: iterative.run(attack, x, y, k, unroll=True))(images, labels, jax.random.key(0))
    np.testing.assert_allclose(looped, unrolled, atol=1e-6)
    _, over_eps = jax.jit(jax.vmap(mlp_fab, in_axes=(None, None, 0)))(images, labels, jnp.array([0.1, 0.0]))
    np.testing.assert_allclose(over_eps[0], looped, atol=1e-6)
    np.testing.assert_array_equal(over_eps[1], images)
    assert np.any(np.asarray(state.distance) <= 0.1)  # so at eps 0.1 the two differ


def test_the_random_start_lies_within_half_eps_and_the_default_starts_at_the_clean_image():
    logits_fn = mlp_logits_fn(mlp_params())
    images = jnp.full(SMALL_SHAPE, 0.5)  # far enough from 0 and 1 that nothing is clipped
    labels = jnp.zeros(8, jnp.int32)
    starts = [
        jax.jit(fab.make_fab_targeted(logits_fn, 0.2, random_start=random).init)(images, labels, jax.random.key(4))
        for random in (True, False)
    ]
    np.testing.assert_allclose(linf_norms(starts[0].point - images), 0.1, rtol=1e-5)
    np.testing.assert_array_equal(starts[1].point, images)


def test_the_standard_ranks_are_apgd_t_s_and_bad_arguments_are_refused():
    assert fab.STANDARD_TARGET_RANKS == apgd.STANDARD_TARGET_RANKS == tuple(range(2, 11))
    logits_fn = mlp_logits_fn(mlp_params())
    with pytest.raises(ValueError, match="target_rank"):
        fab.make_fab_targeted(logits_fn, 0.1, target_rank=1)
    with pytest.raises(ValueError, match="num_steps"):
        fab.make_fab_targeted(logits_fn, 0.1, num_steps=0)
