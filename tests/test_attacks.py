"""Tests for advjax.attacks: FGSM, FGM-L2, random-start FGSM, N-FGSM, BIM, PGD, targeted and least-likely
attacks against closed forms on linear models; clipping, traced strengths, the registry, and PGD against FGSM
on a trained MLP. The registry's one signature is tests/test_attack_registry.py."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from advjax import attack_registry, attacks, losses, models, norms
from advjax import deepfool as deepfool_module
from configs import default
from tests.helpers import (
    IMAGE_SHAPE,
    L2_ATTACKS,
    LINF_ATTACKS,
    NUM_PIXELS,
    assert_in_unit_interval,
    closed_form_input_gradient,
    fgsm,
    l2_norms,
    linear_logits_fn,
    linf_norms,
    numpy_cross_entropy,
    numpy_logits,
    per_image,
    random_linear_model,
    target_margin,
    uniform_images,
)

# Jitted only for speed (see tests/helpers.py, where `fgsm` is jitted the same way).
fgm_l2 = jax.jit(attacks.fgm_l2, static_argnums=0, static_argnames="targeted")
fgsm_random_start = jax.jit(attacks.fgsm_random_start, static_argnums=0, static_argnames=("targeted", "clip_start"))
pgd = jax.jit(
    attacks.pgd, static_argnums=0, static_argnames=("norm", "num_steps", "num_restarts", "random_start", "targeted")
)
input_gradient = jax.jit(attacks.input_gradient, static_argnums=0)
predicted_labels = jax.jit(attacks.predicted_labels, static_argnums=0)


# ----------------------------------------------------------------------------
# FGSM on the linear model.


def test_fgsm_binary_linear_model_moves_by_eps_sign_of_weight_difference():
    # Two classes: grad_x J = p_{y'} (w_{y'} - w_y) with p_{y'} > 0, so the sign
    # needs no softmax at all: sign(w_{y'} - w_y).
    rng = np.random.default_rng(1)
    weights = 0.01 * rng.standard_normal((NUM_PIXELS, 2))
    bias = np.array([0.1, -0.1])
    labels = np.array([0, 1, 1, 0])
    images = np.full((4, *IMAGE_SHAPE), 0.5, np.float32)
    eps = 0.1
    other = 1 - labels
    direction = np.sign(weights[:, other] - weights[:, labels]).T.reshape(images.shape)
    # No near-ties: float32 rounding (~1e-9 here) cannot flip a sign.
    assert np.abs(weights[:, 1] - weights[:, 0]).min() > 1e-6

    adversarial = fgsm(linear_logits_fn(weights, bias), jnp.asarray(images), jnp.asarray(labels), eps)

    chex.assert_shape(adversarial, images.shape)
    chex.assert_trees_all_close(adversarial, (images + np.float32(eps) * direction).astype(np.float32), atol=1e-7)


def test_fgsm_general_linear_model_moves_by_eps_sign_of_closed_form_gradient():
    rng = np.random.default_rng(2)
    weights = 0.05 * rng.standard_normal((NUM_PIXELS, 10))
    bias = rng.standard_normal(10)
    labels = np.array([3, 0, 9])
    # Interior pixels: with eps = 0.1 nothing reaches 0 or 1, so nothing is clipped.
    images = uniform_images(3, 0.2, 0.8, seed=3)
    eps = 0.1
    gradient = closed_form_input_gradient(weights, bias, images, labels)
    # A float32 gradient can only disagree in sign with this one where it is tiny.
    assert np.abs(gradient).min() > 1e-6

    logits_fn = linear_logits_fn(weights, bias)
    chex.assert_trees_all_close(
        input_gradient(logits_fn, jnp.asarray(images), jnp.asarray(labels)),
        gradient.astype(np.float32),
        rtol=1e-4,
        atol=1e-6,
    )
    adversarial = fgsm(logits_fn, jnp.asarray(images), jnp.asarray(labels), eps)
    expected = images + np.float32(eps) * np.sign(gradient).astype(np.float32)
    chex.assert_trees_all_close(adversarial, expected, atol=1e-7)
    # Every pixel moved by exactly eps.
    np.testing.assert_allclose(np.abs(np.asarray(adversarial) - images), eps, rtol=1e-5)


def test_fgsm_input_gradient_is_per_example_not_batch_averaged():
    # The summed loss makes each example's gradient independent of the batch:
    # attacking a batch equals attacking each image alone.
    rng = np.random.default_rng(4)
    weights = 0.05 * rng.standard_normal((NUM_PIXELS, 10))
    logits_fn = linear_logits_fn(weights, np.zeros(10))
    images = jnp.asarray(uniform_images(3, 0.2, 0.8, seed=5))
    labels = jnp.array([1, 2, 3])
    batched = input_gradient(logits_fn, images, labels)
    single = jnp.concatenate([input_gradient(logits_fn, images[i : i + 1], labels[i : i + 1]) for i in range(3)])
    chex.assert_trees_all_close(batched, single, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(
        batched, closed_form_input_gradient(weights, np.zeros(10), images, np.asarray(labels)), rtol=1e-4, atol=1e-7
    )


def test_fgsm_leaves_pixels_with_zero_gradient_unmoved():
    rng = np.random.default_rng(6)
    weights = 0.05 * rng.standard_normal((NUM_PIXELS, 10))
    # A zero row of W: that pixel does not reach the logits, its gradient is exactly 0.
    dead = np.zeros(NUM_PIXELS, bool)
    dead[:100] = True
    dead[rng.choice(NUM_PIXELS, 50, replace=False)] = True
    weights[dead] = 0.0
    images = uniform_images(2, 0.2, 0.8, seed=7)
    labels = np.array([4, 5])
    eps = 0.1

    adversarial = np.asarray(
        fgsm(linear_logits_fn(weights, np.zeros(10)), jnp.asarray(images), jnp.asarray(labels), eps)
    )
    moved = per_image(adversarial) - per_image(images)
    # sign(0) = 0: dead pixels stay exactly where they were; every live pixel moves by eps.
    np.testing.assert_array_equal(moved[:, dead], 0.0)
    np.testing.assert_allclose(np.abs(moved[:, ~dead]), eps, rtol=1e-5)


def test_fgsm_clips_to_unit_interval(saturated_images):
    rng = np.random.default_rng(8)
    logits_fn = linear_logits_fn(rng.standard_normal((NUM_PIXELS, 10)), np.zeros(10))
    adversarial = fgsm(logits_fn, saturated_images, jnp.array([0, 1, 2]), 2.5)
    assert_in_unit_interval(adversarial)
    # From {0, 1} with eps > 1 every moved pixel lands on a boundary.
    assert set(np.unique(np.asarray(adversarial))) <= {0.0, 1.0}


# ----------------------------------------------------------------------------
# Labels.


def test_predicted_labels_is_argmax_of_logits():
    rng = np.random.default_rng(16)
    weights, bias = rng.standard_normal((NUM_PIXELS, 10)), rng.standard_normal(10)
    images = uniform_images(6, seed=17)
    logits = per_image(images) @ weights + bias
    labels = predicted_labels(linear_logits_fn(weights, bias), jnp.asarray(images))
    chex.assert_shape(labels, (6,))
    chex.assert_trees_all_equal(np.asarray(labels), np.argmax(logits, axis=1))
    assert len(set(np.asarray(labels).tolist())) > 1  # not trivially one class


# ----------------------------------------------------------------------------
# Traced strengths.


@pytest.fixture
def linear_setup():
    rng = np.random.default_rng(18)
    logits_fn = linear_logits_fn(0.05 * rng.standard_normal((NUM_PIXELS, 10)), np.zeros(10))
    return logits_fn, jnp.asarray(uniform_images(2, seed=19)), jnp.array([7, 8])


def test_fgsm_vmapped_over_eps_equals_separate_calls(linear_setup):
    logits_fn, images, labels = linear_setup
    eps_values = jnp.array([0.0, 0.05, 0.1, 0.6])
    batched = jax.vmap(lambda eps: fgsm(logits_fn, images, labels, eps))(eps_values)
    chex.assert_shape(batched, (4, *images.shape))
    separate = jnp.stack([fgsm(logits_fn, images, labels, float(eps)) for eps in eps_values])
    chex.assert_trees_all_close(batched, separate, atol=1e-7)
    chex.assert_trees_all_equal(batched[0], images)  # eps = 0 moves nothing


def test_jitted_fgsm_does_not_retrace_for_a_new_eps(linear_setup):
    logits_fn, images, labels = linear_setup

    @jax.jit
    @chex.assert_max_traces(n=1)
    def attack(eps):
        return attacks.fgsm(logits_fn, images, labels, eps)

    small, large = attack(jnp.float32(0.05)), attack(jnp.float32(0.2))
    # The second eps took effect (no stale constant), still from a single trace.
    chex.assert_trees_all_close(small, fgsm(logits_fn, images, labels, 0.05), atol=1e-7)
    chex.assert_trees_all_close(large, fgsm(logits_fn, images, labels, 0.2), atol=1e-7)


# ----------------------------------------------------------------------------
# FGSM on the CNN in eval mode.


def random_cnn_params(model, seed: int = 0) -> dict:
    """LeCun-scaled random weights from numpy: model.init's compile would cost seconds."""
    shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, *IMAGE_SHAPE)), train=False), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def draw(leaf):
        fan_in = int(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 0
        if not fan_in:  # a bias
            return jnp.asarray(0.01 * rng.standard_normal(leaf.shape), jnp.float32)
        return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in), jnp.float32)

    return jax.tree.map(draw, shapes["params"])


