"""Training: the train state, one optimizer step, and the compiled epoch."""

import fractions
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh

from advjax import augment, loops, models, seeds, sharding
from advjax.data import to_float_images
from advjax.objectives import Objective

TrainState = train_state.TrainState
SCHEDULES = ("constant", "cosine", "cyclic")
OPTIMIZERS = ("adam", "sgd")


class BatchNormState(TrainState):
    """The train state of a model with BatchNorm: a TrainState and the running statistics (`batch_stats`), which
    the training step alone updates and attacks and evaluation read frozen (docs/design.md, "Attacks in eval mode").
    A model without BatchNorm keeps the plain TrainState, so its state, checkpoints and programs do not change."""

    batch_stats: Any = None


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
        shape = seeds.seed_shape(num_seeds)  # host arrays: the epoch's fold takes them without a compilation of its own
        return cls(
            np.zeros(shape, np.float32),
            np.zeros(shape, np.int32),
            np.zeros(shape, np.int32),
            np.full(shape, cls.NO_STEP, np.int32),
        )


def init_variables(rng: jax.Array, model: nn.Module) -> dict:
    """The model's variables ("params", and "batch_stats" with BatchNorm), initialised on one zero image of the
    shape it was built for (`model.image_shape`)."""
    return model.init(rng, jnp.zeros((1, *model.image_shape), jnp.float32), train=False)


def init_params(rng: jax.Array, model: nn.Module) -> dict:
    """The model's params (`init_variables`'s "params")."""
    return init_variables(rng, model)["params"]


def eval_variables(state: TrainState):
    """What `models.eval_apply` takes of a state (with a seed axis, of stacked states): its params, or
    `models.Variables(params, batch_stats)` for a model with BatchNorm.

    >>> logits = models.eval_apply(model.apply)(eval_variables(state), images)
    """
    if isinstance(state, BatchNormState):
        return models.Variables(state.params, state.batch_stats)
    return state.params


def learning_rate_schedule(train_config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """Constant; cosine decay to zero over the whole run; or cyclic: linear from 0 up to the rate at
    train.cyclic_peak of the run and back down to 0 (Wong et al. 2020's schedule for fast training: 2/5 on
    MNIST, 1/2 on CIFAR-10). The peak step is exact for a share with a small denominator (0.4 is 2/5)."""
    total = train_config.epochs * steps_per_epoch
    if train_config.schedule == "constant":
        return optax.constant_schedule(train_config.learning_rate)
    if train_config.schedule == "cosine":
        return optax.cosine_decay_schedule(train_config.learning_rate, total)
    if train_config.schedule == "cyclic":
        share = fractions.Fraction(str(train_config.cyclic_peak)).limit_denominator(1000)
        peak = max(1, (share.numerator * total) // share.denominator)
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, train_config.learning_rate, peak),
                optax.linear_schedule(train_config.learning_rate, 0.0, max(1, total - peak)),
            ],
            [peak],
        )
    raise ValueError(f"train.schedule={train_config.schedule!r} is not one of {SCHEDULES}")


def make_optimizer(train_config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
    """Adam, or SGD with heavy-ball momentum (PyTorch's, as Wong et al.'s CIFAR-10 recipe), on the schedule;
    train.weight_decay > 0 adds weight_decay * params to the gradient before either, as PyTorch's weight_decay."""
    schedule = learning_rate_schedule(train_config, steps_per_epoch)
    if train_config.optimizer == "adam":
        tx = optax.adam(schedule)
    elif train_config.optimizer == "sgd":
        tx = optax.sgd(schedule, momentum=train_config.momentum or None)
    else:
        raise ValueError(f"train.optimizer={train_config.optimizer!r} is not one of {OPTIMIZERS}")
    if train_config.weight_decay:
        return optax.chain(optax.add_decayed_weights(train_config.weight_decay), tx)
    return tx


def create_train_state(
    rng: jax.Array, model: nn.Module, train_config: ml_collections.ConfigDict, steps_per_epoch: int
) -> TrainState:
    """A TrainState, or a BatchNormState for a model with BatchNorm."""
    tx, variables = make_optimizer(train_config, steps_per_epoch), init_variables(rng, model)
    if "batch_stats" in variables:
        return BatchNormState.create(
            apply_fn=model.apply, params=variables["params"], tx=tx, batch_stats=variables["batch_stats"]
        )
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx)


