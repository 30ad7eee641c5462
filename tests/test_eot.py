"""Tests for advjax.eot: per-example draws, the averaged gradient, APGD on it, and its refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advjax import apgd, attacks, eot, iterative
from tests.helpers import noisy_gradient_model, noisy_input_model, random_linear_model, uniform_images

# Linear models: compiling with most of XLA's passes costs more than it saves, whatever the tier.
pytestmark = pytest.mark.usefixtures("quick_compile_module")

EPS = 0.03


@pytest.fixture(scope="module")
def linear():
    _, _, logits_fn = random_linear_model(0, scale=0.02)
    images = jnp.asarray(uniform_images(32))
    return logits_fn, images, jnp.argmax(logits_fn(images), -1)  # every example starts correctly classified


def test_each_example_draws_from_its_own_key_whatever_shares_its_batch(linear):
    logits_fn, images, _ = linear
    model, keys = eot.each_with_its_key(noisy_input_model(logits_fn)), jax.random.split(jax.random.key(0), 3)
    together = model(images[:3], keys)
    np.testing.assert_allclose(model(images[1:2], keys[1:2])[0], together[1], atol=1e-5)
    np.testing.assert_allclose(noisy_input_model(logits_fn)(images[1:2], keys[1])[0], together[1], atol=1e-5)
    assert not np.allclose(model(images[:1], keys[1:2])[0], together[0])  # another key, another draw


def test_draw_keys_are_fresh_for_every_example_iteration_and_draw():
    keys = jax.random.split(jax.random.key(0), 4)
    bits = [np.asarray(jax.random.key_data(eot.draw_keys(keys, i, d))) for i, d in [(0, 0), (0, 1), (1, 0), (7, 3)]]
    rows = np.concatenate([b.reshape(4, -1) for b in bits])
    assert len({row.tobytes() for row in rows}) == len(rows)  # 16 distinct keys


def test_the_gradient_is_the_mean_over_draws_and_the_loss_and_verdict_the_last_draws(linear):
    logits_fn, images, labels = linear
    keyed, keys = noisy_input_model(logits_fn), jax.random.split(jax.random.key(1), len(labels))
    loss, misclassified, gradient = eot.averaged_loss_and_gradient(keyed, "ce", 5, keys, 3, images, labels, labels)
    model = eot.each_with_its_key(keyed)
    draws = [
        apgd.loss_and_gradient(lambda x, d=d: model(x, eot.draw_keys(keys, 3, d)), "ce", images, labels, labels)
        for d in range(5)
    ]
    np.testing.assert_allclose(gradient, np.mean([g for _, _, g in draws], axis=0), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(loss, draws[-1][0], rtol=1e-6)
    np.testing.assert_array_equal(misclassified, draws[-1][1])
    assert not np.allclose(draws[0][2], draws[1][2])  # the draws differ: the mean is not one draw


@pytest.mark.slow  # compiles two whole attacks
def test_one_draw_of_a_model_that_ignores_its_key_is_apgd_bit_for_bit(linear):
    logits_fn, images, labels = linear
    options = {"num_steps": 10, "loss": "dlr"}
    ours = eot.make_apgd_eot(lambda x, key: logits_fn(x), EPS, eot_samples=1, **options)
    theirs = apgd.make_apgd(logits_fn, EPS, **options)
    key = jax.random.key(2)
    np.testing.assert_array_equal(iterative.run(ours, images, labels, key), iterative.run(theirs, images, labels, key))


@pytest.mark.slow  # compiles three whole attacks
def test_twenty_draws_find_what_one_misses_when_the_gradient_is_noisy(linear):
    logits_fn, images, labels = linear

    def robust_accuracy(attack):
        adversarial = jax.jit(lambda x, y, k: iterative.run(attack, x, y, k))(images, labels, jax.random.key(0))
        assert float(jnp.max(jnp.abs(adversarial - images))) <= EPS + 1e-6
        return float(jnp.mean(attacks.predicted_labels(logits_fn, adversarial) == labels))

    exact = robust_accuracy(apgd.make_apgd(logits_fn, EPS, num_steps=5))
    one = robust_accuracy(eot.make_apgd_eot(noisy_gradient_model(logits_fn, 0.1), EPS, num_steps=5, eot_samples=1))
    twenty = robust_accuracy(eot.make_apgd_eot(noisy_gradient_model(logits_fn, 0.1), EPS, num_steps=5, eot_samples=20))
    # The noise's spread is 4.5 times smaller averaged: the attack comes within two examples of the exact gradient's.
    assert twenty <= exact + 2 / len(labels) and one >= twenty + 0.2, (exact, one, twenty)


@pytest.mark.parametrize(
    "options, field",
    [
        ({"eot_samples": 0}, "eot_samples"),
        ({"eot_samples": 2.5}, "eot_samples"),
        ({"loss": "dlr_targeted"}, "loss"),
        ({"norm": "l1"}, "norm"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(options, field):
    with pytest.raises(ValueError, match=field):
        eot.make_apgd_eot(lambda x, key: x, EPS, **options)
