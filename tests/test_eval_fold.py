"""Tests for advjax.eval_fold: padded eval sets, the uint8 -> float conversion, and the one evaluation fold
(the padding mask, the per-batch key, ticks per batch, the seed axis)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advjax import eval_fold
from tests.helpers import synthetic_data

pytestmark = pytest.mark.usefixtures("quick_compile_module")

# 21 of 30 examples in batches of 8: 3 batches, the last with 3 padded slots,
# and 9 examples beyond num_examples that must not be read.
NUM_TOTAL, NUM_EXAMPLES, BATCH_SIZE = 30, 21, 8
NUM_BATCHES = 3


def dataset() -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 images [30, 28, 28, 1] and int32 labels."""
    return synthetic_data(NUM_TOTAL, seed=0)


# ----------------------------------------------------------------------------
# make_eval_set.


def test_eval_set_is_batch_major_and_padded_to_whole_batches():
    images, labels = dataset()
    es = eval_fold.make_eval_set(images, labels, NUM_EXAMPLES, BATCH_SIZE)
    assert es.images.shape == (NUM_BATCHES, BATCH_SIZE, 28, 28, 1)
    assert es.labels.shape == es.mask.shape == (NUM_BATCHES, BATCH_SIZE)
    assert es.images.dtype == jnp.uint8 and es.labels.dtype == jnp.int32 and es.mask.dtype == jnp.bool_
    assert es.num_examples == NUM_EXAMPLES
    # Row-major order keeps the examples in order; the padding is zeros.
    flat_images = np.asarray(es.images).reshape(-1, 28, 28, 1)
    flat_labels = np.asarray(es.labels).reshape(-1)
    np.testing.assert_array_equal(flat_images[:NUM_EXAMPLES], images[:NUM_EXAMPLES])
    np.testing.assert_array_equal(flat_labels[:NUM_EXAMPLES], labels[:NUM_EXAMPLES])
    assert not flat_images[NUM_EXAMPLES:].any() and not flat_labels[NUM_EXAMPLES:].any()


def test_eval_set_mask_marks_exactly_the_real_examples():
    images, labels = dataset()
    mask = np.asarray(eval_fold.make_eval_set(images, labels, NUM_EXAMPLES, BATCH_SIZE).mask)
    expected = np.zeros(NUM_BATCHES * BATCH_SIZE, bool)
    expected[:NUM_EXAMPLES] = True
    np.testing.assert_array_equal(mask, expected.reshape(NUM_BATCHES, BATCH_SIZE))


@pytest.mark.parametrize("num_examples,batch_size,num_batches", [(20, 4, 5), (30, 7, 5), (1, 4, 1), (30, 30, 1)])
def test_eval_set_without_remainder_or_with_one_batch(num_examples, batch_size, num_batches):
    images, labels = dataset()
    es = eval_fold.make_eval_set(images, labels, num_examples, batch_size)
    assert es.labels.shape == (num_batches, batch_size)
    assert int(np.sum(np.asarray(es.mask))) == num_examples


@pytest.mark.parametrize("num_examples", [NUM_TOTAL + 1, 0, -1])
def test_eval_set_rejects_impossible_sizes(num_examples):
    images, labels = dataset()
    with pytest.raises(ValueError, match="cannot evaluate"):
        eval_fold.make_eval_set(images, labels, num_examples, BATCH_SIZE)


# ----------------------------------------------------------------------------
# make_eval_fold: the fold every evaluation runs on.


def predict_class(params, images):
    """An eval-mode apply function that predicts class `params["class"]` for every image."""
    return jax.nn.one_hot(jnp.full(images.shape[0], params.get("class", 0)), 10)


def count_correct(carry, batch, logits_fn, shared):
    """(real examples seen, of them predicted correctly): padding must count in neither."""
    seen, correct = carry
    hits = jnp.argmax(logits_fn(batch.images), -1) == batch.labels
    return seen + jnp.sum(batch.mask), correct + jnp.sum(hits & batch.mask)


