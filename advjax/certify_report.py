"""Randomized smoothing in the summary: `config.certify.enabled` certifies the trained model (advjax.smoothing).

For each seed and each sigma of certify.sigma, Cohen et al.'s CERTIFY runs on
the first certify.num_examples images of certify.split, in batches of
certify.batch; summary.json's "certification" holds the certified accuracy at
each radius of certify.radii (mean, std and per seed, as every curve), the
average certified radius (ACR) and the abstention rate.

The base classifier that is certified clips its input to [0, 1] inside itself,
f(x) = argmax apply_fn(params, clip_to_pixels(x)) (`base_classifier`), as
Gaussian training (noise.gaussian) clips the noisy image it trains on: the
certificate is over x + delta, and the classifier sees what it was trained on.
With train.noise_clip False both leave x + delta unclipped, as Cohen et al. do.

Key scheme: seed i's key is the certification key's row i (advjax.evaluators);
batch b of the images draws from `fold_in(key, b)` (`batch_key`), and every sigma
uses that same key (common random numbers), so a sigma's certificates equal
`smoothing.certify(base_classifier(...), batch, batch_key(key, b), sigma=...)`.
Several sigmas are one sampling pass: `smoothing.class_counts` vmapped over them.

Wall-clock seconds and samples per second go under "seconds", which
advjax.experiment moves into timings.json, so that summary.json stays deterministic.
"""

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from advjax import seeds, smoothing
from advjax.data import to_float_images
from advjax.idx import Split
from advjax.losses import LogitsFn
from advjax.models import ApplyFn
from advjax.norms import clip_to_pixels

NAME = "certification"  # the summary's field
BASE_CLASSIFIERS = {
    True: "argmax apply_fn(params, clip_to_pixels(x + delta)): x + delta clipped to [0, 1], as in training",
    False: "argmax apply_fn(params, x + delta): x + delta unclipped, as in training (train.noise_clip False)",
}


class Certificates(NamedTuple):
    """Every seed's certificates at every sigma: prediction, radius and p_lower, each [K, S, N]."""

    prediction: np.ndarray
    radius: np.ndarray
    p_lower: np.ndarray
    seconds: float


@dataclasses.dataclass(frozen=True)
class _BaseLogits:
    """`apply_fn(params, x)`, on x clipped to [0, 1] first when `clip`. Equal for one apply_fn and clip, so the
    base classifiers of every seed (`jax.tree_util.Partial`s of it over their params) share one compilation."""

    apply_fn: ApplyFn
    clip: bool

    def __call__(self, params, x: jax.Array) -> jax.Array:
        return self.apply_fn(params, clip_to_pixels(x) if self.clip else x)


def base_classifier(apply_fn: ApplyFn, params, clip: bool = True) -> jax.tree_util.Partial:
    """The certified base classifier's logits: the model on its input clipped to [0, 1], as it trained
    (`clip=False`: on its input as it is, for a model trained on unclipped noise). The params are the Partial's
    argument, traced rather than baked into the compiled sampler (smoothing.as_pytree).

    >>> cert = smoothing.certify(base_classifier(apply_fn, params), images, key, sigma=0.5, n0=100, n=10_000,
    ...                          alpha=0.001, chunk_size=100)
    """
    return jax.tree_util.Partial(_BaseLogits(apply_fn, clip), params)


def examples(split: Split, num_examples: int) -> tuple[jax.Array, np.ndarray]:
    """The first num_examples images of `split` (all of them when it has fewer): float images in [0, 1], labels.

    >>> images, labels = examples(mnist.test, config.certify.num_examples)
    """
    return to_float_images(jnp.asarray(split.images[:num_examples])), np.asarray(split.labels[:num_examples])


def batch_key(key: jax.Array, index: int) -> jax.Array:
    """Batch `index`'s key: each batch draws its own noise.

    >>> cert = smoothing.certify(logits_fn, images[:50], batch_key(key, 0), sigma=0.5, n0=100, n=10_000,
    ...                          alpha=0.001, chunk_size=100)
    """
    return jax.random.fold_in(key, index)


def certify_sigmas(
    logits_fn: LogitsFn, images: jax.Array, key: jax.Array, sigmas: Sequence[float], section
) -> list[smoothing.Certificate]:
    """smoothing.certify at each sigma on the same key, one Certificate each; several sigmas share one
    vmapped sampling pass, one sigma is smoothing.certify itself.

    >>> low, high = certify_sigmas(logits_fn, images, key, (0.25, 0.5), config.certify)
    """
    budget = dict(n=section.n, alpha=section.alpha)
    if len(sigmas) == 1:
        return [
            smoothing.certify(
                logits_fn, images, key, sigma=sigmas[0], n0=section.n0, chunk_size=section.chunk_size, **budget
            )
        ]
    stds = jnp.asarray(sigmas, images.dtype)

    def counts(count_key: jax.Array, num_samples: int, chunk_size: int) -> np.ndarray:
        one = lambda sigma: smoothing.class_counts(
            logits_fn, images, count_key, sigma=sigma, num_samples=num_samples, chunk_size=chunk_size
        )
        return np.asarray(jax.vmap(one)(stds))  # [S, B, C]

    selection_key, estimation_key = jax.random.split(key)  # as smoothing.certify splits it
    selection = counts(selection_key, section.n0, min(section.chunk_size, section.n0))
    estimation = counts(estimation_key, section.n, section.chunk_size)
    return [
        smoothing.certificate_from_counts(selection[s], estimation[s], sigma=sigma, **budget)
        for s, sigma in enumerate(sigmas)
    ]