def test_fgsm_on_cnn_in_eval_mode_is_deterministic_and_follows_the_eval_gradient():
    model = models.build_model(default.experiment("cnn", "fgsm").model)
    params = random_cnn_params(model)
    images = jnp.asarray(uniform_images(2, 0.2, 0.8, seed=21))
    labels = jnp.array([2, 6])
    eps = 0.1

    # One jitted function for everything: each CNN compile costs ~2 s on a CPU.
    @jax.jit
    def run(params, images, dropout_rngs):
        eval_logits = lambda x: model.apply({"params": params}, x, train=False)

        # The eval-mode gradient, with jax.nn.log_softmax (independent of losses.cross_entropy).
        def summed_loss(x):
            log_p = jax.nn.log_softmax(eval_logits(x))
            return -jnp.sum(jnp.take_along_axis(log_p, labels[:, None], axis=1))

        def train_attack(rng):
            train_logits = lambda x: model.apply({"params": params}, x, train=True, rngs={"dropout": rng})
            return attacks.fgsm(train_logits, images, labels, eps)

        return (
            attacks.fgsm(eval_logits, images, labels, eps),
            jax.grad(summed_loss)(images),
            [train_attack(rng) for rng in dropout_rngs],
        )

    rngs = [jax.random.key(1), jax.random.key(2)]
    adversarial, gradient, train_mode = run(params, images, rngs)
    adversarial_again, _, _ = run(params, jnp.array(images), [jax.random.key(3), jax.random.key(4)])
    chex.assert_trees_all_equal(adversarial_again, adversarial)

    gradient = np.asarray(gradient)
    step = (np.asarray(adversarial) - np.asarray(images)) / eps
    # Rounding may flip the sign only of near-zero components; compare the rest exactly.
    clear = np.abs(gradient) > 1e-3 * np.abs(gradient).max()
    assert clear.mean() > 0.5
    np.testing.assert_allclose(step[clear], np.sign(gradient[clear]), atol=1e-4)

    # A train-mode logits_fn would make the attack depend on the dropout draw:
    # the eval-mode determinism above is not vacuous for this model.
    assert not np.array_equal(train_mode[0], train_mode[1])


