"""Randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019): PREDICT and CERTIFY.

The smoothed classifier is g(x) = argmax_c P(f(x + delta) = c), delta ~ N(0, sigma^2 I),
for a base classifier f = argmax of `logits_fn`. If a lower confidence bound
p_lower on its top class's probability exceeds 1/2, g is constant within the
L2 ball of radius sigma * Phi^-1(p_lower) around x.

Sampling runs on the device: `class_counts` draws the noise in fixed-size
chunks inside one compiled `lax.scan`, and only the class counts [B, C] leave
it. The statistics (Clopper-Pearson, the binomial test, Phi^-1) are scipy's,
on the host, over those counts.

The base classifier sees x + delta unclipped, as in Cohen et al.: the
certificate is over x + delta. A classifier that clips to [0, 1] does so inside
itself, e.g. `lambda x: logits_fn(norms.clip_to_pixels(x))`, which keeps the
certificate valid and matches training on clipped noise (`noise.gaussian`).

Key scheme: the noise of sample s (in 0..num_samples-1) of image i (its index
in the batch) is `sigma * normal(fold_in(fold_in(key, i), s))`, whatever the
chunk it falls in, so the counts are identical for every `chunk_size` that
divides `num_samples` (docs/design.md, "Fresh keys"). CERTIFY's selection and
estimation draw from `split(key)`'s two independent keys.

Certificates assume exact arithmetic; these come from float32 sampling and
forward passes (docs/design.md, "Certificates in floating point").
"""

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from advjax.losses import LogitsFn

ABSTAIN = -1  # the prediction of an example the smoothed classifier abstains on


class Certificate(NamedTuple):
    prediction: np.ndarray  # int [B]: the smoothed class, or ABSTAIN (-1)
    radius: np.ndarray  # float [B]: the certified L2 radius; 0.0 where abstaining, as in Cohen et al.'s logs
    p_lower: np.ndarray  # float [B]: the Clopper-Pearson lower bound on the selected class's probability


def _scipy_stats():
    """scipy.stats, imported on first use: it is slow to import, and most launches certify nothing."""
    import scipy.stats

    return scipy.stats


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer")


def _check_sigma(sigma: float | jax.Array) -> None:
    # A traced sigma (vmapped over several) cannot be read here; its values are the caller's to check.
    if not isinstance(sigma, jax.core.Tracer) and not np.all(np.asarray(sigma) > 0):
        raise ValueError(f"sigma={sigma!r} must be positive")


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha!r} must be in (0, 1)")


def _check_chunks(name: str, num_samples: int, chunk_size: int) -> None:
    _check_positive_int(name, num_samples)
    _check_positive_int("chunk_size", chunk_size)
    if num_samples % chunk_size:
        raise ValueError(
            f"{name}={num_samples} is not a multiple of chunk_size={chunk_size}: a batch the sample count cannot fill"
        )


def _noise(image_keys: jax.Array, sample_ids: jax.Array, shape: Sequence[int], sigma, dtype) -> jax.Array:
    """Noise [B, S, *shape]: sample_ids[j] of image b from fold_in(image_keys[b], sample_ids[j])."""

    def one(image_key, sample_id):
        return jax.random.normal(jax.random.fold_in(image_key, sample_id), tuple(shape), dtype)

    draw = jax.vmap(jax.vmap(one, in_axes=(None, 0)), in_axes=(0, None))
    return sigma * draw(image_keys, sample_ids)


def as_pytree(logits_fn: LogitsFn) -> jax.tree_util.Partial:
    """`logits_fn` as an argument the counting fold can take: a `jax.tree_util.Partial` as it is (its arguments,
    such as params, are traced, so Partials of one function over other params share a compilation), any other
    function wrapped whole (compiled once per function object).

    >>> as_pytree(jax.tree_util.Partial(apply_fn, params))  # logits_fn(x) = apply_fn(params, x)
    """
    return logits_fn if isinstance(logits_fn, jax.tree_util.Partial) else jax.tree_util.Partial(logits_fn)


