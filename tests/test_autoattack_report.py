"""Tests for advjax.autoattack_report: AutoAttack's cascade in the robustness report, summary.json, the log and
the printed table."""

import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import advjax
from advjax import (
    apgd,
    attack_specs,
    auto_attack,
    autoattack_report,
    data,
    evaluators,
    models,
    report,
    robustness,
    seeds,
    train,
)
from advjax.validation import ConfigError, validate
from configs import default
from tests.helpers import mlp_apply, mlp_dataset, mlp_eval_set, mlp_params, synthetic_config

pytestmark = pytest.mark.usefixtures("quick_compile_module")

BUDGETS = {"autoattack_steps": 3, "autoattack_queries": 10}
NUM_EXAMPLES = 24
# At this eps the random BP below keeps about half of its examples through APGD-CE and fewer after.
EPS = 0.002


# ----------------------------------------------------------------------------
# The pure parts: summary, worst case, flags, table.


STAGES = autoattack_report.stages("standard")


def fake_cascades(num_seeds: int, num_eps: int = 2, n: int = 8, stages=STAGES) -> autoattack_report.Cascades:
    rng = np.random.default_rng(num_seeds)
    robust = np.ones((num_seeds, len(stages), num_eps, n), bool)
    for s in range(1, len(stages)):
        robust[:, s] = robust[:, s - 1] & (rng.random((num_seeds, num_eps, n)) < 0.8)
    return autoattack_report.Cascades(robust, [{"seed": 0, "eps": [0.1], "flag": "zero gradients"}], 1.0)


def section_with_autoattack(**overrides):
    section = default.get_config().robust
    section.attacks = ("fgsm", "autoattack")
    section.eps_grid = (0.1, 0.3)
    for name, value in {**BUDGETS, **overrides}.items():
        section[name] = value
    return section


@pytest.mark.parametrize("num_seeds", [1, 2])
def test_the_summary_entry_has_each_stage_at_each_eps_in_the_seed_summary_form(num_seeds):
    cascades = fake_cascades(num_seeds)
    entry = autoattack_report.autoattack_summary(cascades, section_with_autoattack(), num_seeds)
    assert (entry["version"], entry["norm"], entry["eps"], entry["num_examples"]) == ("standard", "linf", [0.1, 0.3], 8)
    assert (entry["num_steps"], entry["num_queries"]) == (3, 10)
    assert list(entry["stages"]) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    for s, stage in enumerate(entry["stages"].values()):
        assert set(stage) == {"accuracy", "accuracy_std", "accuracy_per_seed"}
        assert len(stage["accuracy"]) == 2 and np.shape(stage["accuracy_per_seed"]) == (num_seeds, 2)
        np.testing.assert_allclose(stage["accuracy_per_seed"], cascades.robust[:, s].mean(-1))
    assert entry["flags"] == cascades.flags


