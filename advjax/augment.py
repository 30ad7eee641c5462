"""Data augmentation of a training batch, on the device inside the compiled epoch (`train.augment`).

`crop_flip` is Wong et al.'s CIFAR-10 augmentation (torchvision's RandomCrop(32, padding=4) and
RandomHorizontalFlip): each image is zero-padded by 4 pixels on every side, a window of its own size is cut
from a uniformly drawn offset in [0, 8] x [0, 8], and it is flipped left to right with probability 1/2.
Padding with 0 is black in pixels, as theirs was before their normalisation (which advjax's models do inside).
The draws come from the key given, so a step's augmentation is a function of the step's key: every loop
form, chunk size and resumed run augments the same images the same way ("Fresh keys").
"""

import jax
import jax.numpy as jnp

AUGMENTATIONS = ("none", "crop_flip")
CROP_PADDING = 4


def random_crop(key: jax.Array, images: jax.Array, padding: int = CROP_PADDING) -> jax.Array:
    """Per image, a window of its own size from it zero-padded by `padding` pixels, at a uniform offset.

    >>> cropped = random_crop(jax.random.key(0), images)  # [B, H, W, C], each a shift of its image
    """
    batch, height, width, channels = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(key, (batch, 2), 0, 2 * padding + 1)
    crop = lambda image, offset: jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))
    return jax.vmap(crop)(padded, offsets)


def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
    """Each image flipped left to right with probability 1/2."""
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
    return jnp.where(flip, images[:, :, ::-1], images)


def augment(name: str, key: jax.Array, images: jax.Array) -> jax.Array:
    """The batch `images` [B, H, W, C] under the augmentation `name` (one of AUGMENTATIONS), drawn from `key`.

    >>> batch = augment("crop_flip", jax.random.key(0), batch)
    """
    if name == "none":
        return images
    if name == "crop_flip":
        crop_key, flip_key = jax.random.split(key)
        return random_flip(flip_key, random_crop(crop_key, images))
    raise ValueError(f"train.augment={name!r} is not one of {AUGMENTATIONS}")