# ----------------------------------------------------------------------------
# Each attack stays in its ball and in [0, 1], and moves.


@pytest.mark.usefixtures("quick_compile")
@pytest.mark.parametrize("name", sorted(LINF_ATTACKS) + sorted(L2_ATTACKS))
def test_attack_stays_in_its_norm_ball_and_unit_interval(name):
    _, _, logits_fn = random_linear_model(30)
    # Uniform in [0, 1]: many pixels start near a bound, so clipping acts.
    images = jnp.asarray(uniform_images(8, seed=31))
    labels = jnp.asarray(np.random.default_rng(32).integers(0, 10, 8))
    is_linf = name in LINF_ATTACKS
    eps = 0.1 if is_linf else 1.0
    attack = attack_registry.make_attack(name, **(LINF_ATTACKS if is_linf else L2_ATTACKS)[name])

    adversarial = jax.jit(lambda x, key: attack(logits_fn, x, labels, eps, key))(images, jax.random.key(33))

    chex.assert_shape(adversarial, images.shape)
    assert_in_unit_interval(adversarial)
    sizes = (linf_norms if is_linf else l2_norms)(np.asarray(adversarial) - np.asarray(images))
    np.testing.assert_array_less(sizes, eps * (1 + 1e-5))
    # Not vacuous: the attack used a real part of its budget.
    assert sizes.max() > 0.5 * eps, sizes


