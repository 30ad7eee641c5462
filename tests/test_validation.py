"""Config validation: every out-of-range field is refused, naming the field."""

import pathlib
import re

import pytest

from advjax import attack_specs, validation
from configs import default
from tests.helpers import small_robust_section, validate_robust

BAD_VALUES = [
    ("seed", -1),
    ("data.source", "imagenet"),
    ("data.num_validation", 0),
    ("data.num_validation", 60_000),
    ("model.name", "resnet"),
    ("model.init", "zeros"),
    ("model.hidden", ()),
    ("model.hidden", (256, -1)),
    ("model.dropout", 1.0),
    ("train.mode", "sgd"),  # not a training mode (pgd became one)
    ("train.fast_clip_start", "no"),
    ("train.nfgsm_noise", -1.0),
    ("train.nfgsm_step_size", "eps"),
    ("train.grad_align", -0.1),
    ("train.keep_best", "yes"),
    ("train.epochs", 0),
    ("train.epochs", 2.5),
    ("train.batch_size", 0),
    ("train.batch_size", 50_001),
    ("train.max_examples", -5),
    ("train.learning_rate", 0.0),
    ("train.learning_rate", -1e-3),
    ("train.schedule", "linear"),
    ("train.eps", -0.1),
    ("train.eps", 1.5),
    ("train.alpha", -0.1),
    ("train.alpha", 1.1),
    ("train.sigma", -0.3),
    ("train.loop", "pmap"),
    ("eval.loop", "while"),
    ("train.chunk_size", 0),
    ("eval.eps", -0.1),
    ("eval.sigma", -1.0),
    ("eval.use_predicted_labels", "yes"),
    ("eval.num_train", 0),
    ("eval.num_train", 50_001),
    ("eval.num_validation", 10_001),
    ("eval.num_test", 10_001),
    ("eval.batch_size", 0),
    # Wrong types that used to crash deep inside instead: a bare number where a list belongs, a path that is not text.
    ("model.hidden", 256),
    ("eval.sigma_grid", 0.5),
    ("eval.eps_grid", "0.1,0.2"),
    ("eval.table_eps", 0.1),
    ("data.dir", None),
    ("train.checkpoints_to_keep", 0),
]


def _with(path, value):
    config = default.get_config()
    section, _, field = path.rpartition(".")
    node = config[section] if section else config
    with node.ignore_type():
        node[field] = value
    return config


SHIPPED = sorted(
    p.stem
    for p in pathlib.Path(__file__).resolve().parents[1].joinpath("configs").glob("*.py")
    if p.stem not in ("__init__", "default", "paper")
)


def test_every_experiment_config_is_checked():
    assert {"bp", "cnn_adv", "cnn_pgd", "cnn_fast", "cnn_trades", "bp_trades"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_are_valid(name):
    module = __import__(f"configs.{name}", fromlist=["get_config"])
    validation.validate(module.get_config())


@pytest.mark.parametrize("path,value", BAD_VALUES, ids=[f"{p}={v!r}" for p, v in BAD_VALUES])
def test_bad_value_is_refused_naming_the_field(path, value):
    with pytest.raises(validation.ConfigError, match=f"config\\.{path}="):
        validation.validate(_with(path, value))


ROBUST_BAD_VALUES = [
    ("robust.enabled", "yes"),
    ("robust.split", "holdout"),
    ("robust.num_examples", 0),
    ("robust.batch_size", 0),
    ("robust.eps_grid", ()),  # the label-leaking check needs an L-inf eps
    ("robust.eps_grid", 0.3),
    ("robust.l2_eps_grid", (-1.0,)),
    ("robust.attacks", ("pgd", "cw")),
    ("robust.attacks", "pgd"),
    ("robust.pgd_steps", 0),
    ("robust.pgd_restarts", 0),
    ("robust.pgd_step_size", -0.01),
    ("robust.pgd_step_size", float("inf")),
    ("robust.pgd_protocol", "madry"),
    ("robust.deepfool_max_iter", 0),
    ("robust.chunk_size", 0),
]


def test_every_robust_field_has_a_bad_value_below():
    assert {path for path, _ in ROBUST_BAD_VALUES} == {path for path in validation.RULES if path.startswith("robust.")}


@pytest.mark.parametrize("path,value", ROBUST_BAD_VALUES, ids=[f"{p}={v!r}" for p, v in ROBUST_BAD_VALUES])
def test_each_robust_field_is_refused_naming_it(path, value):
    with pytest.raises(validation.ConfigError, match=re.escape(f"config.{path}={value!r} is invalid")):
        validation.validate(_with(path, value))


@pytest.mark.parametrize("l2_attack", ["fgm_l2", "pgd_l2", "deepfool"])
def test_an_empty_l2_eps_grid_is_refused_when_an_l2_attack_is_listed(l2_attack):
    config = default.get_config()
    config.robust.attacks = ("fgsm", l2_attack)
    config.robust.l2_eps_grid = ()
    with pytest.raises(validation.ConfigError, match=f"config.robust.l2_eps_grid is empty .*'{l2_attack}'"):
        validation.validate(config)
    config.robust.attacks = tuple(n for n, norm in attack_specs.ATTACK_NORMS.items() if norm == "linf")
    validation.validate(config)  # L-inf attacks alone need no L2 eps


def test_train_batch_larger_than_the_shrunk_training_set_is_refused():
    config = default.get_config()
    config.train.max_examples = 100
    with pytest.raises(validation.ConfigError, match="config.train.batch_size=128"):
        validation.validate(config)


def test_missing_section_field_is_named():
    config = default.get_config()
    del config.eval["eps"]
    with pytest.raises(validation.ConfigError, match="config.eval.eps is missing"):
        validation.validate(config)


def test_boundary_values_are_accepted():
    config = default.get_config()
    config.train.alpha = 0.0
    config.train.eps = 0.0
    config.eval.sigma = 0.0
    validation.validate(config)
    config.train.alpha = 1.0
    validation.validate(config)


@pytest.mark.parametrize(
    "mode, check_examples, message",
    [
        ("ordinary", 500, "needs an adversarial train.mode"),
        ("fast", 0, "overfitting_check_examples > 0"),
    ],
)
def test_keep_best_needs_the_per_epoch_pgd_check(mode, check_examples, message):
    config = default.experiment("bp", mode)
    config.train.keep_best = True
    config.train.overfitting_check_examples = check_examples
    with pytest.raises(validation.ConfigError, match=message):
        validation.validate(config)
    config.train.keep_best = False
    validation.validate(config)


def test_report_rejects_bad_sections():
    section = small_robust_section()
    section.attacks = ("pgd", "cw")
    with pytest.raises(ValueError, match="config.robust.attacks"):
        validate_robust(section)
    section = small_robust_section()
    section.l2_eps_grid = ()
    with pytest.raises(ValueError, match="l2_eps_grid"):
        validate_robust(section)
