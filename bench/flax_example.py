"""The baseline every figure in bench/ is compared with: training the flax-example way.

This is how the flax MNIST example (Linen version) trains, and how the optax
adversarial-training example crafts FGSM, written independently of advjax's
training code so that none of advjax's speed work leaks into it:
- the dataset lives on the host as float32 in [0, 1];
- each step gathers a batch with numpy and hands it to a jitted `apply_model`
  (one host-to-device transfer per batch), then a jitted `update_model`;
- FGSM training crafts x_adv in its own forward and backward pass, then takes
  alpha * J(x) + (1 - alpha) * J(x_adv) with two more forward passes;
- losses are collected per step and averaged on the host at the end of the epoch.
Only the models (advjax.models) and the optimizer (Adam with the same schedule) are shared.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy(logits, jax.nn.one_hot(labels, logits.shape[-1]))


def make_apply_model(mode: str, eps: float, alpha: float, sigma: float) -> Callable:
    """`apply_model(state, images, labels, rng) -> (grads, loss, accuracy)`, jitted."""

    def fgsm(params, apply_fn, images, labels):
        def loss(x):
            return jnp.mean(cross_entropy(apply_fn({"params": params}, x, train=False), labels))

        return jnp.clip(images + eps * jnp.sign(jax.grad(loss)(images)), 0.0, 1.0)

    @jax.jit
    def apply_model(state, images, labels, rng):
        def loss_fn(params):
            logits = state.apply_fn({"params": params}, images, train=True, rngs={"dropout": rng})
            loss = jnp.mean(cross_entropy(logits, labels))
            if mode == "fgsm":
                adversarial = jax.lax.stop_gradient(fgsm(params, state.apply_fn, images, labels))
                adv_logits = state.apply_fn({"params": params}, adversarial, train=True, rngs={"dropout": rng})
                loss = alpha * loss + (1 - alpha) * jnp.mean(cross_entropy(adv_logits, labels))
            return loss, logits

        if mode == "gaussian":
            images = jnp.clip(images + sigma * jax.random.normal(rng, images.shape), 0.0, 1.0)
        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return grads, loss, jnp.mean(jnp.argmax(logits, -1) == labels)

    return apply_model


@jax.jit
def update_model(state: train_state.TrainState, grads) -> train_state.TrainState:
    return state.apply_gradients(grads=grads)


def train_epoch(
    apply_model: Callable,
    state: train_state.TrainState,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    rng: jax.Array,
) -> tuple[train_state.TrainState, float, float]:
    """One epoch over host-side float32 `images`, as flax's `train_epoch` does it."""
    steps = len(images) // batch_size
    perms = np.asarray(jax.random.permutation(rng, len(images)))[: steps * batch_size].reshape(steps, batch_size)
    losses, accuracies = [], []
    for i, perm in enumerate(perms):
        grads, loss, accuracy = apply_model(state, images[perm], labels[perm], jax.random.fold_in(rng, i))
        state = update_model(state, grads)
        losses.append(loss)
        accuracies.append(accuracy)
    return state, float(np.mean(losses)), float(np.mean(accuracies))
