"""Tests for advjax.square: the schedule against the reference's table, the query budget, the ball, the
acceptance rule, and success on linear models where a fooling perturbation is known to exist."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advjax import iterative, square
from tests.helpers import assert_in_unit_interval, linear_logits_fn, linf_norms

# The AutoAttack attacks compile whole attacks per test: they run in the full tier, which CI runs.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("quick_compile_module")]


EPS = 0.1


def small_linear_model(shape, num_classes=4, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    weights = scale * rng.standard_normal((int(np.prod(shape)), num_classes))
    return weights, linear_logits_fn(weights, np.zeros(num_classes))


def small_images(shape, seed=0):
    """Uniform in [0, 1], with a few pixels at exactly 0 and 1 so that clipping to [0, 1] binds."""
    images = np.random.default_rng(seed).uniform(0.0, 1.0, shape).astype(np.float32)
    images[:, 0, 0], images[:, -1, -1] = 0.0, 1.0
    return jnp.asarray(images)


def predicted(logits_fn, images):
    return jnp.argmax(logits_fn(images), axis=-1)


def run_steps(attack, state, first, last):
    return jax.jit(lambda s: jax.lax.fori_loop(first, last, lambda i, t: attack.step(t, i), s))(state)


# ----------------------------------------------------------------------------
# The schedule: worked out by hand from SquareAttack.p_selection in AutoAttack's autoattack/square.py.


@pytest.mark.parametrize(
    "iteration, expected",
    [
        (0, 0.8),  # rescaled to 0
        (5, 0.8),  # rescaled to 10, not past 10
        (6, 0.4),  # 12
        (25, 0.4),  # 50
        (26, 0.2),  # 52
        (100, 0.2),  # 200
        (101, 0.1),  # 202
        (250, 0.1),  # 500
        (251, 0.05),  # 502
        (501, 0.025),  # 1002
        (1001, 0.0125),  # 2002
        (2001, 0.00625),  # 4002
        (3001, 0.003125),  # 6002
        (4000, 0.003125),  # 8000
        (4001, 0.0015625),  # 8002
        (4999, 0.0015625),  # 9998
    ],
)
def test_p_selection_rescaled_to_5000_queries_matches_the_reference(iteration, expected):
    assert float(square.p_selection(0.8, iteration, 5000)) == pytest.approx(expected)


@pytest.mark.parametrize("iteration, expected", [(10, 0.8), (11, 0.4), (50, 0.4), (51, 0.2), (8000, 0.8 / 256)])
def test_p_selection_without_rescaling_reads_the_iteration_as_is(iteration, expected):
    assert float(square.p_selection(0.8, iteration, 5000, rescale=False)) == pytest.approx(expected)
    assert float(square.p_selection(0.8, iteration, 10000)) == pytest.approx(expected)


def reference_p_selection(p_init, it, n_queries, rescale=True):
    """SquareAttack.p_selection, transliterated: the float rescaling, then the pieces."""
    it = int(it / n_queries * 10000) if rescale else it
    bounds = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
    return p_init / 2 ** sum(it > bound for bound in bounds)


@pytest.mark.parametrize("num_queries", [1, 7, 100, 333, 1000, 3001, 5000, 10000, 12345])
def test_p_selection_agrees_with_the_reference_at_every_iteration_of_a_budget(num_queries):
    iterations = np.arange(num_queries)
    expected = [reference_p_selection(0.8, int(i), num_queries) for i in iterations]
    np.testing.assert_allclose(square.p_selection(0.8, jnp.asarray(iterations), num_queries), expected, rtol=1e-6)


def test_p_selection_is_traceable_over_a_batch_of_iterations():
    iterations = jnp.array([0, 6, 26, 4001])
    p = jax.jit(lambda i: square.p_selection(0.8, i, 5000))(iterations)
    np.testing.assert_allclose(p, [0.8, 0.4, 0.2, 0.8 / 512], rtol=1e-6)


def test_square_sides_round_sqrt_p_h_w_and_stay_inside_the_image():
    # sqrt(0.8 * 64) = 7.16 -> 7, sqrt(0.4 * 64) = 5.06 -> 5, sqrt(12.8) = 3.58 -> 4, ...
    assert square.square_sides(0.8, 8, 8) == (7, 5, 4, 3, 2, 1, 1, 1, 1, 1)
    assert square.square_sides(0.8, 6, 6) == (5, 4, 3, 2, 1, 1, 1, 1, 1, 1)
    assert square.square_sides(2.0, 4, 4)[0] == 4  # round(sqrt(32)) = 6, at most the image's side
    assert int(square.square_side(0.8, 26, 5000, 8, 8)) == 4


# ----------------------------------------------------------------------------
# The pieces.


def test_margins_are_the_label_logit_minus_the_best_other():
    logits = jnp.array([[2.0, 0.5, 1.0], [0.0, 3.0, 1.0]])
    np.testing.assert_allclose(square.margins(logits, jnp.array([0, 2])), [1.0, -2.0])


@pytest.mark.slow  # compiles a whole attack or run: in the full tier
def test_the_start_is_vertical_stripes_of_plus_minus_eps_clipped_to_pixels():
    images = small_images((4, 6, 6, 3))
    state = square.square_init(
        small_linear_model((6, 6, 3))[1], images, jnp.zeros(4, jnp.int32), jax.random.key(0), EPS
    )
    delta = np.asarray(state.adversarial - images)
    unclipped = (np.asarray(images) > EPS) & (np.asarray(images) < 1 - EPS)
    np.testing.assert_allclose(np.abs(delta[unclipped]), EPS, rtol=1e-5)
    signs = np.where(unclipped, np.sign(delta), np.nan)
    column_signs = np.nanmax(signs, axis=1, keepdims=True)  # one sign per column and channel
    np.testing.assert_array_equal(np.where(unclipped, signs, column_signs), np.broadcast_to(column_signs, signs.shape))
    assert_in_unit_interval(state.adversarial)
    np.testing.assert_array_equal(state.queries, 1)


def test_the_square_mask_is_one_square_whose_corner_is_drawn_as_the_reference_draws_it():
    for seed in range(20):
        mask = np.asarray(square.square_mask(jax.random.key(seed), 3, 8, 8))
        rows, columns = np.nonzero(mask)
        assert mask.sum() == 9 and rows.max() - rows.min() == 2 and columns.max() - columns.min() == 2
        assert rows.min() < 8 - 3 and columns.min() < 8 - 3  # randint(0, h - s) excludes h - s
    np.testing.assert_array_equal(square.square_mask(jax.random.key(0), 8, 8, 8), np.ones((8, 8), bool))


@pytest.mark.slow  # compiles a whole attack or run: in the full tier
def test_signs_are_redrawn_until_the_square_changes_the_image():
    image = jnp.full((6, 6, 1), 0.5)
    raised = image + EPS  # every square already at +eps: only -eps changes it
    for seed in range(10):
        candidate = square.square_candidate(jax.random.key(seed), image, raised, EPS, 2)
        changed = np.asarray(candidate != raised)
        assert changed.sum() == 4
        np.testing.assert_allclose(np.asarray(candidate)[changed], 0.5 - EPS)


# ----------------------------------------------------------------------------
# The attack.


@pytest.mark.slow  # compiles the attack twice over: in the full tier
def test_queries_stay_within_the_budget_and_one_forward_pass_is_made_per_query():
    shape, num_queries = (4, 8, 8, 1), 30
    calls = []
    _, logits_fn = small_linear_model(shape[1:])
    counting = lambda x: calls.append(1) or logits_fn(x)
    images = small_images(shape)
    attack = square.make_square(counting, EPS, num_queries=num_queries)
    state = attack.init(images, predicted(logits_fn, images), jax.random.key(0))
    for iteration in range(attack.num_steps):
        state = square.square_search_step(counting, state, iteration, EPS, 2)
    assert len(calls) == num_queries  # the stripes, then one per step
    assert attack.num_steps == num_queries - 1
    queries = np.asarray(state.queries)
    assert queries.max() <= num_queries
    np.testing.assert_array_equal(queries[~np.asarray(state.fooled)], num_queries)
    plain = square.make_square(logits_fn, EPS, num_queries=num_queries)
    end = run_steps(plain, plain.init(images, predicted(logits_fn, images), jax.random.key(0)), 0, plain.num_steps)
    assert np.asarray(end.queries).max() <= num_queries
    np.testing.assert_array_equal(np.asarray(end.queries)[~np.asarray(end.fooled)], num_queries)


@pytest.mark.slow  # compiles a whole attack or run: in the full tier
def test_examples_fooled_early_stop_changing_and_stop_spending_queries():
    shape = (4, 8, 8, 1)
    _, logits_fn = small_linear_model(shape[1:], scale=0.3)
    images = small_images(shape)
    # Example 0's label is the model's least likely class: the stripes already fool it.
    labels = predicted(logits_fn, images).at[0].set(jnp.argmin(logits_fn(images[:1]), axis=-1)[0])
    attack = square.make_square(logits_fn, EPS, num_queries=200, rescale_schedule=True)
    start = attack.init(images, labels, jax.random.key(1))
    assert bool(start.fooled[0])
    early = run_steps(attack, start, 0, 60)
    late = run_steps(attack, early, 60, attack.num_steps)
    fooled = np.asarray(early.fooled)
    assert fooled.sum() >= 2  # the premise: some examples were fooled within 60 steps
    np.testing.assert_array_equal(late.queries[fooled], early.queries[fooled])
    np.testing.assert_array_equal(late.adversarial[fooled], early.adversarial[fooled])
    np.testing.assert_array_equal(late.adversarial[0], start.adversarial[0])
    assert int(late.queries[0]) == 1
    assert np.all(np.asarray(early.queries)[fooled] <= 61)


@pytest.mark.slow  # compiles a whole attack or run: in the full tier
@pytest.mark.parametrize("shape", [(4, 8, 8, 1), (4, 6, 6, 3)])
def test_results_stay_in_the_eps_ball_and_in_pixels(shape):
    _, logits_fn = small_linear_model(shape[1:])
    images = small_images(shape)
    attack = square.make_square(logits_fn, EPS, num_queries=100)
    adversarial = jax.jit(lambda x, y, k: iterative.run(attack, x, y, k))(
        images, predicted(logits_fn, images), jax.random.key(0)
    )
    assert linf_norms(adversarial - images).max() <= EPS + 1e-6
    assert_in_unit_interval(adversarial)


def test_the_margin_never_rises_and_is_the_margin_of_the_kept_image():
    shape = (4, 6, 6, 3)
    _, logits_fn = small_linear_model(shape[1:], scale=0.2)
    images = small_images(shape, seed=3)
    attack = square.make_square(logits_fn, EPS, num_queries=60)
    state = attack.init(images, predicted(logits_fn, images), jax.random.key(2))
    step = jax.jit(attack.step)
    history = [np.asarray(state.margin)]
    for iteration in range(attack.num_steps):
        state = step(state, iteration)
        history.append(np.asarray(state.margin))
    assert np.all(np.diff(np.stack(history), axis=0) <= 0)
    assert history[-1].sum() < history[0].sum()  # the search does lower it
    np.testing.assert_allclose(state.margin, square.margins(logits_fn(state.adversarial), state.labels), rtol=1e-5)


def fooling_linear_problem(shape, eps):
    """Two classes, logits [x . w + b, 0], images whose margin is 0.4 to 0.6 of the largest drop eps * |w|_1.

    The images lie in [0.4, 0.6], so with eps <= 0.4 clipping never binds and x - eps sign(w) fools every one.
    """
    rng = np.random.default_rng(7)
    w = rng.standard_normal(int(np.prod(shape[1:])))
    images = rng.uniform(0.4, 0.6, shape).astype(np.float32)
    scores = images.reshape(shape[0], -1) @ w
    largest_drop = eps * np.abs(w).sum()
    bias = 0.4 * largest_drop - scores.min()
    assert np.all(scores + bias <= 0.6 * largest_drop)
    weights = np.stack([w, np.zeros_like(w)], axis=1)
    return jnp.asarray(images), jnp.zeros(shape[0], jnp.int32), linear_logits_fn(weights, np.array([bias, 0.0]))


def test_square_fools_a_linear_model_where_a_fooling_perturbation_exists():
    # The rescaled schedule reaches small squares within 500 queries; unrescaled, 500 queries stay on large ones.
    eps = 0.2
    images, labels, logits_fn = fooling_linear_problem((4, 8, 8, 1), eps)
    assert np.all(np.asarray(square.margins(logits_fn(images), labels)) > 0)
    attack = square.make_square(logits_fn, eps, num_queries=500, rescale_schedule=True)
    start = attack.init(images, labels, jax.random.key(0))
    end = run_steps(attack, start, 0, attack.num_steps)
    adversarial = attack.finalize(end)
    assert np.all(np.asarray(predicted(logits_fn, adversarial)) != 0)
    assert np.all(np.asarray(end.margin) <= np.asarray(start.margin))
    assert np.all(np.asarray(end.queries) < 500)
    assert linf_norms(adversarial - images).max() <= eps + 1e-6


@pytest.mark.slow  # compiles the attack twice over: in the full tier
def test_the_jitted_loop_matches_step_by_step_and_eps_can_be_vmapped():
    shape = (4, 6, 6, 3)
    _, logits_fn = small_linear_model(shape[1:])
    images = small_images(shape)
    labels, key = predicted(logits_fn, images), jax.random.key(0)
    attack = square.make_square(logits_fn, EPS, num_queries=20)
    looped = jax.jit(lambda x, y, k: iterative.run(attack, x, y, k))(images, labels, key)
    state, step = attack.init(images, labels, key), jax.jit(attack.step)
    for iteration in range(attack.num_steps):
        state = step(state, iteration)
    np.testing.assert_allclose(looped, attack.finalize(state), atol=1e-6)

    def at(eps):
        return iterative.run(square.make_square(logits_fn, eps, num_queries=20), images, labels, key)

    grid = jnp.array([0.02, 0.2])
    adversarial = jax.jit(jax.vmap(at))(grid)
    for eps, x_adv in zip(grid, adversarial):
        assert linf_norms(x_adv - images).max() <= float(eps) + 1e-6
        assert linf_norms(x_adv - images).max() >= float(eps) - 1e-6


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="num_queries"):
        square.make_square(lambda x: x, EPS, num_queries=0)
    attack = square.make_square(lambda x: x.reshape(x.shape[0], -1), EPS)
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        attack.init(jnp.zeros((2, 4)), jnp.zeros(2, jnp.int32), jax.random.key(0))
