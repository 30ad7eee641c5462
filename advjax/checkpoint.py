"""Saving a trained model with orbax, and restoring it for use in a notebook."""

import json
import os
from typing import Callable, NamedTuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from advjax import models, train
from advjax.report import write_json

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"


def _manager(workdir: str, create: bool) -> ocp.CheckpointManager:
    directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=1, create=create))


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    write_json(os.path.join(workdir, CONFIG_FILE), config.to_dict())


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {workdir!r} is not a workdir written by launch.py")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def save(workdir: str, state: train.TrainState) -> None:
    """Writes params, optimizer state and step; orbax commits it atomically."""
    with _manager(workdir, create=True) as manager:
        # With several seeds the step is per seed, and equal across them.
        manager.save(int(np.max(state.step)), args=ocp.args.StandardSave(state))
        manager.wait_until_finished()


def eval_apply_fn(model) -> Callable:
    """`apply_fn(params, images) -> logits` in eval mode (dropout off); jittable."""

    def apply_fn(params, images):
        return model.apply({"params": params}, images, train=False)

    return apply_fn


class Restored(NamedTuple):
    config: ml_collections.ConfigDict
    params: dict  # with a leading seed axis when config.num_seeds > 1
    apply_fn: Callable  # (params, float32 images [B, 28, 28, 1] in [0, 1]) -> logits [B, 10]


def restore(workdir: str) -> Restored:
    """The last checkpoint in `workdir`, with its config and an eval-mode apply function."""
    config = load_config(workdir)
    model = models.build_model(config.model)
    num_seeds = config.get("num_seeds", 1)
    keys = jax.random.split(jax.random.key(0), num_seeds) if num_seeds > 1 else jax.random.key(0)
    abstract = jax.eval_shape(lambda: train.create_states(keys, model, config.train, 1, num_seeds))
    with _manager(workdir, create=False) as manager:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {os.path.join(workdir, CHECKPOINT_DIR)}")
        state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    return Restored(config, state.params, eval_apply_fn(model))
