"""Iterative attacks as `(init, step, finalize)` over an explicit per-example state.

As optax's GradientTransformation is for optimizers: the hyperparameters and
the model (`logits_fn`) are bound when the attack is made, and the attack is
three pure functions of arrays, so one step serves a direct call (`run`), a
compiled fold's ticks and a cascade alike.

- `init(images, labels, key) -> state`: the start, before any step;
- `step(state, iteration) -> state`: one iteration, `iteration` in [0, num_steps);
- `finalize(state) -> adversarial images`: what the attack returns.

The state is any pytree whose leaves lead with the batch dimension, so a
cascade can mask or gather examples between attacks.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

State = Any  # a pytree of per-example arrays


class IterativeAttack(NamedTuple):
    init: Callable[[jax.Array, jax.Array, jax.Array], State]
    step: Callable[[State, jax.Array], State]
    finalize: Callable[[State], jax.Array]
    num_steps: int


def run(attack: IterativeAttack, images: jax.Array, labels: jax.Array, key: jax.Array, *, unroll: bool = False):
    """The adversarial images: init, `num_steps` steps, finalize; traceable, so it jits and vmaps.

    `unroll=True` unrolls the steps in Python instead of one `fori_loop`: XLA:CPU runs
    convolution gradients slowly inside loops (docs/design.md, "Convolutions in XLA:CPU loops").

    >>> x_adv = jax.jit(lambda x, y, k: run(attack, x, y, k))(images, labels, jax.random.key(0))
    """
    state = attack.init(images, labels, key)
    if unroll:
        for iteration in range(attack.num_steps):
            state = attack.step(state, iteration)
    else:
        state = jax.lax.fori_loop(0, attack.num_steps, lambda i, s: attack.step(s, i), state)
    return attack.finalize(state)
