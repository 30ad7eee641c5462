"""advjax.memory: the estimate of a run's memory, and the check that refuses a run that cannot fit."""

import os
import pathlib
import re

import jax
import pytest

from advjax import data, memory, paper, validation
from configs import default
from configs import paper as paper_config
from tests.helpers import write_synthetic_mnist

GIB = 2**30
CPU_MACHINE = 23 * GIB  # a 24 GiB machine, less what its kernel keeps
# XLA preallocates three quarters of a GPU's memory by default: its allocator's bytes_limit.
GPU_BYTES_LIMIT = int(0.75 * 140 * GIB)

SHIPPED = sorted(
    p.stem
    for p in pathlib.Path(__file__).resolve().parents[1].joinpath("configs").glob("*.py")
    if p.stem not in ("__init__", "default", "paper")
)


def shipped(name: str, num_seeds: int = 1):
    config = __import__(f"configs.{name}", fromlist=["get_config"]).get_config()
    config.num_seeds = num_seeds
    return config


def test_the_parameter_count_is_the_models():
    assert (
        memory.parameter_count(default.experiment("bp", "ordinary").model) == 784 * 256 + 256 + 256 * 256 + 256 + 2570
    )
    conv = 5 * 5 * 32 + 32 + 5 * 5 * 32 * 64 + 64
    assert (
        memory.parameter_count(default.experiment("cnn", "ordinary").model) == conv + 7 * 7 * 64 * 1024 + 1024 + 10250
    )


def test_the_activations_are_the_image_and_every_layers_output():
    # The model's own output is captured twice: as the last layer's and as the model's.
    assert memory.activations_per_example(default.experiment("bp", "ordinary").model) == 784 + 256 + 256 + 10 + 10
    cnn = 784 + 28 * 28 * 32 + 14 * 14 * 64 + 1024 + 1024 + 10 + 10  # the dropout's output is a layer's too
    assert memory.activations_per_example(default.experiment("cnn", "ordinary").model) == cnn


@pytest.mark.parametrize("model", ["bp", "cnn", "small_cnn"])
def test_the_estimate_grows_linearly_in_num_seeds(model):
    config = default.experiment(model, "fgsm")
    estimates = []
    for k in (1, 2, 8, 9):
        config.num_seeds = k
        estimates.append(memory.estimate_bytes(config))
    one, two, eight, nine = estimates
    assert two - one == nine - eight == (eight - one) // 7 == memory.seed_bytes(config) > 0


def test_consistency_training_holds_the_activations_of_its_m_copies():
    # A training step passes m noisy copies of each image forward; the batch is large enough that training,
    # not evaluation, is the largest phase.
    config = default.experiment("cnn", "gaussian")
    config.train.batch_size = config.eval.batch_size * 4
    gaussian = memory.seed_bytes(config, backend="cpu")
    config.train.mode = "consistency"
    estimates = {}
    for copies in (1, 2, 4):
        config.train.consistency_copies = copies
        estimates[copies] = memory.seed_bytes(config, backend="cpu")
    assert estimates[1] == gaussian
    activations = memory.FLOAT_BYTES * memory.activations_per_example(config.model) * config.train.batch_size
    assert estimates[2] - estimates[1] == memory.TRAIN_PASSES * activations  # one more copy per image
    assert estimates[4] - estimates[2] == 2 * (estimates[2] - estimates[1])


# Wong et al.'s CIFAR-10 recipe trains a ResNet-18 on 32x32x3 images: a GPU's run, whose eval batch of 500 alone
# the estimate puts at about 16 GiB a seed.
GPU_RECIPES = ("cifar10_fast",)


@pytest.mark.parametrize("name", [name for name in SHIPPED if name not in GPU_RECIPES])
def test_every_shipped_config_fits_a_24_gib_machine_with_8_seeds(name):
    memory.check_fits(shipped(name, num_seeds=8), available_bytes=CPU_MACHINE)


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_the_cifar10_recipe_fits_one_seed_on_a_24_gib_machine_and_four_on_a_gpu(name):
    memory.check_fits(shipped(name), available_bytes=CPU_MACHINE)
    assert memory.estimate_bytes(shipped(name, num_seeds=4), backend="gpu") < GPU_BYTES_LIMIT
    with pytest.raises(validation.ConfigError, match="config.num_seeds=8 needs about"):
        memory.check_fits(shipped(name, num_seeds=8), available_bytes=CPU_MACHINE)


