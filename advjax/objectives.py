"""Training objectives, one per `config.train.mode`: `objective(params, images, labels, rng, step) -> (loss, logits)`.

Every attack is crafted from the current params in eval mode (docs/design.md,
"Attacks in eval mode") and frozen with stop_gradient before the parameter
gradient is taken ("Frozen adversary"). `step` is the optimizer step the loss
is taken at; it sets the attack's eps during train.eps_warmup_epochs (None:
the full eps). The logits returned are those training accuracy is reported on.
For a model with BatchNorm, `params` is `models.Variables` and the logits come
with the batch statistics its train-mode passes updated; its attacks read the
running statistics, frozen.
The inner attacks are the library's (advjax.attacks; PGD through
`attacks.make_pgd`), and TRADES's is an IterativeAttack of its own here
(`make_trades_attack`), built on the same projected step.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from advjax import attacks, iterative, losses, models, noise
from advjax.losses import LogitsFn
from advjax.norms import clip_to_pixels, project_linf, uniform_in_ball

# ordinary, the paper's two (FGSM-adversarial, Gaussian noise), four defenses
# from later work: PGD (Madry et al. 2018), fast FGSM with a random start
# (Wong et al. 2020), TRADES (Zhang et al. 2019) and N-FGSM (de Jorge et al. 2022),
# and Gaussian noise with consistency regularization for randomized smoothing (Jeong & Shin 2020).
TRAINING_MODES = ("ordinary", "fgsm", "gaussian", "pgd", "fast", "trades", "nfgsm", "consistency")
# Modes that train on attacked images, whose robustness is checked each epoch (advjax.overfitting).
# Not the noise modes, gaussian and consistency: they train for the smoothed classifier's certificate.
ADVERSARIAL_MODES = ("fgsm", "pgd", "fast", "trades", "nfgsm")
ATTACK_UNROLL = ("auto", "loop", "unrolled")

Objective = Callable[..., tuple[jax.Array, jax.Array]]


def attack_unroll(setting: str, backend: str | None = None) -> bool:
    """Whether an attack's steps inside a training step are unrolled (True) or a fori_loop.

    'auto' unrolls on CPU, where the CNN's input-gradient convolutions run
    slowly inside a while loop (docs/design.md, "Convolutions in XLA:CPU
    loops"); on accelerators the loop compiles faster and runs as fast.
    """
    if setting not in ATTACK_UNROLL:
        raise ValueError(f"train.attack_unroll={setting!r} is not one of {ATTACK_UNROLL}")
    if setting == "auto":
        return (backend or jax.default_backend()) == "cpu"
    return setting == "unrolled"


class TradesState(NamedTuple):
    """TRADES's inner maximisation's state; every leaf leads with the batch axis."""

    images: jax.Array  # the clean images, the centres of the eps balls
    reference: jax.Array  # the clean logits, frozen: the prediction the attack pushes away from
    adversarial: jax.Array  # the current iterate


def make_trades_attack(
    logits_fn: LogitsFn, eps: jax.Array | float, step_size: jax.Array | float, num_steps: int
) -> iterative.IterativeAttack:
    """TRADES's inner maximisation (Zhang et al. 2019): L-inf PGD on KL(f(x) || f(x')) from x + 0.001 N(0, 1).

    It needs no labels (init ignores them): it pushes the prediction away from
    the clean one, which init computes once and the state carries.

    >>> x_adv = iterative.run(make_trades_attack(logits_fn, 0.3, 0.01, 40), images, None, jax.random.key(0))
    """

    def init(images, labels, key):
        del labels  # the clean prediction stands in for them
        start = images + 0.001 * jax.random.normal(key, images.shape, images.dtype)
        return TradesState(images, jax.lax.stop_gradient(logits_fn(images)), project_linf(start, images, eps))

    def step(state, iteration):
        del iteration  # every step is alike
        summed_kl = lambda z: jnp.sum(losses.kl_divergence(state.reference, logits_fn(z)))
        gradient = jax.grad(summed_kl)(state.adversarial)
        return state._replace(
            adversarial=attacks.projected_ascent(state.adversarial, gradient, state.images, eps, step_size, "linf")
        )

    return iterative.IterativeAttack(init, step, attacks.current_iterate, num_steps)


def trades_adversary(
    logits_fn: LogitsFn,
    images: jax.Array,
    key: jax.Array,
    eps: float,
    step_size: float,
    num_steps: int,
    unroll: bool = False,
) -> jax.Array:
    """TRADES's adversarial images: `make_trades_attack` run from `key` (see iterative.run_steps for `unroll`).

    >>> adversarial = trades_adversary(logits_fn, images, jax.random.key(0), 0.3, 0.01, 40)
    """
    return iterative.run(make_trades_attack(logits_fn, eps, step_size, num_steps), images, None, key, unroll=unroll)


def attack_eps_schedule(train_config: ml_collections.ConfigDict, steps_per_epoch: int | None) -> Callable:
    """step (or None) -> the training attack's eps: train.eps, reached linearly from 0
    over the first train.eps_warmup_epochs (0: from the first step).

    A ramp is common on MNIST at eps = 0.3: a network that meets the full eps
    at its first step learns to mask its gradient before it learns the digits.
    """
    eps, warmup = train_config.eps, train_config.eps_warmup_epochs
    if not warmup:
        return lambda step: eps
    if steps_per_epoch is None:
        raise ValueError("train.eps_warmup_epochs > 0 needs the number of steps per epoch")
    ramp = optax.linear_schedule(0.0, eps, int(round(warmup * steps_per_epoch)))
    return lambda step: eps if step is None else ramp(step)


class _Setting(NamedTuple):
    """What every mode's objective is built from."""

    apply_fn: Callable  # the Linen module's apply
    config: ml_collections.ConfigDict  # config.train
    eps_at: Callable  # step -> the attack's eps (attack_eps_schedule)
    unroll: bool  # unroll the attack's steps (attack_unroll)

    def train_logits(self, params, images, dropout_rng):
        """(logits, params) of a train-mode pass: `models.train_apply`, whose `models.Variables` come back with the
        batch statistics it updated (docs/design.md, "Attacks in eval mode")."""
        return models.train_apply(self.apply_fn)(params, images, dropout_rng)

    def eval_logits_fn(self, params) -> LogitsFn:
        eval_apply = models.eval_apply(self.apply_fn)
        return lambda x: eval_apply(params, x)


