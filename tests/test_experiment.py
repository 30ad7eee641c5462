"""train_and_evaluate on synthetic MNIST-format files: outputs, sweeps, seeds, determinism, resume, guards."""

import json

import chex
import jax
import numpy as np
import pytest

import advjax
from advjax import checkpoint, data, evaluators, experiment, fit, models, overfitting, seeds, train, workdir
from configs import default
from tests.conftest import synthetic_config

TIMING_FIELDS = ("epoch_seconds", "examples_per_second", "evaluation_seconds")


def _run(config, run_dir, log=lambda message: None, **kwargs):
    return experiment.train_and_evaluate(config, str(run_dir), log=log, **kwargs)


def _outputs(run_dir) -> dict[str, bytes]:
    """The files whose bytes must not depend on timing, interruption or resumption."""
    return {name: (run_dir / name).read_bytes() for name in ("metrics.jsonl", "summary.json", "config.json")}


class Interrupted(Exception):
    """Stands in for a kill: raised from the log line of an epoch, after its checkpoint was written."""


def interrupt_after_epoch(epoch: int, messages: list):
    def log(message: str) -> None:
        messages.append(message)
        if message.startswith(f"epoch {epoch}/"):
            raise Interrupted(message)

    return log


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
        np.testing.assert_allclose(
            together["sweeps"]["gaussian"]["accuracy_per_seed"][i], alone["sweeps"]["gaussian"]["accuracy"], atol=0.011
        )

    first_layer = np.asarray(restored.params["Dense_0"]["kernel"])
    assert not np.allclose(first_layer[0], first_layer[1]) and not np.allclose(first_layer[1], first_layer[2])
    per_seed = np.asarray(together["accuracy_per_seed"]["validation"]["clean"])
    assert together["accuracy"]["validation"]["clean"] == pytest.approx(per_seed.mean())
    assert together["accuracy_std"]["validation"]["clean"] == pytest.approx(per_seed.std())


def test_the_same_config_twice_gives_byte_identical_metrics_and_summary(tmp_path, synthetic_mnist_dir):
    config = synthetic_config(synthetic_mnist_dir, mode="fgsm")
    config.train.epochs = 2
    _run(config, tmp_path / "a")
    _run(config, tmp_path / "b")
    assert _outputs(tmp_path / "a") == _outputs(tmp_path / "b")
    # Wall-clock times live apart, in timings.json, and nowhere else.
    for name in ("metrics.jsonl", "summary.json"):
        assert not any(field in (tmp_path / "a" / name).read_text() for field in TIMING_FIELDS)
    timings = json.loads((tmp_path / "a" / "timings.json").read_text())
    assert [t["epoch"] for t in timings["epochs"]] == [1, 2] and timings["evaluation_seconds"] > 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax, on the damaged checkpoint
def test_an_interrupted_run_resumes_and_ends_exactly_as_an_uninterrupted_one(tmp_path, synthetic_mnist_dir):
    config = synthetic_config(synthetic_mnist_dir, mode="gaussian")  # noise: the keys must follow too
    config.train.epochs = 3
    config.train.batch_size = 128  # 7 steps: the cosine schedule and Adam's count must resume mid-decay
    _run(config, tmp_path / "whole")

    first = []
    with pytest.raises(Interrupted):
        _run(config, tmp_path / "cut", log=interrupt_after_epoch(2, first))
    assert not (tmp_path / "cut" / "summary.json").exists()
    # A damaged newest checkpoint: the run must fall back to epoch 1's and
    # trust it, not the metrics file, which then holds an epoch more.
    for path in (tmp_path / "cut" / "checkpoints" / "2" / checkpoint.STATE_ITEM).rglob("*"):
        if path.is_file():
            path.write_bytes(b"")
    second = []
    _run(config, tmp_path / "cut", log=second.append)

    assert any(m.startswith("resumed after epoch 1/3") for m in second)
    assert not any(m.startswith("epoch 1/") for m in second)  # epoch 1 is not trained again
    assert _outputs(tmp_path / "cut") == _outputs(tmp_path / "whole")
    chex.assert_trees_all_equal(
        advjax.restore(str(tmp_path / "cut")).params, advjax.restore(str(tmp_path / "whole")).params
    )
    timings = json.loads((tmp_path / "cut" / "timings.json").read_text())
    assert [t["epoch"] for t in timings["epochs"]] == [1, 2, 3]


