"""Config checks that run before anything is compiled: `validate` before any data is read, `check_sizes` once they are.

Each failure names the field, the value and what was expected, so a typo on
the command line costs a second, not a compilation.
"""

from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from advjax import attack_registry, augment, auto_attack, data, loops, models, objectives, overfitting, sharding, train
from advjax.attack_specs import ATTACK_NORMS, CASCADES, PGD_PROTOCOLS


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


def int_in(low: int, high: int) -> tuple[Callable[[Any], bool], str]:
    """An integer in [low, high): the upper bound excluded, as in `range`.

    >>> ok, expected = int_in(0, 2**32)  # ok(2**32) is False
    """
    return (lambda v: _is_int(v) and low <= v < high), f"an integer in [{low}, {high})"


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


# JAX's PRNG takes seeds modulo 2**32: seed 2**32 would repeat seed 0's every bit, and 2**63 overflows.
SEED_LIMIT = 2**32
# What robust.attacks may name: every evaluation attack, and AutoAttack's cascade.
ROBUST_ATTACKS = tuple(attack_registry.ATTACKS) + CASCADES

RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": int_in(0, SEED_LIMIT),
    "num_seeds": positive_int(),
    "num_devices": non_negative_int(),
    "data.name": (data.is_valid_name, data.NAME_CHOICES),
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
    "model.width": positive_int(),
    "model.dtype": one_of(tuple(models.DTYPES)),
    "train.mode": one_of(objectives.TRAINING_MODES),
    "train.epochs": positive_int(),
    "train.batch_size": positive_int(),
    "train.max_examples": non_negative_int(),
    "train.learning_rate": ((lambda v: _is_number(v) and 0 < v < float("inf")), "a positive finite number"),
    "train.schedule": one_of(train.SCHEDULES),
    "train.noise_clip": boolean(),
    "train.cyclic_peak": ((lambda v: _is_number(v) and 0 < v < 1), "a number in (0, 1)"),
    "train.optimizer": one_of(train.OPTIMIZERS),
    "train.momentum": ((lambda v: _is_number(v) and 0 <= v < 1), "a number in [0, 1)"),
    "train.weight_decay": non_negative_number(),
    "train.augment": one_of(augment.AUGMENTATIONS),
    "train.eps": number_in(0.0, 1.0),
    "train.alpha": number_in(0.0, 1.0),
    "train.sigma": number_in(0.0, 10.0),
    "train.consistency_copies": positive_int(),
    "train.consistency_lambda": non_negative_number(),
    "train.consistency_eta": non_negative_number(),
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
    "train.overfitting_check_attack": one_of(tuple(overfitting.CHECK_ATTACKS)),
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
    "robust.attacks": sequence_of(lambda n: n in ROBUST_ATTACKS, f"attack names, each one of {ROBUST_ATTACKS}"),
    "robust.pgd_steps": positive_int(),
    "robust.pgd_restarts": positive_int(),
    "robust.pgd_step_size": non_negative_number(),
    "robust.pgd_protocol": one_of(tuple(PGD_PROTOCOLS)),
    "robust.deepfool_max_iter": positive_int(),
    "robust.chunk_size": positive_int(),
    "robust.autoattack_version": (
        lambda v: v in auto_attack.DETERMINISTIC_VERSIONS,
        f"one of {auto_attack.DETERMINISTIC_VERSIONS} (the models trained here are deterministic; 'rand' is "
        "advjax.autoattack's version for a randomised model that takes a key)",
    ),
    "robust.autoattack_steps": positive_int(),
    "robust.autoattack_queries": positive_int(),
    "certify.enabled": boolean(),
    "certify.sigma": sequence_of(lambda x: _is_number(x) and 0 < x <= 10, "numbers in (0, 10]", non_empty=True),
    "certify.n0": positive_int(),
    "certify.n": positive_int(),
    "certify.alpha": ((lambda v: _is_number(v) and 0 < v < 1), "a number in (0, 1)"),
    "certify.split": one_of(("train", "validation", "test")),
    "certify.num_examples": positive_int(),
    "certify.batch": positive_int(),
    "certify.chunk_size": positive_int(),
    "certify.radii": sequence_of(lambda x: _is_number(x) and x >= 0, "non-negative numbers", non_empty=True),
}


def _lookup(config: ml_collections.ConfigDict, path: str) -> Any:
    node = config
    for part in path.split("."):
        if part not in node:
            raise ConfigError(f"config.{path} is missing")
        node = node[part]
    return node


def _check_sizes(config: ml_collections.ConfigDict) -> None:
    """The sizes the config bounds by itself. Those the data bound are `check_sizes`'s, once the data are loaded:
    MNIST's 60,000 and 10,000 would be wrong bounds for any other IDX set the loaders accept, smaller or larger."""
    if config.eval.num_validation > config.data.num_validation:
        raise ConfigError(
            f"config.eval.num_validation={config.eval.num_validation} exceeds the {config.data.num_validation} "
            "validation images that data.num_validation holds out"
        )
    if 0 < config.train.max_examples < config.train.batch_size:
        raise ConfigError(
            f"config.train.batch_size={config.train.batch_size} exceeds the "
            f"train.max_examples={config.train.max_examples} examples trained on"
        )


