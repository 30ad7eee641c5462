"""Training: state, objective, one jitted step, and the compiled epoch."""

from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from advjax import attacks, loops, objectives

TRAINING_MODES = ("ordinary", "fgsm", "gaussian")

# (params, images, labels, rng) -> (scalar loss, logits reported for accuracy)
Objective = Callable[[dict, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
TrainState = train_state.TrainState


class EpochTotals(NamedTuple):
    """Sums over an epoch's steps, kept on the device until the epoch ends."""

    loss: jax.Array
    correct: jax.Array
    examples: jax.Array

    @classmethod
    def zeros(cls, num_seeds: int = 1) -> "EpochTotals":
        shape = () if num_seeds == 1 else (num_seeds,)
        return cls(jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.int32), jnp.zeros(shape, jnp.int32))


def to_float_images(images: jax.Array) -> jax.Array:
    """uint8 [.., 28, 28, 1] -> float32 in [0, 1]; data stays uint8 until it is on the device."""
    return images.astype(jnp.float32) / 255.0


def init_params(rng: jax.Array, model: nn.Module) -> dict:
    return model.init(rng, jnp.zeros((1, 28, 28, 1), jnp.float32), train=False)["params"]


SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(train_config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """Constant, or cosine decay to zero over the whole run."""
    if train_config.schedule == "constant":
        return optax.constant_schedule(train_config.learning_rate)
    if train_config.schedule == "cosine":
        return optax.cosine_decay_schedule(train_config.learning_rate, train_config.epochs * steps_per_epoch)
    raise ValueError(f"train.schedule={train_config.schedule!r} is not one of {SCHEDULES}")


def create_train_state(
    rng: jax.Array, model: nn.Module, train_config: ml_collections.ConfigDict, steps_per_epoch: int
) -> TrainState:
    tx = optax.adam(learning_rate_schedule(train_config, steps_per_epoch))
    return TrainState.create(apply_fn=model.apply, params=init_params(rng, model), tx=tx)


def create_states(
    init_rng: jax.Array, model: nn.Module, train_config: ml_collections.ConfigDict, steps_per_epoch: int, num_seeds: int
) -> TrainState:
    """One train state, or `num_seeds` stacked along a leading axis (one per init key)."""
    create = lambda rng: create_train_state(rng, model, train_config, steps_per_epoch)
    return loops.map_over_seeds(create, num_seeds)(init_rng)


def make_objective(apply_fn: Callable, train_config: ml_collections.ConfigDict) -> Objective:
    """The training loss for `train_config.mode`: 'ordinary', 'fgsm' or 'gaussian'."""

    def train_logits(params, images, dropout_rng):
        return apply_fn({"params": params}, images, train=True, rngs={"dropout": dropout_rng})

    def ordinary(params, images, labels, rng):
        logits = train_logits(params, images, rng)
        return jnp.mean(objectives.cross_entropy(logits, labels)), logits

    def gaussian(params, images, labels, rng):
        noise_rng, dropout_rng = jax.random.split(rng)
        logits = train_logits(params, attacks.gaussian(noise_rng, images, train_config.sigma), dropout_rng)
        return jnp.mean(objectives.cross_entropy(logits, labels)), logits

    def fgsm(params, images, labels, rng):
        # Crafted from the current params in eval mode, then frozen: the
        # parameter gradient must not flow through the construction of x_adv.
        eval_logits = lambda x: apply_fn({"params": params}, x, train=False)
        adversarial = jax.lax.stop_gradient(attacks.fgsm(eval_logits, images, labels, train_config.eps))
        # One forward pass over [x; x_adv] rather than two: the same losses from
        # one larger batch, which every backend runs more efficiently.
        clean_logits, adversarial_logits = jnp.split(
            train_logits(params, jnp.concatenate([images, adversarial]), rng), 2
        )
        loss = objectives.combined_adversarial_loss(
            jnp.mean(objectives.cross_entropy(clean_logits, labels)),
            jnp.mean(objectives.cross_entropy(adversarial_logits, labels)),
            train_config.alpha,
        )
        return loss, clean_logits

    by_mode = {"ordinary": ordinary, "fgsm": fgsm, "gaussian": gaussian}
    if train_config.mode not in by_mode:
        raise ValueError(f"train.mode={train_config.mode!r} is not one of {TRAINING_MODES}")
    return by_mode[train_config.mode]


def train_step(
    state: TrainState, objective: Objective, images: jax.Array, labels: jax.Array, rng: jax.Array
) -> tuple[TrainState, tuple[jax.Array, jax.Array]]:
    """One Adam step on float images; returns (new state, (loss, number correct))."""
    (loss, logits), grads = jax.value_and_grad(objective, has_aux=True)(state.params, images, labels, rng)
    correct = jnp.sum(jnp.argmax(logits, -1) == labels)
    return state.apply_gradients(grads=grads), (loss, correct)


def epoch_permutation(rng: jax.Array, epoch: int | jax.Array, num_examples: int) -> jax.Array:
    """A fresh shuffle per epoch, computed on the device."""
    return jax.random.permutation(jax.random.fold_in(rng, epoch), num_examples)


def make_epoch_fn(
    objective: Objective,
    num_examples: int,
    batch_size: int,
    *,
    form: str = "auto",
    chunk_size: int = 8,
    num_seeds: int = 1,
) -> Callable:
    """`epoch(state, totals, images_u8, labels, permutation, rng) -> (state, totals)`.

    Runs num_examples // batch_size steps (the last partial batch is dropped so
    every step has the same static shape). Per-step keys are
    `fold_in(rng, state.step)`, so every loop form draws the same noise and dropout.
    With `num_seeds > 1`, state, totals, permutation and rng carry a leading seed
    axis and the step is vmapped over it; the data are shared.
    """
    num_steps = num_examples // batch_size
    if num_steps < 1:
        raise ValueError(f"batch size {batch_size} is larger than the {num_examples} training examples")

    def body(carry, step, images, labels, permutation, rng):
        state, totals = carry
        index = jax.lax.dynamic_slice_in_dim(permutation, step * batch_size, batch_size)
        batch_labels = labels[index]
        state, (loss, correct) = train_step(
            state, objective, to_float_images(images[index]), batch_labels, jax.random.fold_in(rng, state.step)
        )
        totals = EpochTotals(totals.loss + loss, totals.correct + correct, totals.examples + batch_size)
        return state, totals

    body = loops.map_over_seeds(body, num_seeds, in_axes=(0, None, None, None, 0, 0))
    fold = loops.make_fold(body, form=form, chunk_size=chunk_size)

    def epoch(state, totals, images, labels, permutation, rng):
        return fold(num_steps, (state, totals), images, labels, permutation, rng)

    epoch.num_steps = num_steps
    return epoch
