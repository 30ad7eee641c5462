"""Tests for advjax.objectives and the training objectives of objectives.make_objective."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advjax import attacks, losses, models, noise, norms, objectives, train
from configs import default

IMAGE_SHAPE = (28, 28, 1)


# ----------------------------------------------------------------------------
# Independent references.


def numpy_cross_entropy(logits, labels) -> np.ndarray:
    """-log softmax(logits)[label], in float64 with the max subtracted."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_softmax = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -log_softmax[np.arange(len(labels)), np.asarray(labels)]


def jax_mean_cross_entropy(logits, labels) -> jax.Array:
    """Differentiable reference, via jax.nn.log_softmax rather than optax."""
    log_p = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], axis=1))


# ----------------------------------------------------------------------------
# cross_entropy and combined_adversarial_loss.


def test_cross_entropy_equals_negative_log_softmax_at_the_label():
    rng = np.random.default_rng(0)
    logits = (3.0 * rng.standard_normal((6, 10))).astype(np.float32)
    labels = np.array([0, 9, 3, 3, 5, 1])
    loss = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
    chex.assert_shape(loss, (6,))  # per example, not reduced
    chex.assert_trees_all_close(loss, numpy_cross_entropy(logits, labels).astype(np.float32), rtol=1e-5, atol=1e-6)


