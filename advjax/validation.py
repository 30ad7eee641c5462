"""Config checks that run before any data is read or anything is compiled.

Each failure names the field, the value and what was expected, so a typo on
the command line costs a second, not a compilation.
"""

from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from advjax import attack_registry, data, loops, models, objectives, sharding, train
from advjax.attack_specs import ATTACK_NORMS, PGD_PROTOCOLS


class ConfigError(ValueError):
    """A config field holds a value the library cannot run with."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def one_of(choices: tuple) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in choices), f"one of {choices}"


def positive_int() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _is_int(v) and v > 0), "a positive integer"


def non_negative_int() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _is_int(v) and v >= 0), "a non-negative integer"


def number_in(low: float, high: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _is_number(v) and low <= v <= high), f"a number in [{low}, {high}]"


def non_negative_number() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _is_number(v) and 0 <= v < float("inf")), "a non-negative finite number"


def boolean() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, bool)), "true or false"


def text() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, str)), "a string"


def sequence_of(ok: Callable[[Any], bool], items: str, non_empty: bool = False) -> tuple[Callable[[Any], bool], str]:
    """A tuple or list whose every item passes `ok`; a bare number or a string is refused, not iterated."""
    check = lambda v: isinstance(v, (tuple, list)) and (len(v) > 0 or not non_empty) and all(ok(x) for x in v)
    return check, f"a {'non-empty ' if non_empty else ''}list of {items}"


RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": non_negative_int(),
    "num_seeds": positive_int(),
    "num_devices": non_negative_int(),
    "data.source": one_of(data.SOURCES),
    "data.dir": text(),
    "data.cache_dir": text(),
    "data.tfds_data_dir": text(),
    "data.num_validation": positive_int(),
    "data.split_seed": non_negative_int(),
    "model.name": one_of(models.MODELS),
    "model.init": one_of(tuple(models.KERNEL_INITS)),
    "model.hidden": sequence_of(lambda w: _is_int(w) and w > 0, "positive integers", non_empty=True),
    "model.dropout": ((lambda v: _is_number(v) and 0 <= v < 1), "a number in [0, 1)"),
    "train.mode": one_of(objectives.TRAINING_MODES),
    "train.epochs": positive_int(),
    "train.batch_size": positive_int(),
    "train.max_examples": non_negative_int(),
    "train.learning_rate": ((lambda v: _is_number(v) and 0 < v < float("inf")), "a positive finite number"),
    "train.schedule": one_of(train.SCHEDULES),
    "train.eps": number_in(0.0, 1.0),
    "train.alpha": number_in(0.0, 1.0),
    "train.sigma": number_in(0.0, 10.0),
    "train.loop": one_of(loops.LOOP_FORMS),
    "train.chunk_size": positive_int(),
    "train.checkpoints_to_keep": positive_int(),
    "train.attack_steps": positive_int(),
    "train.attack_step_size": number_in(0.0, 1.0),
    "train.fast_step_size": number_in(0.0, 10.0),
    "train.fast_clip_start": boolean(),
    "train.nfgsm_noise": number_in(0.0, 10.0),
    "train.nfgsm_step_size": number_in(0.0, 10.0),
    "train.eps_warmup_epochs": number_in(0.0, 1000.0),
    "train.trades_beta": number_in(0.0, 1000.0),
    "train.grad_align": number_in(0.0, 1000.0),
    "train.keep_best": boolean(),
    "train.attack_unroll": one_of(objectives.ATTACK_UNROLL),
    "train.overfitting_check_examples": non_negative_int(),
    "train.overfitting_check_steps": positive_int(),
    "eval.eps": number_in(0.0, 1.0),
    "eval.sigma": number_in(0.0, 10.0),
    "eval.use_predicted_labels": boolean(),
    "eval.num_train": positive_int(),
    "eval.num_validation": positive_int(),
    "eval.num_test": positive_int(),
    "eval.sigma_grid": sequence_of(lambda x: _is_number(x) and 0 <= x <= 10, "numbers in [0, 10]"),
    "eval.eps_grid": sequence_of(lambda x: _is_number(x) and 0 <= x <= 1, "numbers in [0, 1]"),
    "eval.sweep_split": one_of(("train", "validation", "test")),
    "eval.table_eps": sequence_of(lambda x: _is_number(x) and 0 <= x <= 1, "numbers in [0, 1]"),
    "eval.grid_chunk": non_negative_int(),
    "eval.batch_size": positive_int(),
    "eval.chunk_size": positive_int(),
    "eval.loop": one_of(loops.LOOP_FORMS),
    "robust.enabled": boolean(),
    "robust.split": one_of(("train", "validation", "test")),
    "robust.num_examples": positive_int(),
    "robust.batch_size": positive_int(),
    "robust.eps_grid": sequence_of(
        lambda x: _is_number(x) and x >= 0, "non-negative numbers (the label-leaking check needs L-inf eps)", True
    ),
    "robust.l2_eps_grid": sequence_of(lambda x: _is_number(x) and x >= 0, "non-negative numbers"),
    "robust.attacks": sequence_of(
        lambda n: n in attack_registry.ATTACKS, f"attack names, each one of {tuple(attack_registry.ATTACKS)}"
    ),
    "robust.pgd_steps": positive_int(),
    "robust.pgd_restarts": positive_int(),
    "robust.pgd_step_size": non_negative_number(),
    "robust.pgd_protocol": one_of(tuple(PGD_PROTOCOLS)),
    "robust.deepfool_max_iter": positive_int(),
    "robust.chunk_size": positive_int(),
}

MNIST_TRAIN_SIZE, MNIST_TEST_SIZE = 60_000, 10_000


def _lookup(config: ml_collections.ConfigDict, path: str) -> Any:
    node = config
    for part in path.split("."):
        if part not in node:
            raise ConfigError(f"config.{path} is missing")
        node = node[part]
    return node


def _check_sizes(config: ml_collections.ConfigDict) -> None:
    num_train = MNIST_TRAIN_SIZE - config.data.num_validation
    limits = {
        "data.num_validation": (config.data.num_validation, MNIST_TRAIN_SIZE - 1),
        "eval.num_train": (config.eval.num_train, num_train),
        "eval.num_validation": (config.eval.num_validation, config.data.num_validation),
        "eval.num_test": (config.eval.num_test, MNIST_TEST_SIZE),
        "train.max_examples": (config.train.max_examples, num_train),
        "train.batch_size": (config.train.batch_size, config.train.max_examples or num_train),
    }
    for path, (value, limit) in limits.items():
        if value > limit:
            raise ConfigError(f"config.{path}={value} exceeds the {limit} examples available")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first field that is missing, of the wrong type or out of range."""
    for path, (ok, expected) in RULES.items():
        value = _lookup(config, path)
        if not ok(value):
            raise ConfigError(f"config.{path}={value!r} is invalid: expected {expected}")
    _check_sizes(config)
    _check_devices(config)
    _check_keep_best(config)
    _check_l2_grid(config)


