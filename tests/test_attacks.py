"""Tests for advjax.attacks: FGSM against closed forms, noise, clipping, statistics."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advjax import attacks, models
from configs import default

IMAGE_SHAPE = (28, 28, 1)
NUM_PIXELS = 28 * 28

# Jitted only for speed: eagerly, every new shape compiles each op of the
# gradient on its own (about a second per call on a 2-core CPU). Strengths and
# keys stay traced arguments; the logits function is static.
fgsm = jax.jit(attacks.fgsm, static_argnums=0)
input_gradient = jax.jit(attacks.input_gradient, static_argnums=0)
predicted_labels = jax.jit(attacks.predicted_labels, static_argnums=0)
gaussian = jax.jit(attacks.gaussian)
matched_gaussian = jax.jit(attacks.matched_gaussian)
perturbation_stats = jax.jit(attacks.perturbation_stats)


# ----------------------------------------------------------------------------
# A linear model, whose input gradient is known in closed form.


def linear_logits_fn(weights: np.ndarray, bias: np.ndarray):
    """logits = x.reshape(B, -1) @ W + b, as the attacks see a model."""
    w, b = jnp.asarray(weights, jnp.float32), jnp.asarray(bias, jnp.float32)
    return lambda x: x.reshape((x.shape[0], -1)) @ w + b


def closed_form_input_gradient(weights, bias, images, labels) -> np.ndarray:
    """d/dx sum_i CE(x_i W + b, y_i) = (softmax - onehot) @ W^T, in float64 numpy."""
    x = np.asarray(images, np.float64).reshape(len(labels), -1)
    w, b = np.asarray(weights, np.float64), np.asarray(bias, np.float64)
    logits = x @ w + b
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    onehot = np.eye(w.shape[1])[labels]
    return ((p - onehot) @ w.T).reshape(np.shape(images))


def uniform_images(batch: int, low: float = 0.0, high: float = 1.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(low, high, (batch, *IMAGE_SHAPE)).astype(np.float32)


def per_image(x) -> np.ndarray:
    return np.asarray(x, np.float64).reshape(np.shape(x)[0], -1)


# ----------------------------------------------------------------------------
# FGSM on the linear model.


def test_fgsm_binary_linear_model_moves_by_eps_sign_of_weight_difference():
    # Two classes: grad_x J = p_{y'} (w_{y'} - w_y) with p_{y'} > 0, so the sign
    # needs no softmax at all: sign(w_{y'} - w_y).
    rng = np.random.default_rng(1)
    weights = 0.01 * rng.standard_normal((NUM_PIXELS, 2))
    bias = np.array([0.1, -0.1])
    labels = np.array([0, 1, 1, 0])
    images = np.full((4, *IMAGE_SHAPE), 0.5, np.float32)
    eps = 0.1
    other = 1 - labels
    direction = np.sign(weights[:, other] - weights[:, labels]).T.reshape(images.shape)
    # No near-ties: float32 rounding (~1e-9 here) cannot flip a sign.
    assert np.abs(weights[:, 1] - weights[:, 0]).min() > 1e-6

    adversarial = fgsm(linear_logits_fn(weights, bias), jnp.asarray(images), jnp.asarray(labels), eps)

    chex.assert_shape(adversarial, images.shape)
    chex.assert_trees_all_close(adversarial, (images + np.float32(eps) * direction).astype(np.float32), atol=1e-7)


def test_fgsm_general_linear_model_moves_by_eps_sign_of_closed_form_gradient():
    rng = np.random.default_rng(2)
    weights = 0.05 * rng.standard_normal((NUM_PIXELS, 10))
    bias = rng.standard_normal(10)
    labels = np.array([3, 0, 9])
    # Interior pixels: with eps = 0.1 nothing reaches 0 or 1, so nothing is clipped.
    images = uniform_images(3, 0.2, 0.8, seed=3)
    eps = 0.1
    gradient = closed_form_input_gradient(weights, bias, images, labels)
    # A float32 gradient can only disagree in sign with this one where it is tiny.
    assert np.abs(gradient).min() > 1e-6

    logits_fn = linear_logits_fn(weights, bias)
    chex.assert_trees_all_close(
        input_gradient(logits_fn, jnp.asarray(images), jnp.asarray(labels)),
        gradient.astype(np.float32),
        rtol=1e-4,
        atol=1e-6,
    )
    adversarial = fgsm(logits_fn, jnp.asarray(images), jnp.asarray(labels), eps)
    expected = images + np.float32(eps) * np.sign(gradient).astype(np.float32)
    chex.assert_trees_all_close(adversarial, expected, atol=1e-7)
    # Every pixel moved by exactly eps.
    np.testing.assert_allclose(np.abs(np.asarray(adversarial) - images), eps, rtol=1e-5)


def test_fgsm_input_gradient_is_per_example_not_batch_averaged():
    # The summed loss makes each example's gradient independent of the batch:
    # attacking a batch equals attacking each image alone.
    rng = np.random.default_rng(4)
    weights = 0.05 * rng.standard_normal((NUM_PIXELS, 10))
    logits_fn = linear_logits_fn(weights, np.zeros(10))
    images = jnp.asarray(uniform_images(3, 0.2, 0.8, seed=5))
    labels = jnp.array([1, 2, 3])
    batched = input_gradient(logits_fn, images, labels)
    single = jnp.concatenate([input_gradient(logits_fn, images[i : i + 1], labels[i : i + 1]) for i in range(3)])
    chex.assert_trees_all_close(batched, single, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(
        batched, closed_form_input_gradient(weights, np.zeros(10), images, np.asarray(labels)), rtol=1e-4, atol=1e-7
    )


def test_fgsm_leaves_pixels_with_zero_gradient_unmoved():
    rng = np.random.default_rng(6)
    weights = 0.05 * rng.standard_normal((NUM_PIXELS, 10))
    # A zero row of W: that pixel does not reach the logits, its gradient is exactly 0.
    dead = np.zeros(NUM_PIXELS, bool)
    dead[:100] = True
    dead[rng.choice(NUM_PIXELS, 50, replace=False)] = True
    weights[dead] = 0.0
    images = uniform_images(2, 0.2, 0.8, seed=7)
    labels = np.array([4, 5])
    eps = 0.1

    adversarial = np.asarray(
        fgsm(linear_logits_fn(weights, np.zeros(10)), jnp.asarray(images), jnp.asarray(labels), eps)
    )
    moved = per_image(adversarial) - per_image(images)
    # sign(0) = 0: dead pixels stay exactly where they were; every live pixel moves by eps.
    np.testing.assert_array_equal(moved[:, dead], 0.0)
    np.testing.assert_allclose(np.abs(moved[:, ~dead]), eps, rtol=1e-5)


# ----------------------------------------------------------------------------
# Clipping to [0, 1].


@pytest.fixture
def saturated_images() -> jax.Array:
    """A checkerboard of pixels exactly at 0 and at 1."""
    board = (np.indices((28, 28)).sum(axis=0) % 2).astype(np.float32)
    return jnp.asarray(np.broadcast_to(board[None, :, :, None], (3, *IMAGE_SHAPE)).copy())


def assert_in_unit_interval(x):
    x = np.asarray(x)
    assert x.min() >= 0.0 and x.max() <= 1.0, (x.min(), x.max())


def test_fgsm_clips_to_unit_interval(saturated_images):
    rng = np.random.default_rng(8)
    logits_fn = linear_logits_fn(rng.standard_normal((NUM_PIXELS, 10)), np.zeros(10))
    adversarial = fgsm(logits_fn, saturated_images, jnp.array([0, 1, 2]), 2.5)
    assert_in_unit_interval(adversarial)
    # From {0, 1} with eps > 1 every moved pixel lands on a boundary.
    assert set(np.unique(np.asarray(adversarial))) <= {0.0, 1.0}


@pytest.mark.parametrize("sigma", [0.5, 5.0])
def test_gaussian_clips_to_unit_interval(saturated_images, sigma):
    noisy = np.asarray(gaussian(jax.random.key(0), saturated_images, sigma))
    assert_in_unit_interval(noisy)
    # Half of the noise pushes each saturated pixel outwards, where it is clipped
    # back onto its boundary (more land on one when sigma is large).
    assert np.mean((noisy == 0.0) | (noisy == 1.0)) > 0.45


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
    noise = np.asarray(gaussian(jax.random.key(3), images, 0.05)) - 0.5
    n = noise.size
    np.testing.assert_allclose(noise.mean(), 0.0, atol=4 * 0.05 / np.sqrt(n))
    np.testing.assert_allclose(noise.std(), 0.05, atol=4 * 0.05 / np.sqrt(2 * n))


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
    noise = per_image(noisy) - 0.5
    # Standard errors over 784 pixels: sigma/sqrt(n) for the mean, sigma/sqrt(2n) for the std.
    n = NUM_PIXELS
    np.testing.assert_array_less(np.abs(noise.mean(axis=1) - means), 4 * stds / np.sqrt(n))
    np.testing.assert_array_less(np.abs(noise.std(axis=1) - stds), 4 * stds / np.sqrt(2 * n))
    # Independent noise, not a copy of the reference's perturbation.
    for image_noise, image_delta in zip(noise, per_image(delta)):
        assert abs(np.corrcoef(image_noise, image_delta)[0, 1]) < 0.2


# ----------------------------------------------------------------------------
# Statistics and labels.


def test_perturbation_stats_match_numpy():
    images = uniform_images(3, seed=12)
    perturbed = np.clip(images + np.random.default_rng(13).normal(0.02, 0.2, images.shape), 0, 1).astype(np.float32)
    stats = perturbation_stats(jnp.asarray(images), jnp.asarray(perturbed))
    delta = per_image(perturbed) - per_image(images)
    expected = attacks.PerturbationStats(
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


def test_predicted_labels_is_argmax_of_logits():
    rng = np.random.default_rng(16)
    weights, bias = rng.standard_normal((NUM_PIXELS, 10)), rng.standard_normal(10)
    images = uniform_images(6, seed=17)
    logits = per_image(images) @ weights + bias
    labels = predicted_labels(linear_logits_fn(weights, bias), jnp.asarray(images))
    chex.assert_shape(labels, (6,))
    chex.assert_trees_all_equal(np.asarray(labels), np.argmax(logits, axis=1))
    assert len(set(np.asarray(labels).tolist())) > 1  # not trivially one class


# ----------------------------------------------------------------------------
# Traced strengths.


@pytest.fixture
def linear_setup():
    rng = np.random.default_rng(18)
    logits_fn = linear_logits_fn(0.05 * rng.standard_normal((NUM_PIXELS, 10)), np.zeros(10))
    return logits_fn, jnp.asarray(uniform_images(2, seed=19)), jnp.array([7, 8])


def test_fgsm_vmapped_over_eps_equals_separate_calls(linear_setup):
    logits_fn, images, labels = linear_setup
    eps_values = jnp.array([0.0, 0.05, 0.1, 0.6])
    batched = jax.vmap(lambda eps: fgsm(logits_fn, images, labels, eps))(eps_values)
    chex.assert_shape(batched, (4, *images.shape))
    separate = jnp.stack([fgsm(logits_fn, images, labels, float(eps)) for eps in eps_values])
    chex.assert_trees_all_close(batched, separate, atol=1e-7)
    chex.assert_trees_all_equal(batched[0], images)  # eps = 0 moves nothing


def test_gaussian_vmapped_over_sigma_equals_separate_calls():
    images = jnp.asarray(uniform_images(2, seed=20))
    key = jax.random.key(4)
    sigmas = jnp.array([0.0, 0.1, 0.3])
    batched = jax.vmap(lambda sigma: gaussian(key, images, sigma))(sigmas)
    separate = jnp.stack([gaussian(key, images, float(sigma)) for sigma in sigmas])
    chex.assert_trees_all_close(batched, separate, atol=1e-7)


def test_jitted_fgsm_does_not_retrace_for_a_new_eps(linear_setup):
    logits_fn, images, labels = linear_setup

    @jax.jit
    @chex.assert_max_traces(n=1)
    def attack(eps):
        return attacks.fgsm(logits_fn, images, labels, eps)

    small, large = attack(jnp.float32(0.05)), attack(jnp.float32(0.2))
    # The second eps took effect (no stale constant), still from a single trace.
    chex.assert_trees_all_close(small, fgsm(logits_fn, images, labels, 0.05), atol=1e-7)
    chex.assert_trees_all_close(large, fgsm(logits_fn, images, labels, 0.2), atol=1e-7)


# ----------------------------------------------------------------------------
# FGSM on the CNN in eval mode.


def random_cnn_params(model, seed: int = 0) -> dict:
    """LeCun-scaled random weights from numpy: model.init's compile would cost seconds."""
    shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, *IMAGE_SHAPE)), train=False), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def draw(leaf):
        fan_in = int(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 0
        if not fan_in:  # a bias
            return jnp.asarray(0.01 * rng.standard_normal(leaf.shape), jnp.float32)
        return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in), jnp.float32)

    return jax.tree.map(draw, shapes["params"])


