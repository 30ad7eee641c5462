"""Losses from logits: cross-entropy, the paper's combined adversarial loss, and the terms of later defenses
and of consistency regularization for smoothed classifiers."""

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


def consistency_loss(logits: jax.Array, labels: jax.Array, lam: float, eta: float) -> jax.Array:
    """Jeong & Shin (2020, "Consistency Regularization for Certified Robustness of Smoothed Classifiers"),
    averaged over the batch, from the logits [B, m, K] of m noisy copies of each of B images:

        L = mean_b [ mean_i CE(z_bi, y_b) + lam * mean_i KL(p_b || softmax(z_bi)) + eta * H(p_b) ],
        p_b = mean_i softmax(z_bi),  KL(p || q) = sum_k p_k log(p_k / q_k),  H(p) = -sum_k p_k log p_k,

    as their code/consistency.py (consistency_loss, kl_div, entropy) and code/train_consistency.py (the
    cross-entropy over all m B noisy logits) compute it: the average prediction p_b is not held fixed, so the
    gradient flows through it in both terms. The KL pulls each copy's prediction and the average together,
    and the entropy term rewards a confident average. log p_b is a logsumexp of the log-softmaxes,
    exact and finite; their entropy's log(clamp(p_b, 1e-20)) differs only where p_b < 1e-20, by under 1e-20.
    With m = 1 the KL is 0, and with eta = 0 too the loss is Gaussian training's cross-entropy.

    >>> consistency_loss(logits.reshape(batch, 2, 10), labels, 10.0, 0.5)  # scalar
    """
    log_p = jax.nn.log_softmax(logits)  # [B, m, K]
    log_mean = jax.nn.logsumexp(log_p, axis=1) - jnp.log(logits.shape[1])  # log p_b, [B, K]
    mean = jnp.exp(log_mean)
    ce = cross_entropy(logits, jnp.broadcast_to(labels[:, None], logits.shape[:-1]))  # [B, m]
    kl = jnp.sum(mean[:, None] * (log_mean[:, None] - log_p), axis=-1)  # KL(p_b || p_bi), [B, m]
    entropy = -jnp.sum(mean * log_mean, axis=-1)  # [B]
    return jnp.mean(jnp.mean(ce, axis=1) + lam * jnp.mean(kl, axis=1) + eta * entropy)


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


# ----------------------------------------------------------------------------
# Croce & Hein's (2020) difference-of-logits-ratio losses, as autoattack/autopgd_base.py defines them.

# Added to the DLR denominators, as in the reference, so that equal top logits give 0 / 1e-12, not 0 / 0.
DLR_EPSILON = 1e-12


def require_classes(logits: jax.Array, needed: int, loss: str) -> None:
    """Refuses logits with fewer classes than the loss ranks.

    >>> require_classes(jnp.zeros((2, 2)), 3, "dlr_loss")  # ValueError: dlr_loss needs at least 3 classes
    """
    if logits.shape[-1] < needed:
        raise ValueError(f"{loss} needs at least {needed} classes, got {logits.shape[-1]}")


def label_logit(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """z_y per example.

    >>> label_logit(jnp.array([[3.0, 1.0, 0.0]]), jnp.array([1]))  # [1.]
    """
    return jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]


def largest_other_logit(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """max_{i != y} z_i per example: a tie with z_y gives z_y itself, so the margin is 0 either way.

    >>> largest_other_logit(jnp.array([[3.0, 1.0, 0.0]]), jnp.array([0]))  # [1.]
    """
    is_label = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
    return jnp.max(jnp.where(is_label, -jnp.inf, logits), axis=-1)


def dlr_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The untargeted DLR loss per example: -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12), pi sorting descending.

    Dividing by a spread of the logits makes it invariant to shifting and
    rescaling them, so a model cannot hide behind large or saturated logits; it
    is positive exactly when the example is misclassified. Needs 3 classes.

    >>> dlr_loss(jnp.array([[3.0, 1.0, 0.0]]), jnp.array([0]))  # -(3 - 1) / (3 - 0) = [-0.6667]
    """
    require_classes(logits, 3, "dlr_loss")
    top = jax.lax.top_k(logits, 3)[0]
    margin = label_logit(logits, labels) - largest_other_logit(logits, labels)
    return -margin / (top[..., 0] - top[..., 2] + DLR_EPSILON)


def targeted_dlr_loss(logits: jax.Array, labels: jax.Array, targets: jax.Array) -> jax.Array:
    """The targeted DLR loss per example: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12), for APGD-T.

    The denominator is again a spread of the logits, which keeps the loss
    invariant to shifting and rescaling them. Needs 4 classes.

    >>> targeted_dlr_loss(jnp.array([[4.0, 2.0, 1.0, 0.0]]), jnp.array([0]), jnp.array([1]))  # -2 / 3.5
    """
    require_classes(logits, 4, "targeted_dlr_loss")
    top = jax.lax.top_k(logits, 4)[0]
    margin = label_logit(logits, labels) - label_logit(logits, targets)
    return -margin / (top[..., 0] - 0.5 * (top[..., 2] + top[..., 3]) + DLR_EPSILON)
