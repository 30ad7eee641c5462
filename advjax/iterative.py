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

Written to it: PGD (attacks.make_pgd, which FGSM, BIM and the robustness
fold's ticks also run), TRADES's inner maximisation
(objectives.make_trades_attack), APGD, FAB and Square. Restarts are the
caller's: one `run` per restart key.
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


def run_steps(attack: IterativeAttack, state: State, *, unroll: bool = False) -> State:
    """The state after the attack's `num_steps` steps from `state`: a fori_loop, or written out when
    `unroll` (or for one step).

    Written out, because XLA:CPU runs the CNN's input-gradient convolutions
    slowly inside a loop (docs/design.md, "Convolutions in XLA:CPU loops"), and
    lax.fori_loop keeps even a one-trip or `unroll=True` loop as a while loop.
    The price is a compile that grows with the steps.

    >>> state = run_steps(attack, attack.init(images, labels, jax.random.key(0)), unroll=True)
    """
    if unroll or attack.num_steps == 1:
        for iteration in range(attack.num_steps):
            state = attack.step(state, iteration)
        return state
    return jax.lax.fori_loop(0, attack.num_steps, lambda i, s: attack.step(s, i), state)


def run(
    attack: IterativeAttack, images: jax.Array, labels: jax.Array, key: jax.Array | None, *, unroll: bool = False
) -> jax.Array:
    """The adversarial images: init, `num_steps` steps (see `run_steps` for `unroll`), finalize;
    traceable, so it jits and vmaps. `key` may be None for an attack whose init draws nothing.

    >>> x_adv = jax.jit(lambda x, y, k: run(attack, x, y, k))(images, labels, jax.random.key(0))
    """
    return attack.finalize(run_steps(attack, attack.init(images, labels, key), unroll=unroll))
