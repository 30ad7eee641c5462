"""Tests for advjax.fit: the epoch loop, resuming from checkpoints, divergence, and keep-best."""

import json

import chex
import jax
import numpy as np
import pytest

import advjax
from advjax import checkpoint, data, evaluators, fit, models, overfitting, train
from tests.helpers import (
    Interrupted,
    ScriptedCheck,
    interrupt_after_epoch,
    outputs,
    run_experiment,
    synthetic_config,
    tiny_config,
)

pytestmark = pytest.mark.usefixtures("quick_compile_module")

# ----------------------------------------------------------------------------
# Resume.


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax, on the damaged checkpoint
def test_an_interrupted_run_resumes_and_ends_exactly_as_an_uninterrupted_one(tmp_path, synthetic_mnist_dir):
    config = synthetic_config(synthetic_mnist_dir, mode="gaussian")  # noise: the keys must follow too
    config.train.epochs = 3
    config.train.batch_size = 128  # 7 steps: the cosine schedule and Adam's count must resume mid-decay
    run_experiment(config, tmp_path / "whole")

    first = []
    with pytest.raises(Interrupted):
        run_experiment(config, tmp_path / "cut", log=interrupt_after_epoch(2, first))
    assert not (tmp_path / "cut" / "summary.json").exists()
    # A damaged newest checkpoint: the run must fall back to epoch 1's and
    # trust it, not the metrics file, which then holds an epoch more.
    for path in (tmp_path / "cut" / "checkpoints" / "2" / checkpoint.STATE_ITEM).rglob("*"):
        if path.is_file():
            path.write_bytes(b"")
    second = []
    run_experiment(config, tmp_path / "cut", log=second.append)

    assert any(m.startswith("resumed after epoch 1/3") for m in second)
    assert not any(m.startswith("epoch 1/") for m in second)  # epoch 1 is not trained again
    assert outputs(tmp_path / "cut") == outputs(tmp_path / "whole")
    chex.assert_trees_all_equal(
        advjax.restore(str(tmp_path / "cut")).params, advjax.restore(str(tmp_path / "whole")).params
    )
    timings = json.loads((tmp_path / "cut" / "timings.json").read_text())
    assert [t["epoch"] for t in timings["epochs"]] == [1, 2, 3]


@pytest.mark.slow  # two runs: one trains, the second only evaluates
def test_a_finished_run_relaunched_skips_training_and_writes_the_same_summary(tmp_path, synthetic_mnist_dir):
    config = synthetic_config(synthetic_mnist_dir)
    config.train.epochs = 2
    run_experiment(config, tmp_path)
    before = outputs(tmp_path)
    messages = []
    run_experiment(config, tmp_path, log=messages.append)
    assert any("skipping training" in m for m in messages)
    assert not any(m.startswith("epoch ") for m in messages)
    assert outputs(tmp_path) == before


# ----------------------------------------------------------------------------
# Divergence.


def totals(first_nonfinite_step, loss=1.0) -> train.EpochTotals:
    first = np.asarray(first_nonfinite_step, np.int32)
    return train.EpochTotals(np.full(first.shape, loss, np.float32), np.zeros_like(first), np.ones_like(first), first)


@pytest.mark.parametrize("num_seeds", [1, 3])
def test_check_finite_names_the_epoch_the_step_and_the_seed(num_seeds):
    config = tiny_config()
    config.seed, config.num_seeds, config.train.learning_rate = 4, num_seeds, 0.5
    no_step = train.EpochTotals.NO_STEP
    fit.check_finite(totals(np.full(num_seeds, no_step) if num_seeds > 1 else no_step), 3, 10, config)  # all finite
    # Epoch 3 of 10 steps: global steps 20..29. With three seeds, the earliest failure (seed 4 + 2) is named.
    first = [no_step, 25, 23] if num_seeds > 1 else 23
    with pytest.raises(fit.TrainingDiverged) as info:
        fit.check_finite(totals(first), 3, 10, config)
    message = str(info.value)
    assert "non-finite in epoch 3 at step 23 (step 3 of the epoch's 10)" in message
    assert ("the training loss of seed 6 became" in message) == (num_seeds > 1)
    assert "lower train.learning_rate (now 0.5)" in message


def test_check_finite_refuses_a_summed_loss_that_overflowed():
    config = tiny_config()
    with pytest.raises(fit.TrainingDiverged, match="the summed training loss of epoch 2 is inf"):
        fit.check_finite(totals(train.EpochTotals.NO_STEP, loss=np.inf), 2, 10, config)


# ----------------------------------------------------------------------------
# Keep-best: each seed's epoch of best held-out PGD accuracy.


@pytest.mark.slow
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

    def capture(config, apply_fn, params, mnist, *args, **kwargs):
        evaluated["params"] = params
        return original_evaluate(config, apply_fn, params, mnist, *args, **kwargs)

    monkeypatch.setattr(overfitting, "make_configured_check", ScriptedCheck(pgd))
    monkeypatch.setattr(evaluators, "evaluate_trained", capture)
    # Interrupted after epoch 3 and resumed: the kept best checkpoints and their metrics survive the reopening.
    messages = []
    with pytest.raises(Interrupted):
        run_experiment(config, tmp_path, log=interrupt_after_epoch(3, messages))
    monkeypatch.setattr(overfitting, "make_configured_check", ScriptedCheck(pgd, first_epoch=4))
    summary = run_experiment(config, tmp_path, log=messages.append)

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
            jax.tree.map(lambda leaf, seed=seed: leaf[seed], evaluated["params"]),
            jax.tree.map(lambda leaf, seed=seed: leaf[seed], epoch_params[epoch]),
        )
    # Seed 0's params are not the last epoch's.
    last = jax.tree.leaves(
        jax.tree.map(
            lambda a, b: float(np.abs(np.asarray(a[0]) - np.asarray(b[0])).max()), evaluated["params"], state.params
        )
    )
    assert max(last) > 0.0


@pytest.mark.slow
def test_without_keep_best_the_last_epoch_is_evaluated(tmp_path, synthetic_mnist_dir):
    config = synthetic_config(synthetic_mnist_dir, "bp", "fast")
    config.train.epochs = 1
    config.train.overfitting_check_examples = 50
    summary = run_experiment(config, tmp_path)
    assert summary["evaluated_epochs"] is None


def test_restore_best_params_at_the_last_epoch_needs_no_restore(tmp_path):
    # (tests/test_overfitting.py checks overfitting.best_epochs itself.)
    records = [
        {"overfitting_check": {"pgd": [0.2, 0.5]}},
        {"overfitting_check": {"pgd": [0.7, 0.5]}},
        {"overfitting_check": {"pgd": [0.7, 0.6]}},
    ]
    # Every seed best at the last epoch: the final state's params, with no checkpoint read (there is none here).
    config = synthetic_config(tmp_path, "bp", "fast")
    config.num_seeds = 2
    last = train.TrainState(step=0, apply_fn=None, params={"w": np.zeros(2)}, tx=None, opt_state=None)
    params, epochs = fit.restore_best_params(str(tmp_path / "no_run"), last, config, records)
    assert epochs == [3, 3] and params is last.params
