"""Randomized smoothing: the statistics against scipy, the sampler against a linear classifier's closed form."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from advjax import smoothing

NUM_CLASSES = 10
# w = 1/28 on every pixel has ||w||_2 = 1, so w.x - 14 is the signed L2 distance of x to the boundary w.x = 14.
W = jnp.full(28 * 28, 1.0 / 28)


def linear_logits(images):
    """Class 0 where w.x > 14, else class 1; classes 2..9 never win."""
    margin = images.reshape(len(images), -1) @ W - 14.0
    rest = jnp.full((len(images), NUM_CLASSES - 2), -jnp.inf)
    return jnp.concatenate([margin[:, None], jnp.zeros_like(margin)[:, None], rest], axis=1)


def at_distance(distances):
    """Constant images whose signed L2 distance to linear_logits's boundary is each of `distances`."""
    levels = 0.5 + np.asarray(distances, np.float32) / 28
    return jnp.asarray(np.broadcast_to(levels[:, None, None, None], (len(levels), 28, 28, 1)).copy())


def two_sided_interval(count, n, level):
    """Clopper-Pearson's two-sided interval at `level`, written out from scipy's beta quantiles."""
    low = scipy.stats.beta.ppf(level / 2, count, n - count + 1) if count > 0 else 0.0
    high = scipy.stats.beta.ppf(1 - level / 2, count + 1, n - count) if count < n else 1.0
    return low, high


def test_the_lower_bound_is_scipys_beta_quantile_and_a_known_value():
    n, alpha = 1000, 0.001
    counts = np.array([0, 1, 500, 990, 1000])
    bound = smoothing.lower_confidence_bound(counts, n, alpha)
    expected = [0.0] + [scipy.stats.beta(k, n - k + 1).ppf(alpha) for k in counts[1:]]
    np.testing.assert_allclose(bound, expected, rtol=1e-12)
    assert bound[-1] == pytest.approx(alpha ** (1 / n), rel=1e-12)  # count = n: p^n = alpha
    # The bound is the p at which seeing `count` or more successes has probability alpha.
    np.testing.assert_allclose(scipy.stats.binom.sf(counts[1:] - 1, n, bound[1:]), alpha, rtol=1e-6)


def test_counts_of_a_linear_classifier_match_the_normal_cdf():
    sigma, n, distances = 0.5, 4000, np.array([0.25, 0.5, 1.0, -0.5])
    counts = np.asarray(
        smoothing.class_counts(
            linear_logits, at_distance(distances), jax.random.key(0), sigma=sigma, num_samples=n, chunk_size=500
        )
    )
    assert counts.dtype == np.int32 and counts.shape == (4, NUM_CLASSES)
    assert (counts.sum(axis=1) == n).all() and (counts[:, 2:] == 0).all()
    for count, p in zip(counts[:, 0], scipy.stats.norm.cdf(distances / sigma)):
        low, high = two_sided_interval(count, n, 1e-6)
        assert low <= p <= high, (count / n, p)


def test_certify_radius_is_the_formula_and_agrees_with_the_closed_form():
    sigma, n0, n, alpha, distances = 0.5, 100, 4000, 0.001, np.array([0.25, 0.5, 1.0, -0.5])
    images, key = at_distance(distances), jax.random.key(1)
    cert = smoothing.certify(linear_logits, images, key, sigma=sigma, n0=n0, n=n, alpha=alpha, chunk_size=100)
    np.testing.assert_array_equal(cert.prediction, np.where(distances > 0, 0, 1))
    # The same estimation counts, recomputed from the documented key: p_lower and the radius are the formulas.
    counts = smoothing.class_counts(
        linear_logits, images, jax.random.split(key)[1], sigma=sigma, num_samples=n, chunk_size=n
    )
    count_a = np.asarray(counts)[np.arange(4), cert.prediction]
    np.testing.assert_array_equal(cert.p_lower, scipy.stats.beta.ppf(alpha, count_a, n - count_a + 1))
    np.testing.assert_allclose(cert.radius, sigma * scipy.stats.norm.ppf(cert.p_lower), rtol=1e-12)
    # The smoothed linear classifier is itself: its exact radius is the distance to the boundary.
    for count, radius, distance in zip(count_a, cert.radius, np.abs(distances)):
        low, high = two_sided_interval(count, n, 1e-6)
        width = sigma * (scipy.stats.norm.ppf(high) - scipy.stats.norm.ppf(low))
        assert 0 < radius <= distance <= radius + width, (radius, distance, width)