def _aux(logits: jax.Array, params):
    """What an objective returns beside its loss: the logits, with the updated batch statistics for
    `models.Variables` (a model with BatchNorm: train.train_step puts them in the state)."""
    return (logits, params.batch_stats) if isinstance(params, models.Variables) else logits


def _ordinary(s: _Setting) -> Objective:
    def ordinary(params, images, labels, rng, step=None):
        logits, params = s.train_logits(params, images, rng)
        return jnp.mean(losses.cross_entropy(logits, labels)), _aux(logits, params)

    return ordinary


def _gaussian(s: _Setting) -> Objective:
    def gaussian(params, images, labels, rng, step=None):
        noise_rng, dropout_rng = jax.random.split(rng)
        logits, params = s.train_logits(
            params, noise.gaussian(noise_rng, images, s.config.sigma, clip=s.config.noise_clip), dropout_rng
        )
        return jnp.mean(losses.cross_entropy(logits, labels)), _aux(logits, params)

    return gaussian


def _consistency(s: _Setting) -> Objective:
    # Jeong & Shin: train.consistency_copies copies of each image, each with its own noise.gaussian draw at
    # train.sigma (clipped unless train.noise_clip is False, as the certified base classifier's input), in one
    # pass; losses.consistency_loss on their logits. Accuracy is reported on the first copy's logits: one
    # noisy draw per image, as in gaussian mode, and in expectation their code's accuracy over all copies.
    copies, lam, eta = s.config.consistency_copies, s.config.consistency_lambda, s.config.consistency_eta

    def consistency(params, images, labels, rng, step=None):
        noise_rng, dropout_rng = jax.random.split(rng)
        batch, image_shape = images.shape[0], images.shape[1:]
        # Example-major [B, m, ...]: a device's share of the batch keeps its own copies, and with m = 1
        # the draw is gaussian mode's, value for value.
        repeated = jnp.broadcast_to(images[:, None], (batch, copies, *image_shape))
        noisy = noise.gaussian(noise_rng, repeated, s.config.sigma, clip=s.config.noise_clip)
        noisy = noisy.reshape(batch * copies, *image_shape)
        logits, params = s.train_logits(params, noisy, dropout_rng)
        logits = logits.reshape(batch, copies, -1)
        return losses.consistency_loss(logits, labels, lam, eta), _aux(logits[:, 0], params)

    return consistency


