"""Tests for advjax.losses: cross-entropy from logits, the combined adversarial loss, TRADES's KL and loss,
consistency regularization's loss, and GradAlign's penalty on a linear model."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advjax import losses
from tests.helpers import closed_form_input_gradient, linear_logits_fn, numpy_cross_entropy

pytestmark = pytest.mark.usefixtures("quick_compile_module")

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
# TRADES.


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
# Consistency regularization (Jeong & Shin 2020).


def numpy_consistency_loss(logits, labels, lam, eta) -> float:
    """The formula term by term in float64: mean over examples of the copies' mean CE, lam times the copies'
    mean KL(p_bar || p_i) and eta times H(p_bar), with p_bar the copies' mean softmax."""
    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)  # [B, m, K]
    p_bar = p.mean(axis=1)  # [B, K]
    batch, copies, _ = z.shape
    ce = np.array([[-np.log(p[b, i, labels[b]]) for i in range(copies)] for b in range(batch)])
    kl = np.array([[np.sum(p_bar[b] * np.log(p_bar[b] / p[b, i])) for i in range(copies)] for b in range(batch)])
    entropy = -np.sum(p_bar * np.log(p_bar), axis=-1)
    return float(np.mean(ce.mean(axis=1) + lam * kl.mean(axis=1) + eta * entropy))


def random_copies_logits(batch=5, copies=3, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    logits = (2.0 * rng.standard_normal((batch, copies, classes))).astype(np.float32)
    return logits, rng.integers(0, classes, batch)


@pytest.mark.parametrize("lam, eta", [(0.0, 0.0), (4.0, 0.0), (0.0, 0.7), (10.0, 0.5)])
def test_consistency_loss_is_mean_ce_plus_lambda_kl_to_the_mean_prediction_plus_eta_its_entropy(lam, eta):
    logits, labels = random_copies_logits()
    loss = losses.consistency_loss(jnp.asarray(logits), jnp.asarray(labels), lam, eta)
    chex.assert_shape(loss, ())
    np.testing.assert_allclose(loss, numpy_consistency_loss(logits, labels, lam, eta), rtol=1e-5)


def test_consistency_loss_terms_are_apart_from_one_another_and_from_a_reversed_kl():
    logits, labels = random_copies_logits(seed=1)
    x, y = jnp.asarray(logits), jnp.asarray(labels)
    base = float(losses.consistency_loss(x, y, 0.0, 0.0))
    kl = float(losses.consistency_loss(x, y, 1.0, 0.0)) - base
    entropy = float(losses.consistency_loss(x, y, 0.0, 1.0)) - base
    assert kl > 0.01 and entropy > 0.1  # each weight reaches a term of its own
    # KL(p_bar || p_i), the direction of their F.kl_div(log p_i, p_bar): not KL(p_i || p_bar).
    p = jax.nn.softmax(x)
    reversed_kl = jnp.mean(jnp.sum(p * (jnp.log(p) - jnp.log(jnp.mean(p, axis=1, keepdims=True))), axis=-1))
    assert abs(kl - float(reversed_kl)) > 1e-3
    np.testing.assert_allclose(losses.consistency_loss(x, y, 3.0, 2.0), base + 3.0 * kl + 2.0 * entropy, rtol=1e-5)


def test_one_copy_without_the_entropy_is_the_cross_entropy_and_equal_copies_have_no_kl():
    logits, labels = random_copies_logits(copies=1, seed=2)
    x, y = jnp.asarray(logits), jnp.asarray(labels)
    ce = numpy_cross_entropy(logits[:, 0], labels).mean()
    # With one copy p_bar is that copy's prediction: the KL is 0 whatever lambda.
    np.testing.assert_allclose(losses.consistency_loss(x, y, 25.0, 0.0), ce, rtol=1e-6)
    equal = jnp.repeat(x, 4, axis=1)  # four copies with one prediction
    np.testing.assert_allclose(
        losses.consistency_loss(equal, y, 25.0, 0.5), losses.consistency_loss(x, y, 0.0, 0.5), rtol=1e-6
    )


def test_consistency_loss_gradient_flows_through_the_mean_prediction():
    # As in their code, p_bar is not detached: the gradient is that of the formula with p_bar a function of z.
    logits, labels = random_copies_logits(seed=3)
    x, y = jnp.asarray(logits), jnp.asarray(labels)

    def plain(z, detach):
        p, log_p = jax.nn.softmax(z), jax.nn.log_softmax(z)
        p_bar = jnp.mean(p, axis=1)
        p_bar = jax.lax.stop_gradient(p_bar) if detach else p_bar
        ce = -jnp.take_along_axis(log_p, jnp.broadcast_to(y[:, None, None], (*z.shape[:2], 1)), axis=-1)[..., 0]
        kl = jnp.sum(p_bar[:, None] * (jnp.log(p_bar)[:, None] - log_p), axis=-1)
        entropy = -jnp.sum(p_bar * jnp.log(p_bar), axis=-1)
        return jnp.mean(ce.mean(1) + 10.0 * kl.mean(1) + 0.5 * entropy)

    gradient = jax.grad(lambda z: losses.consistency_loss(z, y, 10.0, 0.5))(x)
    chex.assert_trees_all_close(gradient, jax.grad(lambda z: plain(z, False))(x), rtol=1e-4, atol=1e-6)
    assert float(jnp.max(jnp.abs(gradient - jax.grad(lambda z: plain(z, True))(x)))) > 1e-3


def test_consistency_loss_and_its_gradient_are_finite_for_confident_disagreeing_copies():
    # Each copy puts all its mass on another class: p_bar has classes at exp(-1e4) = 0 in float32,
    # where a log(p_bar) of the mean softmax would give 0 * -inf = NaN.
    logits = jnp.array([[[1e4, 0.0, -1e4], [-1e4, 1e4, 0.0]]], jnp.float32)
    labels = jnp.array([0])
    loss, gradient = jax.value_and_grad(lambda z: losses.consistency_loss(z, labels, 10.0, 0.5))(logits)
    chex.assert_tree_all_finite((loss, gradient))
    # Closed form: log p_1 = (0, -1e4, -2e4) and log p_2 = (-2e4, 0, -1e4); CE (0 + 2e4) / 2; p_bar = (1/2, 1/2, 0),
    # KL(p_bar || p_1) = 1e4 / 2 - log 2 and KL(p_bar || p_2) = 2e4 / 2 - log 2; entropy log 2.
    expected = 1e4 + 10.0 * (7.5e3 - np.log(2.0)) + 0.5 * np.log(2.0)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)