def test_cross_entropy_is_finite_and_exact_for_huge_logits():
    # exp(1e4) overflows float32; a naive log(softmax) gives inf or NaN.
    logits = jnp.array([[1e4, -1e4, 0.0], [1e4, -1e4, 0.0], [-1e4, -1e4, 1e4]], jnp.float32)
    labels = jnp.array([0, 1, 0])
    loss = losses.cross_entropy(logits, labels)
    chex.assert_tree_all_finite(loss)
    # Closed forms: the argmax costs log(1 + e^-1e4 + e^-2e4) = 0 in float32; a
    # label 2e4 below the max costs 2e4.
    chex.assert_trees_all_close(loss, jnp.array([0.0, 2e4, 2e4]), rtol=1e-6, atol=1e-6)

    # Its gradient, softmax - onehot, is finite too.
    gradient = jax.jit(jax.grad(lambda z: jnp.sum(losses.cross_entropy(z, labels))))(logits)
    chex.assert_tree_all_finite(gradient)
    expected = np.array([[0.0, 0.0, 0.0], [1.0, -1.0, 0.0], [-1.0, 0.0, 1.0]], np.float32)
    chex.assert_trees_all_close(gradient, expected, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_combined_adversarial_loss_is_alpha_clean_plus_one_minus_alpha_adversarial(alpha):
    clean, adversarial = jnp.float32(1.25), jnp.float32(4.5)
    combined = losses.combined_adversarial_loss(clean, adversarial, alpha)
    chex.assert_trees_all_close(combined, jnp.float32(alpha * 1.25 + (1 - alpha) * 4.5), rtol=1e-6)


def test_combined_adversarial_loss_endpoints_select_one_loss_exactly():
    clean, adversarial = jnp.array([1.25, 0.3]), jnp.array([4.5, 7.0])
    chex.assert_trees_all_equal(losses.combined_adversarial_loss(clean, adversarial, 1.0), clean)
    chex.assert_trees_all_equal(losses.combined_adversarial_loss(clean, adversarial, 0.0), adversarial)


# ----------------------------------------------------------------------------
# objectives.make_objective on the BP net (no dropout, so train and eval logits agree).


@pytest.fixture(scope="module")
def bp_batch():
    """(model, params, images, labels, rng) for a batch of 4."""
    model = models.build_model(default.experiment("bp", "ordinary").model)
    params = train.init_params(jax.random.key(0), model)
    images = jax.random.uniform(jax.random.key(1), (4, *IMAGE_SHAPE), jnp.float32)
    labels = jnp.array([1, 7, 3, 0])
    return model, params, images, labels, jax.random.key(2)


def make_objective(model, mode: str, **train_overrides):
    config = default.experiment("bp", mode).train
    config.update(train_overrides)
    # Jitted only for speed on a CPU; the objective is a pure function of its arguments.
    return jax.jit(objectives.make_objective(model.apply, config)), config


@functools.cache
def fgsm_value_and_grad(model, alpha: float):
    """(loss, logits), grads of the 'fgsm' objective: one compile serves both tests per alpha."""
    config = default.experiment("bp", "fgsm").train
    config.alpha = alpha
    return jax.jit(jax.value_and_grad(objectives.make_objective(model.apply, config), has_aux=True)), config


def logits_of(model, params, images):
    return model.apply({"params": params}, images, train=False)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_fgsm_objective_equals_weighted_clean_and_adversarial_cross_entropy(bp_batch, alpha):
    model, params, images, labels, rng = bp_batch
    value_and_grad, config = fgsm_value_and_grad(model, alpha)
    (loss, reported_logits), _ = value_and_grad(params, images, labels, rng)

    adversarial = attacks.fgsm(lambda x: logits_of(model, params, x), images, labels, config.eps)
    clean_ce = numpy_cross_entropy(logits_of(model, params, images), labels).mean()
    adversarial_ce = numpy_cross_entropy(logits_of(model, params, adversarial), labels).mean()
    # The attack must matter, or alpha = 0 could not tell x_adv from x.
    assert adversarial_ce > clean_ce + 1e-3

    chex.assert_shape(loss, ())
    np.testing.assert_allclose(loss, alpha * clean_ce + (1 - alpha) * adversarial_ce, rtol=1e-5)
    # The logits reported for accuracy are the clean ones.
    chex.assert_trees_all_close(reported_logits, logits_of(model, params, images), rtol=1e-5, atol=1e-6)


@functools.partial(jax.jit, static_argnums=0)
def separate_gradient(model, params, images, adversarial, labels, alpha):
    """d/dparams of alpha*CE(x) + (1-alpha)*CE(x_adv), x_adv an input, hence a constant."""

    def loss(p):
        clean = jax_mean_cross_entropy(logits_of(model, p, images), labels)
        return alpha * clean + (1 - alpha) * jax_mean_cross_entropy(logits_of(model, p, adversarial), labels)

    return jax.grad(loss)(params)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_fgsm_objective_gradient_treats_x_adv_as_a_constant(bp_batch, alpha):
    model, params, images, labels, rng = bp_batch
    value_and_grad, config = fgsm_value_and_grad(model, alpha)
    _, gradient = value_and_grad(params, images, labels, rng)

    # x_adv is crafted once from the current params, then held fixed: only the
    # two forward passes are differentiated. (jnp.sign has a zero derivative,
    # so this pins the weighting and the inputs of both terms; it cannot by
    # itself tell a stop_gradient from none.)
    adversarial = attacks.fgsm(lambda x: logits_of(model, params, x), images, labels, config.eps)

    expected = separate_gradient(model, params, images, adversarial, labels, alpha)
    chex.assert_trees_all_equal_shapes(gradient, params)
    chex.assert_trees_all_close(gradient, expected, rtol=1e-4, atol=1e-6)


def test_gaussian_objective_equals_cross_entropy_on_noise_from_the_first_split_key(bp_batch):
    model, params, images, labels, rng = bp_batch
    objective, config = make_objective(model, "gaussian")
    loss, _ = objective(params, images, labels, rng)

    noise_rng, _ = jax.random.split(rng)
    noisy = noise.gaussian(noise_rng, images, config.sigma)
    expected = numpy_cross_entropy(logits_of(model, params, noisy), labels).mean()
    np.testing.assert_allclose(loss, expected, rtol=1e-5)

    # The check separates the keys and the noise: the unsplit rng, or no noise, give other losses.
    unsplit = numpy_cross_entropy(logits_of(model, params, noise.gaussian(rng, images, config.sigma)), labels)
    clean = numpy_cross_entropy(logits_of(model, params, images), labels)
    assert abs(unsplit.mean() - expected) > 1e-4
    assert abs(clean.mean() - expected) > 1e-4


def test_ordinary_objective_equals_mean_cross_entropy(bp_batch):
    model, params, images, labels, rng = bp_batch
    objective, _ = make_objective(model, "ordinary")
    loss, logits = objective(params, images, labels, rng)
    expected_logits = logits_of(model, params, images)
    np.testing.assert_allclose(loss, numpy_cross_entropy(expected_logits, labels).mean(), rtol=1e-5)
    chex.assert_trees_all_close(logits, expected_logits, rtol=1e-5, atol=1e-6)


def test_ordinary_objective_on_cnn_trains_with_dropout_from_the_rng():
    config = default.experiment("cnn", "ordinary")
    model = models.build_model(config.model)
    # Random weights from numpy: the CNN's model.init would cost seconds to compile.
    shapes = jax.eval_shape(lambda k: train.init_params(k, model), jax.random.key(0))
    rng_np = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: jnp.asarray(rng_np.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]) or 100), jnp.float32),
        shapes,
    )
    images = jax.random.uniform(jax.random.key(1), (2, *IMAGE_SHAPE), jnp.float32)
    labels = jnp.array([4, 8])
    rng = jax.random.key(5)

    loss, logits = jax.jit(objectives.make_objective(model.apply, config.train))(params, images, labels, rng)
    train_logits = model.apply({"params": params}, images, train=True, rngs={"dropout": rng})
    chex.assert_trees_all_close(logits, train_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss, numpy_cross_entropy(train_logits, labels).mean(), rtol=1e-5)
    # Training logits are not the eval ones: dropout is on.
    assert not np.allclose(logits, model.apply({"params": params}, images, train=False), atol=1e-5)


