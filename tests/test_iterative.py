"""Tests for advjax.iterative: the (init, step, finalize) triple and its runner, and PGD written to it
(attacks.make_pgd), which attacks.pgd and attacks.bim run bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advjax import attacks, iterative, restarts
from advjax.data import to_float_images
from tests.helpers import mlp_dataset, mlp_logits_fn, mlp_params


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


# ----------------------------------------------------------------------------
# PGD through the interface is attacks.pgd, bit for bit.


def mlp_batch():
    """The tiny tanh MLP's first 8 images as floats, its labels, and its logits_fn."""
    images, labels = mlp_dataset()
    return mlp_logits_fn(mlp_params()), to_float_images(images[:8]), jnp.asarray(labels[:8])


@pytest.mark.parametrize(
    "eps, options",
    [
        (0.2, {}),
        (0.2, {"stop_on_success": True}),
        (0.2, {"targeted": True}),
        (0.2, {"random_start": False}),
        (1.0, {"norm": "l2"}),
    ],
)
def test_make_pgd_run_by_iterative_run_equals_attacks_pgd_bit_for_bit(eps, options):
    logits_fn, images, labels = mlp_batch()
    key, settings = jax.random.key(7), {"num_steps": 3, "step_size": eps / 4, **options}
    attack = attacks.make_pgd(logits_fn, eps, **settings)
    # attacks.pgd's first restart draws its start from fold_in(key, 0).
    interface = jax.jit(lambda x, y, k: iterative.run(attack, x, y, jax.random.fold_in(k, 0)))(images, labels, key)
    direct = jax.jit(lambda x, y, k: attacks.pgd(logits_fn, x, y, eps, k, **settings))(images, labels, key)
    np.testing.assert_array_equal(interface, direct)
    assert np.abs(np.asarray(interface) - np.asarray(images)).max() > 0


def test_pgd_restarts_are_runs_of_the_interface_under_the_restart_selection_bit_for_bit():
    logits_fn, images, labels = mlp_batch()
    key, eps, num_restarts = jax.random.key(8), 0.1, 3
    attack = attacks.make_pgd(logits_fn, eps, num_steps=2, step_size=0.02)

    @jax.jit
    def written_out(x, y, k):
        best = None
        for restart in range(num_restarts):
            adversarial = iterative.run(attack, x, y, jax.random.fold_in(k, restart))
            candidate = (adversarial, restarts.attack_outcome(logits_fn, adversarial, y))
            best = candidate if best is None else restarts.keep_worst(best, candidate)
        return best[0]

    direct = jax.jit(
        lambda x, y, k: attacks.pgd(logits_fn, x, y, eps, k, num_steps=2, step_size=0.02, num_restarts=num_restarts)
    )(images, labels, key)
    np.testing.assert_array_equal(written_out(images, labels, key), direct)


def test_bim_is_pgd_from_the_clean_image_at_bims_default_step():
    logits_fn, images, labels = mlp_batch()
    eps, steps = 0.2, 4
    bim = jax.jit(lambda x, y: attacks.bim(logits_fn, x, y, eps, num_steps=steps))(images, labels)

    @jax.jit
    def written_out(x, y):
        adversarial = x
        for _ in range(steps):
            adversarial = attacks.ascent_step(logits_fn, x, y, adversarial, eps, 2.5 * eps / steps)
        return adversarial

    np.testing.assert_allclose(bim, written_out(images, labels), atol=1e-6)  # a loop against unrolled: rounding


def test_pgd_state_keeps_the_batch_axis_first_and_the_start_in_the_ball():
    logits_fn, images, labels = mlp_batch()
    state = attacks.make_pgd(logits_fn, 0.1, norm="linf").init(images, labels, jax.random.key(0))
    assert all(leaf.shape[0] == images.shape[0] for leaf in jax.tree.leaves(state))
    assert np.abs(np.asarray(attacks.current_iterate(state)) - np.asarray(images)).max() <= 0.1 + 1e-6
