"""Tests for advjax.restarts: which restart is kept per example."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from advjax import restarts
from tests.helpers import IMAGE_SHAPE, per_image


def test_restart_selections_differ_exactly_where_a_success_has_the_lower_loss():
    images = jnp.zeros((3, *IMAGE_SHAPE))
    best = (images, restarts.AttackOutcome(jnp.array([True, False, True]), jnp.array([0.5, 1.0, 2.0])))
    candidate = (images + 1.0, restarts.AttackOutcome(jnp.array([False, True, False]), jnp.array([0.9, 0.2, 1.0])))
    strict, _ = restarts.keep_worst(best, candidate)
    highest, outcome = restarts.keep_highest_loss(best, candidate)
    # Example 0: the kept success (loss 0.5) loses to a failure with loss 0.9 under highest-loss only.
    np.testing.assert_array_equal(per_image(strict).max(axis=1), [0.0, 1.0, 0.0])
    np.testing.assert_array_equal(per_image(highest).max(axis=1), [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(outcome.success, [False, False, True])