def _check_l2_grid(config: ml_collections.ConfigDict) -> None:
    """L2 attacks need L2 epsilons: their eps grid is not the L-inf one."""
    l2_attacks = [name for name in config.robust.attacks if ATTACK_NORMS[name] == "l2"]
    if l2_attacks and not config.robust.l2_eps_grid:
        raise ConfigError(f"config.robust.l2_eps_grid is empty but L2 attacks are configured: {l2_attacks}")


def _check_keep_best(config: ml_collections.ConfigDict) -> None:
    """Keeping the best epoch needs the per-epoch robustness check it is chosen by."""
    if not config.train.keep_best:
        return
    if config.train.mode not in objectives.ADVERSARIAL_MODES:
        raise ConfigError(
            f"config.train.keep_best=True needs an adversarial train.mode (one of {objectives.ADVERSARIAL_MODES}), "
            f"whose per-epoch PGD check chooses the epoch; train.mode is {config.train.mode!r}"
        )
    if config.train.overfitting_check_examples == 0:
        raise ConfigError(
            "config.train.keep_best=True needs the per-epoch PGD check: set train.overfitting_check_examples > 0"
        )


def _check_devices(config: ml_collections.ConfigDict) -> None:
    """The device count exists, and divides every global batch (each device takes an equal share)."""
    available = jax.device_count()
    if config.num_devices > available:
        raise ConfigError(f"config.num_devices={config.num_devices} exceeds the {available} devices available")
    devices = config.num_devices or available
    for path in ("train.batch_size", "eval.batch_size"):
        try:
            sharding.check_batch_size(_lookup(config, path), devices, path)
        except ValueError as e:
            raise ConfigError(f"config.{e}") from e
