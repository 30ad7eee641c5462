"""Training: state, objective, one jitted step, and the compiled epoch."""

from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state
from jax.sharding import Mesh

from advjax import attacks, loops, objectives, sharding

# ordinary, the paper's two (FGSM-adversarial, Gaussian noise) and four defenses
# from later work: PGD (Madry et al. 2018), fast FGSM with a random start
# (Wong et al. 2020), TRADES (Zhang et al. 2019) and N-FGSM (de Jorge et al. 2022).
TRAINING_MODES = ("ordinary", "fgsm", "gaussian", "pgd", "fast", "trades", "nfgsm")
# Modes that train on attacked images, whose robustness is checked each epoch.
ADVERSARIAL_MODES = ("fgsm", "pgd", "fast", "trades", "nfgsm")

# (params, images, labels, rng[, step]) -> (scalar loss, logits reported for accuracy).
# `step` is the optimizer step the loss is taken at; it sets the attack's eps
# during train.eps_warmup_epochs (None: the full eps).
Objective = Callable[..., tuple[jax.Array, jax.Array]]
TrainState = train_state.TrainState


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
        shape = () if num_seeds == 1 else (num_seeds,)
        return cls(
            jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.int32), jnp.zeros(shape, jnp.int32),
            jnp.full(shape, cls.NO_STEP, jnp.int32),
        )


def to_float_images(images: jax.Array) -> jax.Array:
    """uint8 [.., 28, 28, 1] -> float32 in [0, 1]; data stays uint8 until it is on the device."""
    return images.astype(jnp.float32) / 255.0


def init_params(rng: jax.Array, model: nn.Module) -> dict:
    return model.init(rng, jnp.zeros((1, 28, 28, 1), jnp.float32), train=False)["params"]


