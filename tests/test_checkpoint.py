"""Per-epoch orbax checkpoints, resuming from them, and restoring a model for use in a notebook."""

import logging

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advjax import checkpoint, evaluators, models, overfitting, seeds, train, workdir
from tests.helpers import ScriptedCheck, run_experiment, synthetic_config, tiny_config

# Reading a damaged checkpoint, orbax leaves asyncio callbacks behind that
# complain ("Event loop is closed") whenever they run, often in a later test.
pytestmark = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.usefixtures("quick_compile_module"),
]


def fresh_state(config, seed: int = 0) -> train.TrainState:
    model = models.build_model(config.model)
    return train.create_train_state(jax.random.key(seed), model, config.train, steps_per_epoch=10)


def save_epochs(run_dir, config, states: list, keep: int = 2) -> None:
    """Checkpoints states[i] as epoch i + 1, with one dummy metrics record per epoch."""
    workdir.save_config(str(run_dir), config)
    with checkpoint.open_manager(str(run_dir), keep=keep) as manager:
        for epoch, state in enumerate(states, 1):
            checkpoint.save_epoch(manager, epoch, state, config, [{"epoch": e} for e in range(1, epoch + 1)])


def later(state: train.TrainState, steps: int) -> train.TrainState:
    return state.replace(step=state.step + steps, params=jax.tree.map(lambda p: p + float(steps), state.params))


@pytest.mark.parametrize("model_name", ["bp", pytest.param("cnn", marks=pytest.mark.slow)])
def test_restore_returns_config_params_and_a_jittable_eval_apply(tmp_path, model_name):
    config = tiny_config(model_name)
    model = models.build_model(config.model)
    state = fresh_state(config, seed=3)
    save_epochs(tmp_path, config, [state])

    restored = checkpoint.restore(str(tmp_path))

    assert restored.config.model.name == model_name
    chex.assert_trees_all_equal(restored.params, state.params)
    images = jax.random.uniform(jax.random.key(0), (4, 28, 28, 1))
    logits = jax.jit(restored.apply_fn)(restored.params, images)
    chex.assert_shape(logits, (4, 10))
    # Eval mode: dropout off, so the result is the deterministic apply.
    expected = model.apply({"params": state.params}, images, train=False)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_restore_of_a_directory_without_a_run_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        checkpoint.restore(str(tmp_path))


def test_restore_without_checkpoint_says_so(tmp_path):
    workdir.save_config(str(tmp_path), tiny_config())
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.restore(str(tmp_path))


def test_only_the_latest_epochs_are_kept_and_restore_takes_the_last(tmp_path):
    config = tiny_config()
    state = fresh_state(config)
    save_epochs(tmp_path, config, [state, later(state, 5), later(state, 10)], keep=2)

    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]
    chex.assert_trees_all_close(
        checkpoint.restore(str(tmp_path)).params, jax.tree.map(jnp.asarray, later(state, 10).params)
    )
    # An earlier kept epoch on request; one not kept is refused, naming those kept.
    chex.assert_trees_all_close(
        checkpoint.restore(str(tmp_path), epoch=2).params, jax.tree.map(jnp.asarray, later(state, 5).params)
    )
    with pytest.raises(FileNotFoundError, match=r"epoch 1 .*kept: \[2, 3\]"):
        checkpoint.restore(str(tmp_path), epoch=1)


def test_restore_latest_gives_state_step_optimizer_and_records(tmp_path):
    config = tiny_config()
    state = fresh_state(config)
    stepped = later(state, 7)
    save_epochs(tmp_path, config, [state, stepped])

    with checkpoint.open_manager(str(tmp_path), keep=2) as manager:
        resumed = checkpoint.restore_latest(manager, fresh_state(config, seed=9), config, log=lambda m: None)

    assert resumed.epoch == 2 and resumed.records == [{"epoch": 1}, {"epoch": 2}]
    assert int(resumed.state.step) == 7
    chex.assert_trees_all_equal(resumed.state.params, stepped.params)
    chex.assert_trees_all_equal(resumed.state.opt_state, stepped.opt_state)


