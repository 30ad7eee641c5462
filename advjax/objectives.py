"""Losses: cross-entropy from logits and the paper's training objectives."""

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy, from logits for a non-vanishing gradient (pitfall 2)."""
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
