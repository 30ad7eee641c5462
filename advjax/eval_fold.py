"""The one fold every evaluation runs on: batches of a fixed-size eval set, one compiled call.

An evaluation is a per-batch function and a carry. This module owns the rest:
cutting the split into padded batches (`EvalSet`, with a mask over the
padding), converting uint8 images to float on the device, building the
eval-mode `logits_fn` from the params, the per-batch key, the seed axis, and
the sharding constraints on a mesh. Clean and noisy accuracy, sweeps, the
robustness attacks and the per-epoch overfitting check are all per-batch
functions on it (advjax.evaluate, advjax.robustness, advjax.overfitting).

An evaluation that takes several steps per batch (an iterative attack with
restarts) asks for `ticks_per_batch`: the fold then runs that many ticks per
batch, batch outermost, and each tick sees the same batch.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from advjax import loops, seeds, sharding
from advjax.data import to_float_images
from advjax.losses import LogitsFn
from advjax.models import ApplyFn


class EvalSet(NamedTuple):
    """A split cut to `num_examples` and padded to whole batches, stored batch-major."""

    images: jax.Array  # uint8 [num_batches, batch_size, 28, 28, 1]
    labels: jax.Array  # int32 [num_batches, batch_size]
    mask: jax.Array  # bool [num_batches, batch_size], False on padding
    num_examples: int


def make_eval_set(
    images: np.ndarray | jax.Array, labels: np.ndarray | jax.Array, num_examples: int, batch_size: int
) -> EvalSet:
    """The first `num_examples` of a split, zero-padded to a multiple of `batch_size`.

    >>> eval_set = make_eval_set(mnist.test.images, mnist.test.labels, 1000, 500)  # 2 batches
    """
    if not 0 < num_examples <= len(labels):
        raise ValueError(f"cannot evaluate on {num_examples} examples of a split of {len(labels)}")
    num_batches = -(-num_examples // batch_size)
    padding = num_batches * batch_size - num_examples

    def batched(a):
        padded = jnp.pad(jnp.asarray(a[:num_examples]), [(0, padding)] + [(0, 0)] * (a.ndim - 1))
        return padded.reshape((num_batches, batch_size) + padded.shape[1:])

    mask = (jnp.arange(num_batches * batch_size) < num_examples).reshape(num_batches, batch_size)
    return EvalSet(batched(images), batched(labels), mask, num_examples)


def shard_eval_set(eval_set: EvalSet, mesh: Mesh | None) -> EvalSet:
    """The eval set split along its batch dimension across the mesh's `data` axis (unchanged without a mesh).

    Sharded rather than replicated: an EvalSet is stored batch-major and never
    shuffled, so each device can hold exactly its share of every batch
    (1/N of the memory) and indexing a batch in the fold moves no data. The
    training images are replicated instead, because a fresh shuffle each
    epoch would make a sharded copy exchange images between devices every step.

    >>> eval_set = shard_eval_set(make_eval_set(images, labels, 1000, 500), sharding.make_data_mesh())
    """
    if mesh is None:
        return eval_set
    sharding.check_batch_size(eval_set.labels.shape[1], mesh, "eval.batch_size")
    images, labels, mask = sharding.shard_batch_major((eval_set.images, eval_set.labels, eval_set.mask), mesh)
    return eval_set._replace(images=images, labels=labels, mask=mask)


class Batch(NamedTuple):
    """What a per-batch function sees of one batch."""

    images: jax.Array  # float32 [B, ...] in [0, 1]
    labels: jax.Array  # int32 [B], the true labels
    mask: jax.Array  # bool [B], False on padding
    index: jax.Array  # the batch's index in the eval set
    key: jax.Array  # fold_in(key, index): the batch's own randomness
    tick: jax.Array  # the fold's step: index * ticks_per_batch + the tick within the batch


# per_batch(carry, batch, logits_fn, shared) -> carry, where `shared` is what the caller passes to every batch.
PerBatch = Callable[[Any, Batch, LogitsFn, Any], Any]


def make_eval_fold(
    per_batch: PerBatch,
    apply_fn: ApplyFn,
    *,
    ticks_per_batch: int = 1,
    form: str = "auto",
    chunk_size: int = 1,
    num_seeds: int = 1,
    mesh: Mesh | None = None,
) -> Callable:
    """`run(params, eval_set, key, carry, shared=()) -> carry`: `per_batch` over every batch, one compiled fold.

    `apply_fn(params, images) -> logits` is the model in eval mode
    (models.eval_apply). With `num_seeds > 1`, params, key and carry carry a
    leading seed axis and the eval set is shared. With a `mesh`, each batch is
    split across its `data` axis and the carry is replicated: pass params and
    key replicated and the eval set through `shard_eval_set`. Build it once:
    every call with the same shapes reuses the compiled code.

    >>> count = lambda n, b, logits_fn, _: n + jnp.sum((jnp.argmax(logits_fn(b.images), -1) == b.labels) & b.mask)
    >>> correct = make_eval_fold(count, apply_fn)(params, eval_set, key, jnp.int32(0))
    """

    def body(carry, tick, seeded, shared):
        params, key = seeded
        (images, labels, mask), extra = shared
        index = tick if ticks_per_batch == 1 else tick // ticks_per_batch
        x, y, valid = sharding.constrain_batch((to_float_images(images[index]), labels[index], mask[index]), mesh)
        batch = Batch(x, y, valid, index, jax.random.fold_in(key, index), tick)
        carry = per_batch(carry, batch, lambda z: apply_fn(params, z), extra)
        return sharding.constrain_replicated(carry, mesh)

    body = seeds.map_body_over_seeds(body, num_seeds)
    fold = loops.make_fold(body, form=form, chunk_size=chunk_size, num_seeds=num_seeds)

    def fold_args(params, eval_set: EvalSet, key: jax.Array, carry, shared=()) -> tuple:
        sharding.check_batch_size(eval_set.labels.shape[1], mesh, "eval.batch_size")
        arrays = (eval_set.images, eval_set.labels, eval_set.mask)
        return eval_set.labels.shape[0] * ticks_per_batch, carry, (params, key), (arrays, shared)

    def run(params, eval_set: EvalSet, key: jax.Array, carry, shared=()):
        return fold(*fold_args(params, eval_set, key, carry, shared))

    # Exposed so tests can inspect the program: body(carry, tick, (params, key), ((images, labels, mask), shared)).
    run.fold, run.body, run.fold_args = fold, body, fold_args
    return run