def test_restore_latest_of_an_empty_workdir_is_none(tmp_path):
    config = tiny_config()
    with checkpoint.open_manager(str(tmp_path), keep=2) as manager:
        assert checkpoint.restore_latest(manager, fresh_state(config), config, log=lambda m: None) is None


def test_a_checkpoint_of_another_config_is_refused_naming_the_field(tmp_path):
    config = tiny_config()
    save_epochs(tmp_path, config, [fresh_state(config)])
    other = tiny_config()
    other.train.learning_rate = 0.5
    with checkpoint.open_manager(str(tmp_path), keep=2) as manager:
        with pytest.raises(workdir.WorkdirError, match="config.train.learning_rate: 0.002 there, 0.5 now"):
            checkpoint.restore_latest(manager, fresh_state(other), other, log=lambda m: None)


def damage(epoch_dir) -> None:
    """Truncates every array data file of a checkpoint to nothing."""
    for path in (epoch_dir / checkpoint.STATE_ITEM).rglob("*"):
        if path.is_file() and "ocdbt" in str(path.relative_to(epoch_dir)) and path.stat().st_size:
            path.write_bytes(b"")


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path):
    config = tiny_config()
    state = fresh_state(config)
    save_epochs(tmp_path, config, [state, later(state, 5)])
    damage(tmp_path / "checkpoints" / "2")
    messages = []

    with checkpoint.open_manager(str(tmp_path), keep=2) as manager:
        resumed = checkpoint.restore_latest(manager, fresh_state(config), config, log=messages.append)

    assert resumed.epoch == 1
    chex.assert_trees_all_equal(resumed.state.params, state.params)
    assert any("epoch 2 cannot be restored" in m for m in messages)
    # Deleted, so that epoch 2 can be trained and saved again.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]


def test_when_every_checkpoint_is_damaged_the_run_is_refused(tmp_path):
    config = tiny_config()
    save_epochs(tmp_path, config, [fresh_state(config)])
    damage(tmp_path / "checkpoints" / "1")
    with checkpoint.open_manager(str(tmp_path), keep=2) as manager:
        with pytest.raises(workdir.WorkdirError, match="--overwrite"):
            checkpoint.restore_latest(manager, fresh_state(config), config, log=lambda m: None)


# ----------------------------------------------------------------------------
# advjax.restore of whole runs: which epochs it loads.


@pytest.mark.slow  # a two-seed run of four epochs
def test_restore_of_a_keep_best_run_loads_each_seeds_evaluated_epoch(tmp_path, synthetic_mnist_dir, monkeypatch):
    config = synthetic_config(synthetic_mnist_dir, "bp", "fast")
    config.train.epochs, config.num_seeds, config.train.max_examples = 4, 2, 256
    config.train.keep_best, config.train.checkpoints_to_keep = True, 1
    config.model.hidden = (16,)
    config.eval.num_train = config.eval.num_validation = config.eval.num_test = 100
    # Seed 0 is best at epoch 2, seed 1 at epoch 4 (the latest of a tie with epoch 3).
    monkeypatch.setattr(
        overfitting, "make_configured_check", ScriptedCheck([[0.5, 0.1], [0.9, 0.2], [0.2, 0.3], [0.1, 0.3]])
    )
    evaluated = {}
    original = evaluators.evaluate_trained

    def capture(config, apply_fn, params, mnist, mesh=None):
        evaluated["params"] = params
        return original(config, apply_fn, params, mnist, mesh)

    monkeypatch.setattr(evaluators, "evaluate_trained", capture)
    summary = run_experiment(config, tmp_path)
    assert summary["evaluated_epochs"] == [2, 4]

    restored = checkpoint.restore(str(tmp_path))
    assert restored.epochs == [2, 4]
    chex.assert_trees_all_equal(restored.params, evaluated["params"])  # what the summary reports on
    at_2, at_4 = checkpoint.restore(str(tmp_path), epoch=2), checkpoint.restore(str(tmp_path), epoch=4)
    assert at_2.epochs == [2, 2] and at_4.epochs == [4, 4]
    seed = lambda tree, s: jax.tree.map(lambda leaf: leaf[s], tree)
    chex.assert_trees_all_equal(seed(restored.params, 0), seed(at_2.params, 0))
    chex.assert_trees_all_equal(seed(restored.params, 1), seed(at_4.params, 1))
    # The epochs differ, so loading the wrong one would show.
    assert not np.array_equal(at_2.params["Dense_0"]["kernel"][0], at_4.params["Dense_0"]["kernel"][0])


