"""Per-epoch orbax checkpoints, resuming from them, and restoring a model for use in a notebook."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advjax import checkpoint, models, train, workdir
from tests.conftest import tiny_config

# Reading a damaged checkpoint, orbax leaves asyncio callbacks behind that
# complain ("Event loop is closed") whenever they run, often in a later test.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


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


@pytest.mark.parametrize("model_name", ["bp", "cnn"])
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


def test_config_differences_name_changed_added_and_removed_fields():
    saved = {"seed": 0, "train": {"epochs": 3, "eps": 0.1}, "gone": 1}
    current = {"seed": 0, "train": {"epochs": 5, "eps": 0.1, "new": [1]}}
    assert workdir.config_differences(saved, current) == ["gone", "train.epochs", "train.new"]
    assert workdir.config_differences(saved, saved) == []
    assert "config.train.epochs: 3 there, 5 now" in workdir.describe_differences(saved, current)


def test_a_live_config_equals_its_saved_json(tmp_path):
    config = tiny_config()
    config.eval.sigma_grid = (0.0, 0.5)  # a tuple live, a list on disk
    workdir.save_config(str(tmp_path), config)
    assert (
        workdir.config_differences(workdir.read_saved_config(str(tmp_path)), workdir.config_as_json(config))
        == []
    )
