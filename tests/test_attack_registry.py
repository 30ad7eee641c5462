"""Tests for advjax.attack_registry: every evaluation attack under one signature, vmappable over eps,
least-likely targets, relative step sizes, and keywords checked when an attack is built."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advjax import attack_registry, attacks
from tests.helpers import L2_ATTACKS, LINF_ATTACKS, bim, numpy_logits, random_linear_model, uniform_images


@pytest.mark.usefixtures("quick_compile")
def test_least_likely_attack_targets_the_argmin_class_and_ignores_labels():
    weights, bias, logits_fn = random_linear_model(55)
    images = jnp.asarray(uniform_images(8, 0.2, 0.8, seed=56))
    clean = numpy_logits(weights, bias, images)
    least_likely = np.asarray(attacks.least_likely_labels(jnp.asarray(clean)))
    np.testing.assert_array_equal(least_likely, clean.argmin(axis=1))
    attack = jax.jit(
        lambda x, labels: attack_registry.make_attack("bim", least_likely=True, num_steps=10)(logits_fn, x, labels, 0.3)
    )

    adversarial = attack(images, jnp.zeros(8, jnp.int32))

    np.testing.assert_array_equal(numpy_logits(weights, bias, adversarial).argmax(axis=1), least_likely)
    chex.assert_trees_all_equal(attack(images, jnp.arange(8)), adversarial)


VMAP_CASES = [(name, params, False) for name, params in {**LINF_ATTACKS, **L2_ATTACKS}.items()]
VMAP_CASES.append(("pgd", {"num_steps": 3, "relative_step_size": 0.5}, True))
# pgd_l2's case compiles longest; the other attacks cover the registry's vmap in the quick tier.
VMAP_MARKS = {"pgd_l2": pytest.mark.slow}


@pytest.mark.usefixtures("quick_compile")
@pytest.mark.parametrize(
    "name, params, least_likely",
    [
        pytest.param(
            n, p, ll, id=f"{n}{'-least_likely' if ll else ''}", marks=[VMAP_MARKS[n]] if n in VMAP_MARKS else []
        )
        for n, p, ll in VMAP_CASES
    ],
)
def test_attack_vmapped_over_eps_equals_separate_calls(name, params, least_likely):
    weights, bias, logits_fn = random_linear_model(57, bias_scale=0.3)
    images = jnp.asarray(uniform_images(4, seed=58))
    # The model's own labels, so that DeepFool has something to do (distances 0.05 to 0.29 here).
    labels = jnp.asarray(np.argmax(numpy_logits(weights, bias, images), axis=1))
    key = jax.random.key(59)
    attack = attack_registry.make_attack(name, least_likely=least_likely, **params)
    grid = jnp.array([0.0, 0.05, 0.2]) if name in LINF_ATTACKS else jnp.array([0.0, 0.1, 2.0])
    at_eps = jax.jit(lambda eps: attack(logits_fn, images, labels, eps, key))

    batched = jax.jit(jax.vmap(at_eps))(grid)

    separate = jnp.stack([at_eps(eps) for eps in grid])
    chex.assert_trees_all_close(batched, separate, atol=1e-6)
    chex.assert_trees_all_equal(batched[0], images)  # eps = 0 moves nothing
    assert not np.array_equal(np.asarray(batched[1]), np.asarray(batched[2]))


def test_relative_step_size_is_that_multiple_of_eps():
    _, _, logits_fn = random_linear_model(60)
    images = jnp.asarray(uniform_images(3, seed=61))
    labels = jnp.array([0, 1, 2])
    relative = attack_registry.make_attack("bim", num_steps=3, relative_step_size=0.4)(logits_fn, images, labels, 0.1)
    explicit = bim(logits_fn, images, labels, 0.1, num_steps=3, step_size=0.04)
    chex.assert_trees_all_close(relative, explicit, atol=1e-7)


def test_make_attack_rejects_unknown_names_and_parameters():
    with pytest.raises(ValueError, match="unknown attack"):
        attack_registry.make_attack("cw")
    with pytest.raises(TypeError, match="num_steps"):
        attack_registry.make_attack("fgsm", num_steps=3)
    with pytest.raises(TypeError, match="targeted"):
        attack_registry.make_attack("deepfool", least_likely=True)
    with pytest.raises(TypeError, match="not both"):
        attack_registry.make_attack("pgd", step_size=0.01, relative_step_size=0.1)
    assert set(attack_registry.ATTACKS) >= {"fgsm", "fgm_l2", "fgsm_random_start", "bim", "pgd", "pgd_l2", "deepfool"}
