"""Tests for advjax.noise: Gaussian and matched Gaussian noise, clipping, traced sigmas, perturbation statistics."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advjax import noise
from tests.helpers import (
    IMAGE_SHAPE,
    NUM_PIXELS,
    assert_in_unit_interval,
    fgsm,
    linear_logits_fn,
    per_image,
    uniform_images,
)

pytestmark = pytest.mark.usefixtures("quick_compile_module")

# Jitted only for speed: eagerly, every new shape compiles each op on its own.
gaussian = jax.jit(noise.gaussian, static_argnames="clip")
matched_gaussian = jax.jit(noise.matched_gaussian)
perturbation_stats = jax.jit(noise.perturbation_stats)


# ----------------------------------------------------------------------------
# Clipping to [0, 1].


@pytest.mark.parametrize("sigma", [0.5, 5.0])
def test_gaussian_clips_to_unit_interval(saturated_images, sigma):
    noisy = np.asarray(gaussian(jax.random.key(0), saturated_images, sigma))
    assert_in_unit_interval(noisy)
    # Half of the noise pushes each saturated pixel outwards, where it is clipped
    # back onto its boundary (more land on one when sigma is large).
    assert np.mean((noisy == 0.0) | (noisy == 1.0)) > 0.45


def test_gaussian_without_clipping_is_the_image_plus_the_same_noise(saturated_images):
    key = jax.random.key(3)
    unclipped = np.asarray(gaussian(key, saturated_images, 0.5, clip=False))
    assert unclipped.min() < 0 and unclipped.max() > 1
    np.testing.assert_array_equal(np.clip(unclipped, 0, 1), np.asarray(gaussian(key, saturated_images, 0.5)))


def test_matched_gaussian_clips_to_unit_interval(saturated_images):
    # An (unrealistic) reference far outside [0, 1]: its perturbation has std ~3.
    reference = saturated_images + 3.0 * jax.random.normal(jax.random.key(1), saturated_images.shape)
    noisy = matched_gaussian(jax.random.key(2), saturated_images, reference)
    assert_in_unit_interval(noisy)


# ----------------------------------------------------------------------------
# Gaussian noise.


def test_gaussian_with_zero_sigma_is_identity():
    images = jnp.asarray(uniform_images(2, seed=9))
    chex.assert_trees_all_equal(gaussian(jax.random.key(0), images, 0.0), images)


def test_gaussian_noise_depends_on_the_key_only():
    images = jnp.full((2, *IMAGE_SHAPE), 0.5, jnp.float32)
    first = gaussian(jax.random.key(0), images, 0.1)
    chex.assert_trees_all_equal(gaussian(jax.random.key(0), images, 0.1), first)
    other = gaussian(jax.random.key(1), images, 0.1)
    assert np.mean(np.asarray(other) != np.asarray(first)) > 0.99


def test_gaussian_noise_has_the_requested_std_before_clipping():
    # At 0.5 with sigma 0.05, clipping needs a 10-sigma draw: the std is sigma.
    images = jnp.full((4, *IMAGE_SHAPE), 0.5, jnp.float32)
    drawn = np.asarray(gaussian(jax.random.key(3), images, 0.05)) - 0.5
    n = drawn.size
    np.testing.assert_allclose(drawn.mean(), 0.0, atol=4 * 0.05 / np.sqrt(n))
    np.testing.assert_allclose(drawn.std(), 0.05, atol=4 * 0.05 / np.sqrt(2 * n))


def test_matched_gaussian_matches_per_image_mean_and_std():
    batch = 4
    images = jnp.full((batch, *IMAGE_SHAPE), 0.5, jnp.float32)
    means = np.array([0.02, -0.03, 0.0, 0.05])
    stds = np.array([0.05, 0.08, 0.1, 0.03])
    # A delta with exactly these per-image moments: standardise a draw, then scale.
    z = per_image(np.random.default_rng(10).standard_normal((batch, NUM_PIXELS)))
    z = (z - z.mean(axis=1, keepdims=True)) / z.std(axis=1, keepdims=True)
    delta = (means[:, None] + stds[:, None] * z).reshape(batch, *IMAGE_SHAPE)
    reference = images + jnp.asarray(delta, jnp.float32)
    assert_in_unit_interval(reference)

    noisy = np.asarray(matched_gaussian(jax.random.key(11), images, reference))
    # Far enough from 0 and 1 that nothing was clipped (so the moments are unbiased).
    assert 0.0 < noisy.min() and noisy.max() < 1.0
    drawn = per_image(noisy) - 0.5
    # Standard errors over 784 pixels: sigma/sqrt(n) for the mean, sigma/sqrt(2n) for the std.
    n = NUM_PIXELS
    np.testing.assert_array_less(np.abs(drawn.mean(axis=1) - means), 4 * stds / np.sqrt(n))
    np.testing.assert_array_less(np.abs(drawn.std(axis=1) - stds), 4 * stds / np.sqrt(2 * n))
    # Independent drawn, not a copy of the reference's perturbation.
    for image_drawn, image_delta in zip(drawn, per_image(delta)):
        assert abs(np.corrcoef(image_drawn, image_delta)[0, 1]) < 0.2


def test_gaussian_vmapped_over_sigma_equals_separate_calls():
    images = jnp.asarray(uniform_images(2, seed=20))
    key = jax.random.key(4)
    sigmas = jnp.array([0.0, 0.1, 0.3])
    batched = jax.vmap(lambda sigma: gaussian(key, images, sigma))(sigmas)
    separate = jnp.stack([gaussian(key, images, float(sigma)) for sigma in sigmas])
    chex.assert_trees_all_close(batched, separate, atol=1e-7)


# ----------------------------------------------------------------------------
# Statistics.


def test_perturbation_stats_match_numpy():
    images = uniform_images(3, seed=12)
    perturbed = np.clip(images + np.random.default_rng(13).normal(0.02, 0.2, images.shape), 0, 1).astype(np.float32)
    stats = perturbation_stats(jnp.asarray(images), jnp.asarray(perturbed))
    delta = per_image(perturbed) - per_image(images)
    expected = noise.PerturbationStats(
        mean=delta.mean(axis=1).astype(np.float32),
        std=delta.std(axis=1).astype(np.float32),  # population std (ddof=0) of this one image
        linf=np.abs(delta).max(axis=1).astype(np.float32),
        l2=np.sqrt((delta**2).sum(axis=1)).astype(np.float32),
    )
    chex.assert_shape(list(stats), (3,))
    chex.assert_trees_all_close(stats, expected, rtol=1e-4, atol=1e-6)


def test_perturbation_stats_of_an_fgsm_step_are_eps():
    # An unclipped FGSM step moves every pixel by +-eps: linf = eps, l2 = eps*sqrt(784).
    rng = np.random.default_rng(14)
    logits_fn = linear_logits_fn(0.05 * rng.standard_normal((NUM_PIXELS, 10)), np.zeros(10))
    images = jnp.asarray(uniform_images(2, 0.2, 0.8, seed=15))
    stats = perturbation_stats(images, fgsm(logits_fn, images, jnp.array([0, 1]), 0.1))
    chex.assert_trees_all_close(stats.linf, jnp.full(2, 0.1), rtol=1e-5)
    chex.assert_trees_all_close(stats.l2, jnp.full(2, 0.1 * 28.0), rtol=1e-5)
