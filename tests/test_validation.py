"""Config validation: every out-of-range field is refused, naming the field."""

import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advjax import attack_specs, data, train, validation
from configs import default
from tests.helpers import small_robust_section, validate_robust, write_synthetic_mnist

BAD_VALUES = [
    ("seed", -1),
    ("seed", 2**32),  # would repeat seed 0's every bit
    ("seed", 2**63),  # used to overflow deep inside JAX
    ("seed", 1.5),
    ("data.name", "imagenet"),
    ("data.name", "MNIST"),  # names are the lowercase ones of advjax.data.NAMES
    ("data.name", "tfds:"),
    ("data.name", "tfds:Fashion MNIST"),
    ("data.name", "tfds:cifar10:3"),  # a version has three parts
    ("data.name", None),
    ("data.source", "imagenet"),
    ("data.num_validation", 0),
    ("model.name", "resnet"),
    ("model.init", "zeros"),
    ("model.hidden", ()),
    ("model.hidden", (256, -1)),
    ("model.dropout", 1.0),
    ("model.width", 0),
    ("train.optimizer", "adamw"),
    ("train.momentum", 1.0),
    ("train.momentum", -0.1),
    ("train.weight_decay", -1e-4),
    ("train.augment", "flip"),
    ("train.mode", "sgd"),  # not a training mode (pgd became one)
    ("train.fast_clip_start", "no"),
    ("train.nfgsm_noise", -1.0),
    ("train.nfgsm_step_size", "eps"),
    ("train.grad_align", -0.1),
    ("train.keep_best", "yes"),
    ("train.epochs", 0),
    ("train.epochs", 2.5),
    ("train.batch_size", 0),
    ("train.max_examples", -5),
    ("train.learning_rate", 0.0),
    ("train.learning_rate", -1e-3),
    ("train.schedule", "linear"),
    ("train.eps", -0.1),
    ("train.eps", 1.5),
    ("train.alpha", -0.1),
    ("train.alpha", 1.1),
    ("train.sigma", -0.3),
    ("train.loop", "pmap"),
    ("eval.loop", "while"),
    ("train.chunk_size", 0),
    ("eval.eps", -0.1),
    ("eval.sigma", -1.0),
    ("eval.use_predicted_labels", "yes"),
    ("eval.num_train", 0),
    ("eval.num_validation", 10_001),  # more than data.num_validation holds out, whatever the data
    ("eval.batch_size", 0),
    # Wrong types that used to crash deep inside instead: a bare number where a list belongs, a path that is not text.
    ("model.hidden", 256),
    ("eval.sigma_grid", 0.5),
    ("eval.eps_grid", "0.1,0.2"),
    ("eval.table_eps", 0.1),
    ("data.dir", None),
    ("train.checkpoints_to_keep", 0),
    ("train.overfitting_check_attack", "fgsm"),  # the check already runs FGSM: its second attack is multi-step
    ("train.overfitting_check_attack", "APGD-CE"),
]


def _with(path, value):
    config = default.get_config()
    section, _, field = path.rpartition(".")
    node = config[section] if section else config
    with node.ignore_type():
        node[field] = value
    return config


SHIPPED = sorted(
    p.stem
    for p in pathlib.Path(__file__).resolve().parents[1].joinpath("configs").glob("*.py")
    if p.stem not in ("__init__", "default", "paper")
)