@pytest.mark.parametrize("form", ["scan", "chunked"])
def test_eval_fold_counts_the_real_examples_and_masks_the_padding(form):
    images, labels = dataset()
    labels = labels.copy()
    labels[:NUM_EXAMPLES:3] = 0  # some real examples of class 0; the padding's label is 0 too
    eval_set = eval_fold.make_eval_set(images, labels, NUM_EXAMPLES, BATCH_SIZE)
    run = eval_fold.make_eval_fold(count_correct, predict_class, form=form, chunk_size=2)

    seen, correct = run({"class": 0}, eval_set, jax.random.key(0), (jnp.int32(0), jnp.int32(0)))

    assert int(seen) == NUM_EXAMPLES  # not the 24 slots of 3 batches
    assert int(correct) == int(np.sum(labels[:NUM_EXAMPLES] == 0))
    assert int(correct) > 0  # the model is right on some real examples, and would be on the 3 padded slots


def test_eval_fold_gives_each_batch_its_own_key_fold_in_key_index():
    images, labels = dataset()
    eval_set = eval_fold.make_eval_set(images, labels, NUM_EXAMPLES, BATCH_SIZE)

    def record(carry, batch, logits_fn, shared):
        keys, indices, ticks = carry
        keys = keys.at[batch.index].set(jax.random.key_data(batch.key))
        return keys, indices.at[batch.index].set(batch.index), ticks.at[batch.index].set(batch.tick)

    key = jax.random.key(7)
    width = jax.random.key_data(key).shape
    carry = (jnp.zeros((NUM_BATCHES, *width), jnp.uint32), jnp.full(NUM_BATCHES, -1), jnp.full(NUM_BATCHES, -1))
    keys, indices, ticks = eval_fold.make_eval_fold(record, predict_class, form="scan")({}, eval_set, key, carry)

    expected = np.stack([jax.random.key_data(jax.random.fold_in(key, i)) for i in range(NUM_BATCHES)])
    np.testing.assert_array_equal(keys, expected)
    np.testing.assert_array_equal(indices, np.arange(NUM_BATCHES))
    np.testing.assert_array_equal(ticks, np.arange(NUM_BATCHES))
    assert len({tuple(k) for k in expected.tolist()}) == NUM_BATCHES  # distinct, so the check can tell them apart


@pytest.mark.parametrize("form", ["scan", "chunked"])
def test_eval_fold_with_ticks_per_batch_visits_each_batch_that_many_times_in_order(form):
    images, labels = dataset()
    eval_set = eval_fold.make_eval_set(images, labels, NUM_EXAMPLES, BATCH_SIZE)
    ticks_per_batch = 3
    num_ticks = NUM_BATCHES * ticks_per_batch

    def record(carry, batch, logits_fn, shared):
        visits, index_at_tick, label_sums = carry
        return (
            visits.at[batch.index].add(1),
            index_at_tick.at[batch.tick].set(batch.index),
            label_sums.at[batch.tick].set(jnp.sum(jnp.where(batch.mask, batch.labels, 0))),
        )

    run = eval_fold.make_eval_fold(record, predict_class, ticks_per_batch=ticks_per_batch, form=form, chunk_size=4)
    carry = (jnp.zeros(NUM_BATCHES, jnp.int32), jnp.full(num_ticks, -1), jnp.zeros(num_ticks, jnp.int32))
    visits, index_at_tick, label_sums = run({}, eval_set, jax.random.key(0), carry)

    np.testing.assert_array_equal(visits, [ticks_per_batch] * NUM_BATCHES)
    # Batch outermost: ticks 0-2 see batch 0, 3-5 batch 1, 6-8 batch 2, each the same batch every tick.
    np.testing.assert_array_equal(index_at_tick, np.repeat(np.arange(NUM_BATCHES), ticks_per_batch))
    padded = np.concatenate([labels[:NUM_EXAMPLES], np.zeros(NUM_BATCHES * BATCH_SIZE - NUM_EXAMPLES, np.int32)])
    per_batch = padded.reshape(NUM_BATCHES, BATCH_SIZE).sum(axis=1)
    np.testing.assert_array_equal(label_sums, np.repeat(per_batch, ticks_per_batch))