def _check_data_source(config: ml_collections.ConfigDict) -> None:
    """data.source can read data.name: a 'tfds:<name>' dataset is read through TFDS alone."""
    try:
        data.check_source(config.data.name, config.data.source)
    except data.DataError as e:
        raise ConfigError(f"config.{e}") from e


def _check_seeds(config: ml_collections.ConfigDict) -> None:
    """Seeds seed..seed+num_seeds-1 are all below SEED_LIMIT, else the last ones would repeat the first."""
    last = config.seed + config.num_seeds - 1
    if last >= SEED_LIMIT:
        raise ConfigError(
            f"config.seed={config.seed} with config.num_seeds={config.num_seeds} uses seeds up to {last}, "
            f"past the largest seed {SEED_LIMIT - 1} (seed {SEED_LIMIT} would repeat seed 0); lower seed or num_seeds"
        )


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first field that is missing, of the wrong type or out of range.

    It needs no data: the sizes bounded by the data are checked by `check_sizes`.

    >>> validate(configs.bp_adv.get_config())
    """
    for path, (ok, expected) in RULES.items():
        value = _lookup(config, path)
        if not ok(value):
            raise ConfigError(f"config.{path}={value!r} is invalid: expected {expected}")
    _check_data_source(config)
    _check_sizes(config)
    _check_seeds(config)
    _check_devices(config)
    _check_keep_best(config)
    _check_l2_grid(config)
    _check_certify_chunks(config)


SPLIT_NOUNS = {"train": "training", "validation": "validation", "test": "test"}


def _counts_by_split(config: ml_collections.ConfigDict) -> list[tuple[str, int, str]]:
    """(field, value, split): each count of images the run takes from a split of the data."""
    counts = [
        ("train.max_examples", config.train.max_examples, "train"),
        ("eval.num_train", config.eval.num_train, "train"),
        ("eval.num_validation", config.eval.num_validation, "validation"),
        ("eval.num_test", config.eval.num_test, "test"),
    ]
    # robust.num_examples and train.overfitting_check_examples are not here: each takes all of its split when the
    # split is smaller, and the reports state the count used (robustness.robust_eval_set, overfitting.held_out_set).
    return counts


def check_sizes(config: ml_collections.ConfigDict, mnist: data.MNIST) -> None:
    """Raises ConfigError naming the first count of images that exceeds the split of `mnist` it is taken from.

    Unchecked, a training set too small is silently padded with repeats of its
    last image, and an evaluation subset too large fails only after training.

    >>> check_sizes(config, data.load_mnist(config.data))
    """
    sizes = {split: len(getattr(mnist, split).labels) for split in SPLIT_NOUNS}
    location = data.locate(config.data)[1]
    for path, value, split in _counts_by_split(config):
        if value > sizes[split]:
            raise ConfigError(
                f"config.{path}={value} exceeds the {sizes[split]} {SPLIT_NOUNS[split]} images of the data "
                f"loaded from {location}{_held_out(config, sizes) if split == 'train' else ''}"
            )
    if config.train.batch_size > (config.train.max_examples or sizes["train"]):
        trained_on = (
            f"train.max_examples={config.train.max_examples} examples trained on"
            if config.train.max_examples
            else f"{sizes['train']} training images of the data loaded from {location}{_held_out(config, sizes)}"
        )
        raise ConfigError(f"config.train.batch_size={config.train.batch_size} exceeds the {trained_on}")


def _held_out(config: ml_collections.ConfigDict, sizes: dict[str, int]) -> str:
    total = sizes["train"] + sizes["validation"]
    return f" (data.num_validation={config.data.num_validation} of its {total} are held out for validation)"


def _check_l2_grid(config: ml_collections.ConfigDict) -> None:
    """L2 attacks need L2 epsilons: their eps grid is not the L-inf one."""
    l2_attacks = [name for name in config.robust.attacks if ATTACK_NORMS[name] == "l2"]
    if l2_attacks and not config.robust.l2_eps_grid:
        raise ConfigError(f"config.robust.l2_eps_grid is empty but L2 attacks are configured: {l2_attacks}")


def _check_certify_chunks(config: ml_collections.ConfigDict) -> None:
    """Each sampling pass draws certify.chunk_size samples per image, so it divides both sample counts
    (the selection's n0 is drawn in one pass when it is smaller, as smoothing.certify does)."""
    chunk = config.certify.chunk_size
    for path, samples in (("certify.n0", config.certify.n0), ("certify.n", config.certify.n)):
        if samples % min(chunk, samples):
            raise ConfigError(
                f"config.certify.chunk_size={chunk} does not divide config.{path}={samples}: "
                "a batch the sample count cannot fill"
            )


def _check_keep_best(config: ml_collections.ConfigDict) -> None:
    """Keeping the best epoch needs the per-epoch robustness check it is chosen by."""
    if not config.train.keep_best:
        return
    if config.train.mode not in objectives.ADVERSARIAL_MODES:
        raise ConfigError(
            f"config.train.keep_best=True needs an adversarial train.mode (one of {objectives.ADVERSARIAL_MODES}), "
            f"whose per-epoch PGD (or APGD-CE) check chooses the epoch; train.mode is {config.train.mode!r}"
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