def test_fgsm_on_cnn_in_eval_mode_is_deterministic_and_follows_the_eval_gradient():
    model = models.build_model(default.experiment("cnn", "fgsm").model)
    params = random_cnn_params(model)
    images = jnp.asarray(uniform_images(2, 0.2, 0.8, seed=21))
    labels = jnp.array([2, 6])
    eps = 0.1

    # One jitted function for everything: each CNN compile costs ~2 s on a CPU.
    @jax.jit
    def run(params, images, dropout_rngs):
        eval_logits = lambda x: model.apply({"params": params}, x, train=False)

        # The eval-mode gradient, with jax.nn.log_softmax (independent of objectives.cross_entropy).
        def summed_loss(x):
            log_p = jax.nn.log_softmax(eval_logits(x))
            return -jnp.sum(jnp.take_along_axis(log_p, labels[:, None], axis=1))

        def train_attack(rng):
            train_logits = lambda x: model.apply({"params": params}, x, train=True, rngs={"dropout": rng})
            return attacks.fgsm(train_logits, images, labels, eps)

        return (
            attacks.fgsm(eval_logits, images, labels, eps),
            jax.grad(summed_loss)(images),
            [train_attack(rng) for rng in dropout_rngs],
        )

    rngs = [jax.random.key(1), jax.random.key(2)]
    adversarial, gradient, train_mode = run(params, images, rngs)
    adversarial_again, _, _ = run(params, jnp.array(images), [jax.random.key(3), jax.random.key(4)])
    chex.assert_trees_all_equal(adversarial_again, adversarial)

    gradient = np.asarray(gradient)
    step = (np.asarray(adversarial) - np.asarray(images)) / eps
    # Rounding may flip the sign only of near-zero components; compare the rest exactly.
    clear = np.abs(gradient) > 1e-3 * np.abs(gradient).max()
    assert clear.mean() > 0.5
    np.testing.assert_allclose(step[clear], np.sign(gradient[clear]), atol=1e-4)

    # A train-mode logits_fn would make the attack depend on the dropout draw:
    # the eval-mode determinism above is not vacuous for this model.
    assert not np.array_equal(train_mode[0], train_mode[1])
