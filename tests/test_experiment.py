"""experiment.train_and_evaluate, the thin wiring of one run, on synthetic MNIST-format files: determinism,
and what an adversarial run records and reports besides training."""

import json

import pytest

from tests.helpers import TIMING_FIELDS, outputs, run_experiment, synthetic_config


@pytest.mark.slow
def test_the_same_config_twice_gives_byte_identical_metrics_and_summary(tmp_path, synthetic_mnist_dir):
    config = synthetic_config(synthetic_mnist_dir, mode="fgsm")
    config.train.epochs = 2
    run_experiment(config, tmp_path / "a")
    run_experiment(config, tmp_path / "b")
    assert outputs(tmp_path / "a") == outputs(tmp_path / "b")
    # Wall-clock times live apart, in timings.json, and nowhere else.
    for name in ("metrics.jsonl", "summary.json"):
        assert not any(field in (tmp_path / "a" / name).read_text() for field in TIMING_FIELDS)
    timings = json.loads((tmp_path / "a" / "timings.json").read_text())
    assert [t["epoch"] for t in timings["epochs"]] == [1, 2] and timings["evaluation_seconds"] > 0


@pytest.mark.slow
def test_adversarial_training_checks_robustness_each_epoch_and_reports_it(tmp_path, synthetic_mnist_dir):
    config = synthetic_config(synthetic_mnist_dir, "bp", "fast")
    config.train.epochs = 2
    config.train.eps = 0.3
    config.train.overfitting_check_examples = 100
    config.train.overfitting_check_steps = 3
    config.robust.enabled = True
    config.robust.num_examples = 150
    config.robust.batch_size = 50
    config.robust.eps_grid = (0.1, 0.3)
    config.robust.pgd_steps = 3
    config.robust.pgd_restarts = 2
    messages = []
    summary = run_experiment(config, tmp_path, log=messages.append)

    for record in summary["epochs"]:
        assert set(record["overfitting_check"]) == {"fgsm", "pgd"}
        assert record["overfitting_check"]["pgd"] <= record["overfitting_check"]["fgsm"] + 1e-9
    verdict = summary["overfitting_check"]
    assert len(verdict["pgd_accuracy_by_epoch"]) == 2 and "rule" in verdict
    robust = summary["robustness"]
    assert robust["num_examples"] == 150
    assert robust["attacks"]["pgd"]["num_steps"] == 3 and robust["attacks"]["pgd"]["num_restarts"] == 2
    assert all(
        w <= p + 1e-9 for w, p in zip(robust["worst_case"]["linf"]["accuracy"], robust["attacks"]["pgd"]["accuracy"])
    )
    assert "seconds" not in robust  # wall-clock times live in timings.json
    assert "pgd" in json.loads((tmp_path / "timings.json").read_text())["robustness_seconds"]


@pytest.mark.slow  # a whole run; tests/test_overfitting.py checks the rule without one
def test_ordinary_training_has_no_robustness_check(tmp_path, synthetic_mnist_dir):
    config = synthetic_config(synthetic_mnist_dir)
    summary = run_experiment(config, tmp_path)
    assert "overfitting_check" not in summary["epochs"][0]
    assert summary["overfitting_check"] is None and "robustness" not in summary