@functools.partial(jax.jit, static_argnames=("num_samples", "chunk_size"))
def _count_fold(images, key, sigma, logits_fn, *, num_samples, chunk_size):
    batch, shape = images.shape[0], images.shape[1:]
    image_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))

    def chunk_counts(_, chunk):
        sample_ids = chunk * chunk_size + jnp.arange(chunk_size)
        noisy = images[:, None] + _noise(image_keys, sample_ids, shape, sigma, images.dtype)
        logits = logits_fn(noisy.reshape(batch * chunk_size, *shape))
        votes = jnp.argmax(logits, axis=-1).reshape(batch, chunk_size)
        return None, jax.nn.one_hot(votes, logits.shape[-1], dtype=jnp.int32).sum(axis=1)

    # Per-chunk counts are the scan's outputs, not a carry, so the number of classes comes from tracing
    # logits_fn once; they are [num_chunks, B, C] integers, small beside one chunk's images.
    _, per_chunk = jax.lax.scan(chunk_counts, None, jnp.arange(num_samples // chunk_size))
    return per_chunk.sum(axis=0)


def class_counts(
    logits_fn: LogitsFn,
    images: jax.Array,
    key: jax.Array,
    *,
    sigma: float | jax.Array,
    num_samples: int,
    chunk_size: int,
) -> jax.Array:
    """int32 [B, C]: per image, how often argmax logits_fn(x + delta), delta ~ N(0, sigma^2 I), is each class.

    The base classifier sees x + delta unclipped (the module's docstring says why).
    Noise is fresh per sample and per image: sample s of image i draws from
    fold_in(fold_in(key, i), s), so any `chunk_size` dividing `num_samples` gives
    the same counts. Each chunk is one forward pass of B * chunk_size images,
    inside one compiled `lax.scan` over the chunks; compiled once per
    (logits_fn, shapes, num_samples, chunk_size), so pass the same `logits_fn`
    object to reuse it, or a `jax.tree_util.Partial` of one function over
    other params (`as_pytree`). `sigma` is traced: `jax.vmap` over several works.

    >>> counts = class_counts(logits_fn, images, jax.random.key(0), sigma=0.5, num_samples=1000, chunk_size=100)
    """
    _check_sigma(sigma)
    _check_chunks("num_samples", num_samples, chunk_size)
    sigma = jnp.asarray(sigma, images.dtype)
    return _count_fold(images, key, sigma, as_pytree(logits_fn), num_samples=num_samples, chunk_size=chunk_size)


def lower_confidence_bound(count: np.ndarray | int, n: int, alpha: float) -> np.ndarray:
    """The one-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion, elementwise:
    scipy's beta quantile `beta.ppf(alpha, count, n - count + 1)`, and 0 where count is 0.

    Cohen et al.'s `proportion_confint(count, n, alpha=2 * alpha, method="beta")[0]`.

    >>> lower_confidence_bound(np.array([0, 990, 1000]), 1000, 0.001)  # [0, 0.976..., 0.9931...]
    """
    _check_positive_int("n", n)
    _check_alpha(alpha)
    count = np.asarray(count)
    if np.any(count < 0) or np.any(count > n):
        raise ValueError(f"count must be in 0..n={n}")
    # beta.ppf is nan at shape 0; the bound there is 0, and the shape is moved off 0 only to keep nan out.
    bound = _scipy_stats().beta.ppf(alpha, np.maximum(count, 1), n - count + 1)
    return np.where(count == 0, 0.0, bound)


def _check_certify(sigma: float, n0: int, n: int, alpha: float, chunk_size: int) -> None:
    _check_sigma(sigma)
    _check_alpha(alpha)
    _check_positive_int("n0", n0)
    _check_chunks("n", n, chunk_size)
    _check_chunks("n0", n0, min(chunk_size, n0))


def certify(
    logits_fn: LogitsFn,
    images: jax.Array,
    key: jax.Array,
    *,
    sigma: float,
    n0: int,
    n: int,
    alpha: float,
    chunk_size: int,
) -> Certificate:
    """Cohen et al.'s CERTIFY for each image: n0 samples select the class c_A, n further samples
    bound its probability below by p_lower (Clopper-Pearson at alpha); abstain when
    p_lower <= 1/2, else certify the L2 radius sigma * Phi^-1(p_lower).

    Selection and estimation use the two keys of `jax.random.split(key)`, so the
    bound is not computed from the samples that chose the class. The selection
    counts in chunks of min(chunk_size, n0), which must divide n0, as chunk_size
    must divide n. Ties in the selection go to the lowest class.

    >>> cert = certify(logits_fn, images, jax.random.key(0), sigma=0.5, n0=100, n=10_000, alpha=0.001, chunk_size=100)
    """
    _check_certify(sigma, n0, n, alpha, chunk_size)
    selection_key, estimation_key = jax.random.split(key)
    count = functools.partial(class_counts, logits_fn, images, sigma=sigma)
    selection = np.asarray(count(selection_key, num_samples=n0, chunk_size=min(chunk_size, n0)))
    estimation = np.asarray(count(estimation_key, num_samples=n, chunk_size=chunk_size))
    return certificate_from_counts(selection, estimation, sigma=sigma, n=n, alpha=alpha)


def certificate_from_counts(
    selection: np.ndarray, estimation: np.ndarray, *, sigma: float, n: int, alpha: float
) -> Certificate:
    """CERTIFY's statistics on the host, from the selection and estimation counts [B, C] of `class_counts`
    (n samples in `estimation`): the class c_A selected, p_lower, and the radius or the abstention.

    >>> cert = certificate_from_counts(selection_counts, estimation_counts, sigma=0.5, n=10_000, alpha=0.001)
    """
    selection, estimation = np.asarray(selection), np.asarray(estimation)
    selected = selection.argmax(axis=1)
    count_a = np.take_along_axis(estimation, selected[:, None], axis=1)[:, 0]
    p_lower = lower_confidence_bound(count_a, n, alpha)
    certified = p_lower > 0.5
    # Phi^-1 is evaluated where certified only: at p_lower <= 1/2 it would be a negative or infinite radius.
    radius = np.where(certified, sigma * _scipy_stats().norm.ppf(np.where(certified, p_lower, 0.75)), 0.0)
    return Certificate(np.where(certified, selected, ABSTAIN), radius, p_lower)


def predict(
    logits_fn: LogitsFn,
    images: jax.Array,
    key: jax.Array,
    *,
    sigma: float,
    n: int,
    alpha: float,
    chunk_size: int,
) -> np.ndarray:
    """Cohen et al.'s PREDICT: int [B], the top class of n noisy samples, or ABSTAIN (-1) unless
    the two-sided binomial test of the top two counts n_A, n_B,
    `scipy.stats.binomtest(n_A, n_A + n_B, 0.5).pvalue`, is at most alpha.

    Then the prediction differs from g(x) with probability at most alpha.
    Ties in the counts go to the lowest class.

    >>> prediction = predict(logits_fn, images, jax.random.key(0), sigma=0.5, n=1000, alpha=0.001, chunk_size=100)
    """
    _check_sigma(sigma)
    _check_alpha(alpha)
    _check_chunks("n", n, chunk_size)
    counts = np.asarray(class_counts(logits_fn, images, key, sigma=sigma, num_samples=n, chunk_size=chunk_size))
    top_two = np.argsort(-counts, axis=1, kind="stable")[:, :2]
    n_a, n_b = np.take_along_axis(counts, top_two, axis=1).T
    # binomtest takes one test at a time: B scalar tests on the host, after the sampling.
    pvalues = np.array([_scipy_stats().binomtest(int(a), int(a + b), 0.5).pvalue for a, b in zip(n_a, n_b)])
    return np.where(pvalues <= alpha, top_two[:, 0], ABSTAIN)


def _check_labels(certificate: Certificate, labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != np.shape(certificate.prediction):
        raise ValueError(f"labels has shape {labels.shape}; the certificate's is {np.shape(certificate.prediction)}")
    return labels


def certified_accuracy(certificate: Certificate, labels: np.ndarray, radii: Sequence[float] | np.ndarray) -> np.ndarray:
    """float [R]: for each radius r, the fraction of examples predicted correctly with a radius >= r.
    Abstentions count as wrong at every radius.

    >>> certified_accuracy(cert, labels, np.arange(0, 2.75, 0.25))  # [11], non-increasing
    """
    labels = _check_labels(certificate, labels)
    correct = certificate.prediction == labels
    radii = np.asarray(radii, dtype=np.float64)
    return (correct[None, :] & (certificate.radius[None, :] >= radii[:, None])).mean(axis=1)


def average_certified_radius(certificate: Certificate, labels: np.ndarray) -> float:
    """The average certified radius (ACR): the mean over examples of the radius where the
    prediction is correct, 0 where it is wrong or abstains.

    >>> acr = average_certified_radius(cert, labels)
    """
    labels = _check_labels(certificate, labels)
    return float(np.where(certificate.prediction == labels, certificate.radius, 0.0).mean())


def largest_radius(sigma: float, n: int, alpha: float) -> float:
    """The largest radius CERTIFY can give with n estimation samples: all n on one class gives p_lower =
    alpha^(1/n), so sigma * Phi^-1(alpha^(1/n)) bounds every certificate whatever the model.

    >>> largest_radius(0.5, 10_000, 0.001)  # 1.60
    """
    return float(certificate_from_counts(np.array([[1]]), np.array([[n]]), sigma=sigma, n=n, alpha=alpha).radius[0])
