"""Training: the train state, one optimizer step, and the compiled epoch."""

from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state
from jax.sharding import Mesh

from advjax import loops, seeds, sharding
from advjax.data import to_float_images
from advjax.objectives import Objective

TrainState = train_state.TrainState
SCHEDULES = ("constant", "cosine", "cyclic")


class EpochTotals(NamedTuple):
    """Sums over an epoch's steps, kept on the device until the epoch ends.

    `first_nonfinite_step` is the global step (state.step after the update) of
    the first step whose loss was NaN or infinite, or NO_STEP: a min over the
    steps, so divergence is found and located without a host sync per step.
    """

    loss: jax.Array
    correct: jax.Array
    examples: jax.Array
    first_nonfinite_step: jax.Array

    NO_STEP = int(jnp.iinfo(jnp.int32).max)  # the sentinel: every step's loss was finite

    @classmethod
    def zeros(cls, num_seeds: int = 1) -> "EpochTotals":
        shape = seeds.seed_shape(num_seeds)
        return cls(
            jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape, jnp.int32),
            jnp.zeros(shape, jnp.int32),
            jnp.full(shape, cls.NO_STEP, jnp.int32),
        )


def init_params(rng: jax.Array, model: nn.Module) -> dict:
    """The model's params, initialised on one zero image of the shape it was built for (`model.image_shape`)."""
    return model.init(rng, jnp.zeros((1, *model.image_shape), jnp.float32), train=False)["params"]


def learning_rate_schedule(train_config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """Constant; cosine decay to zero over the whole run; or cyclic: linear from 0
    up to the rate at 2/5 of the run and back down to 0 (Wong et al. 2020's schedule for fast training)."""
    total = train_config.epochs * steps_per_epoch
    if train_config.schedule == "constant":
        return optax.constant_schedule(train_config.learning_rate)
    if train_config.schedule == "cosine":
        return optax.cosine_decay_schedule(train_config.learning_rate, total)
    if train_config.schedule == "cyclic":
        peak = max(1, (2 * total) // 5)
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, train_config.learning_rate, peak),
                optax.linear_schedule(train_config.learning_rate, 0.0, max(1, total - peak)),
            ],
            [peak],
        )
    raise ValueError(f"train.schedule={train_config.schedule!r} is not one of {SCHEDULES}")


def create_train_state(
    rng: jax.Array, model: nn.Module, train_config: ml_collections.ConfigDict, steps_per_epoch: int
) -> TrainState:
    tx = optax.adam(learning_rate_schedule(train_config, steps_per_epoch))
    return TrainState.create(apply_fn=model.apply, params=init_params(rng, model), tx=tx)


def create_states(
    init_rng: jax.Array, model: nn.Module, train_config: ml_collections.ConfigDict, steps_per_epoch: int, num_seeds: int
) -> TrainState:
    """One train state, or `num_seeds` stacked along a leading axis (one per init key).

    Jitted as a whole: run eagerly, every initializer and optimizer buffer
    would be its own small compilation.

    >>> state = create_states(jax.random.key(0), models.build_model(config.model), config.train, 390, 1)
    """
    create = lambda rng: create_train_state(rng, model, train_config, steps_per_epoch)
    return jax.jit(seeds.map_over_seeds(create, num_seeds))(init_rng)


def train_step(
    state: TrainState, objective: Objective, images: jax.Array, labels: jax.Array, rng: jax.Array
) -> tuple[TrainState, tuple[jax.Array, jax.Array]]:
    """One Adam step on float images; returns (new state, (loss, number correct))."""
    value_and_grad = getattr(objective, "value_and_grad", None) or jax.value_and_grad(objective, has_aux=True)
    (loss, logits), grads = value_and_grad(state.params, images, labels, rng, state.step)
    correct = jnp.sum(jnp.argmax(logits, -1) == labels)
    return state.apply_gradients(grads=grads), (loss, correct)


def epoch_permutation(rng: jax.Array, epoch: int | jax.Array, num_examples: int) -> jax.Array:
    """A fresh shuffle per epoch, computed on the device."""
    return jax.random.permutation(jax.random.fold_in(rng, epoch), num_examples)


def _add_step(
    totals: EpochTotals, loss: jax.Array, correct: jax.Array, batch_size: int, step: jax.Array
) -> EpochTotals:
    nonfinite_step = jnp.where(jnp.isfinite(loss), EpochTotals.NO_STEP, step).astype(jnp.int32)
    return EpochTotals(
        totals.loss + loss,
        totals.correct + correct,
        totals.examples + batch_size,
        jnp.minimum(totals.first_nonfinite_step, nonfinite_step),
    )


def make_epoch_fn(
    objective: Objective,
    num_examples: int,
    batch_size: int,
    *,
    form: str = "auto",
    chunk_size: int = 8,
    num_seeds: int = 1,
    mesh: Mesh | None = None,
    convolutional: bool = True,
) -> Callable:
    """`epoch(state, totals, images_u8, labels, permutation, rng) -> (state, totals)`.

    Runs num_examples // batch_size steps of one static shape (the last partial batch is dropped).
    Per-step keys are `fold_in(rng, state.step)`, so every loop form draws the same noise and dropout.
    With `num_seeds > 1`, state, totals, permutation and rng carry a leading seed
    axis and the step is vmapped over it; the data are shared.

    With a `mesh`, each batch is split across its `data` axis and the carry stays
    replicated: the gradient is all-reduced inside the same compiled fold (advjax.sharding).
    Pass the state, images, labels and keys replicated (`sharding.replicate`).

    `convolutional` (does the model have convolutions?) decides what `form="auto"` means on CPU:
    only convolution gradients need the chunked form there; without them one `fori_loop` is
    faster and bit-identical to one jitted step per batch (docs/design.md, "Fused rounding").

    >>> epoch = make_epoch_fn(objective, 50_000, 128)
    >>> state, totals = epoch(state, EpochTotals.zeros(), images, labels, permutation, jax.random.key(1))
    """
    num_steps = num_examples // batch_size
    if num_steps < 1:
        raise ValueError(f"batch size {batch_size} is larger than the {num_examples} training examples")
    sharding.check_batch_size(batch_size, mesh, "train.batch_size")

    def body(carry, step, seeded, shared):
        (state, totals), (permutation, rng), (images, labels) = carry, seeded, shared
        index = jax.lax.dynamic_slice_in_dim(permutation, step * batch_size, batch_size)
        batch_images, batch_labels = sharding.constrain_batch((to_float_images(images[index]), labels[index]), mesh)
        state, (loss, correct) = train_step(
            state, objective, batch_images, batch_labels, jax.random.fold_in(rng, state.step)
        )
        return sharding.constrain_replicated((state, _add_step(totals, loss, correct, batch_size, state.step)), mesh)

    fold = loops.make_fold(
        seeds.map_body_over_seeds(body, num_seeds),
        form=form,
        chunk_size=chunk_size,
        num_seeds=num_seeds,
        cpu_form="chunked" if convolutional else "scan",
    )

    def fold_args(state, totals, images, labels, permutation, rng) -> tuple:
        return num_steps, (state, totals), (permutation, rng), (images, labels)

    def epoch(state, totals, images, labels, permutation, rng):
        return fold(*fold_args(state, totals, images, labels, permutation, rng))

    # Exposed so tests can inspect the compiled (partitioned) program: epoch.fold.lower(*epoch.fold_args(...)).
    epoch.num_steps, epoch.fold, epoch.fold_args = num_steps, fold, fold_args
    return epoch
