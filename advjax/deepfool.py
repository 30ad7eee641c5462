"""DeepFool in L2 for many classes (Moosavi-Dezfooli et al. 2016): the minimal perturbation
that crosses the nearest linearised decision boundary, and its image within an eps budget."""

import jax
import jax.numpy as jnp
from jax import lax

from advjax.losses import LogitsFn
from advjax.norms import L2_EPSILON, clip_to_pixels, l2_norms, per_example


def class_gradients(logits_fn: LogitsFn, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Logits [B, K] and d logit_k / d x for every class, [B, K, D] with D the pixels.

    One backward pass per class through a single forward pass; it assumes, as
    every eval-mode model here does, that an example's logits depend on that
    example alone.

    >>> logits, gradients = class_gradients(logits_fn, images)  # [B, K], [B, K, D]
    """
    logits, vjp = jax.vjp(logits_fn, images)
    num_classes = logits.shape[-1]
    cotangents = jnp.broadcast_to(jnp.eye(num_classes, dtype=logits.dtype)[:, None, :], (num_classes, *logits.shape))
    (gradients,) = jax.vmap(vjp)(cotangents)
    return logits, jnp.moveaxis(gradients, 0, 1).reshape(logits.shape + (-1,))


def deepfool_step(logits: jax.Array, gradients: jax.Array, labels: jax.Array) -> jax.Array:
    """The linearised minimal L2 step across the nearest other class's boundary, [B, D].

    Linearised, class k overtakes `labels` at distance |f_k - f_y| / ||w_k - w_y||
    along w_k - w_y; the step goes to the nearest such boundary, plus 1e-4 in L2
    so that it does not land exactly on it (as in the authors' code).

    >>> step = deepfool_step(*class_gradients(logits_fn, images), labels)  # [B, D]
    """
    rows = jnp.arange(logits.shape[0])
    margins = logits - logits[rows, labels][:, None]
    directions = gradients - gradients[rows, labels][:, None, :]
    norms = jnp.sqrt(jnp.sum(jnp.square(directions), axis=-1) + L2_EPSILON)
    distances = jnp.abs(margins) / norms
    distances = distances.at[rows, labels].set(jnp.inf)
    closest = jnp.argmin(distances, axis=-1)
    length = distances[rows, closest] + 1e-4
    return (length / norms[rows, closest])[:, None] * directions[rows, closest]


def deepfool(
    logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, *, max_iter: int = 50, overshoot: float = 0.02
) -> jax.Array:
    """Accumulates linearised minimal steps until the prediction leaves `labels`.

    The paper uses the model's own prediction: pass `attacks.predicted_labels`.
    The image is x + (1 + overshoot) * total step, clipped to [0, 1]. Examples
    stop one by one (a done mask), and the loop stops when all have, or after
    `max_iter` steps. An example already not predicted as its label is
    returned unchanged.

    >>> adversarial = deepfool(logits_fn, images, attacks.predicted_labels(logits_fn, images))
    """
    still_labelled = lambda x: jnp.argmax(logits_fn(x), axis=-1) == labels

    def active(state):
        iteration, _, _, running = state
        return (iteration < max_iter) & jnp.any(running)

    def step(state):
        iteration, total, adversarial, running = state
        logits, gradients = class_gradients(logits_fn, adversarial)
        move = deepfool_step(logits, gradients, labels).reshape(images.shape)
        total = total + jnp.where(per_example(running, move), move, 0.0)
        adversarial = clip_to_pixels(images + (1.0 + overshoot) * total)
        return iteration + 1, total, adversarial, running & still_labelled(adversarial)

    state = (jnp.int32(0), jnp.zeros_like(images), images, still_labelled(images))
    return lax.while_loop(active, step, state)[2]


def deepfool_within(
    logits_fn: LogitsFn,
    images: jax.Array,
    labels: jax.Array,
    eps: jax.Array | float,
    *,
    max_iter: int = 50,
    overshoot: float = 0.02,
) -> jax.Array:
    """DeepFool's image where its L2 perturbation is at most eps, else the clean image.

    DeepFool has no budget of its own; this is the image an L2 attacker with
    budget eps gets from it, so accuracy against eps is the share of examples
    whose DeepFool distance exceeds eps. The search does not depend on eps, so
    under a vmap over eps it runs once.

    >>> adversarial = deepfool_within(logits_fn, images, labels, 2.0)
    """
    adversarial = deepfool(logits_fn, images, labels, max_iter=max_iter, overshoot=overshoot)
    within = l2_norms(adversarial - images) <= eps
    return jnp.where(per_example(within, images), adversarial, images)
