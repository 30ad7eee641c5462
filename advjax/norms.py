"""The norm-specific pieces every gradient attack shares: pixel clipping, steepest ascent,
projection onto the eps ball, and uniform draws from it (as foolbox's Linf/L2 bases share theirs).

Images are float32 [B, ...] in [0, 1]; `eps` may be a traced scalar, so callers can vmap over it.
"""

from typing import Literal

import jax
import jax.numpy as jnp

Norm = Literal["linf", "l2"]
NORMS: tuple[str, ...] = ("linf", "l2")

# Inside the square root, so a zero vector gets norm sqrt(1e-12), not 0 (docs/design.md, "Zero gradients").
L2_EPSILON = 1e-12


def clip_to_pixels(images: jax.Array) -> jax.Array:
    """Back into [0, 1]: every perturbed image must be a valid image (docs/design.md, "Pixels in [0, 1]").

    >>> clip_to_pixels(jnp.array([-0.5, 0.5, 1.5]))  # [0., 0.5, 1.]
    """
    return jnp.clip(images, 0.0, 1.0)


def per_image(fn, x: jax.Array) -> jax.Array:
    """`fn` (a reduction such as jnp.sum) over all but the batch axis, [B].

    >>> per_image(jnp.sum, jnp.ones((2, 28, 28, 1)))  # [784., 784.]
    """
    return fn(x.reshape((x.shape[0], -1)), axis=1)


def per_example(values: jax.Array, like: jax.Array) -> jax.Array:
    """[B] -> [B, 1, 1, ...], to scale each example of `like` by its own value.

    >>> images * per_example(jnp.array([0.5, 2.0]), images)  # scales image 0 by 0.5, image 1 by 2
    """
    return values.reshape((-1,) + (1,) * (like.ndim - 1))


def l2_norms(x: jax.Array) -> jax.Array:
    """Per-example L2 norm over all but the batch axis, [B].

    >>> l2_norms(jnp.ones((2, 4)))  # [2., 2.]
    """
    return jnp.sqrt(per_image(jnp.sum, jnp.square(x)))


def l2_unit(x: jax.Array) -> jax.Array:
    """x / ||x||_2 per example; an all-zero example stays zero.

    The rescaling by max|x| first matters: a confidently classified example has
    gradients of ~1e-8 whose squares sum to far below the constant under the
    square root, which would otherwise shrink the step instead of normalising it.

    >>> l2_norms(l2_unit(gradient))  # 1 for every nonzero example
    """
    scale = per_example(per_image(jnp.max, jnp.abs(x)), x)
    x = x / jnp.where(scale > 0, scale, 1.0)
    return x / per_example(jnp.sqrt(per_image(jnp.sum, jnp.square(x)) + L2_EPSILON), x)


def check_norm(norm: str) -> None:
    """Refuses a norm other than NORMS.

    >>> check_norm("l1")  # ValueError: unknown norm 'l1'; choose from ('linf', 'l2')
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose from {NORMS}")


def steepest_ascent(gradient: jax.Array, norm: Norm) -> jax.Array:
    """The unit-norm direction that most increases a linearised loss: sign for L-inf, g/||g|| for L2.

    >>> step = 0.01 * steepest_ascent(gradient, "linf")
    """
    check_norm(norm)
    return jnp.sign(gradient) if norm == "linf" else l2_unit(gradient)


def project_linf(adversarial: jax.Array, images: jax.Array, eps: jax.Array | float) -> jax.Array:
    """The nearest point of the L-inf ball around `images` that is also in [0, 1].

    Both sets are boxes, so clipping to one and then the other is the exact
    projection onto their intersection.

    >>> project_linf(images + 0.5, images, 0.1)  # images + 0.1, clipped to [0, 1]
    """
    return clip_to_pixels(jnp.clip(adversarial, images - eps, images + eps))


def project_l2(adversarial: jax.Array, images: jax.Array, eps: jax.Array | float) -> jax.Array:
    """Shrink the perturbation onto the L2 ball, then clip to [0, 1].

    Clipping only moves pixels back toward `images` (which lie in [0, 1]), so
    it cannot leave the ball.

    >>> l2_norms(project_l2(adversarial, images, 2.0) - images)  # at most 2.0
    """
    delta = adversarial - images
    norms = l2_norms(delta)
    factor = jnp.where(norms > eps, eps / jnp.where(norms > 0, norms, 1.0), 1.0)
    return clip_to_pixels(images + delta * per_example(factor, delta))


def project(adversarial: jax.Array, images: jax.Array, eps: jax.Array | float, norm: Norm) -> jax.Array:
    """Onto the `norm` ball of radius eps around `images`, and [0, 1].

    >>> project(images + 0.5, images, 0.1, "linf")  # at most 0.1 from images, per pixel
    """
    check_norm(norm)
    return (project_linf if norm == "linf" else project_l2)(adversarial, images, eps)


def uniform_in_ball(
    key: jax.Array, images: jax.Array, eps: jax.Array | float, norm: Norm, *, clip: bool = True
) -> jax.Array:
    """A uniform draw from the eps ball around each image, clipped to [0, 1] unless `clip=False`.

    For L2 the radius is eps * u^(1/d), which makes the draw uniform in the
    ball's volume rather than bunched at its centre.

    >>> start = uniform_in_ball(jax.random.key(0), images, 0.3, "linf")
    """
    check_norm(norm)
    if norm == "linf":
        draw = images + eps * jax.random.uniform(key, images.shape, images.dtype, -1.0, 1.0)
    else:
        direction_key, radius_key = jax.random.split(key)
        direction = l2_unit(jax.random.normal(direction_key, images.shape, images.dtype))
        dimension = images[0].size
        radius = eps * jax.random.uniform(radius_key, images.shape[:1], images.dtype) ** (1.0 / dimension)
        draw = images + direction * per_example(radius, images)
    return clip_to_pixels(draw) if clip else draw