@pytest.mark.slow  # a whole run; test_restore_loads_the_epochs_summary_json_says_were_evaluated covers the rule
def test_restore_of_a_finished_run_without_keep_best_loads_the_last_epoch(tmp_path, synthetic_mnist_dir):
    config = synthetic_config(synthetic_mnist_dir)
    config.train.epochs = 2
    summary = run_experiment(config, tmp_path)
    assert summary["evaluated_epochs"] is None

    restored = checkpoint.restore(str(tmp_path))
    assert restored.epochs == [2]
    chex.assert_trees_all_equal(restored.params, checkpoint.restore(str(tmp_path), epoch=2).params)
    first = checkpoint.restore(str(tmp_path), epoch=1)
    assert first.epochs == [1]
    assert not np.array_equal(first.params["Dense_0"]["kernel"], restored.params["Dense_0"]["kernel"])


def test_restore_loads_the_epochs_summary_json_says_were_evaluated(tmp_path):
    config = tiny_config()
    config.num_seeds, config.model.hidden = 2, (16,)
    model = models.build_model(config.model)
    state = train.create_states(seeds.seed_keys(0, 2)[0], model, config.train, 10, 2)
    states = [later(state, 5 * e) for e in range(3)]  # epochs 1, 2, 3 with params +0, +5, +10
    save_epochs(tmp_path, config, states, keep=3)
    workdir.write_summary(str(tmp_path), {"evaluated_epochs": [3, 2]})  # as train.keep_best writes it

    restored = checkpoint.restore(str(tmp_path))

    assert restored.epochs == [3, 2]
    seed = lambda tree, s: jax.tree.map(lambda leaf: np.asarray(leaf)[s], tree)
    chex.assert_trees_all_close(seed(restored.params, 0), seed(states[2].params, 0))
    chex.assert_trees_all_close(seed(restored.params, 1), seed(states[1].params, 1))
    every = checkpoint.restore(str(tmp_path), epoch=1)
    assert every.epochs == [1, 1]
    chex.assert_trees_all_close(every.params, jax.tree.map(np.asarray, states[0].params))
    workdir.write_summary(str(tmp_path), {"evaluated_epochs": None})  # no keep_best: the last epoch
    assert checkpoint.restore(str(tmp_path)).epochs == [3, 3]
    workdir.write_summary(str(tmp_path), {"evaluated_epochs": [3]})  # one epoch for two seeds: refused
    with pytest.raises(workdir.WorkdirError, match="1 evaluated epochs for 2 seeds"):
        checkpoint.restore(str(tmp_path))


def test_restore_prints_no_read_only_warnings(tmp_path, caplog, capfd):
    config = tiny_config()
    save_epochs(tmp_path, config, [fresh_state(config)])
    capfd.readouterr()
    with caplog.at_level(logging.WARNING, logger="absl"):
        checkpoint.restore(str(tmp_path))
        checkpoint.restore(str(tmp_path), epoch=1)
    out, err = capfd.readouterr()
    for text in (caplog.text, out, err):
        assert "read_only=True" not in text and "read only" not in text, text