def test_the_paper_with_8_seeds_fits_a_140_gib_gpu():
    config = paper_config.get_config()
    config.num_seeds = 8
    for run in paper.run_configs(config).values():
        # On a GPU a sweep vmaps its whole grid: the most memory any backend's estimate asks for.
        assert memory.estimate_bytes(run, backend="gpu") < GPU_BYTES_LIMIT


@pytest.mark.parametrize("model", ["bp", "cnn"])
def test_ten_thousand_seeds_are_refused_naming_the_need_and_the_memory(model):
    config = default.experiment(model, "fgsm")
    config.num_seeds = 10_000
    with pytest.raises(validation.ConfigError) as info:
        memory.check_fits(config, available_bytes=CPU_MACHINE)
    message = str(info.value)
    assert re.match(r"config\.num_seeds=10000 needs about [\d.]+ GiB by advjax's estimate \(parameters, ", message)
    assert "more than the 23.0 GiB available; lower num_seeds (by this estimate, which errs low, at most " in message
    fitting = int(re.search(r"at most (\d+) fit", message).group(1))
    config.num_seeds = fitting
    memory.check_fits(config, available_bytes=CPU_MACHINE)  # the count it names does fit
    config.num_seeds = fitting + 1
    with pytest.raises(validation.ConfigError):
        memory.check_fits(config, available_bytes=CPU_MACHINE)


def test_a_config_too_big_for_a_small_memory_is_refused():
    config = default.experiment("cnn", "ordinary")
    with pytest.raises(validation.ConfigError, match=r"config.num_seeds=1 needs about .* MiB .*more than the 1.0 MiB"):
        memory.check_fits(config, available_bytes=2**20)
    with pytest.raises(validation.ConfigError, match="not even one seed fits: lower train.batch_size"):
        memory.check_fits(config, available_bytes=2**20)


def test_without_a_limit_the_first_devices_memory_is_used():
    available, where = memory.available_memory()
    if jax.default_backend() == "cpu":
        assert (available, where) == (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "cpu")
    config = default.experiment("bp", "fgsm")
    config.num_seeds = available // memory.seed_bytes(config) + 1
    with pytest.raises(validation.ConfigError, match=f"GiB of memory of {re.escape(where)}; lower num_seeds"):
        memory.check_fits(config)


def test_the_data_loaded_replace_mnists_sizes(tmp_path):
    config = default.experiment("bp", "ordinary")
    config.data.source, config.data.dir, config.data.num_validation = "idx", str(tmp_path), 200
    config.eval.num_train = config.eval.num_validation = config.eval.num_test = 200
    write_synthetic_mnist(tmp_path, num_train=1200, num_test=300)
    mnist = data.load_mnist(config.data)
    # Without the data, MNIST's 60,000 training images are assumed in place of these 1200.
    fewer = memory.estimate_bytes(config) - memory.estimate_bytes(config, mnist)
    assert fewer == (60_000 - 1200) * (28 * 28 + memory.LABEL_BYTES)


def test_the_estimate_compiles_nothing():
    compiled = []
    listener = lambda name, *args, **kwargs: compiled.append(name) if "backend_compile" in name else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        config = default.experiment("cnn", "trades")
        config.robust.enabled, config.num_seeds = True, 4
        memory.check_fits(config, available_bytes=CPU_MACHINE)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiled == []


def test_the_estimate_takes_the_datas_image_shape():
    config = default.experiment("bp", "ordinary")
    mnist_bytes = memory.estimate_bytes(config, backend="cpu")
    config.data.name = "cifar10"
    cifar_params = memory.parameter_count(config.model, memory.data_info(config))
    assert cifar_params == 32 * 32 * 3 * 256 + 256 + 256 * 256 + 256 + 2570
    assert memory.estimate_bytes(config, backend="cpu") > mnist_bytes