SCHEDULES = ("constant", "cosine", "cyclic")


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
            [optax.linear_schedule(0.0, train_config.learning_rate, peak),
             optax.linear_schedule(train_config.learning_rate, 0.0, max(1, total - peak))],
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

    Jitted as a whole: run eagerly, every initializer and optimizer buffer is its
    own small compilation (BP: 3.2 s for one seed, 6.0 s for four on the 2-core
    CPU, while other jobs ran; jitted, 0.9 and 1.9 s).
    """
    create = lambda rng: create_train_state(rng, model, train_config, steps_per_epoch)
    return jax.jit(loops.map_over_seeds(create, num_seeds))(init_rng)


ATTACK_UNROLL = ("auto", "loop", "unrolled")


def attack_unroll(setting: str, backend: str | None = None) -> bool:
    """Whether an attack's steps inside a training step are unrolled (True) or a fori_loop.

    'auto' unrolls on CPU: XLA:CPU runs the CNN's input-gradient convolutions
    about 3x slower inside a while loop than unrolled (measured, DESIGN.md
    pitfall 9), while on accelerators the loop compiles faster and runs as fast.
    """
    if setting not in ATTACK_UNROLL:
        raise ValueError(f"train.attack_unroll={setting!r} is not one of {ATTACK_UNROLL}")
    if setting == "auto":
        return (backend or jax.default_backend()) == "cpu"
    return setting == "unrolled"


def trades_adversary(
    logits_fn: attacks.LogitsFn, images: jax.Array, key: jax.Array, eps: float, step_size: float, num_steps: int, unroll: bool = False
) -> jax.Array:
    """TRADES's inner maximisation: PGD on KL(f(x) || f(x')) from x + 0.001 N(0, 1), in the L-inf ball.

    It needs no labels: it pushes the prediction away from the clean one.
    """
    reference = jax.lax.stop_gradient(logits_fn(images))

    def step(_, adversarial):
        gradient = jax.grad(lambda z: jnp.sum(objectives.kl_divergence(reference, logits_fn(z))))(adversarial)
        return attacks.project_linf(adversarial + step_size * jnp.sign(gradient), images, eps)

    start = attacks.project_linf(images + 0.001 * jax.random.normal(key, images.shape, images.dtype), images, eps)
    return attacks.repeat(step, num_steps, start, unroll)


def attack_eps_schedule(train_config: ml_collections.ConfigDict, steps_per_epoch: int | None) -> Callable:
    """step (or None) -> the training attack's eps: train.eps, reached linearly from 0
    over the first train.eps_warmup_epochs (0: from the first step).

    A ramp is common on MNIST at eps = 0.3: a network that meets the full eps
    at its first step learns to mask its gradient before it learns the digits.
    """
    eps, warmup = train_config.eps, train_config.get("eps_warmup_epochs", 0)
    if not warmup:
        return lambda step: eps
    if steps_per_epoch is None:
        raise ValueError("train.eps_warmup_epochs > 0 needs the number of steps per epoch")
    ramp = optax.linear_schedule(0.0, eps, int(round(warmup * steps_per_epoch)))
    return lambda step: eps if step is None else ramp(step)


def make_objective(
    apply_fn: Callable, train_config: ml_collections.ConfigDict, *, deterministic: bool = False, steps_per_epoch: int | None = None
) -> Objective:
    """The training loss for `train_config.mode` (one of TRAINING_MODES).

    Every attack is crafted from the current params in eval mode (dropout off,
    pitfall 1) and frozen with stop_gradient before the parameter gradient is taken.
    `deterministic=True` promises that the model's train mode equals its eval
    mode (no dropout: BP, or the CNN with dropout 0); FGSM training then gets a
    faster gradient (`objective.value_and_grad`, see `shared_pass_fgsm`).
    `steps_per_epoch` is needed only for an eps warmup (attack_eps_schedule).
    """
    eps_at = attack_eps_schedule(train_config, steps_per_epoch)

    def train_logits(params, images, dropout_rng):
        return apply_fn({"params": params}, images, train=True, rngs={"dropout": dropout_rng})

    def ordinary(params, images, labels, rng, step=None):
        logits = train_logits(params, images, rng)
        return jnp.mean(objectives.cross_entropy(logits, labels)), logits

    def gaussian(params, images, labels, rng, step=None):
        noise_rng, dropout_rng = jax.random.split(rng)
        logits = train_logits(params, attacks.gaussian(noise_rng, images, train_config.sigma), dropout_rng)
        return jnp.mean(objectives.cross_entropy(logits, labels)), logits

    def fgsm(params, images, labels, rng, step=None):
        # Crafted from the current params in eval mode, then frozen: the
        # parameter gradient must not flow through the construction of x_adv.
        eval_logits = lambda x: apply_fn({"params": params}, x, train=False)
        adversarial = jax.lax.stop_gradient(attacks.fgsm(eval_logits, images, labels, eps_at(step)))
        # Two passes, not one over [x; x_adv]: the clean pass repeats the attack's
        # forward pass up to the dropout layer, and XLA merges the repeated part
        # (CSE). Measured for the CNN on CPU: 170 against 195 MFLOP per example,
        # 536 against 476 examples/s. (Without dropout, `shared_pass_fgsm` shares more.)
        clean_rng, adversarial_rng = jax.random.split(rng)  # independent dropout masks, as in one pass over both
        clean_logits = train_logits(params, images, clean_rng)
        adversarial_logits = train_logits(params, adversarial, adversarial_rng)
        loss = objectives.combined_adversarial_loss(
            jnp.mean(objectives.cross_entropy(clean_logits, labels)),
            jnp.mean(objectives.cross_entropy(adversarial_logits, labels)),
            train_config.alpha,
        )
        return loss, clean_logits

    def eval_logits_fn(params):
        return lambda x: apply_fn({"params": params}, x, train=False)

    def adversarial_only(params, images, adversarial, labels, dropout_rng):
        # Accuracy is reported on the images trained on, here adversarial ones
        # (as Madry et al. and Wong et al. report it): a clean pass only for the
        # metric would add half again to the cost of fast training.
        logits = train_logits(params, adversarial, dropout_rng)
        return jnp.mean(objectives.cross_entropy(logits, labels)), logits

    def trained_on(craft):
        """The loss on `craft(eval_logits, images, labels, eps, key)` alone, frozen before the parameter gradient."""

        def objective(params, images, labels, rng, step=None):
            attack_rng, dropout_rng = jax.random.split(rng)
            adversarial = jax.lax.stop_gradient(craft(eval_logits_fn(params), images, labels, eps_at(step), attack_rng))
            return adversarial_only(params, images, adversarial, labels, dropout_rng)

        return objective

    # Madry et al.: the loss at the worst point PGD finds in the eps ball, nothing else.
    pgd = trained_on(lambda logits_fn, x, y, eps, key: attacks.pgd(
        logits_fn, x, y, eps, key, num_steps=train_config.attack_steps, step_size=train_config.attack_step_size, unroll=unroll,
    ))
    # Wong et al.: one FGSM step from a uniform random start; the start is what
    # keeps it from the catastrophic overfitting of plain FGSM training.
    fast = trained_on(lambda logits_fn, x, y, eps, key: attacks.fgsm_random_start(
        logits_fn, x, y, eps, key, train_config.fast_step_size * eps, clip_start=train_config.get("fast_clip_start", False),
    ))
    # de Jorge et al.: single-step like fast, with twice the noise and no projection
    # (attacks.noisy_fgsm); it trains on perturbations larger than eps.
    nfgsm = trained_on(lambda logits_fn, x, y, eps, key: attacks.noisy_fgsm(
        logits_fn, x, y, eps, key, train_config.nfgsm_noise, train_config.nfgsm_step_size * eps,
    ))

    def trades(params, images, labels, rng, step=None):
        attack_rng, dropout_rng = jax.random.split(rng)
        adversarial = jax.lax.stop_gradient(trades_adversary(
            eval_logits_fn(params), images, attack_rng, eps_at(step), train_config.attack_step_size,
            train_config.attack_steps, unroll,
        ))
        # Separate passes, as in fgsm: the clean one shares the adversary's reference pass (CSE).
        clean_rng, adversarial_rng = jax.random.split(dropout_rng)
        clean_logits = train_logits(params, images, clean_rng)
        adversarial_logits = train_logits(params, adversarial, adversarial_rng)
        return objectives.trades_loss(clean_logits, adversarial_logits, labels, train_config.trades_beta), clean_logits

    unroll = attack_unroll(train_config.get("attack_unroll", "auto"))
    by_mode = {"ordinary": ordinary, "fgsm": fgsm, "gaussian": gaussian, "pgd": pgd, "fast": fast, "trades": trades, "nfgsm": nfgsm}
    if train_config.mode not in by_mode:
        raise ValueError(f"train.mode={train_config.mode!r} is not one of {TRAINING_MODES}")
    objective = by_mode[train_config.mode]
    align_weight = train_config.get("grad_align", 0.0)
    if align_weight:
        # Through jax.value_and_grad: shared_pass_fgsm's hand-written gradient has no penalty term.
        return with_gradient_alignment(objective, eval_logits_fn, eps_at, align_weight)
    if deterministic and train_config.mode == "fgsm":
        objective.value_and_grad = shared_pass_fgsm(apply_fn, eps_at, train_config.alpha)
    return objective


def with_gradient_alignment(objective: Objective, eval_logits_fn: Callable, eps_at: Callable, weight: float) -> Objective:
    """`objective` plus `weight` x GradAlign's penalty (objectives.gradient_misalignment),
    between the clean images and a uniform draw from the eps ball around them.

    The draw is not clipped to [0, 1], as in Andriushchenko & Flammarion's code:
    the penalty asks for a locally linear loss around x, not for an attack.
    It costs one more forward and backward pass, and a second-order one.
    """

    def aligned(params, images, labels, rng, step=None):
        rng, align_rng = jax.random.split(rng)
        loss, logits = objective(params, images, labels, rng, step)
        eps = eps_at(step)
        perturbed = attacks.uniform_in_ball(align_rng, images, eps, "linf", clip=False)
        penalty = objectives.gradient_misalignment(eval_logits_fn(params), images, perturbed, labels)
        return loss + weight * penalty, logits

    return aligned


def shared_pass_fgsm(apply_fn: Callable, eps_at: Callable, alpha: float) -> Callable:
    """FGSM training's (loss, logits) and parameter gradient, for a model without dropout.

    The attack needs d J(x) / d x and the clean loss needs d J(x) / d params:
    with no dropout the attack's eval-mode pass is the training pass, so one
    forward and one backward give both, and only x_adv needs a pass of its own.
    That is about 20% fewer FLOPs than crafting x_adv in a separate pass
    (BP: 2.8 against 3.5 MFLOP per example), and measured faster on CPU.
    The result equals `jax.value_and_grad` of the FGSM objective up to rounding.
    `eps_at` gives the attack's eps at a step (attack_eps_schedule).
    """

    def value_and_grad(params, images, labels, rng, step=None):
        del rng  # nothing is random: no dropout, and FGSM is deterministic

        def per_example_loss(p, x):
            logits = apply_fn({"params": p}, x, train=True)
            return objectives.cross_entropy(logits, labels), logits

        clean_loss, backward, logits = jax.vjp(per_example_loss, params, images, has_aux=True)
        # Seeded with alpha / B, the backward gives the clean term's parameter
        # gradient directly; the input gradient's sign is all FGSM uses. With
        # alpha = 0 that seed would zero the input gradient, and with it the
        # attack: then it is seeded with 1 / B and the clean gradient dropped.
        seed = alpha if alpha > 0 else 1.0
        clean_grads, input_grads = backward(jnp.full_like(clean_loss, seed / clean_loss.shape[0]))
        adversarial = jax.lax.stop_gradient(attacks.clip_to_pixels(images + eps_at(step) * jnp.sign(input_grads)))

        def adversarial_loss(p):
            return jnp.mean(objectives.cross_entropy(apply_fn({"params": p}, adversarial, train=True), labels))

        adv_loss, adv_grads = jax.value_and_grad(adversarial_loss)(params)
        if alpha > 0:
            grads = jax.tree.map(lambda c, a: c + (1.0 - alpha) * a, clean_grads, adv_grads)
        else:
            grads = adv_grads
        loss = objectives.combined_adversarial_loss(jnp.mean(clean_loss), adv_loss, alpha)
        return (loss, logits), grads

    return value_and_grad


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

    Runs num_examples // batch_size steps (the last partial batch is dropped so
    every step has the same static shape). Per-step keys are
    `fold_in(rng, state.step)`, so every loop form draws the same noise and dropout.
    With `num_seeds > 1`, state, totals, permutation and rng carry a leading seed
    axis and the step is vmapped over it; the data are shared.

    With a `mesh` (advjax.sharding), each batch is split across its `data` axis
    and the carry stays replicated, so the compiler makes the step data-parallel
    (the gradient is all-reduced inside the same compiled fold). Pass the state,
    images, labels and keys replicated (`sharding.replicate`). Without a mesh
    the program is exactly the single-device one.

    `convolutional` (does the model have convolutions?) decides what
    `form="auto"` means on CPU. Only convolution gradients need the chunked form
    there; without them one `fori_loop` is the faster fold (BP FGSM training on
    the 2-core CPU: 48-51k against 38-40k examples/s in chunks of 8), compiles
    faster, and computes bit for bit what one jitted step per batch computes,
    which unrolled chunks do not (tests/test_train.py).
    """
    num_steps = num_examples // batch_size
    if num_steps < 1:
        raise ValueError(f"batch size {batch_size} is larger than the {num_examples} training examples")
    sharding.check_batch_size(batch_size, mesh, "train.batch_size")

    def body(carry, step, images, labels, permutation, rng):
        state, totals = carry
        index = jax.lax.dynamic_slice_in_dim(permutation, step * batch_size, batch_size)
        batch_images, batch_labels = sharding.constrain_batch((to_float_images(images[index]), labels[index]), mesh)
        state, (loss, correct) = train_step(
            state, objective, batch_images, batch_labels, jax.random.fold_in(rng, state.step)
        )
        nonfinite_step = jnp.where(jnp.isfinite(loss), EpochTotals.NO_STEP, state.step).astype(jnp.int32)
        totals = EpochTotals(
            totals.loss + loss, totals.correct + correct, totals.examples + batch_size,
            jnp.minimum(totals.first_nonfinite_step, nonfinite_step),
        )
        return sharding.constrain_replicated((state, totals), mesh)

    body = loops.map_over_seeds(body, num_seeds, in_axes=(0, None, None, None, 0, 0))
    fold = loops.make_fold(
        body, form=form, chunk_size=chunk_size, num_seeds=num_seeds, cpu_form="chunked" if convolutional else "scan"
    )

    def epoch(state, totals, images, labels, permutation, rng):
        return fold(num_steps, (state, totals), images, labels, permutation, rng)

    epoch.num_steps = num_steps
    epoch.fold = fold  # exposed so tests can inspect the compiled (partitioned) program
    return epoch
