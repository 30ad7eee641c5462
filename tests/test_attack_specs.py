"""Tests for advjax.attack_specs: specs that would compute something else are refused, and config.robust's
attacks and PGD protocol as specs."""

from __future__ import annotations

import inspect

import jax
import pytest

from advjax import attack_registry, attack_specs, models, robustness
from configs import default
from tests.helpers import mlp_apply, mlp_eval_set, mlp_params, small_robust_section, validate_robust

# The protocol's report compiles folds of a tiny MLP (see tests/test_robustness.py).
pytestmark = pytest.mark.usefixtures("quick_compile_module")


@pytest.mark.parametrize(
    "spec, message",
    [
        (attack_specs.AttackSpec("cw"), "unknown attack"),
        (attack_specs.AttackSpec("fgsm", num_restarts=2), "restarts need a random start"),
        (attack_specs.AttackSpec("pgd", num_restarts=3, random_start=False), "restarts need a random start"),
        (attack_specs.AttackSpec("fgsm", step_size=0.1), "takes no step size"),
        (attack_specs.AttackSpec("pgd", step_size=0.1, relative_step_size=0.1), "not both"),
        (attack_specs.AttackSpec("fgm_l2", num_steps=5), "one-step attack"),
        (attack_specs.AttackSpec("pgd", restart_selection="max"), "restart_selection must be one of"),
        (attack_specs.AttackSpec("fgsm", stop_on_success=True), "one-step attack"),
    ],
)
def test_specs_that_would_compute_something_else_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        robustness.make_robust_sweep(models.eval_apply(mlp_apply), spec)


def test_config_section_defaults_are_valid():
    section = default.get_config().robust
    validate_robust(section)
    assert section.enabled is False and section.split in ("train", "validation", "test")
    assert set(attack_specs.attack_specs(section)) == set(section.attacks)


@pytest.mark.slow
def test_pgd_protocol_selects_wong_et_al_s_evaluation_and_the_report_states_it():
    section = small_robust_section()
    assert attack_specs.attack_specs(section)["pgd"].restart_selection == "success_first"
    section.pgd_protocol = "wong2020"
    spec = attack_specs.attack_specs(section)["pgd"]
    assert (spec.restart_selection, spec.stop_on_success) == ("highest_loss", True)
    report = robustness.robustness_report(
        models.eval_apply(mlp_apply), mlp_params(), mlp_eval_set(), jax.random.key(0), section, "chunked"
    )
    assert (report["attacks"]["pgd"]["restart_selection"], report["attacks"]["pgd"]["stop_on_success"]) == (
        "highest_loss",
        True,
    )
    section.pgd_protocol = "madry"
    with pytest.raises(ValueError, match="config.robust.pgd_protocol='madry'"):
        validate_robust(section)


def test_an_unset_step_count_or_size_is_the_attacks_own_default():
    default_steps = lambda name, parameter: (
        inspect.signature(attack_registry.ATTACKS[name]).parameters[parameter].default
    )
    assert attack_specs.num_steps(attack_specs.AttackSpec("fgsm")) == 1
    assert attack_specs.num_steps(attack_specs.AttackSpec("pgd")) == default_steps("pgd", "num_steps")
    assert attack_specs.num_steps(attack_specs.AttackSpec("deepfool")) == default_steps("deepfool", "max_iter")
    assert attack_specs.num_steps(attack_specs.AttackSpec("bim", num_steps=7)) == 7
    pgd = attack_specs.AttackSpec("pgd", num_steps=10)
    assert attack_specs.step_size(pgd, 0.3) == pytest.approx(2.5 * 0.3 / 10)
    assert attack_specs.step_size(pgd._replace(step_size=0.01), 0.3) == 0.01
    assert attack_specs.step_size(pgd._replace(relative_step_size=0.1), 0.3) == pytest.approx(0.03)
    assert attack_specs.describe_step_size(attack_specs.AttackSpec("fgsm")) is None
    assert attack_specs.describe_step_size(pgd) == "2.5 * eps / num_steps"
    assert attack_specs.describe_step_size(pgd._replace(relative_step_size=0.1)) == "0.1 * eps"
    assert attack_specs.describe_step_size(attack_specs.AttackSpec("fgsm_random_start")) == "1.25 * eps"