def test_unknown_training_mode_raises_value_error(bp_batch):
    model = bp_batch[0]
    config = default.experiment("bp", "ordinary").train
    config.mode = "madry"
    with pytest.raises(ValueError, match="madry"):
        objectives.make_objective(model.apply, config)


def test_kl_divergence_matches_its_definition_and_is_zero_only_for_equal_predictions():
    p_logits = jnp.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    q_logits = jnp.array([[0.0, 1.0, 0.0], [0.5, 0.5, 0.5]])
    p, q = jax.nn.softmax(p_logits), jax.nn.softmax(q_logits)
    expected = jnp.sum(p * jnp.log(p / q), axis=-1)
    np.testing.assert_allclose(losses.kl_divergence(p_logits, q_logits), expected, rtol=1e-6)
    assert float(losses.kl_divergence(p_logits, q_logits)[0]) > 0.1
    assert float(losses.kl_divergence(p_logits, q_logits)[1]) == pytest.approx(0.0, abs=1e-7)
    # Logits that differ by a constant give the same prediction.
    np.testing.assert_allclose(losses.kl_divergence(p_logits, p_logits + 3.0), 0.0, atol=1e-6)


def test_trades_loss_weights_the_kl_by_beta():
    clean = jnp.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    adversarial = jnp.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    labels = jnp.array([0, 1])
    ce = jnp.mean(losses.cross_entropy(clean, labels))
    kl = jnp.mean(losses.kl_divergence(clean, adversarial))
    np.testing.assert_allclose(losses.trades_loss(clean, adversarial, labels, 0.0), ce, rtol=1e-6)
    np.testing.assert_allclose(losses.trades_loss(clean, adversarial, labels, 6.0), ce + 6.0 * kl, rtol=1e-6)


# ----------------------------------------------------------------------------
# GradAlign's penalty, on a linear model: grad_x CE = W (softmax(x W + b) - onehot(y)).


def linear_input_gradients(weights, bias, images, labels) -> np.ndarray:
    x = np.asarray(images, np.float64).reshape(len(labels), -1)
    z = x @ weights + bias
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(labels)), labels] -= 1.0
    return p @ weights.T


def numpy_misalignment(clean_weights, shifted_weights, bias, images, perturbed, labels) -> float:
    """1 - cos per example, averaged; the clean gradient from `clean_weights` (held fixed), the shifted one from `shifted_weights`."""
    g1 = linear_input_gradients(clean_weights, bias, images, labels)
    g2 = linear_input_gradients(shifted_weights, bias, perturbed, labels)
    cosine = np.sum(g1 * g2, axis=1) / (np.linalg.norm(g1, axis=1) * np.linalg.norm(g2, axis=1))
    return float(np.mean(1.0 - cosine))


@pytest.fixture
def linear_problem():
    rng = np.random.default_rng(3)
    weights = rng.normal(size=(12, 5)) * 0.8
    bias = rng.normal(size=5) * 0.1
    images = rng.uniform(size=(6, 3, 4, 1))
    perturbed = images + rng.uniform(-0.3, 0.3, size=images.shape)
    labels = np.array([0, 1, 2, 3, 4, 0])
    return weights, bias, images, perturbed, labels


def linear_logits(weights, bias):
    return lambda x: x.reshape(x.shape[0], -1) @ weights + bias


def test_gradient_misalignment_is_the_mean_one_minus_cosine_of_input_gradients(linear_problem):
    weights, bias, images, perturbed, labels = linear_problem
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    penalty = losses.gradient_misalignment(
        linear_logits(f32(weights), f32(bias)), f32(images), f32(perturbed), jnp.asarray(labels)
    )
    expected = numpy_misalignment(weights, weights, bias, images, perturbed, labels)
    assert expected > 0.01  # the perturbation turns the gradients
    np.testing.assert_allclose(penalty, expected, rtol=1e-4)
    same = losses.gradient_misalignment(
        linear_logits(f32(weights), f32(bias)), f32(images), f32(images), jnp.asarray(labels)
    )
    np.testing.assert_allclose(same, 0.0, atol=1e-6)


def test_gradient_misalignment_differentiates_only_the_perturbed_gradient(linear_problem):
    weights, bias, images, perturbed, labels = linear_problem
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    grad = jax.grad(
        lambda w: losses.gradient_misalignment(
            linear_logits(w, f32(bias)), f32(images), f32(perturbed), jnp.asarray(labels)
        )
    )(f32(weights))
    # Central differences in float64, moving only the weights behind the perturbed gradient.
    h, numeric = 1e-6, np.zeros_like(weights)
    for index in np.ndindex(weights.shape):
        step = np.zeros_like(weights)
        step[index] = h
        numeric[index] = (
            numpy_misalignment(weights, weights + step, bias, images, perturbed, labels)
            - numpy_misalignment(weights, weights - step, bias, images, perturbed, labels)
        ) / (2 * h)
    assert np.abs(numeric).max() > 1e-3
    np.testing.assert_allclose(grad, numeric, rtol=2e-3, atol=2e-5)