# ----------------------------------------------------------------------------
# GradAlign's penalty, on a linear model: grad_x CE = W (softmax(x W + b) - onehot(y)).


def numpy_misalignment(clean_weights, shifted_weights, bias, images, perturbed, labels) -> float:
    """1 - cos per example, averaged; the clean gradient from `clean_weights` (held fixed),
    the shifted one from `shifted_weights`."""
    g1 = closed_form_input_gradient(clean_weights, bias, images, labels).reshape(len(labels), -1)
    g2 = closed_form_input_gradient(shifted_weights, bias, perturbed, labels).reshape(len(labels), -1)
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


def test_gradient_misalignment_is_the_mean_one_minus_cosine_of_input_gradients(linear_problem):
    weights, bias, images, perturbed, labels = linear_problem
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    penalty = losses.gradient_misalignment(
        linear_logits_fn(f32(weights), f32(bias)), f32(images), f32(perturbed), jnp.asarray(labels)
    )
    expected = numpy_misalignment(weights, weights, bias, images, perturbed, labels)
    assert expected > 0.01  # the perturbation turns the gradients
    np.testing.assert_allclose(penalty, expected, rtol=1e-4)
    same = losses.gradient_misalignment(
        linear_logits_fn(f32(weights), f32(bias)), f32(images), f32(images), jnp.asarray(labels)
    )
    np.testing.assert_allclose(same, 0.0, atol=1e-6)


