"""Config checks that run before any data is read or anything is compiled.

Each failure names the field, the value and what was expected, so a typo on
the command line costs a second, not a compilation.
"""

from typing import Any, Callable

import ml_collections

from advjax import data, loops, models, train


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


RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": non_negative_int(),
    "num_seeds": positive_int(),
    "data.source": one_of(data.SOURCES),
    "data.num_validation": positive_int(),
    "data.split_seed": non_negative_int(),
    "model.name": one_of(models.MODELS),
    "model.init": one_of(tuple(models.KERNEL_INITS)),
    "model.hidden": ((lambda v: len(v) > 0 and all(_is_int(w) and w > 0 for w in v)), "a non-empty list of positive integers"),
    "model.dropout": ((lambda v: _is_number(v) and 0 <= v < 1), "a number in [0, 1)"),
    "train.mode": one_of(train.TRAINING_MODES),
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
    "eval.eps": number_in(0.0, 1.0),
    "eval.sigma": number_in(0.0, 10.0),
    "eval.use_predicted_labels": ((lambda v: isinstance(v, bool)), "true or false"),
    "eval.num_train": positive_int(),
    "eval.num_validation": positive_int(),
    "eval.num_test": positive_int(),
    "eval.sigma_grid": ((lambda v: all(_is_number(x) and 0 <= x <= 10 for x in v)), "numbers in [0, 10]"),
    "eval.eps_grid": ((lambda v: all(_is_number(x) and 0 <= x <= 1 for x in v)), "numbers in [0, 1]"),
    "eval.sweep_split": one_of(("train", "validation", "test")),
    "eval.table_eps": ((lambda v: all(_is_number(x) and 0 <= x <= 1 for x in v)), "numbers in [0, 1]"),
    "eval.grid_chunk": non_negative_int(),
    "eval.batch_size": positive_int(),
    "eval.chunk_size": positive_int(),
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
    """Raises ConfigError naming the first field that is out of range."""
    for path, (ok, expected) in RULES.items():
        value = _lookup(config, path)
        if not ok(value):
            raise ConfigError(f"config.{path}={value!r} is invalid: expected {expected}")
    _check_sizes(config)
