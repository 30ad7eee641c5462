"""The overfitting check: FGSM and PGD (or APGD-CE) accuracy on held-out images after every epoch of adversarial
training.

One-step training can overfit catastrophically: within an epoch FGSM accuracy
climbs while PGD accuracy collapses, and the model has learned to mask its
gradient rather than to be robust (Wong et al. 2020; docs/design.md,
"Catastrophic overfitting"). A cheap multi-step attack each epoch catches it:
`train.overfitting_check_attack`, PGD with one random start, or APGD-CE, a
stronger attack at a similar cost per step that needs no step size (its
step-size schedule wants a few dozen steps, e.g. 25-50).
Its records go into metrics.jsonl (`overfitting_check`: {"fgsm": ..., <attack>: ...}),
its verdict into summary.json (`overfitting_check`), and `train.keep_best`
chooses each seed's epoch by the multi-step attack's accuracy. Which attack a
record holds is read from the record itself, so runs written before the choice
existed (always "pgd") still resume and summarise.
"""

from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np

from advjax import data, objectives, seeds
from advjax.attack_specs import AttackSpec
from advjax.eval_fold import EvalSet, make_eval_set
from advjax.models import ApplyFn
from advjax.robustness import make_robust_sweep

# The check's multi-step attacks (train.overfitting_check_attack), as their reports name them.
CHECK_ATTACKS: dict[str, str] = {"pgd": "PGD", "apgd_ce": "APGD-CE"}
OVERFITTING_DROP = 0.2  # a fall of the multi-step attack's accuracy this large (absolute) below its best so far
# FGSM accuracy this far above PGD accuracy at the same eps: the model has
# learned to defeat the one-step attack, not to be robust (fast training of BP
# at eps 0.3 shows it from epoch 1; docs/results.md).
MASKING_GAP = 0.5
# Ticks per compiled chunk of the check's attacks in the chunked (CPU) form.
CHECK_CHUNK_SIZE = 4


def held_out_set(validation: data.Split, num_examples: int, batch_size: int) -> EvalSet:
    """The last `num_examples` validation images (the paper's tables use the first 5000)."""
    n = min(num_examples, len(validation.labels))
    return make_eval_set(validation.images[-n:], validation.labels[-n:], n, min(n, batch_size))


def make_check(
    apply_fn: ApplyFn, eps: float, num_steps: int, *, attack: str = "pgd", form: str = "auto", num_seeds: int = 1
) -> Callable[..., dict]:
    """`check(params, eval_set, key) -> {'fgsm': accuracy, attack: accuracy}` at `eps`.

    `attack` is one of CHECK_ATTACKS, with one random start and `num_steps` steps: PGD's of the default
    2.5 eps / steps, or APGD-CE's own schedule. With several seeds each accuracy is a list, one per seed.

    >>> make_check(apply_fn, 0.3, 25, attack="apgd_ce")(params, held_out_set(mnist.validation, 500, 500), key)
    """
    if attack not in CHECK_ATTACKS:
        raise ValueError(f"the overfitting check's attack must be one of {tuple(CHECK_ATTACKS)}, got {attack!r}")
    specs = {"fgsm": AttackSpec("fgsm"), attack: AttackSpec(attack, num_steps=num_steps)}
    sweeps = {
        name: make_robust_sweep(apply_fn, spec, form=form, chunk_size=CHECK_CHUNK_SIZE, num_seeds=num_seeds)
        for name, spec in specs.items()
    }

    def check(params, eval_set: EvalSet, key: jax.Array) -> dict:
        return {
            name: seeds.as_reported(np.asarray(sweep(params, eval_set, key, (eps,)).accuracy)[..., 0], num_seeds)
            for name, sweep in sweeps.items()
        }

    def compile_ahead(params, eval_set: EvalSet, key: jax.Array) -> None:
        for sweep in sweeps.values():
            sweep.compile_ahead(params, eval_set, key, (eps,))

    check.compile_ahead = compile_ahead
    return check


def make_configured_check(
    config: ml_collections.ConfigDict, apply_fn: ApplyFn, validation: data.Split
) -> Callable | None:
    """`check(params, key)` on config.train.overfitting_check_examples held-out images at train.eps;
    None when the mode trains on no attack or the check is off (0 examples)."""
    if config.train.mode not in objectives.ADVERSARIAL_MODES or config.train.overfitting_check_examples == 0:
        return None
    held_out = held_out_set(validation, config.train.overfitting_check_examples, config.eval.batch_size)
    check = make_check(
        apply_fn,
        config.train.eps,
        config.train.overfitting_check_steps,
        attack=config.train.overfitting_check_attack,
        form=config.eval.loop,
        num_seeds=config.num_seeds,
    )
    configured = lambda params, key: check(params, held_out, key)
    configured.compile_ahead = lambda params, key: check.compile_ahead(params, held_out, key)
    return configured


def check_attack(record: dict) -> str:
    """The multi-step attack an epoch's record holds (a key of CHECK_ATTACKS): read from the record, not the
    config, so records written before train.overfitting_check_attack existed read as "pgd".

    >>> check_attack({"overfitting_check": {"fgsm": 0.9, "apgd_ce": 0.8}})  # 'apgd_ce'
    """
    return next(name for name in CHECK_ATTACKS if name in record["overfitting_check"])


