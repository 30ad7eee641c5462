"""Tests for advjax.iterative: the (init, step, finalize) triple and its runner."""

import jax
import jax.numpy as jnp
import numpy as np

from advjax import iterative


def counting_attack(num_steps: int) -> iterative.IterativeAttack:
    """Adds the iteration index to every pixel each step: a closed form to check the runner against."""
    return iterative.IterativeAttack(
        init=lambda images, labels, key: {"x": images, "steps": jnp.zeros(images.shape[0], jnp.int32)},
        step=lambda state, i: {"x": state["x"] + i, "steps": state["steps"] + 1},
        finalize=lambda state: state["x"],
        num_steps=num_steps,
    )


def test_run_applies_every_step_once_in_order_looped_or_unrolled():
    images, labels = jnp.zeros((3, 2)), jnp.zeros(3, jnp.int32)
    attack = counting_attack(4)
    for unroll in (False, True):
        out = jax.jit(lambda x, y, k, u=unroll: iterative.run(attack, x, y, k, unroll=u))(
            images, labels, jax.random.key(0)
        )
        np.testing.assert_array_equal(out, np.full((3, 2), 0 + 1 + 2 + 3))
