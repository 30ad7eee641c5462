"""Tests for advjax.overfitting: the per-epoch check, its warning signs, and the epochs keep-best picks."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from advjax import attack_specs, data, models, overfitting, robustness, runtime
from tests.helpers import mlp_apply, mlp_eval_set, mlp_params, tiny_config

# The check compiles folds of a tiny MLP (see tests/test_robustness.py).
pytestmark = pytest.mark.usefixtures("quick_compile_module")


def test_catastrophic_overfitting_epoch_finds_the_first_collapse():
    assert overfitting.catastrophic_overfitting_epoch([]) is None
    assert overfitting.catastrophic_overfitting_epoch([0.5]) is None
    assert overfitting.catastrophic_overfitting_epoch([0.5, 0.6, 0.55, 0.7]) is None  # small wiggles are not a collapse
    assert overfitting.catastrophic_overfitting_epoch([0.5, 0.8, 0.7, 0.1, 0.0]) == 4
    assert overfitting.catastrophic_overfitting_epoch([0.5, 0.29]) == 2
    # Per seed: one seed collapsing is enough.
    assert overfitting.catastrophic_overfitting_epoch([[0.6, 0.6], [0.7, 0.3]]) == 2
    assert overfitting.catastrophic_overfitting_epoch([[0.6, 0.6], [0.7, 0.5]]) is None


def test_gradient_masking_epochs_are_those_with_a_wide_fgsm_pgd_gap():
    assert overfitting.gradient_masking_epochs([0.6, 0.9], [0.5, 0.5]) == []
    # Fast training of BP at eps 0.3 (measured): FGSM high, PGD near zero from the first epoch on.
    assert overfitting.gradient_masking_epochs([0.62, 0.76], [0.02, 0.006]) == [1, 2]
    # Fast training of the CNN (measured): the gap closes as PGD accuracy rises.
    assert overfitting.gradient_masking_epochs([0.924, 0.906, 0.914], [0.032, 0.458, 0.728]) == [1]
    assert overfitting.gradient_masking_epochs([[0.5, 0.5], [0.5, 0.95]], [[0.4, 0.4], [0.4, 0.4]]) == [2]


def test_overfitting_check_is_fgsm_and_single_start_pgd_at_eps():
    params, es, key = mlp_params(), mlp_eval_set(), jax.random.key(5)
    check = overfitting.make_check(models.eval_apply(mlp_apply), 0.3, 3, form="chunked")(params, es, key)
    fgsm = robustness.make_robust_sweep(models.eval_apply(mlp_apply), attack_specs.AttackSpec("fgsm"), form="scan")(
        params, es, key, (0.3,)
    )
    pgd = robustness.make_robust_sweep(
        models.eval_apply(mlp_apply), attack_specs.AttackSpec("pgd", num_steps=3), form="scan"
    )(params, es, key, (0.3,))
    assert check == {"fgsm": pytest.approx(float(fgsm.accuracy[0])), "pgd": pytest.approx(float(pgd.accuracy[0]))}
    assert check["pgd"] <= check["fgsm"]


def test_best_epochs_take_the_latest_of_ties():
    records = [
        {"overfitting_check": {"pgd": [0.2, 0.5]}},
        {"overfitting_check": {"pgd": [0.7, 0.5]}},
        {"overfitting_check": {"pgd": [0.7, 0.6]}},
    ]
    assert overfitting.best_epochs(records, 2) == [3, 3]
    assert overfitting.best_epochs([{"overfitting_check": {"pgd": 0.9}}, {"overfitting_check": {"pgd": 0.4}}], 1) == [1]


def records_of(checks: list[tuple[float, float]]) -> list[dict]:
    return [{"epoch": e, "overfitting_check": {"fgsm": f, "pgd": p}} for e, (f, p) in enumerate(checks, 1)]


def test_summary_states_every_epochs_check_and_the_first_warning_signs():
    assert overfitting.summary([]) is None
    assert overfitting.summary([{"epoch": 1, "train_loss": 0.1}]) is None  # an ordinary run records no check
    summary = overfitting.summary(records_of([(0.6, 0.5), (0.9, 0.7), (0.95, 0.1)]))
    assert summary["epoch"] == 3 and summary["gradient_masking_epochs"] == [3]
    assert summary["pgd_accuracy_by_epoch"] == [0.5, 0.7, 0.1]
    assert summary["fgsm_accuracy_by_epoch"] == [0.6, 0.9, 0.95]
    assert str(overfitting.OVERFITTING_DROP) in summary["rule"] and str(overfitting.MASKING_GAP) in summary["rule"]


def test_a_warning_is_logged_in_the_epoch_of_a_collapse_or_of_masking():
    messages = []
    records = records_of([(0.6, 0.5), (0.9, 0.7), (0.95, 0.1)])
    for epoch in (1, 2):
        overfitting.warn_if_overfitting(records[:epoch], messages.append)
    assert messages == []  # a sound start
    overfitting.warn_if_overfitting(records, messages.append)
    assert len(messages) == 1 and messages[0].startswith(
        "WARNING: catastrophic overfitting in epoch 3: PGD accuracy 0.100"
    )
    messages.clear()
    overfitting.warn_if_overfitting(
        records_of([(0.9, 0.3)]), messages.append
    )  # masked from the start: nothing to fall from
    assert len(messages) == 1 and messages[0].startswith("WARNING: signs of gradient masking in epoch 1")


@pytest.mark.parametrize(
    "mode, examples, checked",
    [("ordinary", 500, False), ("gaussian", 500, False), ("fgsm", 0, False), ("fgsm", 50, True)],
)
def test_the_check_runs_for_adversarial_modes_only_and_not_when_switched_off(mode, examples, checked):
    config = tiny_config("bp", mode)
    config.train.overfitting_check_examples = examples
    validation = data.Split(np.zeros((60, 28, 28, 1), np.uint8), np.zeros(60, np.int32))
    apply_fn = models.eval_apply(models.build_model(config.model).apply)
    check = overfitting.make_configured_check(config, apply_fn, validation)
    assert (check is not None) == checked


# ----------------------------------------------------------------------------
# The check's multi-step attack as config: PGD (the default) or APGD-CE.


def test_an_apgd_ce_check_is_fgsm_and_the_folds_apgd_ce_at_eps_under_its_name(monkeypatch):
    params, es, key, apply_fn = mlp_params(), mlp_eval_set(), jax.random.key(5), models.eval_apply(mlp_apply)
    built = []  # the specs the check builds: on this tiny model PGD-3 and APGD-CE-3 happen to agree in accuracy
    spy = lambda fn, spec, **kwargs: built.append(spec) or robustness.make_robust_sweep(fn, spec, **kwargs)
    monkeypatch.setattr(overfitting, "make_robust_sweep", spy)
    check = overfitting.make_check(apply_fn, 0.3, 3, attack="apgd_ce", form="chunked")(params, es, key)
    assert built == [attack_specs.AttackSpec("fgsm"), attack_specs.AttackSpec("apgd_ce", num_steps=3)]
    apgd_ce = robustness.make_robust_sweep(apply_fn, built[1], form="scan")
    expected = float(apgd_ce(params, es, key, (0.3,)).accuracy[0])
    assert set(check) == {"fgsm", "apgd_ce"} and check["apgd_ce"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="must be one of \\('pgd', 'apgd_ce'\\), got 'bim'"):
        overfitting.make_check(apply_fn, 0.3, 3, attack="bim")


def test_the_configured_check_runs_the_configured_attack_with_its_steps(monkeypatch):
    made = []
    monkeypatch.setattr(overfitting, "make_check", lambda *args, **kwargs: made.append((args, kwargs)) or None)
    config = tiny_config("bp", "fgsm")
    config.train.overfitting_check_attack, config.train.overfitting_check_steps = "apgd_ce", 25
    validation = data.Split(np.zeros((60, 28, 28, 1), np.uint8), np.zeros(60, np.int32))
    overfitting.make_configured_check(config, models.eval_apply(models.build_model(config.model).apply), validation)
    ((args, kwargs),) = made
    assert args[1:] == (config.train.eps, 25) and kwargs["attack"] == "apgd_ce"


def test_apgd_ce_records_pick_epochs_warn_and_summarise_under_their_attacks_name():
    records = [
        {"epoch": e, "overfitting_check": {"fgsm": f, "apgd_ce": a}}
        for e, (f, a) in enumerate([(0.6, 0.5), (0.9, 0.7), (0.95, 0.1)], 1)
    ]
    assert overfitting.check_attack(records[0]) == "apgd_ce"
    assert overfitting.best_epochs(records, 1) == [2]
    assert overfitting.check_per_seed(records[1], 1) == [0.7]
    summary = overfitting.summary(records)
    assert summary["apgd_ce_accuracy_by_epoch"] == [0.5, 0.7, 0.1] and "pgd_accuracy_by_epoch" not in summary
    assert summary["epoch"] == 3 and "APGD-CE accuracy more than" in summary["rule"]
    messages = []
    overfitting.warn_if_overfitting(records, messages.append)
    assert messages == [
        "WARNING: catastrophic overfitting in epoch 3: APGD-CE accuracy 0.100, FGSM 0.950 on "
        "held-out images; FGSM accuracy no longer measures robustness"
    ]


def test_records_written_before_the_choice_read_as_pgd_and_keep_their_summary():
    old = records_of([(0.6, 0.5), (0.9, 0.7)])  # what every run wrote before train.overfitting_check_attack
    assert overfitting.check_attack(old[0]) == "pgd" and overfitting.best_epochs(old, 1) == [2]
    assert list(overfitting.summary(old)) == [
        "epoch",
        "gradient_masking_epochs",
        "pgd_accuracy_by_epoch",
        "fgsm_accuracy_by_epoch",
        "rule",
    ]
    assert overfitting.summary(old)["rule"] == (
        "catastrophic overfitting: PGD accuracy more than 0.2 below its best in an earlier epoch; "
        "gradient masking: FGSM accuracy more than 0.5 above PGD accuracy"
    )


@pytest.mark.parametrize("attack", ["pgd", "apgd_ce"])
def test_compile_ahead_compiles_the_checks_whole_attack(attack):
    # fit.fit compiles the check in a thread while the first epoch trains; the check after it then compiles
    # nothing but its batch slice.
    params, es, key = mlp_params(), mlp_eval_set(), jax.random.key(2)
    check = overfitting.make_check(models.eval_apply(mlp_apply), 0.3, 10, attack=attack, form="chunked")
    meter = runtime.CompileMeter().install()
    try:
        check.compile_ahead(jax.eval_shape(lambda p: p, params), es, key)
        ahead = len(meter.executables)
        check(params, es, key)
        later = [e["name"] for e in meter.executables[ahead:]]
    finally:
        meter.uninstall()
    assert ahead >= 2 and all("take_batch" in name for name in later), later
