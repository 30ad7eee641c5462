"""Expectation over Transformation (Athalye et al., ICML 2018): APGD on the average gradient of a randomised model.

A randomised model is a `KeyedLogitsFn`, `(images, key) -> logits`: its
randomness (noise on the input, dropout left on, a random transform) comes
from the key, as JAX wants it, where a PyTorch model draws from hidden state.
The attack calls it one example at a time under vmap, each example with its
own chain of keys (split by its place in the batch), so that the draws do not
depend on how the model spreads one key over a batch.

`make_apgd_eot` is the reference's APGD with `eot_iter` above 1
(`autoattack/autopgd_base.py`; AutoAttack's "rand" version runs it with 20):
each step averages the input gradient over `eot_samples` draws, and takes the
loss and the verdict from the last draw, as the reference does. Otherwise it
is `apgd`'s step, schedule and records, unchanged.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from advjax import apgd, iterative
from advjax.norms import Norm, check_norm

KeyedLogitsFn = Callable[[jax.Array, jax.Array], jax.Array]


class EoTState(NamedTuple):
    attack: apgd.APGDState  # APGD's per-example records
    keys: jax.Array  # per example, the key its draws come from (a key array [B])


def each_with_its_key(keyed_logits_fn: KeyedLogitsFn) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """(images [B, ...], keys [B]) -> logits [B, C]: each example through the model alone, with its own key.

    >>> logits = each_with_its_key(noisy_logits_fn)(images, jax.random.split(key, len(images)))
    """
    return jax.vmap(lambda image, key: keyed_logits_fn(image[None], key)[0])


def draw_keys(keys: jax.Array, iteration: jax.Array | int, draw: jax.Array | int) -> jax.Array:
    """Each example's key for one draw of one iteration (0 the start point): fresh for every pair.

    >>> keys = draw_keys(jax.random.split(key, 8), 3, 0)  # [8]
    """
    fold = jax.vmap(jax.random.fold_in, in_axes=(0, None))
    return fold(fold(keys, iteration), draw)


def averaged_loss_and_gradient(
    keyed_logits_fn: KeyedLogitsFn,
    loss: apgd.Loss,
    num_draws: int,
    keys: jax.Array,
    iteration: jax.Array | int,
    points: jax.Array,
    labels: jax.Array,
    targets: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The last draw's per-example loss and verdict, and the input gradient averaged over `num_draws` draws.

    >>> loss, misclassified, gradient = averaged_loss_and_gradient(fn, "ce", 20, keys, 0, images, labels, labels)
    """
    model = each_with_its_key(keyed_logits_fn)

    def one_draw(total, draw):
        logits_fn = lambda x: model(x, draw_keys(keys, iteration, draw))
        values, misclassified, gradient = apgd.loss_and_gradient(logits_fn, loss, points, labels, targets)
        return total + gradient, (values, misclassified)

    total, (values, misclassified) = jax.lax.scan(one_draw, jnp.zeros_like(points), jnp.arange(num_draws))
    return values[-1], misclassified[-1], total / num_draws


def make_apgd_eot(
    keyed_logits_fn: KeyedLogitsFn,
    eps: jax.Array | float,
    *,
    norm: Norm = "linf",
    loss: apgd.Loss = "ce",
    num_steps: int = 100,
    eot_samples: int = 20,
    momentum: float = 0.75,
    rho: float = 0.75,
) -> iterative.IterativeAttack:
    """APGD-CE ("ce") or APGD-DLR ("dlr") on a randomised model, each gradient the mean of `eot_samples` draws.

    With the defaults it is one of AutoAttack's "rand" attacks. The start
    point is drawn from `key` as `apgd.make_apgd` draws it, the model's draws
    from a key folded out of it.

    >>> x_adv = iterative.run(make_apgd_eot(noisy_logits_fn, 0.3), images, labels, jax.random.key(0))
    """
    check_norm(norm)
    if loss not in ("ce", "dlr"):
        raise ValueError(f"loss={loss!r}: EoT's APGD climbs 'ce' or 'dlr' (AutoAttack's rand version)")
    if not (isinstance(eot_samples, int) and eot_samples > 0):
        raise ValueError(f"eot_samples={eot_samples!r} must be a positive integer")

    def evaluator(keys, iteration):
        return lambda points, labels, targets: averaged_loss_and_gradient(
            keyed_logits_fn, loss, eot_samples, keys, iteration, points, labels, targets
        )

    def init(images, labels, key):
        keys = jax.random.split(jax.random.fold_in(key, 1), labels.shape[0])
        return EoTState(apgd.initial_state(evaluator(keys, 0), images, labels, labels, key, eps, norm), keys)

    def step(state, iteration):
        evaluate = evaluator(state.keys, iteration + 1)
        attack = apgd.apgd_step(evaluate, state.attack, iteration, eps, norm, num_steps, momentum, rho)
        return EoTState(attack, state.keys)

    return iterative.IterativeAttack(init, step, lambda state: apgd.finalize(state.attack), num_steps)