def _fgsm(s: _Setting) -> Objective:
    def fgsm(params, images, labels, rng, step=None):
        adversarial = jax.lax.stop_gradient(attacks.fgsm(s.eval_logits_fn(params), images, labels, s.eps_at(step)))
        # Two passes, not one over [x; x_adv]: the clean pass repeats the attack's
        # forward pass up to the dropout layer, and XLA merges the repeated part
        # (bench/README.md). Without dropout, `shared_pass_fgsm` shares more.
        clean_rng, adversarial_rng = jax.random.split(rng)  # independent dropout masks, as in one pass over both
        # With BatchNorm, each pass updates the running statistics in turn, as two train-mode passes do in PyTorch.
        clean_logits, params = s.train_logits(params, images, clean_rng)
        adversarial_logits, params = s.train_logits(params, adversarial, adversarial_rng)
        loss = losses.combined_adversarial_loss(
            jnp.mean(losses.cross_entropy(clean_logits, labels)),
            jnp.mean(losses.cross_entropy(adversarial_logits, labels)),
            s.config.alpha,
        )
        return loss, _aux(clean_logits, params)

    return fgsm


def _trained_on(s: _Setting, craft: Callable) -> Objective:
    """The loss on `craft(eval_logits, images, labels, eps, key)` alone, frozen before the parameter gradient.

    Accuracy is reported on the images trained on, here adversarial ones (as
    Madry et al. and Wong et al. report it): a clean pass only for the metric
    would add half again to the cost of fast training.
    """

    def objective(params, images, labels, rng, step=None):
        attack_rng, dropout_rng = jax.random.split(rng)
        adversarial = jax.lax.stop_gradient(craft(s.eval_logits_fn(params), images, labels, s.eps_at(step), attack_rng))
        logits, params = s.train_logits(params, adversarial, dropout_rng)
        return jnp.mean(losses.cross_entropy(logits, labels)), _aux(logits, params)

    return objective


def _pgd(s: _Setting) -> Objective:
    # Madry et al.: the loss at the worst point PGD finds in the eps ball, nothing else.
    steps, step_size = s.config.attack_steps, s.config.attack_step_size
    return _trained_on(
        s,
        lambda logits_fn, x, y, eps, key: attacks.pgd(
            logits_fn, x, y, eps, key, num_steps=steps, step_size=step_size, unroll=s.unroll
        ),
    )


def _fast(s: _Setting) -> Objective:
    # Wong et al.: one FGSM step from a uniform random start; the start is what
    # keeps it from the catastrophic overfitting of plain FGSM training.
    relative, clip_start = s.config.fast_step_size, s.config.fast_clip_start
    return _trained_on(
        s,
        lambda logits_fn, x, y, eps, key: attacks.fgsm_random_start(
            logits_fn, x, y, eps, key, relative * eps, clip_start=clip_start
        ),
    )


def _nfgsm(s: _Setting) -> Objective:
    # de Jorge et al.: single-step like fast, with twice the noise and no projection
    # (attacks.noisy_fgsm); it trains on perturbations larger than eps.
    noise_scale, relative = s.config.nfgsm_noise, s.config.nfgsm_step_size
    return _trained_on(
        s,
        lambda logits_fn, x, y, eps, key: attacks.noisy_fgsm(logits_fn, x, y, eps, key, noise_scale, relative * eps),
    )


def _trades(s: _Setting) -> Objective:
    def trades(params, images, labels, rng, step=None):
        attack_rng, dropout_rng = jax.random.split(rng)
        adversarial = jax.lax.stop_gradient(
            trades_adversary(
                s.eval_logits_fn(params),
                images,
                attack_rng,
                s.eps_at(step),
                s.config.attack_step_size,
                s.config.attack_steps,
                s.unroll,
            )
        )
        # Separate passes, as in fgsm: the clean one shares the adversary's reference pass (CSE).
        clean_rng, adversarial_rng = jax.random.split(dropout_rng)
        clean_logits, params = s.train_logits(params, images, clean_rng)
        adversarial_logits, params = s.train_logits(params, adversarial, adversarial_rng)
        loss = losses.trades_loss(clean_logits, adversarial_logits, labels, s.config.trades_beta)
        return loss, _aux(clean_logits, params)

    return trades


_BUILDERS = {
    "ordinary": _ordinary,
    "fgsm": _fgsm,
    "gaussian": _gaussian,
    "pgd": _pgd,
    "fast": _fast,
    "trades": _trades,
    "nfgsm": _nfgsm,
    "consistency": _consistency,
}