def test_the_plus_version_reports_its_six_attacks_in_the_references_order():
    plus = autoattack_report.stages("plus")
    assert plus == ("clean", "apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
    section = section_with_autoattack(autoattack_version="plus")
    entry = autoattack_report.autoattack_summary(fake_cascades(1, stages=plus), section, 1)
    assert entry["version"] == "plus" and tuple(entry["stages"]) == plus
    config = default.get_config()
    config.robust.attacks, config.robust.autoattack_version = ("autoattack",), "plus"
    validate(config)


def test_flags_are_grouped_per_seed_and_flag_over_eps_and_logged_naming_both():
    raised = [(3, 0.1, "zero"), (3, 0.3, "zero"), (4, 0.1, "zero"), (3, 0.3, "square")]
    grouped = autoattack_report.group_flags(raised)
    assert grouped == [
        {"seed": 3, "eps": [0.1, 0.3], "flag": "zero"},
        {"seed": 4, "eps": [0.1], "flag": "zero"},
        {"seed": 3, "eps": [0.3], "flag": "square"},
    ]
    lines = autoattack_report.flag_lines({"flags": grouped})
    assert lines[0] == "warning: AutoAttack, seed 3, eps 0.1, 0.3: zero"
    assert len(lines) == 3 and all(line.startswith("warning: ") for line in lines)


@pytest.mark.parametrize("num_seeds", [1, 2])
def test_the_final_set_has_the_reports_seed_shape(num_seeds):
    cascades = fake_cascades(num_seeds)
    final = autoattack_report.final_robust(cascades, num_seeds)
    assert final.shape == seeds.seed_shape(num_seeds) + (2, 8)
    np.testing.assert_array_equal(seeds.per_seed(final, num_seeds), cascades.robust[:, -1])


def test_eval_examples_are_the_real_examples_as_floats_without_padding():
    images, labels = autoattack_report.eval_examples(mlp_eval_set())
    raw_images, raw_labels = mlp_dataset()
    assert images.shape == (21, 6, 6, 1) and images.dtype == jnp.float32
    np.testing.assert_array_equal(images, data.to_float_images(jnp.asarray(raw_images[:21])))
    np.testing.assert_array_equal(labels, raw_labels[:21])


def test_autoattack_is_a_robust_attack_name_that_the_specs_leave_to_this_module():
    config = default.get_config()
    config.robust.attacks = ("fgsm", "pgd", "autoattack")
    validate(config)
    assert set(attack_specs.attack_specs(config.robust)) == {"fgsm", "pgd"}
    assert autoattack_report.requested(config.robust) and not autoattack_report.requested(default.get_config().robust)


@pytest.mark.parametrize(
    "path, value",
    [
        ("robust.autoattack_version", "rand"),
        ("robust.autoattack_steps", 0),
        ("robust.autoattack_queries", -1),
        ("robust.autoattack_queries", 2.5),
        ("robust.attacks", ("autoattack", "auto_attack")),
    ],
)
def test_bad_autoattack_settings_are_one_error_naming_the_field(path, value):
    config = default.get_config()
    config.robust.attacks = ("autoattack",)
    section, field = path.split(".")
    with config[section].ignore_type():  # as a command line or a config file could set it
        config[section][field] = value
    with pytest.raises(ConfigError, match=re.escape(f"config.{path}={value!r} is invalid")) as error:
        validate(config)
    assert "\n" not in str(error.value)


def test_the_printed_table_names_each_stage_with_its_image_count_and_the_flags():
    entry = autoattack_report.autoattack_summary(fake_cascades(1), section_with_autoattack(), 1)
    worst = {"linf": {"eps": [0.1, 0.3], "accuracy": [0.5, 0.25], "over": ["clean", "fgsm", "autoattack"]}}
    table = report.robustness_table({"num_examples": 8, "attacks": {}, "worst_case": worst, "autoattack": entry})
    rows = [line for line in table.splitlines() if line.startswith("| autoattack")]
    assert [row.split(" | ")[0].split()[-1] for row in rows] == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    assert rows[0].startswith("| autoattack (standard, 3 steps, 10 queries): clean | linf | 8 | ")
    square = entry["stages"]["square"]["accuracy"]
    assert rows[-1] == f"| autoattack: clean to square | linf | 8 | {square[0]:.4f} @ 0.1, {square[1]:.4f} @ 0.3 |"
    assert "| worst case over clean, fgsm, autoattack | linf | 8 |" in table
    assert table.splitlines()[-1] == "AutoAttack flag (seed 0, eps 0.1): zero gradients"


# ----------------------------------------------------------------------------
# The worst case takes the report's own runs and the cascade's final set: no attack runs twice.


def test_the_worst_case_with_autoattack_is_the_reports_runs_and_the_final_set_and_pgd_runs_once(monkeypatch):
    """evaluators.robust on a tiny MLP, with the cascades stood in for by a fixed robust set (their wiring is
    tested end to end below): the report's sweeps are recorded as they run."""
    config = default.get_config()
    config.robust.enabled, config.robust.split = True, "test"
    config.robust.attacks, config.robust.eps_grid = ("fgsm", "pgd", "autoattack"), (0.1, 0.3)
    config.robust.pgd_steps, config.robust.pgd_restarts, config.robust.num_examples = 2, 2, 21
    config.robust.batch_size, config.eval.loop = 8, "chunked"
    validate(config)
    images, labels = mlp_dataset()
    split = data.Split(images[:21], labels[:21])
    mnist = data.MNIST(split, split, split)
    cascades = fake_cascades(1, num_eps=2, n=21)
    monkeypatch.setattr(autoattack_report, "run_cascades", lambda *args, **kwargs: cascades)
    ran = []  # (spec, result) of every sweep the report builds and runs

    def spy(apply_fn, spec, **kwargs):
        sweep = original(apply_fn, spec, **kwargs)
        return lambda *args: ran.append((spec, sweep(*args))) or ran[-1][1]

    original = robustness.make_robust_sweep
    monkeypatch.setattr(robustness, "make_robust_sweep", spy)
    ctx = evaluators.Context(
        config, models.eval_apply(mlp_apply), mlp_params(), mnist, None, {}, {}, jax.random.key(5), None
    )
    report = evaluators.robust(ctx)["robustness"]

    assert [spec.name for spec, _ in ran].count("pgd") == 1  # PGD's sweep is built and run once
    by_run = dict(zip(["clean", "fgsm", "pgd", "fgsm_predicted_labels"], (result.correct for _, result in ran)))
    assert [spec for spec, _ in ran][3].use_predicted_labels
    final = cascades.robust[0, -1]  # [G, N]
    without = robustness.worst_case_correct(by_run).mean(-1)
    expected = robustness.worst_case_correct({**by_run, "autoattack": final}).mean(-1)
    worst = report["worst_case"]["linf"]
    assert worst["accuracy"] == expected.tolist() and worst["over"] == [*by_run, "autoattack"]
    assert np.any(expected < without)  # the final set fools examples the report's runs left: the check has teeth
    assert report["autoattack"]["stages"]["square"]["accuracy"] == final.mean(-1).tolist()
    assert report["seconds"]["autoattack"] == cascades.seconds and "autoattack_worst_case" not in report["seconds"]


def test_extra_linf_of_a_wrong_shape_or_a_run_s_name_is_refused():
    section = default.get_config().robust
    section.attacks, section.eps_grid = ("fgsm",), (0.1, 0.3)
    apply_fn, params, eval_set, key = models.eval_apply(mlp_apply), mlp_params(), mlp_eval_set(), jax.random.key(5)
    for extra in ({"autoattack": np.ones((2, 20), bool)}, {"fgsm": np.ones((2, 21), bool)}):
        with pytest.raises(ValueError, match="extra_linf"):
            robustness.robustness_report(apply_fn, params, eval_set, key, section, "chunked", extra_linf=extra)


# ----------------------------------------------------------------------------
# The config path, end to end through evaluate_trained, on a random BP and 24 synthetic test images.


@pytest.fixture(scope="module")
def one_target():
    """APGD-T and FAB-T on one target class instead of nine: the wiring is under test, not the attacks."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(apgd, "STANDARD_TARGET_RANKS", (2,))
        yield


def evaluated(synthetic_mnist_dir, num_seeds: int, eps_grid: tuple, probabilities: bool = False):
    """(config, apply_fn, params, mnist, results, log lines): evaluate_trained with AutoAttack listed.

    The test labels are seed 0's predictions, so every example starts robust for seed 0."""
    config = synthetic_config(synthetic_mnist_dir)
    config.model.hidden, config.num_seeds = (32,), num_seeds
    config.robust.enabled, config.robust.attacks, config.robust.eps_grid = True, ("fgsm", "autoattack"), eps_grid
    config.robust.num_examples, config.robust.batch_size = NUM_EXAMPLES, 12
    config.robust.update(BUDGETS)
    validate(config)
    model = models.build_model(config.model)
    apply_fn = models.eval_apply(model.apply)
    if probabilities:
        apply_fn = lambda p, x, logits=apply_fn: jax.nn.softmax(logits(p, x))  # AutoAttack flags these
    init = seeds.map_over_seeds(lambda key: train.init_params(key, model), num_seeds)
    params = init(seeds.seed_keys(1, num_seeds)[0])
    mnist = data.load_mnist(config.data)
    first = seeds.select_seed(params, 0, num_seeds)
    predicted = np.asarray(jnp.argmax(apply_fn(first, data.to_float_images(jnp.asarray(mnist.test.images))), -1))
    mnist = mnist._replace(test=mnist.test._replace(labels=predicted.astype(np.int32)))
    lines = []
    results = evaluators.evaluate_trained(config, apply_fn, params, mnist, log=lines.append)
    return config, apply_fn, params, mnist, results, lines


@pytest.mark.slow  # two AutoAttack cascades compiled
def test_one_seed_summary_stages_worst_case_and_the_direct_call_agree(synthetic_mnist_dir, one_target, monkeypatch):
    calls = []
    spy = lambda *args, original=auto_attack.autoattack, **kwargs: (
        calls.append((args, kwargs)) or original(*args, **kwargs)
    )
    monkeypatch.setattr(auto_attack, "autoattack", spy)
    config, apply_fn, params, mnist, results, _ = evaluated(synthetic_mnist_dir, 1, (0.0, EPS))
    robust = results["robustness"]
    entry = robust["autoattack"]
    assert (entry["eps"], entry["num_examples"], entry["num_steps"], entry["num_queries"]) == ([0.0, EPS], 24, 3, 10)
    stages = np.array([entry["stages"][s]["accuracy"] for s in STAGES])  # [stage, G]
    assert np.all(np.diff(stages, axis=0) <= 0), stages  # cumulative: no stage gives a point back
    assert np.all(stages[:, 0] == 1.0)  # eps 0: nothing to attack, every stage is the clean set
    assert stages[-1, 1] < 1.0  # the cascade fools some at EPS: the comparisons below have teeth

    # The same images and key through advjax.autoattack directly: the report adds nothing and loses nothing.
    robust_key = jax.random.fold_in(seeds.seed_keys(config.seed, 1)[3], 3)  # evaluate_trained's robustness key
    key = jax.random.fold_in(robust_key, zlib.crc32(b"autoattack"))
    images = data.to_float_images(jnp.asarray(mnist.test.images[:NUM_EXAMPLES]))
    labels = jnp.asarray(mnist.test.labels[:NUM_EXAMPLES])
    direct = advjax.autoattack(
        lambda x: apply_fn(params, x), images, labels, eps=EPS, key=key, num_steps=3, num_queries=10
    )
    assert [float(direct.robust[s].mean()) for s in STAGES] == stages[:, 1].tolist()
    # The accuracies alone could agree by chance: the report's one call (eps 0 needs none) took these very inputs.
    ((args, kwargs),) = calls
    np.testing.assert_array_equal(args[1], images)
    np.testing.assert_array_equal(args[2], labels)
    assert (kwargs["eps"], kwargs["num_steps"], kwargs["num_queries"], kwargs["version"]) == (EPS, 3, 10, "standard")
    np.testing.assert_array_equal(jax.random.key_data(kwargs["key"]), jax.random.key_data(key))
    assert [f["flag"] for f in entry["flags"]] == direct.flags

    worst = robust["worst_case"]["linf"]
    assert worst["over"][-1] == "autoattack" and "autoattack" not in worst["over"][:-1]
    assert worst["accuracy"][1] <= min(stages[-1, 1], robust["attacks"]["fgsm"]["accuracy"][1])
    assert "autoattack" in robust["seconds"]


@pytest.mark.slow  # two AutoAttack cascades compiled
def test_two_seeds_give_per_seed_stages_and_each_seeds_flags_in_the_summary_and_the_log(
    synthetic_mnist_dir, one_target
):
    *_, results, lines = evaluated(synthetic_mnist_dir, 2, (EPS,), probabilities=True)
    entry = results["robustness"]["autoattack"]
    for stage in STAGES:
        summary = entry["stages"][stage]
        assert len(summary["accuracy"]) == 1 and np.shape(summary["accuracy_per_seed"]) == (2, 1)
        assert summary["accuracy"][0] == pytest.approx(np.mean(summary["accuracy_per_seed"]))
    assert np.shape(results["robustness"]["worst_case"]["linf"]["accuracy_per_seed"]) == (2, 1)
    probability_flags = [f for f in entry["flags"] if "probabilities" in f["flag"]]
    assert [(f["seed"], f["eps"]) for f in probability_flags] == [(0, [EPS]), (1, [EPS])]  # seeds seed..seed+1
    warnings = [line for line in lines if line.startswith("warning: AutoAttack") and "probabilities" in line]
    assert warnings[0].startswith(f"warning: AutoAttack, seed 0, eps {EPS:g}: ") and len(warnings) == 2
    # Progress: a line after each attack of each seed's cascade, naming seed, eps and the robust count.
    progress = [line for line in lines if line.startswith(f"seed 1, eps {EPS:g}: AutoAttack ")]
    assert [line.split()[5].rstrip(":") for line in progress] == list(STAGES[1:])
    assert all(f"of {NUM_EXAMPLES} still robust" in line for line in progress)
