"""Random perturbations, the paper's counterpart to FGSM: Gaussian noise, noise matched to a
reference perturbation's mean and std, and the statistics of a perturbation after clipping."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from advjax.norms import clip_to_pixels, per_image


def gaussian(
    key: jax.Array, images: jax.Array, sigma: jax.Array | float, mean: jax.Array | float = 0.0, clip: bool = True
) -> jax.Array:
    """x + N(mean, sigma^2) per pixel, clipped to [0, 1] (`clip=False`: left unclipped, as Cohen et al. train).

    `sigma` is the std before clipping; `perturbation_stats` gives it after.

    >>> noisy = gaussian(jax.random.key(0), images, 0.3)
    """
    noise = mean + sigma * jax.random.normal(key, images.shape, images.dtype)
    return clip_to_pixels(images + noise) if clip else images + noise


def matched_gaussian(key: jax.Array, images: jax.Array, reference: jax.Array) -> jax.Array:
    """Gaussian noise with the mean and std, per image, of `reference - images`.

    The paper (section 5) compares FGSM with random noise of the same mean and
    standard deviation; `reference` is the FGSM image, and its perturbation is
    measured after clipping, since that is what the model saw.

    >>> noisy = matched_gaussian(jax.random.key(0), images, attacks.fgsm(logits_fn, images, labels, 0.1))
    """
    delta = reference - images
    mean = per_image(jnp.mean, delta)[:, None, None, None]
    std = per_image(jnp.std, delta)[:, None, None, None]
    return gaussian(key, images, std, mean)


class PerturbationStats(NamedTuple):
    """Per-image statistics of the actual (post-clipping) perturbation, each [B]."""

    mean: jax.Array
    std: jax.Array
    linf: jax.Array
    l2: jax.Array


def perturbation_stats(images: jax.Array, perturbed: jax.Array) -> PerturbationStats:
    """Mean, std, L-inf and L2 of `perturbed - images`, per image (docs/design.md, "Pixels in [0, 1]").

    >>> perturbation_stats(images, gaussian(key, images, 0.3)).std  # [B], below 0.3 after clipping
    """
    delta = perturbed - images
    return PerturbationStats(
        mean=per_image(jnp.mean, delta),
        std=per_image(jnp.std, delta),
        linf=per_image(jnp.max, jnp.abs(delta)),
        l2=jnp.sqrt(per_image(jnp.sum, jnp.square(delta))),
    )
