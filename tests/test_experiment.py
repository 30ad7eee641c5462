"""experiment.train_and_evaluate, the thin wiring of one run, on synthetic MNIST-format files: determinism,
and what an adversarial run records and reports besides training."""

import json

import pytest

from tests.helpers import TIMING_FIELDS, outputs, run_experiment, synthetic_config

# Tiny runs: XLA's full optimisation passes cost more to compile than they save (as in the quick tier).
pytestmark = pytest.mark.usefixtures("quick_compile_module")


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


def learnable_cifar_dir(directory, per_batch: int = 240, num_test: int = 200):
    """CIFAR-10's binary layout (cifar-10-batches-bin/), written here: each class lights its own 8x8 block of
    its own channel over noise, so a small network learns it in an epoch."""
    import numpy as np

    from advjax import cifar
    from tests.test_cifar import record_bytes, write_batches_dir

    def batch(num, seed):
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, 10, num)
        planes = rng.integers(0, 80, (num, 3, 32, 32)).astype(np.uint8)
        for plane, label in zip(planes, labels):
            row, col = divmod(int(label), 4)
            plane[label % 3, 8 * row : 8 * row + 8, 8 * col : 8 * col + 8] = 255
        return record_bytes(planes, labels)

    files = {name: batch(per_batch, seed) for seed, name in enumerate(cifar.TRAIN_BATCHES)}
    return write_batches_dir(directory, files | {cifar.TEST_BATCH: batch(num_test, 99)})


@pytest.mark.slow  # BP here; tests/test_batchnorm.py runs the convolutional PreAct ResNet through the same pipeline
@pytest.mark.parametrize("model", ["bp"])
def test_train_attack_report_and_restore_run_on_synthetic_cifar10(tmp_path, model):
    import jax
    import numpy as np

    import advjax
    from advjax import data

    config = synthetic_config(learnable_cifar_dir(tmp_path / "data"), model, "fast")
    config.data.name, config.data.num_validation, config.train.epochs = "cifar10", 100, 3
    config.eval.num_train, config.eval.num_validation, config.eval.num_test = 100, 100, 200
    config.train.eps, config.eval.eps = 8 / 255, 8 / 255
    config.train.overfitting_check_examples, config.train.overfitting_check_steps = 50, 2
    config.robust.enabled, config.robust.num_examples, config.robust.batch_size = True, 100, 50
    config.robust.eps_grid, config.robust.pgd_steps, config.robust.pgd_restarts = (4 / 255, 8 / 255), 3, 1
    summary = run_experiment(config, tmp_path / "run")

    assert summary["data"]["name"] == "cifar10"
    assert summary["accuracy"]["test"]["clean"] > 0.5  # it learned the synthetic classes (chance: 0.1)
    assert summary["robustness"]["num_examples"] == 100 and "pgd" in summary["robustness"]["attacks"]
    restored = advjax.restore(str(tmp_path / "run"))
    first = restored.params["Dense_0" if model == "bp" else "Conv_0"]["kernel"]
    assert first.shape[0] == 32 * 32 * 3 if model == "bp" else first.shape[2] == 3
    test = data.load_mnist(restored.config.data).test
    logits = jax.jit(restored.apply_fn)(restored.params, data.to_float_images(test.images[:200]))
    assert logits.shape == (200, 10)
    accuracy = float(np.mean(np.argmax(logits, -1) == test.labels[:200]))
    assert accuracy == pytest.approx(summary["accuracy"]["test"]["clean"], abs=1e-6)
