"""Losses from logits: cross-entropy, the paper's combined adversarial loss, and the terms of later defenses."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

# A model as attacks and losses see it: float images in [0, 1] -> logits, in eval mode.
LogitsFn = Callable[[jax.Array], jax.Array]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy, from logits for a non-vanishing gradient
    (docs/design.md, "Loss from logits")."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def combined_adversarial_loss(clean_loss: jax.Array, adversarial_loss: jax.Array, alpha: float) -> jax.Array:
    """Goodfellow et al.'s objective, alpha * J(x) + (1 - alpha) * J(x_adv) (paper eq. 2)."""
    return alpha * clean_loss + (1.0 - alpha) * adversarial_loss


def kl_divergence(reference_logits: jax.Array, logits: jax.Array) -> jax.Array:
    """Per-example KL(p_reference || p), both from logits: TRADES's robustness term."""
    log_p = jax.nn.log_softmax(reference_logits)
    return jnp.sum(jnp.exp(log_p) * (log_p - jax.nn.log_softmax(logits)), axis=-1)


def trades_loss(clean_logits: jax.Array, adversarial_logits: jax.Array, labels: jax.Array, beta: float) -> jax.Array:
    """Zhang et al. (2019): CE(f(x), y) + beta * KL(f(x) || f(x_adv)), averaged over the batch."""
    return jnp.mean(cross_entropy(clean_logits, labels) + beta * kl_divergence(clean_logits, adversarial_logits))


# Below this cross-entropy an example's input gradient is rounding noise in
# float32: softmax - onehot loses its label entry once 1 - p_label < 2^-24.
ALIGNMENT_LOSS_FLOOR = 1e-4


def gradient_misalignment(logits_fn: LogitsFn, images: jax.Array, perturbed: jax.Array, labels: jax.Array) -> jax.Array:
    """GradAlign's penalty (Andriushchenko & Flammarion 2020): the batch mean of
    1 - cos(grad_x J(x), grad_x J(x')) per example, between the images and a
    perturbed copy (the caller draws x' uniformly in the eps ball).

    Catastrophic overfitting is the loss turning locally non-linear, so that a
    one-step attack no longer finds the ascent that many steps do; the penalty
    keeps gradients inside the ball aligned. The clean gradient is held fixed, as
    in their code: only the perturbed one is differentiated again, which halves
    the double-backprop cost.

    Examples are left out (0 if all are) where either loss is below
    ALIGNMENT_LOSS_FLOOR. Their code leaves out only zero gradients, which
    suffices on CIFAR-10; on MNIST most examples end up classified with a loss
    near 1e-8, whose gradient has no reliable direction; with them in, the
    small CNN's training diverged to NaN (docs/design.md, "Float32 underflow").
    """

    def losses_and_input_gradient(x):
        losses, pullback = jax.vjp(lambda z: cross_entropy(logits_fn(z), labels), x)
        return losses, pullback(jnp.ones_like(losses))[0].reshape(x.shape[0], -1)

    clean_losses, clean = jax.lax.stop_gradient(losses_and_input_gradient(images))
    shifted_losses, shifted = losses_and_input_gradient(perturbed)
    clean_sq, shifted_sq = jnp.sum(clean**2, axis=1), jnp.sum(shifted**2, axis=1)
    has_direction = (
        (clean_sq > 0)
        & (shifted_sq > 0)
        & (clean_losses > ALIGNMENT_LOSS_FLOOR)
        & (shifted_losses > ALIGNMENT_LOSS_FLOOR)
    )
    # Each norm on its own: the product of two small squares underflows. And sqrt's
    # gradient at 0 is infinite: keep left-out rows out of it, not only out of the mean.
    norms = jnp.sqrt(jnp.where(has_direction, clean_sq, 1.0)) * jnp.sqrt(jnp.where(has_direction, shifted_sq, 1.0))
    cosine = jnp.sum(clean * shifted, axis=1) / norms
    count = jnp.sum(has_direction)
    return jnp.sum(jnp.where(has_direction, 1.0 - cosine, 0.0)) / jnp.maximum(count, 1)