def _padded(images: jax.Array, size: int) -> jax.Array:
    """`images` with its last image repeated up to `size`: every batch has one shape, so one compilation."""
    missing = size - images.shape[0]
    return images if missing == 0 else jnp.concatenate([images, jnp.repeat(images[-1:], missing, axis=0)])


def certify_images(
    logits_fn: LogitsFn,
    images: jax.Array,
    key: jax.Array,
    section,
    log: Callable[[str], None] = lambda line: None,
) -> smoothing.Certificate:
    """Every sigma's certificates of all `images`, batch by batch: prediction, radius, p_lower, each [S, N].
    `log` gets a line after each batch: images done, seconds so far and the time left at that rate.

    >>> cert = certify_images(base_classifier(apply_fn, params), images, key, config.certify)  # cert.radius [S, N]
    """
    sigmas, size = [float(s) for s in section.sigma], min(section.batch, images.shape[0])
    parts, start_time, total = [], time.perf_counter(), images.shape[0]
    for b, start in enumerate(range(0, total, size)):
        batch = images[start : start + size]
        certificates = certify_sigmas(logits_fn, _padded(batch, size), batch_key(key, b), sigmas, section)
        parts.append([np.stack([c[field][: batch.shape[0]] for c in certificates]) for field in range(3)])
        done, elapsed = start + batch.shape[0], time.perf_counter() - start_time
        log(f"{done}/{total} images, {elapsed:.0f} s, about {elapsed / done * (total - done):.0f} s left")
    return smoothing.Certificate(*(np.concatenate([p[field] for p in parts], axis=1) for field in range(3)))


def run_certification(
    apply_fn: ApplyFn,
    params,
    images: jax.Array,
    key: jax.Array,
    section,
    num_seeds: int,
    log: Callable[[str], None] = lambda line: None,
    first_seed: int = 0,
    clip: bool = True,
) -> Certificates:
    """Each seed's certificates (params and key carry a seed axis when num_seeds > 1), and the seconds they took.
    `log` gets certify_images's progress lines, each naming the seed as first_seed + index; `clip`: whether the
    base classifier clips x + delta (train.noise_clip).

    >>> certificates = run_certification(apply_fn, params, images, key, config.certify, config.num_seeds)
    """
    start, per_seed = time.perf_counter(), []
    for i in range(num_seeds):
        logits_fn = base_classifier(apply_fn, seeds.select_seed(params, i, num_seeds), clip)
        progress = lambda line, seed=first_seed + i: log(f"certification, seed {seed}: {line}")
        per_seed.append(certify_images(logits_fn, images, seeds.select_seed(key, i, num_seeds), section, progress))
    fields = (np.stack([c[field] for c in per_seed]) for field in range(3))
    return Certificates(*fields, seconds=time.perf_counter() - start)


def _scalar_summary(name: str, per_seed: np.ndarray) -> dict:
    return {name: float(per_seed.mean()), f"{name}_std": float(per_seed.std()), f"{name}_per_seed": per_seed.tolist()}


def certification_summary(
    certificates: Certificates,
    labels: np.ndarray,
    section: ml_collections.ConfigDict,
    num_seeds: int,
    clip: bool = True,
) -> dict:
    """summary.json's "certification": the budgets, and per sigma the certified accuracy at each radius, the ACR
    and the abstention rate (mean, std and per seed); wall-clock figures under "seconds".

    >>> certification_summary(certificates, labels, config.certify, 1)["by_sigma"]["0.25"]["acr"]
    """
    radii, sigmas = [float(r) for r in section.radii], [float(s) for s in section.sigma]
    by_sigma = {}
    for s, sigma in enumerate(sigmas):
        per_seed = [
            smoothing.Certificate(certificates.prediction[i, s], certificates.radius[i, s], certificates.p_lower[i, s])
            for i in range(num_seeds)
        ]
        accuracy = np.stack([smoothing.certified_accuracy(c, labels, radii) for c in per_seed])  # [K, R]
        by_sigma[str(sigma)] = {
            "certified_accuracy": seeds.seed_summary(accuracy, num_seeds),
            **_scalar_summary("acr", np.array([smoothing.average_certified_radius(c, labels) for c in per_seed])),
            **_scalar_summary(
                "abstention_rate", np.array([np.mean(c.prediction == smoothing.ABSTAIN) for c in per_seed])
            ),
        }
    samples = num_seeds * len(sigmas) * len(labels) * (section.n0 + section.n)
    return {
        "split": section.split,
        "sigma": sigmas,
        "n0": section.n0,
        "n": section.n,
        "alpha": section.alpha,
        "num_examples": len(labels),
        "radii": radii,
        "base_classifier": BASE_CLASSIFIERS[clip],
        "by_sigma": by_sigma,
        "seconds": {
            NAME: certificates.seconds,
            "samples": samples,
            "samples_per_second": samples / max(certificates.seconds, 1e-9),
        },
    }