@pytest.mark.usefixtures("quick_compile")
def test_fgsm_random_start_closed_form_on_a_binary_linear_model():
    # Two classes: the gradient's sign is sign(w_other - w_y) at every x, so the
    # attack is clip(u + step * s, -eps, eps) with u the uniform start.
    rng = np.random.default_rng(34)
    weights = 0.01 * rng.standard_normal((NUM_PIXELS, 2))
    dead = np.zeros(NUM_PIXELS, bool)
    dead[::7] = True
    weights[dead] = 0.0
    labels = np.array([0, 1, 1])
    images = jnp.full((3, *IMAGE_SHAPE), 0.5, jnp.float32)
    eps, key = 0.1, jax.random.key(35)
    logits_fn = linear_logits_fn(weights, np.zeros(2))
    sign = per_image(np.sign(weights[:, 1 - labels] - weights[:, labels]).T)
    start = per_image(norms.uniform_in_ball(key, images, eps, "linf")) - 0.5

    for step_size in (None, 2 * eps):
        adversarial = fgsm_random_start(logits_fn, images, jnp.asarray(labels), eps, key, step_size)
        delta = per_image(adversarial) - 0.5
        expected = np.clip(start + (1.25 * eps if step_size is None else step_size) * sign, -eps, eps)
        np.testing.assert_allclose(delta, expected, atol=1e-6)
        # Pixels with zero gradient stay at their random start (sign(0) = 0).
        np.testing.assert_allclose(delta[:, dead], start[:, dead], atol=1e-6)
    # A step of 2 eps reaches the ball's face from anywhere: every live pixel moves by exactly eps.
    np.testing.assert_allclose(np.abs(delta[:, ~dead]), eps, rtol=1e-5)
    np.testing.assert_array_equal(np.sign(delta[:, ~dead]), sign[:, ~dead])


@pytest.mark.usefixtures("quick_compile")
def test_fgsm_random_start_unclipped_takes_the_gradient_outside_the_pixel_range():
    # Black images and a linear model whose gradient sign is +1 everywhere: from a
    # clipped start (in [0, eps]) a 1.25 eps step always lands on eps, like plain
    # FGSM; from an unclipped start (in [-eps, eps]) it lands on
    # clip(u + 1.25 eps, -eps, eps), below eps wherever u < -0.25 eps.
    weights = np.zeros((NUM_PIXELS, 2))
    weights[:, 1] = 0.01  # class 1 gains from every pixel; attacking label 0 pushes every pixel up
    logits_fn = linear_logits_fn(weights, np.zeros(2))
    images = jnp.zeros((4, *IMAGE_SHAPE), jnp.float32)
    labels = jnp.zeros(4, jnp.int32)
    eps, key = 0.3, jax.random.key(36)
    clipped = per_image(fgsm_random_start(logits_fn, images, labels, eps, key))
    unclipped = per_image(fgsm_random_start(logits_fn, images, labels, eps, key, clip_start=False))

    np.testing.assert_allclose(clipped, eps, rtol=1e-6)
    u = eps * per_image(jax.random.uniform(key, images.shape, jnp.float32, -1.0, 1.0))
    np.testing.assert_allclose(unclipped, np.clip(u + 1.25 * eps, -eps, eps), atol=1e-6)
    # About a third of the pixels (u < -0.25 eps: 37.5%) end strictly inside the ball.
    inside = np.mean(unclipped < eps - 1e-6)
    assert 0.3 < inside < 0.45, inside
    # The result is a valid image in the ball either way.
    assert unclipped.min() >= 0.0 and unclipped.max() <= eps + 1e-6


