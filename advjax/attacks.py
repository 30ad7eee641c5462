"""Perturbations as pure, batched functions.

Every function takes a batch of float32 images [B, 28, 28, 1] in [0, 1] and
returns perturbed images of the same shape, clipped to [0, 1]. Strengths
(`eps`, `sigma`) may be traced scalars, so a caller can `jax.vmap` over them.

Attacks see the model only through `logits_fn(images) -> logits`, which the
caller builds with the model in eval mode (dropout off, DESIGN.md pitfall 1).
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from advjax import objectives

LogitsFn = Callable[[jax.Array], jax.Array]


def clip_to_pixels(images: jax.Array) -> jax.Array:
    return jnp.clip(images, 0.0, 1.0)


def predicted_labels(logits_fn: LogitsFn, images: jax.Array) -> jax.Array:
    """The model's own labels: attacking them avoids label leaking (pitfall 5)."""
    return jnp.argmax(logits_fn(images), axis=-1)


def input_gradient(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array) -> jax.Array:
    """d J / d x per example, J the cross-entropy from logits (pitfall 2).

    The batch loss is a sum, not a mean, so each example's gradient is its own
    and does not shrink with the batch size.
    """

    def summed_loss(x):
        return jnp.sum(objectives.cross_entropy(logits_fn(x), labels))

    return jax.grad(summed_loss)(images)


def fgsm_direction(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array) -> jax.Array:
    """sign(grad_x J): independent of eps, so one gradient serves a whole eps sweep.

    Pixels whose gradient is exactly zero do not move (sign(0) = 0, pitfall 4).
    """
    return jnp.sign(input_gradient(logits_fn, images, labels))


def fgsm(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, eps: jax.Array | float) -> jax.Array:
    """Fast gradient sign method: x + eps * sign(grad_x J), clipped to [0, 1]."""
    return clip_to_pixels(images + eps * fgsm_direction(logits_fn, images, labels))


def gaussian(
    key: jax.Array, images: jax.Array, sigma: jax.Array | float, mean: jax.Array | float = 0.0
) -> jax.Array:
    """x + N(mean, sigma^2) per pixel, clipped to [0, 1].

    `sigma` is the std before clipping; `perturbation_stats` gives it after.
    """
    noise = mean + sigma * jax.random.normal(key, images.shape, images.dtype)
    return clip_to_pixels(images + noise)


def _per_image(fn, x: jax.Array) -> jax.Array:
    return fn(x.reshape((x.shape[0], -1)), axis=1)


def matched_gaussian(key: jax.Array, images: jax.Array, reference: jax.Array) -> jax.Array:
    """Gaussian noise with the mean and std, per image, of `reference - images`.

    The paper (section 5) compares FGSM with random noise of the same mean and
    standard deviation; `reference` is the FGSM image, and its perturbation is
    measured after clipping, since that is what the model saw.
    """
    delta = reference - images
    mean = _per_image(jnp.mean, delta)[:, None, None, None]
    std = _per_image(jnp.std, delta)[:, None, None, None]
    return gaussian(key, images, std, mean)


class PerturbationStats(NamedTuple):
    """Per-image statistics of the actual (post-clipping) perturbation, each [B]."""

    mean: jax.Array
    std: jax.Array
    linf: jax.Array
    l2: jax.Array


def perturbation_stats(images: jax.Array, perturbed: jax.Array) -> PerturbationStats:
    delta = perturbed - images
    return PerturbationStats(
        mean=_per_image(jnp.mean, delta),
        std=_per_image(jnp.std, delta),
        linf=_per_image(jnp.max, jnp.abs(delta)),
        l2=jnp.sqrt(_per_image(jnp.sum, jnp.square(delta))),
    )