def test_gradient_misalignment_leaves_out_examples_without_a_gradient(linear_problem):
    weights, bias, images, perturbed, labels = linear_problem
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    mask = f32([1, 1, 0, 1, 1, 1])[:, None]  # example 2's logits do not depend on its pixels
    masked_logits = lambda w: lambda x: (x.reshape(x.shape[0], -1) * mask) @ w + f32(bias)
    args = (f32(images), f32(perturbed), jnp.asarray(labels))
    penalty = losses.gradient_misalignment(masked_logits(f32(weights)), *args)
    keep = np.array([0, 1, 3, 4, 5])
    expected = numpy_misalignment(weights, weights, bias, images[keep], perturbed[keep], labels[keep])
    np.testing.assert_allclose(penalty, expected, rtol=1e-4)
    grad = jax.grad(lambda w: losses.gradient_misalignment(masked_logits(w), *args))(f32(weights))
    assert bool(jnp.all(jnp.isfinite(grad)))
    # No example with a gradient at all: 0, with a finite (zero) parameter gradient.
    constant = lambda w: lambda x: 0.0 * x.reshape(x.shape[0], -1) @ w + f32(bias)
    assert float(losses.gradient_misalignment(constant(f32(weights)), *args)) == 0.0
    grad = jax.grad(lambda w: losses.gradient_misalignment(constant(w), *args))(f32(weights))
    assert bool(jnp.all(grad == 0.0))


@pytest.mark.parametrize("mode", ["fast", "ordinary"])
def test_grad_align_adds_its_weighted_penalty_at_a_uniform_draw_to_the_mode_objective(bp_batch, mode):
    model, params, images, labels = bp_batch[:4]
    key = jax.random.key(7)
    base, _ = make_objective(model, mode, eps=0.3)
    aligned, _ = make_objective(model, mode, eps=0.3, grad_align=0.5)
    base_key, align_key = jax.random.split(key)
    perturbed = norms.uniform_in_ball(align_key, images, 0.3, "linf", clip=False)
    assert float(jnp.min(perturbed)) < 0.0  # not clipped to [0, 1]
    penalty = losses.gradient_misalignment(functools.partial(logits_of, model, params), images, perturbed, labels)
    assert float(penalty) > 0.01
    loss, logits = aligned(params, images, labels, key)
    base_loss, base_logits = base(params, images, labels, base_key)
    np.testing.assert_allclose(loss, base_loss + 0.5 * penalty, rtol=1e-5)
    chex.assert_trees_all_close(logits, base_logits)
    # The penalty reaches the parameter gradient.
    grads = jax.grad(lambda p: aligned(p, images, labels, key)[0])(params)
    base_grads = jax.grad(lambda p: base(p, images, labels, base_key)[0])(params)
    difference = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), grads, base_grads)
    assert max(jax.tree.leaves(difference)) > 1e-5
    # Weight 0 is the mode's objective itself.
    unaligned, _ = make_objective(model, mode, eps=0.3, grad_align=0.0)
    np.testing.assert_allclose(
        unaligned(params, images, labels, key)[0], base(params, images, labels, key)[0], rtol=1e-6
    )


def test_gradient_misalignment_leaves_out_confident_examples_and_stays_finite(linear_problem):
    # A margin of 60 makes examples 0-2's loss ~1e-26: their float32 gradient has
    # no reliable direction and, squared, underflows.
    weights, bias, images, perturbed, labels = linear_problem
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    margin = 60.0 * jax.nn.one_hot(labels, 5) * f32([1, 1, 1, 0, 0, 0])[:, None]
    logits = lambda w: lambda x: x.reshape(x.shape[0], -1) @ w + f32(bias) + margin
    args = (f32(images), f32(perturbed), jnp.asarray(labels))
    assert float(jnp.max(losses.cross_entropy(logits(f32(weights))(args[0]), args[2])[:3])) < 1e-20
    penalty, grad = jax.value_and_grad(lambda w: losses.gradient_misalignment(logits(w), *args))(f32(weights))
    assert bool(jnp.all(jnp.isfinite(grad)))
    keep = np.array([3, 4, 5])
    expected = numpy_misalignment(weights, weights, bias, images[keep], perturbed[keep], labels[keep])
    np.testing.assert_allclose(penalty, expected, rtol=1e-4)
