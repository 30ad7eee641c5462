"""Tests for advjax.norms: uniform draws from the eps ball, projections, steepest ascent."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advjax import norms
from tests.helpers import IMAGE_SHAPE, l2_norms, per_image


@pytest.mark.usefixtures("quick_compile")
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_uniform_in_ball_fills_the_ball(norm):
    images = jnp.full((64, *IMAGE_SHAPE), 0.5, jnp.float32)
    eps = 0.1 if norm == "linf" else 2.0
    delta = np.asarray(jax.jit(norms.uniform_in_ball, static_argnums=3)(jax.random.key(39), images, eps, norm)) - 0.5
    if norm == "linf":
        assert np.abs(delta).max() <= eps * (1 + 1e-6)
        # Uniform on [-eps, eps]: std eps / sqrt(3).
        np.testing.assert_allclose(delta.std(), eps / np.sqrt(3), rtol=0.01)
    else:
        sizes = l2_norms(delta)
        # Uniform in a 784-dimensional ball: radius eps * u^(1/784), almost all near eps.
        assert sizes.max() <= eps * (1 + 1e-5) and sizes.min() > 0.98 * eps, (sizes.min(), sizes.max())
        # ...and an isotropic direction: the per-image means are ~0, not one shared direction.
        directions = per_image(delta) / sizes[:, None]
        assert np.abs(directions @ directions.T - np.eye(64)).max() < 0.2


def test_project_linf_clips_to_the_ball_then_to_pixels():
    images = jnp.array([[0.5, 0.5, 0.5, 0.5], [0.95, 0.95, 0.95, 0.05]])
    adversarial = images + jnp.array([[0.3, -0.3, 0.05, 0.0], [0.3, -0.3, 0.05, -0.3]])
    projected = norms.project(adversarial, images, 0.1, "linf")
    np.testing.assert_allclose(projected, [[0.6, 0.4, 0.55, 0.5], [1.0, 0.85, 1.0, 0.0]], atol=1e-6)


def test_project_l2_shrinks_onto_the_ball_and_leaves_points_inside_it():
    images = jnp.full((3, 4), 0.5)
    delta = jnp.array([[0.3, 0.4, 0.0, 0.0], [0.03, 0.04, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # L2 0.5, 0.05, 0
    projected = norms.project(images + delta, images, 0.1, "l2")
    np.testing.assert_allclose(projected - images, [[0.06, 0.08, 0, 0], [0.03, 0.04, 0, 0], [0, 0, 0, 0]], atol=1e-6)
    # Then clipped to [0, 1], which only moves pixels back toward the image.
    corner = norms.project(jnp.array([[1.5, 0.5]]), jnp.array([[0.95, 0.5]]), 1.0, "l2")
    np.testing.assert_allclose(corner, [[1.0, 0.5]], atol=1e-6)


def test_l2_unit_normalises_tiny_vectors_and_leaves_zero_at_zero():
    # Squares of 3e-30 underflow float32: without the rescaling by the largest entry the unit vector would vanish.
    x = jnp.array([[3e-30, 4e-30], [0.0, 0.0], [3.0, -4.0]], jnp.float32)
    np.testing.assert_allclose(norms.l2_unit(x), [[0.6, 0.8], [0.0, 0.0], [0.6, -0.8]], atol=1e-6)
    np.testing.assert_allclose(norms.steepest_ascent(x, "l2"), norms.l2_unit(x))
    np.testing.assert_array_equal(norms.steepest_ascent(x, "linf"), [[1, 1], [0, 0], [1, -1]])


def test_an_unknown_norm_is_refused():
    x = jnp.zeros((1, 4))
    for call in (
        lambda: norms.project(x, x, 0.1, "l1"),
        lambda: norms.steepest_ascent(x, "l1"),
        lambda: norms.uniform_in_ball(jax.random.key(0), x, 0.1, "l1"),
    ):
        with pytest.raises(ValueError, match="unknown norm 'l1'"):
            call()
