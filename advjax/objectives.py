"""Losses: cross-entropy from logits and the paper's training objectives."""

import jax
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy, from logits for a non-vanishing gradient (pitfall 2)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def combined_adversarial_loss(clean_loss: jax.Array, adversarial_loss: jax.Array, alpha: float) -> jax.Array:
    """Goodfellow et al.'s objective, alpha * J(x) + (1 - alpha) * J(x_adv) (paper eq. 2)."""
    return alpha * clean_loss + (1.0 - alpha) * adversarial_loss