def test_every_experiment_config_is_checked():
    assert {"bp", "cnn_adv", "cnn_pgd", "cnn_fast", "cnn_trades", "bp_trades"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_are_valid(name):
    module = __import__(f"configs.{name}", fromlist=["get_config"])
    validation.validate(module.get_config())


@pytest.mark.parametrize("path,value", BAD_VALUES, ids=[f"{p}={v!r}" for p, v in BAD_VALUES])
def test_bad_value_is_refused_naming_the_field(path, value):
    with pytest.raises(validation.ConfigError, match=f"config\\.{path}="):
        validation.validate(_with(path, value))


@pytest.mark.parametrize(
    "name", ["mnist", "fashion_mnist", "cifar10", "tfds:cifar100", "tfds:imagenette/160px", "tfds:mnist:3.0.1"]
)
def test_each_dataset_name_is_accepted(name):
    validation.validate(_with("data.name", name))


def test_a_bad_data_name_names_the_field_and_the_choices():
    with pytest.raises(validation.ConfigError) as info:
        validation.validate(_with("data.name", "tfds:"))
    assert "config.data.name='tfds:' is invalid: expected one of ('mnist', 'fashion_mnist', 'cifar10')" in str(
        info.value
    )
    assert "'tfds:<name>'" in str(info.value)


@pytest.mark.parametrize("source", ["idx", "download"])
def test_a_tfds_name_with_a_source_other_than_tfds_is_refused_naming_both_fields(source):
    config = _with("data.name", "tfds:cifar100")
    config.data.source = source
    with pytest.raises(validation.ConfigError) as info:
        validation.validate(config)
    message = str(info.value)
    assert "config.data.name='tfds:cifar100'" in message and f"data.source={source!r}" in message, message
    config.data.source = "tfds"
    validation.validate(config)


ROBUST_BAD_VALUES = [
    ("robust.enabled", "yes"),
    ("robust.split", "holdout"),
    ("robust.num_examples", 0),
    ("robust.batch_size", 0),
    ("robust.eps_grid", ()),  # the label-leaking check needs an L-inf eps
    ("robust.eps_grid", 0.3),
    ("robust.l2_eps_grid", (-1.0,)),
    ("robust.attacks", ("pgd", "cw")),
    ("robust.attacks", "pgd"),
    ("robust.pgd_steps", 0),
    ("robust.pgd_restarts", 0),
    ("robust.pgd_step_size", -0.01),
    ("robust.pgd_step_size", float("inf")),
    ("robust.pgd_protocol", "madry"),
    ("robust.deepfool_max_iter", 0),
    ("robust.chunk_size", 0),
    ("robust.attacks", ("autoattack", "autoattack-plus")),
    ("robust.autoattack_version", "rand"),
    ("robust.autoattack_steps", 0),
    ("robust.autoattack_queries", 2.5),
]


def test_every_robust_field_has_a_bad_value_below():
    assert {path for path, _ in ROBUST_BAD_VALUES} == {path for path in validation.RULES if path.startswith("robust.")}


@pytest.mark.parametrize("path,value", ROBUST_BAD_VALUES, ids=[f"{p}={v!r}" for p, v in ROBUST_BAD_VALUES])
def test_each_robust_field_is_refused_naming_it(path, value):
    with pytest.raises(validation.ConfigError, match=re.escape(f"config.{path}={value!r} is invalid")):
        validation.validate(_with(path, value))


@pytest.mark.parametrize("l2_attack", ["fgm_l2", "pgd_l2", "deepfool"])
def test_an_empty_l2_eps_grid_is_refused_when_an_l2_attack_is_listed(l2_attack):
    config = default.get_config()
    config.robust.attacks = ("fgsm", l2_attack)
    config.robust.l2_eps_grid = ()
    with pytest.raises(validation.ConfigError, match=f"config.robust.l2_eps_grid is empty .*'{l2_attack}'"):
        validation.validate(config)
    config.robust.attacks = tuple(n for n, norm in attack_specs.ATTACK_NORMS.items() if norm == "linf")
    validation.validate(config)  # L-inf attacks alone need no L2 eps


def test_train_batch_larger_than_the_shrunk_training_set_is_refused():
    config = default.get_config()
    config.train.max_examples = 100
    with pytest.raises(validation.ConfigError, match="config.train.batch_size=128"):
        validation.validate(config)


def test_missing_section_field_is_named():
    config = default.get_config()
    del config.eval["eps"]
    with pytest.raises(validation.ConfigError, match="config.eval.eps is missing"):
        validation.validate(config)


def test_boundary_values_are_accepted():
    config = default.get_config()
    config.train.alpha = 0.0
    config.train.eps = 0.0
    config.eval.sigma = 0.0
    validation.validate(config)
    config.train.alpha = 1.0
    validation.validate(config)


@pytest.mark.parametrize(
    "mode, check_examples, message",
    [
        ("ordinary", 500, "needs an adversarial train.mode"),
        ("fast", 0, "overfitting_check_examples > 0"),
    ],
)
def test_keep_best_needs_the_per_epoch_pgd_check(mode, check_examples, message):
    config = default.experiment("bp", mode)
    config.train.keep_best = True
    config.train.overfitting_check_examples = check_examples
    with pytest.raises(validation.ConfigError, match=message):
        validation.validate(config)
    config.train.keep_best = False
    validation.validate(config)


def test_report_rejects_bad_sections():
    section = small_robust_section()
    section.attacks = ("pgd", "cw")
    with pytest.raises(ValueError, match="config.robust.attacks"):
        validate_robust(section)
    section = small_robust_section()
    section.l2_eps_grid = ()
    with pytest.raises(ValueError, match="l2_eps_grid"):
        validate_robust(section)


# ----------------------------------------------------------------------------
# Seeds: 32-bit, all of seed..seed+num_seeds-1.


def test_a_seed_out_of_range_names_the_range():
    with pytest.raises(
        validation.ConfigError,
        match=re.escape("config.seed=4294967296 is invalid: expected an integer in [0, 4294967296)"),
    ):
        validation.validate(_with("seed", 2**32))


def test_the_largest_seed_is_accepted_alone_but_not_with_a_second():
    config = _with("seed", 2**32 - 1)
    validation.validate(config)
    config.num_seeds = 2
    with pytest.raises(
        validation.ConfigError, match="config.seed=4294967295 with config.num_seeds=2 uses seeds up to 4294967296"
    ):
        validation.validate(config)
    config.seed = 2**32 - 2
    validation.validate(config)


# ----------------------------------------------------------------------------
# Sizes against the data loaded (check_sizes).

NUM_TRAIN, NUM_VALIDATION, NUM_TEST = 2000, 200, 300  # a small, valid IDX set


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> pathlib.Path:
    return write_synthetic_mnist(tmp_path_factory.mktemp("small_mnist"), NUM_TRAIN, NUM_TEST)


def sized_config(directory: pathlib.Path, mode: str = "fgsm"):
    """A config whose every count fits the small set: 1800 training, 200 validation and 300 test images."""
    config = default.experiment("bp", mode)
    config.data.source, config.data.dir, config.data.num_validation = "idx", str(directory), NUM_VALIDATION
    config.eval.num_train, config.eval.num_validation, config.eval.num_test = 1000, NUM_VALIDATION, NUM_TEST
    config.eval.batch_size = 100
    config.train.overfitting_check_examples = 100
    config.robust.num_examples = 100
    return config


@pytest.fixture(scope="module")
def small_mnist(small_set) -> data.MNIST:
    return data.load_mnist(sized_config(small_set).data)


def test_a_config_that_fits_the_data_passes(small_set, small_mnist):
    config = sized_config(small_set)
    config.robust.enabled = True
    validation.validate(config)
    validation.check_sizes(config, small_mnist)


TRAIN_SIZE = NUM_TRAIN - NUM_VALIDATION
TOO_LARGE = [
    ("train.max_examples", 5000, TRAIN_SIZE, "training"),
    ("eval.num_train", TRAIN_SIZE + 1, TRAIN_SIZE, "training"),
    ("eval.num_validation", NUM_VALIDATION + 1, NUM_VALIDATION, "validation"),
    ("eval.num_test", NUM_TEST + 1, NUM_TEST, "test"),
]


@pytest.mark.parametrize("path,value,size,split", TOO_LARGE, ids=[p for p, *_ in TOO_LARGE])
def test_a_count_larger_than_its_split_is_refused_naming_the_field_the_split_and_the_data(
    small_set, small_mnist, path, value, size, split
):
    config = sized_config(small_set)
    config.robust.enabled = True
    section, field = path.split(".")
    config[section][field] = value
    expected = f"config.{path}={value} exceeds the {size} {split} images of the data loaded from {small_set}"
    with pytest.raises(validation.ConfigError, match=re.escape(expected)):
        validation.check_sizes(config, small_mnist)


def test_the_training_images_named_are_those_left_after_the_validation_split(small_set, small_mnist):
    config = sized_config(small_set)
    config.eval.num_train = TRAIN_SIZE + 1
    held_out = f"(data.num_validation={NUM_VALIDATION} of its {NUM_TRAIN} are held out for validation)"
    with pytest.raises(validation.ConfigError, match=re.escape(held_out)):
        validation.check_sizes(config, small_mnist)


@pytest.mark.parametrize("max_examples", [0, 1000])
def test_a_batch_larger_than_the_examples_trained_on_is_refused(small_set, small_mnist, max_examples):
    config = sized_config(small_set)
    config.train.max_examples = max_examples
    config.train.batch_size = (max_examples or TRAIN_SIZE) + 1
    trained_on = f"{TRAIN_SIZE} training images of the data loaded from {small_set}"
    if max_examples:
        trained_on = f"train.max_examples={max_examples} examples trained on"
    with pytest.raises(
        validation.ConfigError,
        match=re.escape(f"config.train.batch_size={config.train.batch_size} exceeds the {trained_on}"),
    ):
        validation.check_sizes(config, small_mnist)
    config.train.batch_size -= 1
    validation.check_sizes(config, small_mnist)


def test_counts_that_take_all_of_a_smaller_split_are_not_refused(small_set, small_mnist):
    # The robustness report and the per-epoch check use all of their split when it is smaller, and say how many.
    config = sized_config(small_set)
    config.robust.enabled = True
    config.robust.num_examples = NUM_TEST + 1
    config.train.overfitting_check_examples = NUM_VALIDATION + 1
    validation.check_sizes(config, small_mnist)


def test_a_training_set_too_small_passed_the_old_check_and_was_clamped_silently(small_set, small_mnist):
    config = sized_config(small_set)
    config.train.max_examples = 5000
    # The data-free checks cannot know; the old ones compared with MNIST's 60,000 - data.num_validation.
    validation.validate(config)
    assert config.train.max_examples <= 60_000 - config.data.num_validation
    # What training then did (fit._build, train.make_epoch_fn): numpy's slice stops at the end of the
    # data, while the epoch permutes 5000 indices, and JAX's gather clamps those past the end.
    images = small_mnist.train.images[: config.train.max_examples]
    assert len(images) == TRAIN_SIZE
    permutation = train.epoch_permutation(jax.random.key(0), 1, config.train.max_examples)
    gathered = np.asarray(jnp.asarray(images)[permutation])
    past_the_end = np.asarray(permutation) >= TRAIN_SIZE
    assert past_the_end.sum() == 5000 - TRAIN_SIZE
    assert (gathered[past_the_end] == images[-1]).all()  # copies of the last image, trained on as data
    with pytest.raises(validation.ConfigError, match="config.train.max_examples=5000 exceeds the 1800 training images"):
        validation.check_sizes(config, small_mnist)


def test_validate_bounds_no_count_by_mnists_sizes():
    # A larger IDX set (the loaders accept any count) could hold all of these.
    config = default.get_config()
    config.eval.num_train, config.eval.num_test, config.train.batch_size = 100_000, 20_000, 60_000
    validation.validate(config)


@pytest.fixture(scope="module")
def real_mnist() -> tuple[str, data.MNIST]:
    directory = os.environ.get(data.DATA_DIR_ENV, "")
    if not directory:
        pytest.skip(f"{data.DATA_DIR_ENV} is unset; point it at a directory holding the four MNIST IDX files")
    config = default.get_config()
    config.data.dir = directory
    return directory, data.load_mnist(config.data)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_fit_the_real_mnist(real_mnist, name):
    directory, mnist = real_mnist
    config = __import__(f"configs.{name}", fromlist=["get_config"]).get_config()
    config.data.dir = directory
    validation.check_sizes(config, mnist)
    config.eval.num_test = 10_001
    with pytest.raises(validation.ConfigError, match="config.eval.num_test=10001 exceeds the 10000 test images"):
        validation.check_sizes(config, mnist)
