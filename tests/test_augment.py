"""Tests for advjax.augment (train.augment): Wong et al.'s random crop of the zero-padded image and random flip,
drawn from each step's key inside the compiled epoch; "none" leaves the epoch exactly as it was."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advjax import augment, data, models, objectives, train
from tests.helpers import small_config

SHAPE = (8, 8, 3)


def images(batch: int = 32, seed: int = 0) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), (batch, *SHAPE), jnp.float32)


def offsets_of(cropped: np.ndarray, image: np.ndarray, padding: int = augment.CROP_PADDING) -> list[tuple[int, int]]:
    """Every offset (dy, dx) at which `cropped` is the window of the zero-padded `image`."""
    h, w, _ = image.shape
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    return [
        (dy, dx)
        for dy, dx in itertools.product(range(2 * padding + 1), repeat=2)
        if np.array_equal(padded[dy : dy + h, dx : dx + w], cropped)
    ]


def test_a_crop_is_a_window_of_the_zero_padded_image_at_an_offset_up_to_twice_the_padding():
    x = np.asarray(images())
    cropped = np.asarray(augment.random_crop(jax.random.key(1), jnp.asarray(x)))
    assert cropped.shape == x.shape and cropped.dtype == x.dtype
    found = [offsets_of(c, image) for c, image in zip(cropped, x)]
    assert all(len(f) == 1 for f in found)  # random pixels: exactly one window matches
    drawn = {f[0] for f in found}
    assert len(drawn) > 10  # 32 draws from 81 offsets
    assert len({dy for dy, _ in drawn}) > 4 and len({dx for _, dx in drawn}) > 4
    # A shift leaves zeros where the padding comes in: the offset (4, 4) alone keeps the image whole.
    shifted = [i for i, f in enumerate(found) if f[0] != (4, 4)]
    assert all((cropped[i] == 0).any() for i in shifted)


def test_a_flip_mirrors_left_to_right_about_half_the_images():
    x = images(64)
    flipped = np.asarray(augment.random_flip(jax.random.key(2), x))
    same = [np.array_equal(f, i) for f, i in zip(flipped, np.asarray(x))]
    mirrored = [np.array_equal(f, i[:, ::-1]) for f, i in zip(flipped, np.asarray(x))]
    assert all(s != m for s, m in zip(same, mirrored))
    assert 16 < sum(mirrored) < 48


def test_crop_flip_is_a_function_of_the_key():
    x = images()
    first = augment.augment("crop_flip", jax.random.key(3), x)
    chex.assert_trees_all_equal(first, augment.augment("crop_flip", jax.random.key(3), x))
    assert not np.array_equal(first, augment.augment("crop_flip", jax.random.key(4), x))
    jitted = jax.jit(lambda key, x: augment.augment("crop_flip", key, x))(jax.random.key(3), x)
    chex.assert_trees_all_equal(first, jitted)
    # Every output is a (possibly mirrored) window of its image.
    for out, image in zip(np.asarray(first), np.asarray(x)):
        assert offsets_of(out, image) or offsets_of(out[:, ::-1], image)


def test_none_is_the_identity_and_an_unknown_augmentation_is_refused():
    x = images()
    assert augment.augment("none", jax.random.key(0), x) is x
    with pytest.raises(ValueError, match="train.augment='flip'"):
        augment.augment("flip", jax.random.key(0), x)


# ----------------------------------------------------------------------------
# Inside the compiled epoch.

NUM, BATCH = 32, 8


def setup():
    config = small_config("bp", "ordinary", hidden=(16,))
    model = models.build_model(config.model, data.DatasetInfo("tiny", SHAPE, 10))
    objective = objectives.make_objective(model.apply, config.train)
    state = train.create_states(jax.random.key(0), model, config.train, NUM // BATCH, 1)
    x = np.asarray(jax.random.randint(jax.random.key(5), (NUM, *SHAPE), 0, 256), np.uint8)
    y = np.asarray(jax.random.randint(jax.random.key(6), (NUM,), 0, 10), np.int32)
    return objective, state, x, y, jnp.arange(NUM)[::-1], jax.random.key(7)


def make_epoch(objective, augmentation: str | None):
    kwargs = {} if augmentation is None else {"augmentation": augmentation}
    return train.make_epoch_fn(objective, NUM, BATCH, form="scan", convolutional=False, **kwargs)


def run_epoch(augmentation: str, state, objective, x, y, permutation, rng):
    state = jax.tree.map(jnp.array, state)  # a copy: the epoch donates its carry
    return make_epoch(objective, augmentation)(state, train.EpochTotals.zeros(), x, y, permutation, rng)


def test_augment_none_compiles_the_epoch_of_no_augmentation_at_all():
    objective, state, x, y, permutation, rng = setup()
    lower = lambda epoch: epoch.fold.lower(*epoch.fold_args(state, train.EpochTotals.zeros(), x, y, permutation, rng))
    assert lower(make_epoch(objective, None)).as_text() == lower(make_epoch(objective, "none")).as_text()
    assert lower(make_epoch(objective, None)).as_text() != lower(make_epoch(objective, "crop_flip")).as_text()


def test_crop_flip_epoch_augments_each_batch_with_a_key_split_from_the_steps_key():
    objective, state, x, y, permutation, rng = setup()
    augmented, totals = run_epoch("crop_flip", state, objective, x, y, permutation, rng)
    plain, _ = run_epoch("none", state, objective, x, y, permutation, rng)
    assert not np.allclose(augmented.params["Dense_0"]["kernel"], plain.params["Dense_0"]["kernel"])
    # The same steps by hand: the step's key fold_in(rng, step) is split into the augmentation's and the objective's.
    expected, losses = state, []
    step = jax.jit(lambda s, images, labels, key: train.train_step(s, objective, images, labels, key))
    for i in range(NUM // BATCH):
        index = permutation[i * BATCH : (i + 1) * BATCH]
        augment_key, step_key = jax.random.split(jax.random.fold_in(rng, expected.step))
        batch = augment.augment("crop_flip", augment_key, data.to_float_images(jnp.asarray(x)[index]))
        expected, (loss, _) = step(expected, batch, y[index], step_key)
        losses.append(loss)
    chex.assert_trees_all_close(augmented.params, expected.params, atol=1e-6)
    np.testing.assert_allclose(totals.loss, np.sum(losses), rtol=1e-6)