def test_gradient_misalignment_differentiates_only_the_perturbed_gradient(linear_problem):
    weights, bias, images, perturbed, labels = linear_problem
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    grad = jax.grad(
        lambda w: losses.gradient_misalignment(
            linear_logits_fn(w, f32(bias)), f32(images), f32(perturbed), jnp.asarray(labels)
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


# ----------------------------------------------------------------------------
# The DLR losses (Croce & Hein 2020), against hand computations.


def test_dlr_loss_matches_hand_computations_including_ties():
    logits = jnp.array(
        [
            [3.0, 1.0, 0.0, -1.0],  # correct: -(3 - 1) / (3 - 0)
            [1.0, 4.0, 2.0, 0.0],  # wrong, label 0: -(1 - 4) / (4 - 1)
            [2.0, 2.0, 1.0, 0.0],  # the label ties the top: margin 0
            [5.0, 0.0, 5.0, 5.0],  # a three-way tie at the top: margin 0 over 0 + 1e-12
            [0.0, 1.0, 1.0, 1.0],  # the label below a tie: -(0 - 1) / (1 - 1 + 1e-12)
        ]
    )
    labels = jnp.array([0, 0, 1, 2, 0])
    expected = np.array([-2.0 / 3.0, 1.0, 0.0, 0.0, 1e12])
    np.testing.assert_allclose(losses.dlr_loss(logits, labels), expected, rtol=1e-6)


def test_targeted_dlr_loss_matches_hand_computations_including_ties():
    logits = jnp.array(
        [
            [4.0, 2.0, 1.0, 0.0],  # -(4 - 2) / (4 - (1 + 0) / 2)
            [1.0, 3.0, 0.0, -2.0],  # the target leads: -(1 - 3) / (3 - (0 - 2) / 2)
            [2.0, 2.0, 1.0, 1.0],  # label and target tie: 0
        ]
    )
    labels, targets = jnp.array([0, 0, 0]), jnp.array([1, 1, 1])
    expected = np.array([-2.0 / 3.5, 2.0 / 4.0, 0.0])
    np.testing.assert_allclose(losses.targeted_dlr_loss(logits, labels, targets), expected, rtol=1e-6)
    five = jnp.array([[0.0, 1.0, 2.0, 3.0, 4.0]])  # -(0 - 2) / (4 - (2 + 1) / 2)
    np.testing.assert_allclose(losses.targeted_dlr_loss(five, jnp.array([0]), jnp.array([2])), [2.0 / 2.5], rtol=1e-6)


def test_dlr_losses_are_invariant_to_shifting_and_scaling_the_logits():
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((6, 10)), jnp.float32)
    labels, targets = jnp.arange(6), jnp.arange(6)[::-1] + 4
    for transformed in (logits + 7.0, 3.0 * logits, 0.5 * logits - 2.0):
        np.testing.assert_allclose(losses.dlr_loss(transformed, labels), losses.dlr_loss(logits, labels), rtol=1e-4)
        np.testing.assert_allclose(
            losses.targeted_dlr_loss(transformed, labels, targets),
            losses.targeted_dlr_loss(logits, labels, targets),
            rtol=1e-4,
        )


def test_dlr_loss_is_positive_exactly_when_misclassified_and_its_gradient_is_finite_at_ties():
    logits = jnp.asarray(np.random.default_rng(1).standard_normal((32, 5)), jnp.float32)
    labels = jnp.asarray(np.random.default_rng(2).integers(0, 5, 32))
    misclassified = np.asarray(jnp.argmax(logits, axis=-1) != labels)
    np.testing.assert_array_equal(np.asarray(losses.dlr_loss(logits, labels)) > 0, misclassified)
    ties = jnp.array([[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 0.0, 0.0]])
    for loss in (
        lambda z: losses.dlr_loss(z, jnp.array([0, 1])),
        lambda z: losses.targeted_dlr_loss(z, jnp.array([0, 1]), jnp.array([1, 0])),
    ):
        chex.assert_tree_all_finite(jax.grad(lambda z, f=loss: jnp.sum(f(z)))(ties))


def test_dlr_losses_refuse_too_few_classes():
    with pytest.raises(ValueError, match="at least 3 classes"):
        losses.dlr_loss(jnp.zeros((2, 2)), jnp.array([0, 1]))
    with pytest.raises(ValueError, match="at least 4 classes"):
        losses.targeted_dlr_loss(jnp.zeros((2, 3)), jnp.array([0, 1]), jnp.array([1, 0]))