def test_a_finished_run_relaunched_skips_training_and_writes_the_same_summary(tmp_path, synthetic_mnist_dir):
    config = synthetic_config(synthetic_mnist_dir)
    config.train.epochs = 2
    _run(config, tmp_path)
    before = _outputs(tmp_path)
    messages = []
    _run(config, tmp_path, log=messages.append)
    assert any("skipping training" in m for m in messages)
    assert not any(m.startswith("epoch ") for m in messages)
    assert _outputs(tmp_path) == before


def test_a_workdir_of_another_config_is_refused_unless_overwritten(tmp_path, synthetic_mnist_dir):
    old = synthetic_config(synthetic_mnist_dir)
    old.train.epochs = 3
    _run(old, tmp_path / "run")
    new = synthetic_config(synthetic_mnist_dir)
    new.train.epochs = 1

    with pytest.raises(workdir.WorkdirError, match=r"config\.train\.epochs: 3 there, 1 now.*--overwrite"):
        _run(new, tmp_path / "run")
    summary = _run(new, tmp_path / "run", overwrite=True)

    # Nothing of the old run is left to be trusted: its later checkpoints, records and timings are gone.
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]
    assert [r["epoch"] for r in summary["epochs"]] == [1]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1
    assert len(json.loads((tmp_path / "run" / "timings.json").read_text())["epochs"]) == 1
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["epochs"] == 1


def test_overwrite_with_the_same_config_trains_afresh(tmp_path, synthetic_mnist_dir):
    config = synthetic_config(synthetic_mnist_dir)
    _run(config, tmp_path)
    before = _outputs(tmp_path)
    messages = []
    _run(config, tmp_path, log=messages.append, overwrite=True)
    assert not any("resumed" in m for m in messages) and any(m.startswith("epoch 1/1") for m in messages)
    assert _outputs(tmp_path) == before


def test_seed_keys_for_k_seeds_are_those_of_each_seed_alone():
    together = seeds.seed_keys(3, 2)
    for i in range(2):
        alone = seeds.seed_keys(3 + i, 1)
        for key_together, key_alone in zip(together, alone):
            np.testing.assert_array_equal(jax.random.key_data(key_together[i]), jax.random.key_data(key_alone))


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
    summary = _run(config, tmp_path, log=messages.append)

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


def test_ordinary_training_has_no_robustness_check(tmp_path, synthetic_mnist_dir):
    config = synthetic_config(synthetic_mnist_dir)
    summary = _run(config, tmp_path)
    assert "overfitting_check" not in summary["epochs"][0]
    assert summary["overfitting_check"] is None and "robustness" not in summary


def test_changing_only_evaluation_settings_keeps_the_trained_model(tmp_path, synthetic_mnist_dir):
    config = synthetic_config(synthetic_mnist_dir)
    first = _run(config, tmp_path)
    config.eval.sigma_grid = (0.0, 0.5)
    messages = []
    second = _run(config, tmp_path, log=messages.append)
    assert any("skipping training" in m for m in messages), messages
    assert second["epochs"] == first["epochs"] and second["accuracy"] == first["accuracy"]
    assert len(second["sweeps"]["gaussian"]["accuracy"]) == 2


def test_the_fast_fgsm_gradient_leaves_bp_accuracies_unchanged(tmp_path, mnist_dir):
    # The speed work must not move results: BP's FGSM training through the
    # shared-pass gradient (models without dropout) against the general one,
    # same seed, real MNIST, clean and FGSM accuracy within 0.2 points.
    # The two differ only by float rounding, which 780 Adam steps amplify into
    # slightly different models. The run is configs/bp_adv.py's own (5 epochs):
    # shorter runs end mid-schedule, where that difference is larger (seen: 0.44
    # points of FGSM accuracy after 2 epochs). Gaussian-noise accuracy at sigma
    # 0.3 is too sensitive to it to compare (seen: 0.851 against 0.842).
    config = default.experiment("bp", "fgsm")
    config.data.dir = str(mnist_dir)
    config.train.overfitting_check_examples = 0
    summaries = {}
    for shared in (True, False):
        original = models.is_deterministic
        models.is_deterministic = lambda model_config, shared=shared: shared
        try:
            summaries[shared] = _run(config, tmp_path / str(shared))
        finally:
            models.is_deterministic = original
    for split in ("validation", "test"):
        for perturbation in ("clean", "fgsm", "matched_gaussian"):
            fast, general = (summaries[s]["accuracy"][split][perturbation] for s in (True, False))
            assert abs(fast - general) <= 0.002, (split, perturbation, fast, general)