@pytest.mark.usefixtures("quick_compile")
def test_noisy_fgsm_closed_form_leaves_the_eps_ball_and_stays_in_pixels():
    # Binary linear model: the gradient's sign is s = sign(w_other - w_y) everywhere, so
    # N-FGSM is clip(clip(x + u) + step * s) with u ~ U(-2 eps, 2 eps), unprojected.
    rng = np.random.default_rng(37)
    weights = 0.01 * rng.standard_normal((NUM_PIXELS, 2))
    labels = np.array([0, 1, 0, 1])
    images = jnp.asarray(uniform_images(4, seed=38))
    eps, key = 0.1, jax.random.key(39)
    logits_fn = linear_logits_fn(weights, np.zeros(2))
    sign = per_image(np.sign(weights[:, 1 - labels] - weights[:, labels]).T)
    x = per_image(images)
    u = per_image(jax.random.uniform(key, images.shape, jnp.float32, -1.0, 1.0))

    noisy_fgsm = jax.jit(attacks.noisy_fgsm, static_argnums=0)
    for noise, step_size in ((2.0, None), (1.0, 0.5 * eps)):
        adversarial = per_image(noisy_fgsm(logits_fn, images, jnp.asarray(labels), eps, key, noise, step_size))
        start = np.clip(x + noise * eps * u, 0, 1)
        expected = np.clip(start + (eps if step_size is None else step_size) * sign, 0, 1)
        np.testing.assert_allclose(adversarial, expected, atol=1e-6)
        assert adversarial.min() >= 0.0 and adversarial.max() <= 1.0
    # Default (noise 2 eps, step eps): beyond the eps ball, as the method intends, within 3 eps.
    delta = np.abs(per_image(noisy_fgsm(logits_fn, images, jnp.asarray(labels), eps, key)) - x)
    assert delta.max() > 1.5 * eps and delta.max() <= 3 * eps + 1e-6, delta.max()


def test_fgm_l2_moves_exactly_eps_along_the_gradient():
    weights, bias, logits_fn = random_linear_model(36, bias_scale=0.5)
    # At 0.5 an L2 step of 0.5 moves pixels by ~0.02: nothing is clipped.
    images = np.full((4, *IMAGE_SHAPE), 0.5, np.float32)
    images += np.random.default_rng(37).uniform(-0.1, 0.1, images.shape).astype(np.float32)
    labels = np.array([1, 3, 5, 7])
    eps = 0.5

    adversarial = fgm_l2(logits_fn, jnp.asarray(images), jnp.asarray(labels), eps)

    gradient = per_image(closed_form_input_gradient(weights, bias, images, labels))
    expected = eps * gradient / np.linalg.norm(gradient, axis=1, keepdims=True)
    delta = per_image(adversarial) - per_image(images)
    np.testing.assert_allclose(l2_norms(delta), eps, rtol=1e-5)
    np.testing.assert_allclose(delta, expected, atol=2e-6)