def create_states(
    init_rng: jax.Array, model: nn.Module, train_config: ml_collections.ConfigDict, steps_per_epoch: int, num_seeds: int
) -> TrainState:
    """One train state, or `num_seeds` stacked along a leading axis (one per init key).

    Jitted as a whole: run eagerly, every initializer and optimizer buffer
    would be its own small compilation.

    >>> state = create_states(jax.random.key(0), models.build_model(config.model), config.train, 390, 1)
    """
    create = lambda rng: create_train_state(rng, model, train_config, steps_per_epoch)
    return loops.jit_once(loops.named(seeds.map_over_seeds(create, num_seeds), "create_states"))(init_rng)


def train_step(
    state: TrainState, objective: Objective, images: jax.Array, labels: jax.Array, rng: jax.Array
) -> tuple[TrainState, tuple[jax.Array, jax.Array]]:
    """One optimizer step on float images; returns (new state, (loss, number correct)).

    A BatchNormState's objective takes `models.Variables` and returns the batch statistics its training
    passes updated beside the logits; they replace the state's, and the gradient is the params' alone.
    """
    if isinstance(state, BatchNormState):
        loss_of = lambda params: objective(models.Variables(params, state.batch_stats), images, labels, rng, state.step)
        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        correct = jnp.sum(jnp.argmax(logits, -1) == labels)
        return state.apply_gradients(grads=grads).replace(batch_stats=batch_stats), (loss, correct)
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


def _augmented(augmentation: str, images: jax.Array, step_rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(the batch, the objective's key): under "none" both as they are; else the batch augmented with a key split
    from the step's (advjax.augment), the other half the objective's."""
    if augmentation == "none":
        return images, step_rng
    augment_rng, step_rng = jax.random.split(step_rng)
    return augment.augment(augmentation, augment_rng, images), step_rng


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
    augmentation: str = "none",
) -> Callable:
    """`epoch(state, totals, images_u8, labels, permutation, rng) -> (state, totals)`.

    Runs num_examples // batch_size steps of one static shape (the last partial batch is dropped). Per-step
    keys are `fold_in(rng, state.step)`, so every loop form draws the same noise and dropout.
    With `num_seeds > 1`, state, totals, permutation and rng carry a leading seed axis; the data are shared.

    With a `mesh`, each batch is split across its `data` axis and the carry stays replicated: the gradient is
    all-reduced inside the same compiled fold (advjax.sharding). Pass all operands `sharding.replicate`d.

    `convolutional` (does the model have convolutions?) decides what `form="auto"` means on CPU:
    only convolution gradients need the chunked form there; without them one `fori_loop` is
    faster and bit-identical to one jitted step per batch (docs/design.md, "Fused rounding").

    `augmentation` (advjax.augment) other than "none" splits each step's key: augmentation's, objective's.

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
        batch_images, step_rng = _augmented(augmentation, batch_images, jax.random.fold_in(rng, state.step))
        state, (loss, correct) = train_step(state, objective, batch_images, batch_labels, step_rng)
        return sharding.constrain_replicated((state, _add_step(totals, loss, correct, batch_size, state.step)), mesh)

    cpu_form = "chunked" if convolutional else "scan"
    # Where a convnet's epoch runs in chunks (XLA:CPU), its seeds' steps run one by one rather than vmapped.
    unrolled = convolutional and loops.resolve_form(form, cpu_form=cpu_form) == "chunked"
    body = seeds.map_body_over_seeds(body, num_seeds, unrolled=unrolled)
    fold = loops.make_fold(
        body, form=form, chunk_size=chunk_size, num_seeds=num_seeds, cpu_form=cpu_form, name="train_epoch"
    )

    def fold_args(state, totals, images, labels, permutation, rng) -> tuple:
        return num_steps, (state, totals), (permutation, rng), (images, labels)

    def epoch(state, totals, images, labels, permutation, rng):
        return fold(*fold_args(state, totals, images, labels, permutation, rng))

    # Exposed so tests can inspect the compiled (partitioned) program: epoch.fold.lower(*epoch.fold_args(...)).
    epoch.num_steps, epoch.fold, epoch.fold_args = num_steps, fold, fold_args
    return epoch
