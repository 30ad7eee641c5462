"""Tests for advjax.deepfool: the minimal perturbation of a linear model in closed form, and the budgeted attack."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advjax import attack_registry
from advjax import deepfool as deepfool_module
from tests.helpers import IMAGE_SHAPE, l2_norms, numpy_logits, per_image, random_linear_model, uniform_images

# Jitted only for speed: eagerly, every new shape compiles each op of the gradient on its own.
deepfool = jax.jit(deepfool_module.deepfool, static_argnums=0, static_argnames="max_iter")


def closed_form_minimal_perturbation(weights, bias, images, labels):
    """For a linear classifier: the distance |f_l - f_y| / ||w_l - w_y|| to the nearest
    other class l's boundary, and the unit direction w_l - w_y that reaches it."""
    logits = numpy_logits(weights, bias, images)
    rows = np.arange(len(labels))
    differences = weights.T[None, :, :] - weights.T[labels][:, None, :]  # [B, K, D]
    distances = np.abs(logits - logits[rows, labels][:, None]) / np.linalg.norm(differences, axis=2).clip(1e-30)
    distances[rows, labels] = np.inf
    closest = distances.argmin(axis=1)
    direction = differences[rows, closest]
    return distances[rows, closest], direction / np.linalg.norm(direction, axis=1, keepdims=True), closest


@pytest.mark.usefixtures("quick_compile")
@pytest.mark.parametrize("num_classes, overshoot", [(2, 0.02), (10, 0.02), (10, 0.1)])
def test_deepfool_finds_the_minimal_perturbation_of_a_linear_model(num_classes, overshoot):
    weights, bias, logits_fn = random_linear_model(47, num_classes, scale=0.01, bias_scale=0.5)
    # Near 0.5, and the steps are ~0.01 per pixel: clipping to [0, 1] never acts.
    images = 0.5 + np.random.default_rng(48).uniform(-0.1, 0.1, (6, *IMAGE_SHAPE)).astype(np.float32)
    labels = np.argmax(numpy_logits(weights, bias, images), axis=1)
    distance, direction, closest = closed_form_minimal_perturbation(weights, bias, images, labels)

    adversarial = deepfool(logits_fn, jnp.asarray(images), jnp.asarray(labels), overshoot=overshoot)

    delta = per_image(adversarial) - per_image(images)
    assert 0 < np.asarray(adversarial).min() and np.asarray(adversarial).max() < 1
    # (1 + overshoot) times the minimal distance, plus DeepFool's 1e-4 nudge past the boundary.
    np.testing.assert_allclose(l2_norms(delta), (1 + overshoot) * (distance + 1e-4), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(delta / l2_norms(delta)[:, None], direction, atol=1e-4)
    predicted = numpy_logits(weights, bias, adversarial).argmax(axis=1)
    assert np.all(predicted != labels)
    if num_classes == 2:
        np.testing.assert_array_equal(predicted, closest)

    # With a budget, the registry's DeepFool keeps only the perturbations that fit in it.
    budget = float(np.median(l2_norms(delta)))
    budgeted = attack_registry.make_attack("deepfool", overshoot=overshoot)
    within = np.asarray(budgeted(logits_fn, jnp.asarray(images), jnp.asarray(labels), budget))
    fits = l2_norms(delta) <= budget
    assert fits.any() and not fits.all()
    np.testing.assert_array_equal(within[fits], np.asarray(adversarial)[fits])
    np.testing.assert_array_equal(within[~fits], images[~fits])


@pytest.mark.usefixtures("quick_compile")
def test_deepfool_leaves_examples_not_predicted_as_their_label_unchanged():
    weights, bias, logits_fn = random_linear_model(49, bias_scale=0.5)
    images = jnp.asarray(uniform_images(4, 0.3, 0.7, seed=50))
    wrong = (np.argmax(numpy_logits(weights, bias, images), axis=1) + 1) % 10
    chex.assert_trees_all_equal(deepfool(logits_fn, images, jnp.asarray(wrong)), images)