@pytest.mark.usefixtures("quick_compile")
def test_fgm_l2_zero_gradient_does_not_move_and_a_tiny_one_moves_eps():
    images = jnp.full((2, *IMAGE_SHAPE), 0.5, jnp.float32)
    labels = jnp.array([0, 0])
    flat = linear_logits_fn(np.zeros((NUM_PIXELS, 10)), np.zeros(10))
    chex.assert_trees_all_equal(fgm_l2(flat, images, labels, 0.5), images)

    # A margin of 60 makes the loss gradient ~1e-26 per pixel: its squares
    # underflow in float32, yet the step must still be a full eps.
    weights = 0.01 * np.random.default_rng(38).standard_normal((NUM_PIXELS, 10))
    confident = linear_logits_fn(weights, np.array([60.0] + [0.0] * 9))
    gradient = np.asarray(input_gradient(confident, images, labels))
    assert 0 < np.abs(gradient).max() < 1e-20
    delta = np.asarray(fgm_l2(confident, images, labels, 0.5)) - np.asarray(images)
    np.testing.assert_allclose(l2_norms(delta), 0.5, rtol=1e-5)


# ----------------------------------------------------------------------------
# PGD.


def test_one_step_pgd_without_random_start_equals_fgsm_exactly():
    _, _, logits_fn = random_linear_model(40)
    images = jnp.asarray(uniform_images(6, seed=41))
    labels = jnp.asarray(np.random.default_rng(42).integers(0, 10, 6))
    eps = 0.1
    one_step = pgd(logits_fn, images, labels, eps, None, num_steps=1, step_size=eps, random_start=False)
    reference = fgsm(logits_fn, images, labels, eps)
    chex.assert_trees_all_equal(one_step, reference)
    assert np.mean(np.asarray(one_step) != np.asarray(images)) > 0.5
    # And FGSM, itself one step of make_pgd, is still the sign formula written out, bit for bit.
    sign_formula = jax.jit(
        lambda x, y: norms.clip_to_pixels(x + eps * jnp.sign(attacks.input_gradient(logits_fn, x, y)))
    )
    chex.assert_trees_all_equal(reference, sign_formula(images, labels))


@pytest.mark.usefixtures("quick_compile")
def test_pgd_restarts_keep_the_worst_case_per_example():
    weights, bias, logits_fn = random_linear_model(43, bias_scale=0.3)
    images = jnp.asarray(uniform_images(32, seed=44))
    labels = np.argmax(numpy_logits(weights, bias, images), axis=1)  # all correct before the attack
    # A wide ball and one short step: where each restart starts decides whether it fools the model.
    eps, step_size, num_steps, num_restarts = 0.2, 0.005, 1, 4
    key = jax.random.key(45)

    returned = pgd(
        logits_fn,
        images,
        jnp.asarray(labels),
        eps,
        key,
        num_steps=num_steps,
        step_size=step_size,
        num_restarts=num_restarts,
    )

    @jax.jit
    def single_restarts(images, key):
        # Restart r, rebuilt from its parts: its own start, then the same projected steps.
        def one(restart):
            start = norms.uniform_in_ball(jax.random.fold_in(key, restart), images, eps, "linf")
            return attacks.iterate(logits_fn, images, jnp.asarray(labels), start, eps, step_size, num_steps)

        return jnp.stack([one(r) for r in range(num_restarts)])

    candidates = np.asarray(single_restarts(images, key))
    logits = np.stack([numpy_logits(weights, bias, c) for c in candidates])  # [R, B, K]
    success = logits.argmax(axis=2) != labels
    loss = np.stack([numpy_cross_entropy(restart_logits, labels) for restart_logits in logits])
    # Restarts disagree, so which one is kept matters.
    assert (success.any(axis=0) & ~success.all(axis=0)).any()
    # Per example: a restart that fools the model if there is one, then the highest loss.
    worst = np.lexsort((loss, success), axis=0)[-1]
    assert len(set(worst.tolist())) > 1
    np.testing.assert_allclose(np.asarray(returned), candidates[worst, np.arange(32)], atol=1e-6)

    returned_logits = numpy_logits(weights, bias, returned)
    returned_success = returned_logits.argmax(axis=1) != labels
    np.testing.assert_array_equal(returned_success, success.any(axis=0))
    returned_loss = numpy_cross_entropy(returned_logits, labels)
    assert np.all(returned_loss[~returned_success] >= loss[:, ~returned_success].max(axis=0) - 1e-5)