def make_objective(
    apply_fn: Callable,
    train_config: ml_collections.ConfigDict,
    *,
    deterministic: bool = False,
    steps_per_epoch: int | None = None,
) -> Objective:
    """The training loss for `train_config.mode` (one of TRAINING_MODES), from a Linen module's `apply`.

    `deterministic=True` promises that the model's train mode equals its eval
    mode (no dropout: BP, or the CNN with dropout 0); FGSM training then gets a
    faster gradient (`objective.value_and_grad`, see `shared_pass_fgsm`).
    `steps_per_epoch` is needed only for an eps warmup (attack_eps_schedule).

    >>> objective = make_objective(model.apply, config.train)
    >>> loss, logits = objective(params, images, labels, jax.random.key(0))
    """
    if train_config.mode not in _BUILDERS:
        raise ValueError(f"train.mode={train_config.mode!r} is not one of {TRAINING_MODES}")
    eps_at = attack_eps_schedule(train_config, steps_per_epoch)
    setting = _Setting(apply_fn, train_config, eps_at, attack_unroll(train_config.attack_unroll))
    objective = _BUILDERS[train_config.mode](setting)
    if train_config.grad_align:
        # Through jax.value_and_grad: shared_pass_fgsm's hand-written gradient has no penalty term.
        return with_gradient_alignment(objective, setting.eval_logits_fn, eps_at, train_config.grad_align)
    if deterministic and train_config.mode == "fgsm":
        objective.value_and_grad = shared_pass_fgsm(apply_fn, eps_at, train_config.alpha)
    return objective


def with_gradient_alignment(
    objective: Objective, eval_logits_fn: Callable, eps_at: Callable, weight: float
) -> Objective:
    """`objective` plus `weight` x GradAlign's penalty (losses.gradient_misalignment),
    between the clean images and a uniform draw from the eps ball around them.

    The draw is not clipped to [0, 1], as in Andriushchenko & Flammarion's code:
    the penalty asks for a locally linear loss around x, not for an attack.
    It costs one more forward and backward pass, and a second-order one.
    """

    def aligned(params, images, labels, rng, step=None):
        rng, align_rng = jax.random.split(rng)
        loss, logits = objective(params, images, labels, rng, step)
        eps = eps_at(step)
        perturbed = uniform_in_ball(align_rng, images, eps, "linf", clip=False)
        penalty = losses.gradient_misalignment(eval_logits_fn(params), images, perturbed, labels)
        return loss + weight * penalty, logits

    return aligned


def shared_pass_fgsm(apply_fn: Callable, eps_at: Callable, alpha: float) -> Callable:
    """FGSM training's (loss, logits) and parameter gradient, for a model without dropout.

    The attack needs d J(x) / d x and the clean loss needs d J(x) / d params:
    with no dropout the attack's eval-mode pass is the training pass, so one
    forward and one backward give both, and only x_adv needs a pass of its own.
    That is fewer FLOPs than crafting x_adv in a separate pass (bench/README.md).
    The result equals `jax.value_and_grad` of the FGSM objective up to rounding.
    `eps_at` gives the attack's eps at a step (attack_eps_schedule).
    """

    def value_and_grad(params, images, labels, rng, step=None):
        del rng  # nothing is random: no dropout, and FGSM is deterministic

        def per_example_loss(p, x):
            logits = apply_fn({"params": p}, x, train=True)
            return losses.cross_entropy(logits, labels), logits

        clean_loss, backward, logits = jax.vjp(per_example_loss, params, images, has_aux=True)
        # Seeded with alpha / B, the backward gives the clean term's parameter
        # gradient directly; the input gradient's sign is all FGSM uses. With
        # alpha = 0 that seed would zero the input gradient, and with it the
        # attack: then it is seeded with 1 / B and the clean gradient dropped.
        seed = alpha if alpha > 0 else 1.0
        clean_grads, input_grads = backward(jnp.full_like(clean_loss, seed / clean_loss.shape[0]))
        adversarial = jax.lax.stop_gradient(clip_to_pixels(images + eps_at(step) * jnp.sign(input_grads)))

        def adversarial_loss(p):
            return jnp.mean(losses.cross_entropy(apply_fn({"params": p}, adversarial, train=True), labels))

        adv_loss, adv_grads = jax.value_and_grad(adversarial_loss)(params)
        if alpha > 0:
            grads = jax.tree.map(lambda c, a: c + (1.0 - alpha) * a, clean_grads, adv_grads)
        else:
            grads = adv_grads
        loss = losses.combined_adversarial_loss(jnp.mean(clean_loss), adv_loss, alpha)
        return (loss, logits), grads

    return value_and_grad
