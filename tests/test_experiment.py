"""train_and_evaluate on synthetic MNIST-format files: outputs, sweeps, seeds, determinism, guards."""

import json

import chex
import jax
import numpy as np
import pytest

import advjax
from advjax import experiment
from tests.conftest import synthetic_config

TIMING_FIELDS = ("epoch_seconds", "examples_per_second")


def _run(config, workdir):
    return experiment.train_and_evaluate(config, str(workdir), log=lambda message: None)


def _without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def test_summary_holds_every_split_perturbation_sweep_and_eps_table(tmp_path, synthetic_mnist_dir):
    config = synthetic_config(synthetic_mnist_dir)
    config.train.epochs = 2
    config.eval.sigma_grid = (0.0, 0.5, 1.0)
    config.eval.eps_grid = (0.0, 0.2)
    config.eval.table_eps = (0.05, 0.3)
    summary = _run(config, tmp_path)

    assert summary["accuracy"]["validation"]["clean"] > 0.5  # the synthetic digits are learnable
    assert [r["epoch"] for r in summary["epochs"]] == [1, 2]
    sweeps = summary["sweeps"]
    assert sweeps["split"] == "validation" and len(sweeps["gaussian"]["accuracy"]) == 3
    # sigma = 0 and eps = 0 leave the images unchanged: the sweep's first point is the clean accuracy.
    assert sweeps["gaussian"]["accuracy"][0] == summary["accuracy"]["validation"]["clean"]
    assert sweeps["fgsm"]["accuracy"][0] == summary["accuracy"]["validation"]["clean"]
    assert set(summary["by_eps"]) == {"0.05", "0.3"}
    strong, weak = (summary["by_eps"][e]["validation"]["accuracy"]["fgsm"] for e in ("0.3", "0.05"))
    assert strong <= weak
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["accuracy"] == summary["accuracy"]


def test_k_seeds_at_once_equal_k_separate_runs_and_differ_from_each_other(tmp_path, synthetic_mnist_dir):
    config = synthetic_config(synthetic_mnist_dir, mode="gaussian")  # noise too must differ per seed
    config.seed, config.num_seeds = 5, 3
    config.eval.sigma_grid = (0.0, 0.6)
    together = _run(config, tmp_path / "k3")
    restored = advjax.restore(str(tmp_path / "k3"))

    for i in range(3):
        single = synthetic_config(synthetic_mnist_dir, mode="gaussian")
        single.seed = 5 + i
        single.eval.sigma_grid = (0.0, 0.6)
        alone = _run(single, tmp_path / f"seed{5 + i}")
        params_alone = advjax.restore(str(tmp_path / f"seed{5 + i}")).params
        chex.assert_trees_all_close(jax.tree.map(lambda p: p[i], restored.params), params_alone, rtol=1e-4, atol=1e-5)
        for split, by_perturbation in alone["accuracy"].items():
            for name, value in by_perturbation.items():
                assert together["accuracy_per_seed"][split][name][i] == pytest.approx(value, abs=0.011), (split, name)
        np.testing.assert_allclose(together["sweeps"]["gaussian"]["accuracy_per_seed"][i], alone["sweeps"]["gaussian"]["accuracy"], atol=0.011)

    first_layer = np.asarray(restored.params["Dense_0"]["kernel"])
    assert not np.allclose(first_layer[0], first_layer[1]) and not np.allclose(first_layer[1], first_layer[2])
    per_seed = np.asarray(together["accuracy_per_seed"]["validation"]["clean"])
    assert together["accuracy"]["validation"]["clean"] == pytest.approx(per_seed.mean())
    assert together["accuracy_std"]["validation"]["clean"] == pytest.approx(per_seed.std())


def test_the_same_config_twice_gives_identical_metrics(tmp_path, synthetic_mnist_dir):
    config = synthetic_config(synthetic_mnist_dir, mode="fgsm")
    first, second = _run(config, tmp_path / "a"), _run(config, tmp_path / "b")
    assert _without_timing(first["epochs"]) == _without_timing(second["epochs"])
    assert first["accuracy"] == second["accuracy"]
    assert first["perturbation_stats"] == second["perturbation_stats"]


def test_an_absurd_learning_rate_stops_with_a_message_naming_the_epoch(tmp_path, synthetic_mnist_dir):
    config = synthetic_config(synthetic_mnist_dir)
    config.train.learning_rate = 1e30
    config.train.schedule = "constant"
    with pytest.raises(experiment.TrainingDiverged, match="epoch 1"):
        _run(config, tmp_path)
    assert not (tmp_path / "summary.json").exists()


def test_seed_keys_for_k_seeds_are_those_of_each_seed_alone():
    together = experiment.seed_keys(3, 2)
    for i in range(2):
        alone = experiment.seed_keys(3 + i, 1)
        for key_together, key_alone in zip(together, alone):
            np.testing.assert_array_equal(jax.random.key_data(key_together[i]), jax.random.key_data(key_alone))