def _by_epoch(records: Sequence[dict], attack: str) -> list:
    return [r["overfitting_check"][attack] for r in records]


def _per_epoch_and_seed(values: Sequence) -> np.ndarray:
    """[epochs] of floats or of per-seed lists -> [epochs, seeds]."""
    return np.atleast_2d(np.asarray(values, dtype=float).T).T


def catastrophic_overfitting_epoch(pgd_accuracy_by_epoch: Sequence[float | Sequence[float]]) -> int | None:
    """The first epoch (1-based) whose multi-step (PGD or APGD-CE) accuracy fell OVERFITTING_DROP below the best
    before it, or None.

    With several seeds, a drop in any seed counts.

    >>> catastrophic_overfitting_epoch([0.6, 0.7, 0.3])  # 3
    """
    history = _per_epoch_and_seed(pgd_accuracy_by_epoch)
    for epoch in range(1, len(history)):
        if np.any(history[epoch] < history[:epoch].max(axis=0) - OVERFITTING_DROP):
            return epoch + 1
    return None


def gradient_masking_epochs(
    fgsm_accuracy_by_epoch: Sequence[float | Sequence[float]], pgd_accuracy_by_epoch: Sequence[float | Sequence[float]]
) -> list[int]:
    """The epochs (1-based) whose FGSM accuracy exceeds their PGD accuracy by MASKING_GAP, in any seed.

    It catches what the drop rule cannot: a model that masks its gradient from
    the start and so never has a PGD accuracy to fall from. A list, because
    early epochs of a sound run can show the gap too (fast training of the CNN
    does; docs/results.md), and only the last epochs describe the model that
    training ends with.

    >>> gradient_masking_epochs([0.9, 0.9], [0.1, 0.8])  # [1]
    """
    fgsm, pgd = _per_epoch_and_seed(fgsm_accuracy_by_epoch), _per_epoch_and_seed(pgd_accuracy_by_epoch)
    return [epoch + 1 for epoch in range(len(pgd)) if np.any(fgsm[epoch] - pgd[epoch] > MASKING_GAP)]


def warn_if_overfitting(records: list[dict], log: Callable[[str], None]) -> None:
    """Logs, in the epoch it happens, a collapse of the multi-step attack's accuracy or a gap that says the
    gradient is masked.

    >>> warn_if_overfitting(records, print)  # 'WARNING: catastrophic overfitting in epoch 3: ...'
    """
    attack = check_attack(records[-1])
    fgsm, pgd = _by_epoch(records, "fgsm"), _by_epoch(records, attack)
    accuracy = f"{CHECK_ATTACKS[attack]} accuracy {np.mean(pgd[-1]):.3f}"
    epoch, now = len(records), f"{accuracy}, FGSM {np.mean(fgsm[-1]):.3f} on held-out images"
    if catastrophic_overfitting_epoch(pgd) == epoch:
        log(f"WARNING: catastrophic overfitting in epoch {epoch}: {now}; FGSM accuracy no longer measures robustness")
    elif epoch in gradient_masking_epochs(fgsm, pgd):
        log(f"WARNING: signs of gradient masking in epoch {epoch}: {now}; FGSM accuracy does not measure robustness")


def summary(records: list[dict]) -> dict | None:
    """The checks of every epoch and the first epoch each warning sign appeared (None: never), for summary.json."""
    if not records or "overfitting_check" not in records[0]:
        return None
    attack = check_attack(records[0])
    fgsm, strong, shown = _by_epoch(records, "fgsm"), _by_epoch(records, attack), CHECK_ATTACKS[attack]
    return {
        "epoch": catastrophic_overfitting_epoch(strong),
        "gradient_masking_epochs": gradient_masking_epochs(fgsm, strong),
        f"{attack}_accuracy_by_epoch": strong,
        "fgsm_accuracy_by_epoch": fgsm,
        "rule": (
            f"catastrophic overfitting: {shown} accuracy more than {OVERFITTING_DROP} below its best in an "
            f"earlier epoch; gradient masking: FGSM accuracy more than {MASKING_GAP} above {shown} accuracy"
        ),
    }


def check_per_seed(record: dict, num_seeds: int) -> list[float]:
    """An epoch's held-out accuracy under its multi-step attack (PGD or APGD-CE), one value per seed: what
    train.keep_best ranks epochs by.

    >>> check_per_seed({"overfitting_check": {"fgsm": 0.9, "pgd": [0.8, 0.7]}}, 2)  # [0.8, 0.7]
    """
    return [float(v) for v in seeds.per_seed(record["overfitting_check"][check_attack(record)], num_seeds)]


def best_epochs(records: list[dict], num_seeds: int) -> list[int]:
    """Per seed, the epoch of highest held-out accuracy under the check's multi-step attack, the latest of ties
    (as the checkpoint manager keeps).

    >>> best_epochs([{"overfitting_check": {"pgd": 0.8}}, {"overfitting_check": {"pgd": 0.7}}], 1)  # [1]
    """
    checks = np.array([check_per_seed(r, num_seeds) for r in records])
    return [int(len(records) - np.argmax(checks[::-1, seed])) for seed in range(num_seeds)]