def test_config_robust_attacks_become_specs():
    section = default.get_config().robust
    section.attacks = ("fgsm", "bim", "pgd", "pgd_l2", "deepfool")
    section.pgd_steps, section.pgd_restarts, section.pgd_step_size, section.deepfool_max_iter = 7, 3, 0.02, 9
    specs = attack_specs.attack_specs(section)
    assert list(specs) == list(section.attacks)
    assert specs["fgsm"] == attack_specs.AttackSpec("fgsm")
    assert specs["bim"] == attack_specs.AttackSpec("bim", num_steps=7, step_size=0.02, random_start=False)
    assert specs["pgd"] == attack_specs.AttackSpec("pgd", num_steps=7, num_restarts=3, step_size=0.02)
    # The absolute step is in L-inf pixels: L2 PGD keeps its relative default.
    assert specs["pgd_l2"] == attack_specs.AttackSpec("pgd_l2", num_steps=7, num_restarts=3)
    assert specs["deepfool"] == attack_specs.AttackSpec("deepfool", num_steps=9)
    for spec in specs.values():
        attack_specs.check_spec(spec)
    section.pgd_step_size = 0.0  # 0: the 2.5 eps / steps default
    assert attack_specs.attack_specs(section)["pgd"].step_size is None
    section.pgd_protocol = "wong2020"  # Wong et al.'s evaluation, for PGD but not for BIM
    wong = attack_specs.attack_specs(section)
    assert (wong["pgd"].restart_selection, wong["pgd"].stop_on_success) == ("highest_loss", True)
    assert (wong["pgd_l2"].restart_selection, wong["pgd_l2"].stop_on_success) == ("highest_loss", True)
    assert (wong["bim"].restart_selection, wong["bim"].stop_on_success) == ("success_first", False)


@pytest.mark.parametrize(
    "spec, message",
    [
        (attack_specs.AttackSpec("apgd_ce", step_size=0.1), "takes no step size .APGD adapts its own"),
        (attack_specs.AttackSpec("apgd_ce", relative_step_size=0.1), "takes no step size"),
        (attack_specs.AttackSpec("apgd_ce", stop_on_success=True), "stop_on_success False"),
        (attack_specs.AttackSpec("apgd_ce", random_start=False), "random_start must be True"),
        (attack_specs.AttackSpec("apgd_ce", num_steps=0), "num_steps must be at least 1"),
        (attack_specs.AttackSpec("apgd_ce", num_restarts=0), "num_restarts must be at least 1"),
    ],
)
def test_apgd_ce_specs_that_would_compute_something_else_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        robustness.make_robust_sweep(models.eval_apply(mlp_apply), spec)


def test_apgd_ce_is_an_iterative_linf_attack_with_restarts_and_its_own_step_rule():
    default_steps = inspect.signature(attack_registry.ATTACKS["apgd_ce"]).parameters["num_steps"].default
    assert attack_specs.num_steps(attack_specs.AttackSpec("apgd_ce")) == default_steps == 100
    assert "apgd_ce" in attack_specs.NAMES and "apgd_ce" in attack_specs.ITERATIVE
    assert attack_specs.ATTACK_NORMS["apgd_ce"] == "linf"
    attack_specs.check_spec(attack_specs.AttackSpec("apgd_ce", num_steps=25, num_restarts=3))
    assert "2 * eps" in attack_specs.describe_step_size(attack_specs.AttackSpec("apgd_ce"))


def test_config_robust_apgd_ce_takes_pgds_step_and_restart_counts_and_is_a_valid_robust_attack():
    section = default.get_config().robust
    section.attacks, section.pgd_steps, section.pgd_restarts = ("fgsm", "apgd_ce"), 25, 2
    section.pgd_protocol = "wong2020"  # PGD's protocol options do not apply to APGD
    validate_robust(section)
    assert attack_specs.attack_specs(section)["apgd_ce"] == attack_specs.AttackSpec(
        "apgd_ce", num_steps=25, num_restarts=2
    )
