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

    # Cut and padded on the host, then placed once: on the device each step would be its own compilation.
    def batched(a):
        padded = np.pad(np.asarray(a[:num_examples]), [(0, padding)] + [(0, 0)] * (a.ndim - 1))
        return padded.reshape((num_batches, batch_size) + padded.shape[1:])

    mask = (np.arange(num_batches * batch_size) < num_examples).reshape(num_batches, batch_size)
    return EvalSet(*jax.device_put((batched(images), batched(labels), mask)), num_examples)


def eval_set_spec(data_split, num_examples: int, batch_size: int) -> EvalSet:
    """The shapes and dtypes of `make_eval_set(data_split.images, data_split.labels, num_examples, batch_size)`,
    for compiling ahead without building it.

    >>> spec = eval_set_spec(mnist.test, 10_000, 500)  # images: ShapeDtypeStruct((20, 500, 28, 28, 1), uint8)
    """
    num_batches = -(-num_examples // batch_size)
    lead = (num_batches, batch_size)
    return EvalSet(
        jax.ShapeDtypeStruct(lead + tuple(data_split.images.shape[1:]), np.uint8),
        jax.ShapeDtypeStruct(lead, np.int32),
        jax.ShapeDtypeStruct(lead, np.bool_),
        num_examples,
    )


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


@loops.jit_once
def _take_batch(arrays: tuple, index: jax.Array) -> tuple:
    return tuple(a[index] for a in arrays)


def _batchwise_chunked_fold(
    batch_body: loops.Body, ticks_per_batch: int, chunk_size: int, num_seeds: int, name: str
) -> loops.Fold:
    """The chunked form, one batch at a time: each chunk sees only its batch, so eval sets of any length share
    one executable (docs/design.md, "Counting executables"). A chunk holds the largest divisor of
    `ticks_per_batch` not above loops.steps_per_chunk's ticks, so no batch needs a remainder chunk of another
    length."""
    size = loops.largest_divisor_at_most(ticks_per_batch, loops.steps_per_chunk(chunk_size, num_seeds))
    chunk = loops.unrolled_chunk(batch_body, f"{name}_chunk")

    def fold(num_steps, carry, seeded, shared):
        arrays, extra = shared
        for index in range(num_steps // ticks_per_batch):
            batch = _take_batch(arrays, index)
            for start in range(index * ticks_per_batch, (index + 1) * ticks_per_batch, size):
                carry = chunk(size, carry, start, seeded, (batch, extra))
        return carry

    def compile_ahead(num_steps, carry, seeded, shared) -> None:
        arrays, extra = shared
        chunk.lower(size, carry, 0, seeded, (jax.eval_shape(_take_batch, arrays, 0), extra)).compile()

    fold.compile_ahead = compile_ahead
    return fold


def _fold(form: str, body, batch_body, ticks_per_batch: int, chunk_size: int, num_seeds: int, name: str) -> loops.Fold:
    """The scan of `body` over the whole set, or the batchwise chunks of `batch_body`; either with `compile_ahead`."""
    if loops.resolve_form(form) == "scan":
        fold = loops.make_fold(body, form="scan", name=name)
        fold.compile_ahead = lambda *args: fold.lower(*args).compile()
        return fold
    return _batchwise_chunked_fold(batch_body, ticks_per_batch, chunk_size, num_seeds, name)


def make_eval_fold(
    per_batch: PerBatch,
    apply_fn: ApplyFn,
    *,
    ticks_per_batch: int = 1,
    form: str = "auto",
    chunk_size: int = 1,
    num_seeds: int = 1,
    mesh: Mesh | None = None,
    name: str = "eval_fold",
) -> Callable:
    """`run(params, eval_set, key, carry, shared=()) -> carry`: `per_batch` over every batch, one compiled fold.

    `apply_fn(params, images) -> logits` is the model in eval mode
    (models.eval_apply). With `num_seeds > 1`, params, key and carry carry a
    leading seed axis and the eval set is shared. With a `mesh`, each batch is
    split across its `data` axis and the carry is replicated: pass params and
    key replicated and the eval set through `shard_eval_set`. Build it once:
    every call with the same shapes reuses the compiled code. `name` names its executables in timings.json.

    >>> count = lambda n, b, logits_fn, _: n + jnp.sum((jnp.argmax(logits_fn(b.images), -1) == b.labels) & b.mask)
    >>> correct = make_eval_fold(count, apply_fn)(params, eval_set, key, jnp.int32(0))
    """
    batch_index = lambda tick: tick if ticks_per_batch == 1 else tick // ticks_per_batch

    def batch_body(carry, tick, seeded, shared):  # shared: (one batch's (images, labels, mask), extra)
        params, key = seeded
        (images, labels, mask), extra = shared
        index = batch_index(tick)
        x, y, valid = sharding.constrain_batch((to_float_images(images), labels, mask), mesh)
        batch = Batch(x, y, valid, index, jax.random.fold_in(key, index), tick)
        carry = per_batch(carry, batch, lambda z: apply_fn(params, z), extra)
        return sharding.constrain_replicated(carry, mesh)

    def body(carry, tick, seeded, shared):  # shared: (the whole set's (images, labels, mask), extra)
        arrays, extra = shared
        index = batch_index(tick)
        return batch_body(carry, tick, seeded, (tuple(a[index] for a in arrays), extra))

    body = seeds.map_body_over_seeds(body, num_seeds)
    seeded_batch_body = seeds.map_body_over_seeds(batch_body, num_seeds)
    fold = _fold(form, body, seeded_batch_body, ticks_per_batch, chunk_size, num_seeds, name)

    def fold_args(params, eval_set: EvalSet, key: jax.Array, carry, shared=()) -> tuple:
        sharding.check_batch_size(eval_set.labels.shape[1], mesh, "eval.batch_size")
        arrays = (eval_set.images, eval_set.labels, eval_set.mask)
        return eval_set.labels.shape[0] * ticks_per_batch, carry, (params, key), (arrays, shared)

    def run(params, eval_set: EvalSet, key: jax.Array, carry, shared=()):
        return fold(*fold_args(params, eval_set, key, carry, shared))

    def compile_ahead(params, eval_set: EvalSet, key: jax.Array, carry, shared=()) -> None:
        """Compiles what `run` with these arguments' shapes will run, without running it (nothing is donated),
        so a thread can compile while another trains (docs/design.md, "Counting executables")."""
        if mesh is None:  # on a mesh the arguments' placement is part of the executable: compiled on first call
            fold.compile_ahead(*fold_args(params, eval_set, key, carry, shared))

    # Exposed so tests can inspect the program: body(carry, tick, (params, key), ((images, labels, mask), shared)).
    run.fold, run.body, run.fold_args, run.compile_ahead = fold, body, fold_args, compile_ahead
    return run