def test_pgd_without_a_key_for_its_random_start_is_an_error():
    _, _, logits_fn = random_linear_model(46)
    with pytest.raises(ValueError, match="key"):
        attacks.pgd(logits_fn, jnp.zeros((1, *IMAGE_SHAPE)), jnp.array([0]), 0.1, None)


# ----------------------------------------------------------------------------
# Targeted and least-likely attacks.


def test_one_step_targeted_attacks_descend_toward_the_target_on_a_binary_linear_model():
    # Two classes: -grad J(t) = p_o (w_t - w_o), so a targeted step follows w_t - w_o.
    rng = np.random.default_rng(51)
    weights = 0.01 * rng.standard_normal((NUM_PIXELS, 2))
    logits_fn = linear_logits_fn(weights, np.zeros(2))
    targets = np.array([0, 1, 1])
    images = jnp.full((3, *IMAGE_SHAPE), 0.5, jnp.float32)
    toward = (weights[:, targets] - weights[:, 1 - targets]).T

    signed = per_image(fgsm(logits_fn, images, jnp.asarray(targets), 0.1, targeted=True)) - 0.5
    np.testing.assert_allclose(signed, 0.1 * np.sign(toward), atol=1e-6)
    l2_step = per_image(fgm_l2(logits_fn, images, jnp.asarray(targets), 0.5, targeted=True)) - 0.5
    np.testing.assert_allclose(l2_step, 0.5 * toward / np.linalg.norm(toward, axis=1, keepdims=True), atol=1e-6)


@pytest.mark.usefixtures("quick_compile")
@pytest.mark.parametrize("name, eps", [("fgsm", 0.05), ("fgm_l2", 1.0), ("bim", 0.3), ("pgd", 0.3), ("pgd_l2", 4.0)])
def test_targeted_attacks_raise_the_target_margin(name, eps):
    weights, bias, logits_fn = random_linear_model(52)
    images = jnp.asarray(uniform_images(8, 0.2, 0.8, seed=53))
    clean = numpy_logits(weights, bias, images)
    targets = (clean.argmax(axis=1) + 1 + np.arange(8) % 9) % 10  # never the predicted class
    params = {"num_steps": 10} if name in ("bim", "pgd", "pgd_l2") else {}
    attack = attack_registry.make_attack(name, targeted=True, **params)

    adversarial = jax.jit(lambda x: attack(logits_fn, x, jnp.asarray(targets), eps, jax.random.key(54)))(images)

    before = target_margin(clean, targets)
    after = target_margin(numpy_logits(weights, bias, adversarial), targets)
    assert np.all(before < 0) and np.all(after > before), (before, after)
    if name not in ("fgsm", "fgm_l2"):  # the iterative attacks with a large budget reach the target
        assert np.all(after > 0), after


# ----------------------------------------------------------------------------
# A trained model: PGD is at least as strong as FGSM.