def test_both_procedures_abstain_where_the_classes_are_equally_likely():
    images, key = at_distance([0.0, 1.0]), jax.random.key(2)
    cert = smoothing.certify(linear_logits, images, key, sigma=0.5, n0=100, n=2000, alpha=0.001, chunk_size=100)
    np.testing.assert_array_equal(cert.prediction, [smoothing.ABSTAIN, 0])
    assert cert.radius[0] == 0.0 and cert.p_lower[0] < 0.5 and cert.radius[1] > 0
    prediction = smoothing.predict(linear_logits, images, key, sigma=0.5, n=2000, alpha=0.001, chunk_size=100)
    np.testing.assert_array_equal(prediction, [smoothing.ABSTAIN, 0])


def test_a_fixed_key_reproduces_the_certificate_and_another_key_changes_the_counts():
    images = at_distance([0.0, 0.3])
    kwargs = dict(sigma=0.5, n0=100, n=1000, alpha=0.001, chunk_size=100)
    first = smoothing.certify(linear_logits, images, jax.random.key(3), **kwargs)
    again = smoothing.certify(linear_logits, images, jax.random.key(3), **kwargs)
    chex.assert_trees_all_equal(first, again)
    count = dict(sigma=0.5, num_samples=1000, chunk_size=100)
    counts_3 = smoothing.class_counts(linear_logits, images, jax.random.key(3), **count)
    counts_4 = smoothing.class_counts(linear_logits, images, jax.random.key(4), **count)
    assert not np.array_equal(counts_3, counts_4)


def test_counts_in_chunks_equal_counts_at_once():
    images, key = at_distance([0.0, 0.1, -0.2]), jax.random.key(5)
    at_once = smoothing.class_counts(linear_logits, images, key, sigma=0.5, num_samples=1000, chunk_size=1000)
    for chunk_size in (50, 200):
        in_chunks = smoothing.class_counts(
            linear_logits, images, key, sigma=0.5, num_samples=1000, chunk_size=chunk_size
        )
        np.testing.assert_array_equal(in_chunks, at_once)


def argmax_pixel_logits(images):
    """784 classes: the brightest pixel, so that the counts show which noise was drawn."""
    return images.reshape(len(images), -1)


def test_sample_s_of_image_i_draws_from_fold_in_of_fold_in():
    images, key, sigma, num_samples = jnp.zeros((2, 28, 28, 1)), jax.random.key(6), 0.7, 4
    counts = smoothing.class_counts(
        argmax_pixel_logits, images, key, sigma=sigma, num_samples=num_samples, chunk_size=2
    )
    expected = np.zeros((2, 28 * 28), np.int32)
    for i in range(2):
        for s in range(num_samples):
            noise = sigma * jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), s), (28, 28, 1))
            expected[i, int(jnp.argmax(noise.reshape(-1)))] += 1
    np.testing.assert_array_equal(counts, expected)
    # Noise reused across samples would light up 2 pixels, across images 4.
    assert (expected > 0).sum() > num_samples


def test_the_counting_fold_compiles_once_per_shape():
    chex.clear_trace_counter()

    @chex.assert_max_traces(n=1)
    def traced_once(images):
        return linear_logits(images)

    count = dict(num_samples=200, chunk_size=100)
    smoothing.class_counts(traced_once, at_distance([0.0, 0.5]), jax.random.key(7), sigma=0.5, **count)
    smoothing.class_counts(traced_once, at_distance([0.2, -0.1]), jax.random.key(8), sigma=0.25, **count)
    with pytest.raises(AssertionError, match="traced > 1 times"):  # a new shape compiles again, and is counted
        smoothing.class_counts(traced_once, at_distance([0.0, 0.5, 1.0]), jax.random.key(7), sigma=0.5, **count)


def test_vmap_over_sigma_gives_each_sigmas_counts():
    images, key, sigmas = at_distance([0.0, 0.25, 0.5]), jax.random.key(9), jnp.array([0.25, 0.5, 1.0])
    count = dict(num_samples=400, chunk_size=100)
    vmapped = jax.vmap(lambda s: smoothing.class_counts(linear_logits, images, key, sigma=s, **count))(sigmas)
    for sigma, counts in zip(sigmas, vmapped):
        np.testing.assert_array_equal(
            counts, smoothing.class_counts(linear_logits, images, key, sigma=float(sigma), **count)
        )
    assert not np.array_equal(vmapped[0], vmapped[2])


