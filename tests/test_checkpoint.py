"""Saving with orbax and restoring a model for use in a notebook."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advjax import checkpoint, models, train
from tests.conftest import tiny_config


@pytest.mark.parametrize("model_name", ["bp", "cnn"])
def test_restore_returns_config_params_and_a_jittable_eval_apply(tmp_path, model_name):
    config = tiny_config(model_name)
    model = models.build_model(config.model)
    state = train.create_train_state(jax.random.key(3), model, config.train, steps_per_epoch=10)
    checkpoint.save_config(str(tmp_path), config)
    checkpoint.save(str(tmp_path), state)

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
    checkpoint.save_config(str(tmp_path), tiny_config())
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.restore(str(tmp_path))


def test_saving_again_keeps_only_the_latest(tmp_path):
    config = tiny_config()
    model = models.build_model(config.model)
    state = train.create_train_state(jax.random.key(0), model, config.train, steps_per_epoch=10)
    checkpoint.save_config(str(tmp_path), config)
    checkpoint.save(str(tmp_path), state)
    later = state.replace(step=state.step + 5, params=jax.tree.map(lambda p: p + 1.0, state.params))
    checkpoint.save(str(tmp_path), later)
    restored = checkpoint.restore(str(tmp_path))
    chex.assert_trees_all_close(restored.params, jax.tree.map(jnp.asarray, later.params))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["5"]
