"""Restarts of an attack: each restart's outcome per example, and which restart is kept.

`keep_worst` ranks success first, then the loss: more restarts never make the
attack weaker. `keep_highest_loss` is Wong et al.'s (2020) selection, kept to
reproduce their published evaluation.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from advjax import losses
from advjax.losses import LogitsFn
from advjax.norms import per_example


class AttackOutcome(NamedTuple):
    """Per example, [B] each: whether the attack succeeded and the loss it climbs."""

    success: jax.Array
    objective: jax.Array


def attack_outcome(
    logits_fn: LogitsFn, adversarial: jax.Array, labels: jax.Array, targeted: bool = False
) -> AttackOutcome:
    """Success is a wrong prediction (untargeted) or the target's (targeted).

    >>> attack_outcome(logits_fn, adversarial, labels).success  # [B] bool
    """
    logits = logits_fn(adversarial)
    loss = losses.cross_entropy(logits, labels)
    predicted = jnp.argmax(logits, axis=-1)
    if targeted:
        return AttackOutcome(predicted == labels, -loss)
    return AttackOutcome(predicted != labels, loss)


def _keep_where(better: jax.Array, best: tuple, candidate: tuple) -> tuple:
    """Per example, the candidate's (images, outcome) where `better`, else the best's."""
    choose = lambda new, old: jnp.where(per_example(better, new), new, old)
    return jax.tree.map(choose, candidate, best)


def keep_worst(
    best: tuple[jax.Array, AttackOutcome], candidate: tuple[jax.Array, AttackOutcome]
) -> tuple[jax.Array, AttackOutcome]:
    """Per example, the stronger of two adversarial images: success first, then the higher objective.

    Success ranks first because a restart that fools the model matters more to
    a robust accuracy than one with a higher loss that does not.

    >>> adversarial, outcome = keep_worst((a, attack_outcome(logits_fn, a, y)), (b, attack_outcome(logits_fn, b, y)))
    """
    (_, best_outcome), (_, outcome) = best, candidate
    better = (outcome.success & ~best_outcome.success) | (
        (outcome.success == best_outcome.success) & (outcome.objective > best_outcome.objective)
    )
    return _keep_where(better, best, candidate)


def keep_highest_loss(
    best: tuple[jax.Array, AttackOutcome], candidate: tuple[jax.Array, AttackOutcome]
) -> tuple[jax.Array, AttackOutcome]:
    """Per example, the candidate if its objective is at least the best's: Wong et al.'s (2020)
    restart selection, which ignores success. A restart that fooled the model can
    lose to a later one with a higher loss that did not, so it is weaker than
    `keep_worst`; it exists to reproduce their published evaluation.

    >>> adversarial, outcome = keep_highest_loss(best, (b, attack_outcome(logits_fn, b, y)))
    """
    return _keep_where(candidate[1].objective >= best[1].objective, best, candidate)


RESTART_SELECTIONS = {"success_first": keep_worst, "highest_loss": keep_highest_loss}