def test_certified_accuracy_and_the_average_certified_radius():
    cert = smoothing.Certificate(
        prediction=np.array([0, 1, smoothing.ABSTAIN, 2]),
        radius=np.array([0.5, 1.0, 0.0, 2.0]),
        p_lower=np.array([0.8, 0.9, 0.4, 0.99]),
    )
    labels = np.array([0, 1, 1, 0])
    np.testing.assert_allclose(
        smoothing.certified_accuracy(cert, labels, [0.0, 0.5, 0.75, 1.0, 1.5]), [0.5, 0.5, 0.25, 0.25, 0]
    )
    assert smoothing.average_certified_radius(cert, labels) == pytest.approx((0.5 + 1.0) / 4)


IMAGES = at_distance([0.0, 0.5])
KEY = jax.random.key(0)
GOOD_CERTIFY = dict(sigma=0.5, n0=100, n=1000, alpha=0.001, chunk_size=100)
GOOD_PREDICT = dict(sigma=0.5, n=1000, alpha=0.001, chunk_size=100)
GOOD_COUNTS = dict(sigma=0.5, num_samples=1000, chunk_size=100)
CERT = smoothing.Certificate(np.array([0, 1]), np.array([0.5, 0.0]), np.array([0.8, 0.4]))


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda: smoothing.class_counts(linear_logits, IMAGES, KEY, **{**GOOD_COUNTS, "sigma": 0.0}), "sigma"),
        (lambda: smoothing.certify(linear_logits, IMAGES, KEY, **{**GOOD_CERTIFY, "sigma": -1.0}), "sigma"),
        (lambda: smoothing.predict(linear_logits, IMAGES, KEY, **{**GOOD_PREDICT, "sigma": 0.0}), "sigma"),
        (lambda: smoothing.certify(linear_logits, IMAGES, KEY, **{**GOOD_CERTIFY, "n0": 0}), "n0"),
        (lambda: smoothing.certify(linear_logits, IMAGES, KEY, **{**GOOD_CERTIFY, "n": -5}), "n="),
        (lambda: smoothing.predict(linear_logits, IMAGES, KEY, **{**GOOD_PREDICT, "n": 0}), "n="),
        (lambda: smoothing.certify(linear_logits, IMAGES, KEY, **{**GOOD_CERTIFY, "alpha": 0.0}), "alpha"),
        (lambda: smoothing.predict(linear_logits, IMAGES, KEY, **{**GOOD_PREDICT, "alpha": 1.0}), "alpha"),
        (lambda: smoothing.lower_confidence_bound(3, 10, 1.5), "alpha"),
        (
            lambda: smoothing.class_counts(linear_logits, IMAGES, KEY, **{**GOOD_COUNTS, "num_samples": 150}),
            "num_samples=150 is not a multiple of chunk_size=100: a batch the sample count cannot fill",
        ),
        (lambda: smoothing.certify(linear_logits, IMAGES, KEY, **{**GOOD_CERTIFY, "n": 1050}), "n=1050 .*chunk_size"),
        (lambda: smoothing.certify(linear_logits, IMAGES, KEY, **{**GOOD_CERTIFY, "n0": 150}), "n0=150 .*chunk_size"),
        (lambda: smoothing.class_counts(linear_logits, IMAGES, KEY, **{**GOOD_COUNTS, "chunk_size": 0}), "chunk_size"),
        (lambda: smoothing.certified_accuracy(CERT, np.array([0, 1, 2]), [0.0]), "labels"),
        (lambda: smoothing.average_certified_radius(CERT, np.array([[0, 1]])), "labels"),
    ],
)
def test_bad_input_is_one_value_error_naming_the_field(call, field):
    with pytest.raises(ValueError, match=field):
        call()


@pytest.mark.parametrize("sigma, n, alpha", [(0.5, 10_000, 0.001), (0.3, 1_000, 0.001), (1.0, 100_000, 0.01)])
def test_the_largest_radius_is_sigma_times_phi_inverse_of_alpha_to_the_one_over_n(sigma, n, alpha):
    expected = sigma * scipy.stats.norm.ppf(alpha ** (1 / n))
    assert smoothing.largest_radius(sigma, n, alpha) == pytest.approx(expected, rel=1e-9)
    # No count can certify more: n - 1 of n gives a smaller radius.
    smaller = smoothing.certificate_from_counts(np.array([[1]]), np.array([[n - 1]]), sigma=sigma, n=n, alpha=alpha)
    assert smaller.radius[0] < expected