class ScriptedCheck:
    """Stands in for the per-epoch robustness check: epoch e (1-based) reports pgd[e - 1]."""

    def __init__(self, pgd: list, first_epoch: int = 1):
        self.pgd, self.epoch = pgd, first_epoch

    def __call__(self, config, apply_fn, validation):
        def check(params, key):
            value = self.pgd[self.epoch - 1]
            self.epoch += 1
            return {"fgsm": value, "pgd": value}

        return check


def test_keep_best_evaluates_each_seeds_epoch_of_best_pgd_check_and_keeps_its_checkpoint(
    tmp_path, synthetic_mnist_dir, monkeypatch
):
    config = synthetic_config(synthetic_mnist_dir, "bp", "fast")
    config.train.epochs = 4
    config.num_seeds = 2
    config.train.keep_best = True
    config.train.checkpoints_to_keep = 1
    # Seed 0 is best at epoch 2; seed 1 ties at epochs 3 and 4: the latest is taken.
    pgd = [[0.5, 0.1], [0.9, 0.2], [0.2, 0.3], [0.1, 0.3]]
    evaluated = {}
    original_evaluate = evaluators.evaluate_trained

    def capture(config, apply_fn, params, mnist, mesh=None):
        evaluated["params"] = params
        return original_evaluate(config, apply_fn, params, mnist, mesh)

    monkeypatch.setattr(overfitting, "make_configured_check", ScriptedCheck(pgd))
    monkeypatch.setattr(evaluators, "evaluate_trained", capture)
    # Interrupted after epoch 3 and resumed: the kept best checkpoints and their metrics survive the reopening.
    messages = []
    with pytest.raises(Interrupted):
        _run(config, tmp_path, log=interrupt_after_epoch(3, messages))
    monkeypatch.setattr(overfitting, "make_configured_check", ScriptedCheck(pgd, first_epoch=4))
    summary = _run(config, tmp_path, log=messages.append)

    assert summary["evaluated_epochs"] == [2, 4]
    assert any("best held-out PGD accuracy: 2, 4" in m for m in messages), messages
    with checkpoint.open_manager(str(tmp_path)) as manager:
        assert checkpoint.saved_epochs(manager) == [2, 4]
        state = fit.fit(
            config,
            models.build_model(config.model),
            data.load_mnist(config.data),
            str(tmp_path),
            lambda m: None,
        ).state
        epoch_params = {e: checkpoint.restore_epoch(manager, e, state, config).state.params for e in (2, 4)}
    for seed, epoch in enumerate([2, 4]):
        chex.assert_trees_all_equal(
            jax.tree.map(lambda leaf: leaf[seed], evaluated["params"]),
            jax.tree.map(lambda leaf: leaf[seed], epoch_params[epoch]),
        )
    # Seed 0's params are not the last epoch's.
    last = jax.tree.leaves(
        jax.tree.map(
            lambda a, b: float(np.abs(np.asarray(a[0]) - np.asarray(b[0])).max()), evaluated["params"], state.params
        )
    )
    assert max(last) > 0.0


def test_without_keep_best_the_last_epoch_is_evaluated(tmp_path, synthetic_mnist_dir):
    config = synthetic_config(synthetic_mnist_dir, "bp", "fast")
    config.train.epochs = 1
    config.train.overfitting_check_examples = 50
    summary = _run(config, tmp_path)
    assert summary["evaluated_epochs"] is None


def test_best_epochs_take_the_latest_of_ties_and_the_last_epoch_needs_no_restore(tmp_path):
    records = [
        {"overfitting_check": {"pgd": [0.2, 0.5]}},
        {"overfitting_check": {"pgd": [0.7, 0.5]}},
        {"overfitting_check": {"pgd": [0.7, 0.6]}},
    ]
    assert overfitting.best_epochs(records, 2) == [3, 3]
    assert overfitting.best_epochs([{"overfitting_check": {"pgd": 0.9}}, {"overfitting_check": {"pgd": 0.4}}], 1) == [1]
    # Every seed best at the last epoch: the final state's params, with no checkpoint read (there is none here).
    config = synthetic_config(tmp_path, "bp", "fast")
    config.num_seeds = 2
    last = train.TrainState(step=0, apply_fn=None, params={"w": np.zeros(2)}, tx=None, opt_state=None)
    params, epochs = fit.restore_best_params(str(tmp_path / "no_run"), last, config, records)
    assert epochs == [3, 3] and params is last.params