def test_eval_fold_over_seeds_gives_each_seed_its_params_key_and_carry():
    images, labels = dataset()
    eval_set = eval_fold.make_eval_set(images, labels, NUM_EXAMPLES, BATCH_SIZE)

    def count_and_key(carry, batch, logits_fn, shared):
        counts, first_keys = count_correct(carry[:2], batch, logits_fn, shared), carry[2]
        first = jnp.where(batch.index == 0, jax.random.key_data(batch.key), first_keys)
        return (*counts, first)

    keys = jnp.stack([jax.random.key(3), jax.random.key(4)])
    width = jax.random.key_data(keys[0]).shape
    carry = (jnp.zeros(2, jnp.int32), jnp.zeros(2, jnp.int32), jnp.zeros((2, *width), jnp.uint32))
    run = eval_fold.make_eval_fold(count_and_key, predict_class, form="chunked", chunk_size=2, num_seeds=2)
    seen, correct, first_keys = run({"class": jnp.array([1, 2])}, eval_set, keys, carry)

    np.testing.assert_array_equal(seen, [NUM_EXAMPLES, NUM_EXAMPLES])
    np.testing.assert_array_equal(correct, [np.sum(labels[:NUM_EXAMPLES] == c) for c in (1, 2)])
    for s in range(2):
        np.testing.assert_array_equal(first_keys[s], jax.random.key_data(jax.random.fold_in(keys[s], 0)))


def test_the_chunked_fold_compiles_one_chunk_for_eval_sets_of_any_length():
    # Each chunk sees one batch, not the whole set: sets of 3 and 2 batches share the executable
    # (docs/design.md, "Counting executables"), and count as the scan form does.
    images, labels = dataset()
    traces = []

    def counting(carry, batch, logits_fn, shared):
        traces.append(None)
        return count_correct(carry, batch, logits_fn, shared)

    run = eval_fold.make_eval_fold(counting, predict_class, form="chunked")
    scan = eval_fold.make_eval_fold(count_correct, predict_class, form="scan")
    for num_examples in (NUM_EXAMPLES, 16):
        eval_set = eval_fold.make_eval_set(images, labels, num_examples, BATCH_SIZE)
        zero = lambda: (jnp.int32(0), jnp.int32(0))  # a fresh carry per call: the fold donates it
        chunked = run({"class": 1}, eval_set, jax.random.key(0), zero())
        np.testing.assert_array_equal(chunked, scan({"class": 1}, eval_set, jax.random.key(0), zero()))
        assert int(chunked[0]) == num_examples
    assert len(traces) == 1


@pytest.mark.parametrize("ticks_per_batch,chunk_size,ticks_per_chunk", [(6, 4, 3), (10, 4, 2), (5, 4, 1), (4, 8, 4)])
def test_a_chunk_never_spans_two_batches_nor_leaves_a_remainder(ticks_per_batch, chunk_size, ticks_per_chunk):
    images, labels = dataset()
    eval_set = eval_fold.make_eval_set(images, labels, NUM_EXAMPLES, BATCH_SIZE)
    traces = []

    def record(carry, batch, logits_fn, shared):
        traces.append(None)
        return carry.at[batch.tick].set(batch.index)

    run = eval_fold.make_eval_fold(
        record, predict_class, ticks_per_batch=ticks_per_batch, form="chunked", chunk_size=chunk_size
    )
    index_at_tick = run({}, eval_set, jax.random.key(0), jnp.full(NUM_BATCHES * ticks_per_batch, -1))
    np.testing.assert_array_equal(index_at_tick, np.repeat(np.arange(NUM_BATCHES), ticks_per_batch))
    assert len(traces) == ticks_per_chunk  # one chunk length, unrolled that many ticks


def test_shard_eval_set_without_a_mesh_is_the_eval_set_itself():
    images, labels = dataset()
    eval_set = eval_fold.make_eval_set(images, labels, NUM_EXAMPLES, BATCH_SIZE)
    assert eval_fold.shard_eval_set(eval_set, None) is eval_set