def separable_digits(num: int, seed: int) -> tuple[jax.Array, jax.Array]:
    """Each class lights its own 4x4 block over faint noise: learnable in a hundred steps."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, num)
    images = rng.uniform(0.0, 0.3, (num, *IMAGE_SHAPE)).astype(np.float32)
    for i, label in enumerate(labels):
        row, col = divmod(int(label), 5)
        images[i, 4 + 10 * row : 8 + 10 * row, 2 + 5 * col : 6 + 5 * col] = 0.8
    return jnp.asarray(images), jnp.asarray(labels)


def mlp_logits(params: dict, images: jax.Array) -> jax.Array:
    hidden = jax.nn.relu(images.reshape((images.shape[0], -1)) @ params["w1"] + params["b1"])
    return hidden @ params["w2"] + params["b2"]


@pytest.fixture(scope="module")
def trained_mlp() -> dict:
    """A 784-32-10 MLP trained to ~100% on separable_digits: Adam, full batch, 100 steps."""
    images, labels = separable_digits(256, seed=0)
    rng = np.random.default_rng(1)
    params = {
        "w1": jnp.asarray(rng.standard_normal((NUM_PIXELS, 32)) / 28, jnp.float32),
        "b1": jnp.zeros(32),
        "w2": jnp.asarray(rng.standard_normal((32, 10)) / np.sqrt(32), jnp.float32),
        "b2": jnp.zeros(10),
    }
    optimizer = optax.adam(1e-2)

    @jax.jit
    def train(params):
        def step(carry, _):
            params, state = carry
            loss = lambda p: losses.cross_entropy(mlp_logits(p, images), labels).mean()
            updates, state = optimizer.update(jax.grad(loss)(params), state)
            return (optax.apply_updates(params, updates), state), None

        return jax.lax.scan(step, (params, optimizer.init(params)), None, length=100)[0][0]

    return train(params)


@pytest.mark.usefixtures("quick_compile")
def test_pgd_is_at_least_as_strong_as_fgsm_on_a_trained_model(trained_mlp):
    images, labels = separable_digits(256, seed=2)
    logits_fn = lambda x: mlp_logits(trained_mlp, x)
    eps = 0.07  # where FGSM fools the model on about a third of the test images

    @jax.jit
    def accuracies(key):
        accuracy = lambda x: jnp.mean(jnp.argmax(logits_fn(x), -1) == labels)
        fooled_by_deepfool = jnp.argmax(logits_fn(deepfool_module.deepfool(logits_fn, images, labels)), -1) != labels
        return (
            accuracy(images),
            accuracy(attacks.fgsm(logits_fn, images, labels, eps)),
            accuracy(attacks.pgd(logits_fn, images, labels, eps, key, num_steps=10, num_restarts=2)),
            jnp.mean(fooled_by_deepfool),
        )

    clean, fgsm_accuracy, pgd_accuracy, deepfool_success = map(float, accuracies(jax.random.key(62)))
    assert clean > 0.95, clean
    assert 0.3 < fgsm_accuracy < clean, fgsm_accuracy  # FGSM bites, but not completely
    # The margin is what the multi-step attack adds on a nonlinear model (~0.7 -> ~0.25).
    assert pgd_accuracy <= fgsm_accuracy - 0.2, (pgd_accuracy, fgsm_accuracy)
    assert deepfool_success > 0.95, deepfool_success


# ----------------------------------------------------------------------------
# Wong et al.'s (2020) evaluation protocol: stop once fooled.


def test_ascent_step_with_stop_on_success_freezes_fooled_examples_and_steps_the_rest():
    weights, bias, logits_fn = random_linear_model(0, scale=0.2)
    images = jnp.asarray(uniform_images(16, 0.2, 0.8))
    predictions = np.argmax(numpy_logits(weights, bias, images), axis=1)
    labels = predictions.copy()
    labels[::2] = (predictions[::2] + 1) % 10  # even examples already misclassified
    labels = jnp.asarray(labels)
    eps, step_size = 0.1, 0.02
    frozen = attacks.ascent_step(logits_fn, images, labels, images, eps, step_size, stop_on_success=True)
    stepped = attacks.ascent_step(logits_fn, images, labels, images, eps, step_size)
    np.testing.assert_array_equal(np.asarray(frozen)[::2], np.asarray(images)[::2])
    np.testing.assert_array_equal(np.asarray(frozen)[1::2], np.asarray(stepped)[1::2])
    assert np.all(np.abs(per_image(stepped - images)[1::2]).max(axis=1) > 0)


def test_pgd_refuses_an_unknown_restart_selection_and_a_targeted_stop_on_success():
    _, _, logits_fn = random_linear_model(0)
    images, labels = jnp.asarray(uniform_images(2)), jnp.array([0, 1])
    with pytest.raises(ValueError, match="restart_selection must be one of"):
        attacks.pgd(logits_fn, images, labels, 0.1, jax.random.key(0), restart_selection="max")
    with pytest.raises(ValueError, match="untargeted"):
        attacks.pgd(logits_fn, images, labels, 0.1, jax.random.key(0), targeted=True, stop_on_success=True)
