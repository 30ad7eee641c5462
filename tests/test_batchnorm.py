"""The PreAct ResNet-18 and BatchNorm's running statistics: updated by the training step alone, frozen in every
attack and evaluation (docs/design.md, "Attacks in eval mode"); carried by the seed axis, checkpoints and restore.

A ResNet-18 of width 2 on 8x8 images stands in for Wong et al.'s width 64 on 32x32: the same layers, a CPU's
milliseconds. The end-to-end run on a synthetic CIFAR-10 is in the slow tier.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advjax import attack_registry, checkpoint, data, eval_fold, evaluate, models, objectives, seeds, train
from configs import default
from tests.helpers import QUICK_COMPILE_ENV

SHAPE, WIDTH = (8, 8, 3), 2
INFO = data.DatasetInfo("cifar10", SHAPE, 10)
EPS = 8 / 255


def resnet_config(mode: str = "ordinary", width: int = WIDTH):
    config = default.experiment("preact_resnet18", mode)
    config.model.width, config.model.init = width, "torch_default"
    config.train.attack_steps, config.train.eps, config.train.batch_size = 2, EPS, 4
    return config


@functools.cache
def tiny():
    """(model, Variables): the params at init and running statistics away from their init (mean 0, var 1), so that
    normalising by them and by a batch's statistics differ."""
    model = models.build_model(resnet_config().model, INFO)
    variables = jax.jit(lambda key: train.init_variables(key, model))(jax.random.key(0))
    keys = iter(jax.random.split(jax.random.key(1), 1000))
    stats = jax.tree_util.tree_map_with_path(
        lambda path, a: (
            jax.random.uniform(next(keys), a.shape, a.dtype, 0.5, 2.0)
            if "var" in jax.tree_util.keystr(path)
            else 0.3 * jax.random.normal(next(keys), a.shape, a.dtype)
        ),
        variables["batch_stats"],
    )
    return model, models.Variables(variables["params"], stats)


def images(batch: int = 6, seed: int = 2) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), (batch, *SHAPE), jnp.float32)


def labels(batch: int = 6) -> jax.Array:
    return jnp.arange(batch) % 10


def differ(a, b) -> bool:
    return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ----------------------------------------------------------------------------
# The model.


def test_preact_resnet18_has_wong_et_al_s_layers_and_a_running_statistic_per_batchnorm_feature():
    model = models.build_model(resnet_config(width=64).model, data.DATASETS["cifar10"])
    variables = jax.eval_shape(lambda key: train.init_variables(key, model), jax.random.key(0))
    shapes = jax.tree.map(lambda a: a.shape, variables)
    params, stats = shapes["params"], shapes["batch_stats"]
    # PyTorch's count for their PreActResNet18 (11,171,146 without the final BatchNorm, which theirs has).
    assert sum(math.prod(s) for s in jax.tree.leaves(params, is_leaf=lambda s: isinstance(s, tuple))) == 11_172_170
    assert params["conv1"] == {"kernel": (3, 3, 3, 64)}  # no bias on any convolution
    assert "shortcut" not in params["layer1_0"] and "shortcut" not in params["layer1_1"]
    for stage, channels in ((2, 128), (3, 256), (4, 512)):
        block = params[f"layer{stage}_0"]
        assert block["shortcut"] == {"kernel": (1, 1, channels // 2, channels)}
        assert block["conv1"] == {"kernel": (3, 3, channels // 2, channels)}
        assert block["bn1"] == {"scale": (channels // 2,), "bias": (channels // 2,)}
    assert params["linear"] == {"kernel": (512, 10), "bias": (10,)}
    # One running mean and variance per BatchNorm feature, where its scale and bias are.
    bn_params = {k: v for k, v in jax.tree_util.tree_flatten_with_path(params)[0] if "bn" in jax.tree_util.keystr(k)}
    assert len(bn_params) == 2 * 17  # 16 in the blocks and the final one, each a scale and a bias
    for path, shape in jax.tree_util.tree_flatten_with_path(stats, is_leaf=lambda s: isinstance(s, tuple))[0]:
        *where, leaf = [p.key for p in path]
        assert leaf in ("mean", "var")
        node = params
        for key in where:
            node = node[key]
        assert shape == node["scale"]
    small = tiny()[0]
    initial = jax.jit(lambda key: train.init_variables(key, small))(jax.random.key(0))["batch_stats"]
    for path, leaf in jax.tree_util.tree_flatten_with_path(initial)[0]:
        assert np.all(leaf == (0.0 if path[-1].key == "mean" else 1.0)), jax.tree_util.keystr(path)


def test_the_model_normalises_its_input_with_cifar10_statistics_so_images_stay_in_pixels():
    model = models.build_model(resnet_config().model, INFO)
    assert (model.mean, model.std) == (models.CIFAR10_MEAN, models.CIFAR10_STD)
    gray = models.build_model(resnet_config().model, data.DatasetInfo("mnist", (8, 8, 1), 10))
    assert (gray.mean, gray.std) == ((0.0,), (1.0,))
    assert models.has_convolutions(resnet_config().model) and not models.is_deterministic(resnet_config().model)


def test_eval_mode_ignores_the_rest_of_the_batch_and_train_mode_does_not():
    model, variables = tiny()
    x = images(8)
    apply_fn = jax.jit(models.eval_apply(model.apply))
    alone, in_batch = apply_fn(variables, x[:1]), apply_fn(variables, x)[:1]
    np.testing.assert_allclose(alone, in_batch, atol=1e-5)
    other_batch = jnp.concatenate([x[:1], 1.0 - x[1:]])
    np.testing.assert_allclose(apply_fn(variables, other_batch)[:1], alone, atol=1e-5)
    train_fn = jax.jit(models.train_apply(model.apply))
    train_alone, train_in_batch = (
        train_fn(variables, x[:2], jax.random.key(0))[0][:1],
        train_fn(variables, x, jax.random.key(0))[0][:1],
    )
    assert not np.allclose(train_alone, train_in_batch, atol=1e-3)  # train mode normalises by the batch


def test_eval_mode_reads_the_running_statistics():
    model, variables = tiny()
    apply_fn = jax.jit(models.eval_apply(model.apply))
    shifted = variables._replace(batch_stats=jax.tree.map(lambda a: a + 0.5, variables.batch_stats))
    assert not np.allclose(apply_fn(variables, images()), apply_fn(shifted, images()), atol=1e-3)


def test_a_train_mode_pass_updates_the_statistics_as_pytorch_does_with_momentum_0_1():
    model, variables = tiny()
    x = images(4)
    _, updated = jax.jit(models.train_apply(model.apply))(variables, x, jax.random.key(0))
    # The first block's first BatchNorm sees conv1's output: its batch mean and (biased) variance.
    _, captured = model.apply(
        {"params": variables.params, "batch_stats": variables.batch_stats},
        x,
        train=True,
        mutable=["batch_stats", "intermediates"],
        capture_intermediates=lambda module, _: module.name == "conv1" and len(module.scope.path) == 1,
    )
    features = captured["intermediates"]["conv1"]["__call__"][0]
    old, new = variables.batch_stats["layer1_0"]["bn1"], updated.batch_stats["layer1_0"]["bn1"]
    np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * features.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * features.var((0, 1, 2)), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal(updated.params, variables.params)


# ----------------------------------------------------------------------------
# Attacks and objectives call the model in eval mode: a spy on the Linen apply sees every call.


class Call(NamedTuple):
    train: bool
    mutable: tuple
    images: jax.Array


class Spy:
    def __init__(self, apply):
        self.apply, self.calls = apply, []

    def __call__(self, variables, x, *, train, **kwargs):
        self.calls.append(Call(train, tuple(kwargs.get("mutable", ())), x))
        return self.apply(variables, x, train=train, **kwargs)


@pytest.mark.parametrize(
    "name, params", [("fgsm", {}), ("pgd", {"num_steps": 2, "num_restarts": 2}), ("apgd_ce", {"num_steps": 3})]
)
def test_evaluation_attacks_call_the_model_in_eval_mode_only_and_leave_the_statistics_alone(name, params):
    model, variables = tiny()
    before = jax.tree.map(np.array, variables)
    spy = Spy(model.apply)
    attack = attack_registry.make_attack(name, **params)
    craft = jax.jit(lambda v, x, y, key: attack(lambda z: models.eval_apply(spy)(v, z), x, y, EPS, key))
    adversarial = craft(variables, images(), labels(), jax.random.key(3))
    assert spy.calls and all(not call.train and not call.mutable for call in spy.calls)
    chex.assert_trees_all_equal(jax.tree.map(np.array, variables), before)
    assert float(jnp.max(jnp.abs(adversarial - images()))) <= EPS + 1e-6


def test_fgsm_on_a_batch_is_fgsm_on_each_image_alone():
    model, variables = tiny()
    logits_fn = lambda z: models.eval_apply(model.apply)(variables, z)
    attack = jax.jit(lambda x, y: attack_registry.make_attack("fgsm")(logits_fn, x, y, EPS))
    together = attack(images(), labels())
    alone = jnp.concatenate([attack(images()[i : i + 1], labels()[i : i + 1]) for i in range(6)])
    np.testing.assert_allclose(together, alone, atol=1e-6)


TRAIN_PASSES = {"ordinary": 1, "fgsm": 2, "pgd": 1, "fast": 1, "trades": 2, "nfgsm": 1}


@pytest.mark.parametrize("mode", ["fgsm", "pgd", "fast", "trades"])
def test_a_training_objective_s_inner_attack_leaves_the_statistics_to_its_training_passes(mode):
    model, variables = tiny()
    spy = Spy(model.apply)
    objective = objectives.make_objective(spy, resnet_config(mode).train, deterministic=False)
    loss, (logits, stats) = objective(variables, images(), labels(), jax.random.key(4))
    passes = [call for call in spy.calls if call.train]
    assert [call.mutable for call in passes] == [("batch_stats",)] * TRAIN_PASSES[mode]
    attack_calls = [call for call in spy.calls if not call.train]
    assert attack_calls and not any(call.mutable for call in attack_calls)  # the attack ran, in eval mode
    # The statistics returned are the running ones updated by the training passes alone, in order.
    expected = variables
    for call in passes:
        _, expected = models.train_apply(model.apply)(expected, call.images, jax.random.key(0))
    chex.assert_trees_all_close(stats, expected.batch_stats, rtol=1e-6, atol=1e-7)
    assert differ(stats, variables.batch_stats) and logits.shape == (6, 10) and np.isfinite(loss)


@pytest.mark.slow  # compiles the ResNet's whole jitted training step, per mode
@pytest.mark.parametrize("mode", ["fast", "trades"])
def test_a_training_step_updates_the_statistics_and_only_the_step_does(mode):
    model, variables = tiny()
    config = resnet_config(mode)
    state = train.create_train_state(jax.random.key(0), model, config.train, 10)
    assert isinstance(state, train.BatchNormState)
    state = state.replace(batch_stats=variables.batch_stats)
    objective = objectives.make_objective(model.apply, config.train)
    x, y, key = images(), labels(), jax.random.key(5)
    new, (loss, correct) = jax.jit(lambda s: train.train_step(s, objective, x, y, key))(state)
    _, (_, stats) = objective(train.eval_variables(state), x, y, key, state.step)
    chex.assert_trees_all_close(new.batch_stats, stats, rtol=1e-5, atol=1e-6)
    assert differ(new.batch_stats, state.batch_stats) and differ(new.params, state.params) and int(new.step) == 1
    assert isinstance(train.eval_variables(new), models.Variables) and 0 <= int(correct) <= 6


def test_models_without_batchnorm_keep_the_plain_train_state():
    config = default.experiment("bp", "ordinary")
    state = train.create_train_state(jax.random.key(0), models.build_model(config.model), config.train, 10)
    assert type(state) is train.TrainState and train.eval_variables(state) is state.params


# ----------------------------------------------------------------------------
# The seed axis, evaluation folds and checkpoints.


@pytest.mark.slow  # three runs: two seeds at once, one seed alone, and their evaluations
def test_two_seeds_carry_their_own_statistics_and_seed_0_is_the_one_seed_run():
    model, _ = tiny()
    config = resnet_config("fast")
    num, batch = 8, 4
    x = np.asarray(jax.random.randint(jax.random.key(6), (num, *SHAPE), 0, 256), np.uint8)
    y = np.arange(num, dtype=np.int32) % 10
    objective = objectives.make_objective(model.apply, config.train)

    def run(num_seeds: int, keys, form: str):
        state = train.create_states(keys, model, config.train, num // batch, num_seeds)
        epoch = train.make_epoch_fn(objective, num, batch, form=form, chunk_size=2, num_seeds=num_seeds)
        permutation = seeds.map_over_seeds(lambda k: train.epoch_permutation(k, 1, num), num_seeds)(keys)
        return epoch(state, train.EpochTotals.zeros(num_seeds), x, y, permutation, keys)[0]

    keys = jax.random.split(jax.random.key(7), 2)
    two = run(2, keys, "chunked")
    assert all(leaf.shape[0] == 2 for leaf in jax.tree.leaves(two.batch_stats))
    assert differ(seeds.select_seed(two.batch_stats, 0, 2), seeds.select_seed(two.batch_stats, 1, 2))
    one = run(1, keys[0], "scan")  # the statistics in a fori_loop's carry, too
    chex.assert_trees_all_close(seeds.select_seed(two.batch_stats, 0, 2), one.batch_stats, rtol=1e-4, atol=1e-5)
    # The evaluation fold takes both seeds' Variables and gives each seed its own accuracy.
    eval_set = eval_fold.make_eval_set(x, y, num, 4)
    evaluator = evaluate.make_evaluator(models.eval_apply(model.apply), ("clean",), num_seeds=2)
    result = evaluator(train.eval_variables(two), eval_set, keys)
    single = evaluate.make_evaluator(models.eval_apply(model.apply), ("clean",))(
        train.eval_variables(one), eval_set, keys[0]
    )
    assert result["accuracy_per_seed"]["clean"][0] == single["accuracy"]["clean"]


def test_a_checkpoint_saves_and_restores_the_statistics_and_its_digest_covers_them(tmp_path):
    model, variables = tiny()
    config = resnet_config()
    fresh = train.create_train_state(jax.random.key(0), model, config.train, 10)
    state = fresh.replace(batch_stats=variables.batch_stats)
    assert checkpoint.state_digest(state) != checkpoint.state_digest(fresh)
    records = [{"epoch": 1}]
    with checkpoint.open_manager(str(tmp_path), keep=3) as manager:
        checkpoint.save_epoch(manager, 1, state, config, records)
        broken = state.replace(batch_stats=jax.tree.map(lambda a: a.at[0].set(jnp.nan), state.batch_stats))
        checkpoint.save_epoch(manager, 2, broken, config, records * 2)
        restored = checkpoint.restore_epoch(manager, 1, fresh, config).state
        with pytest.raises(checkpoint.CheckpointDamaged, match=r"non-finite batch_stats \(batch_stats\['"):
            checkpoint.restore_epoch(manager, 2, fresh, config)
    assert isinstance(restored, train.BatchNormState)
    chex.assert_trees_all_equal(restored.batch_stats, variables.batch_stats)
    chex.assert_trees_all_equal(restored.params, state.params)


# ----------------------------------------------------------------------------
# Data parallel, and end to end.

DATA_PARALLEL = """
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 2)
import numpy as np
from advjax import models, objectives, sharding, train
from tests.test_batchnorm import SHAPE, resnet_config, tiny

model, _ = tiny()
config = resnet_config("ordinary")  # the statistics come from the training pass alone
objective = objectives.make_objective(model.apply, config.train)
x = np.asarray(jax.random.randint(jax.random.key(6), (8, *SHAPE), 0, 256), np.uint8)
y = np.arange(8, dtype=np.int32) % 10

def run(mesh):
    epoch = train.make_epoch_fn(objective, 8, 4, form="chunked", chunk_size=1, mesh=mesh)
    state = train.create_states(jax.random.key(0), model, config.train, 2, 1)
    args = (state, train.EpochTotals.zeros(), x, y, jax.numpy.arange(8), jax.random.key(1))
    return epoch(*(args if mesh is None else sharding.replicate(args, mesh)))[0]

single, mesh = run(None), run(sharding.make_data_mesh())

def difference(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b))
    return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v)))) for u, v in pairs)

print(json.dumps({
    "devices": jax.device_count(),
    "stats_difference": difference(single.batch_stats, mesh.batch_stats),
    "params_difference": difference(single.params, mesh.params),
    "stats_moved": difference(single.batch_stats, train.init_variables(jax.random.key(0), model)["batch_stats"]),
    "stats_replicated": all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(mesh.batch_stats)),
}))
"""


@pytest.mark.slow
def test_data_parallel_training_keeps_the_statistics_replicated_and_of_the_whole_batch():
    import json
    import os
    import pathlib
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **QUICK_COMPILE_ENV}  # both sides of the comparison run in it
    run = subprocess.run([sys.executable, "-c", DATA_PARALLEL], cwd=repo, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["devices"] == 2 and report["stats_replicated"]
    # Each device normalises its half by the whole batch's statistics: the same numbers as on one device.
    assert report["stats_difference"] < 1e-5 and report["params_difference"] < 1e-5 and report["stats_moved"] > 1e-3


@pytest.mark.slow
@pytest.mark.usefixtures("quick_compile")  # a narrow network: XLA's full passes cost more than they save
def test_wong_et_al_s_recipe_trains_attacks_reports_and_restores_on_synthetic_cifar10(tmp_path):
    import advjax
    from configs import cifar10_fast
    from tests.helpers import run_experiment
    from tests.test_experiment import learnable_cifar_dir

    config = cifar10_fast.get_config()  # SGD, the cyclic rate, crop and flip, the PreAct ResNet-18 ...
    config.data.source, config.data.dir = "idx", str(learnable_cifar_dir(tmp_path / "data"))
    config.data.num_validation, config.model.width = 100, 4  # ... narrow, on 1100 training images
    config.train.epochs, config.train.batch_size, config.train.chunk_size, config.train.learning_rate = 2, 50, 2, 0.05
    config.train.overfitting_check_examples, config.train.overfitting_check_steps = 50, 2
    config.eval.num_train, config.eval.num_validation, config.eval.num_test, config.eval.batch_size = 100, 100, 200, 100
    config.robust.num_examples, config.robust.batch_size = 100, 50
    config.robust.pgd_steps, config.robust.pgd_restarts = 3, 2
    summary = run_experiment(config, tmp_path / "run")

    assert summary["accuracy"]["test"]["clean"] > 0.2  # chance is 0.1; flips make some synthetic classes alike
    assert "pgd" in summary["robustness"]["attacks"] and len(summary["epochs"]) == 2
    restored = advjax.restore(str(tmp_path / "run"))
    assert isinstance(restored.params, models.Variables)
    assert restored.params.params["conv1"]["kernel"].shape == (3, 3, 3, 4)
    test = data.load_mnist(restored.config.data).test
    logits = jax.jit(restored.apply_fn)(restored.params, data.to_float_images(test.images[:200]))
    accuracy = float(np.mean(np.argmax(logits, -1) == test.labels[:200]))
    assert accuracy == pytest.approx(summary["accuracy"]["test"]["clean"], abs=1e-6)  # on the running statistics
