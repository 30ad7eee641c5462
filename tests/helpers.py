"""Helpers shared by the test files: small configs, synthetic data, linear models with closed forms, a tiny MLP,
and the pieces that run an experiment. Fixtures built on them are in tests/conftest.py."""

from __future__ import annotations

import contextlib
import functools
import gzip
import pathlib
import shutil
import struct

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from advjax import attacks, data, eval_fold, experiment, idx, models, noise, objectives, train, validation
from configs import default

IMAGE_SHAPE = (28, 28, 1)
NUM_PIXELS = 28 * 28


@contextlib.contextmanager
def optimizations_disabled(disabled: bool = True):
    """Most of XLA's optimisation passes off (for tiny programs, compiling costs several times more than
    running), or with `disabled=False` back on inside the quick tier's fixture that turns them off."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", disabled)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)


full_optimizations = functools.partial(optimizations_disabled, False)

# optimizations_disabled for a subprocess, through its environment: both sides of a comparison made inside it
# compile the same way.
QUICK_COMPILE_ENV = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}


# ----------------------------------------------------------------------------
# Configs shrunk to seconds.


def tiny_config(model: str = "bp", mode: str = "ordinary"):
    """A config that trains and evaluates in seconds: few examples, one epoch."""
    config = default.experiment(model, mode)
    config.train.epochs = 1
    config.train.max_examples = 512
    config.train.batch_size = 64
    config.eval.num_train = 200
    config.eval.num_validation = 200
    config.eval.num_test = 300
    config.eval.batch_size = 100
    config.train.attack_steps = 3  # the defenses' inner attacks (pgd, trades): a few steps test the same code
    return config


def synthetic_config(data_dir: pathlib.Path, model: str = "bp", mode: str = "ordinary"):
    """tiny_config reading the synthetic directory (200 of its 1200 training images for validation)."""
    config = tiny_config(model, mode)
    config.data.source = "idx"
    config.data.dir = str(data_dir)
    config.data.num_validation = 200
    config.train.max_examples = 0
    return config


def small_config(model: str = "bp", mode: str = "ordinary", schedule: str = "constant", hidden: tuple = (32,)):
    """tiny_config with a narrower BP (it compiles and runs faster; the CNN ignores it) and a chosen schedule."""
    cfg = tiny_config(model, mode)
    cfg.model.hidden = hidden
    cfg.train.schedule = schedule
    return cfg


# ----------------------------------------------------------------------------
# Synthetic data.


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """Encodes a uint8 array as IDX: big-endian magic, dims, then the bytes."""
    magic = magic or {3: 2051, 1: 2049}[array.ndim]
    dims = b"".join(struct.pack(">I", d) for d in array.shape)
    return struct.pack(">I", magic) + dims + array.astype(np.uint8).tobytes()


def synthetic_digits(num: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable fake digits: each class lights its own 4x4 block, over noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, num).astype(np.uint8)
    images = rng.integers(0, 60, (num, 28, 28)).astype(np.uint8)
    for i, label in enumerate(labels):
        row, col = divmod(int(label), 5)
        images[i, 4 + 10 * row : 8 + 10 * row, 2 + 5 * col : 6 + 5 * col] = 230
    return images, labels


def write_synthetic_mnist(path: pathlib.Path, num_train: int = 1200, num_test: int = 300) -> pathlib.Path:
    """Writes the four gzipped IDX files of synthetic digits into `path`."""
    path.mkdir(parents=True, exist_ok=True)
    for prefix, num, seed in (("train", num_train, 0), ("t10k", num_test, 1)):
        images, labels = synthetic_digits(num, seed)
        (path / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images), compresslevel=1))
        (path / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels), compresslevel=1))
    return path


def synthetic_data(num_examples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 images [N, 28, 28, 1] and int32 labels: for the mechanics of a step or an epoch."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num_examples, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, num_examples).astype(np.int32)
    return images, labels


# IDX files of random arrays, for the loaders (advjax.idx, advjax.download, advjax.data).
IDX_NAMES = (idx.TRAIN_IMAGES, idx.TRAIN_LABELS, idx.TEST_IMAGES, idx.TEST_LABELS)
GZ_NAMES = sorted(f"{name}.gz" for name in IDX_NAMES)
IDX_NUM_TRAIN, IDX_NUM_TEST, IDX_NUM_VALIDATION = 60, 20, 10
MIRRORS = ("https://a.example/mnist/", "https://b.example/mnist")


def write_file(path: pathlib.Path, content: bytes, *, compress: bool = False) -> pathlib.Path:
    path.write_bytes(gzip.compress(content) if compress else content)
    return path


def flip_last_byte(content: bytes) -> bytes:
    return content[:-1] + bytes([content[-1] ^ 1])


def synthetic_arrays() -> dict[str, np.ndarray]:
    """IDX name -> array, with every class present in each split."""
    rng = np.random.default_rng(0)
    return {
        idx.TRAIN_IMAGES: rng.integers(0, 256, (IDX_NUM_TRAIN, 28, 28), np.uint8),
        idx.TRAIN_LABELS: np.arange(IDX_NUM_TRAIN, dtype=np.uint8) % 10,
        idx.TEST_IMAGES: rng.integers(0, 256, (IDX_NUM_TEST, 28, 28), np.uint8),
        idx.TEST_LABELS: np.arange(IDX_NUM_TEST, dtype=np.uint8) % 10,
    }


def write_gz_dir(directory: pathlib.Path) -> pathlib.Path:
    """Writes the synthetic arrays as the four gzipped IDX files."""
    directory.mkdir(parents=True)
    for name, array in synthetic_arrays().items():
        write_file(directory / f"{name}.gz", idx_bytes(array), compress=True)
    return directory


def listing(directory: pathlib.Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def data_config(**overrides) -> ml_collections.ConfigDict:
    """A config.data section for the synthetic IDX files."""
    config = ml_collections.ConfigDict(
        dict(
            source="auto",
            dir="",
            cache_dir="",
            tfds_data_dir="",
            num_validation=IDX_NUM_VALIDATION,
            split_seed=0,
        )
    )
    config.update(overrides)
    return config


class CopyFetch:
    """A `fetch` that copies files from a local directory and records the URLs."""

    def __init__(self, source: pathlib.Path):
        self.source = source
        self.urls: list[str] = []

    def __call__(self, url: str, dest: pathlib.Path) -> None:
        self.urls.append(url)
        name = url.rsplit("/", 1)[-1].removesuffix(".gz")
        shutil.copyfile(idx._find_idx_file(self.source, name), dest)


def expect_error(fn, *args, must_contain: tuple[str, ...], **kwargs) -> str:
    """Calls fn, expects a DataError, checks its message; returns the message."""
    with pytest.raises(data.DataError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    for fragment in must_contain:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# ----------------------------------------------------------------------------
# Linear models, whose input gradients are known in closed form, and numpy references.


def linear_logits_fn(weights, bias):
    """logits = x.reshape(B, -1) @ W + b, as the attacks see a model."""
    w, b = jnp.asarray(weights, jnp.float32), jnp.asarray(bias, jnp.float32)
    return lambda x: x.reshape((x.shape[0], -1)) @ w + b


def closed_form_input_gradient(weights, bias, images, labels) -> np.ndarray:
    """d/dx sum_i CE(x_i W + b, y_i) = (softmax - onehot) @ W^T, in float64 numpy."""
    x = np.asarray(images, np.float64).reshape(len(labels), -1)
    w, b = np.asarray(weights, np.float64), np.asarray(bias, np.float64)
    logits = x @ w + b
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    onehot = np.eye(w.shape[1])[labels]
    return ((p - onehot) @ w.T).reshape(np.shape(images))


def uniform_images(batch: int, low: float = 0.0, high: float = 1.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(low, high, (batch, *IMAGE_SHAPE)).astype(np.float32)


def per_image(x) -> np.ndarray:
    return np.asarray(x, np.float64).reshape(np.shape(x)[0], -1)


def linf_norms(delta) -> np.ndarray:
    return np.abs(per_image(delta)).max(axis=1)


def l2_norms(delta) -> np.ndarray:
    return np.sqrt((per_image(delta) ** 2).sum(axis=1))


def random_linear_model(seed: int, num_classes: int = 10, scale: float = 0.05, bias_scale: float = 0.0):
    rng = np.random.default_rng(seed)
    weights = scale * rng.standard_normal((NUM_PIXELS, num_classes))
    bias = bias_scale * rng.standard_normal(num_classes)
    return weights, bias, linear_logits_fn(weights, bias)


def noisy_input_model(logits_fn, sigma: float = 0.5):
    """A randomised model, (images, key) -> logits: Gaussian noise on the input, as a smoothed classifier's base."""
    return lambda x, key: logits_fn(noise.gaussian(key, x, sigma, clip=False))


def noisy_gradient_model(logits_fn, scale: float):
    """(images, key) -> logits_fn(images), whose input gradient carries noise of `scale` drawn from the key."""

    def keyed(x, key):
        flat = x.reshape(x.shape[0], -1)
        projected = flat @ jax.random.normal(key, (flat.shape[1], 10))
        return logits_fn(x) + scale * (projected - jax.lax.stop_gradient(projected))

    return keyed


def numpy_logits(weights, bias, images) -> np.ndarray:
    return per_image(images) @ np.asarray(weights, np.float64) + np.asarray(bias, np.float64)


def numpy_cross_entropy(logits, labels) -> np.ndarray:
    """-log softmax(logits)[label], in float64 with the max subtracted."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_softmax = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -log_softmax[np.arange(len(labels)), np.asarray(labels)]


def target_margin(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """logit_target - max other logit: positive exactly when the target is predicted."""
    rows = np.arange(len(targets))
    others = logits.copy()
    others[rows, targets] = -np.inf
    return logits[rows, targets] - others.max(axis=1)


def assert_in_unit_interval(x):
    x = np.asarray(x)
    assert x.min() >= 0.0 and x.max() <= 1.0, (x.min(), x.max())


# ----------------------------------------------------------------------------
# A model, an objective and fresh train states.


class Setup:
    """A model, an objective, and fresh initial states (the epoch donates its carry)."""

    def __init__(
        self,
        model: str = "bp",
        mode: str = "ordinary",
        schedule: str = "constant",
        steps_per_epoch: int = 4,
        hidden: tuple = (32,),
        deterministic: bool = False,
    ):
        self.config = small_config(model, mode, schedule, hidden)
        self.model = models.build_model(self.config.model)
        self.objective = objectives.make_objective(self.model.apply, self.config.train, deterministic=deterministic)
        self.steps_per_epoch = steps_per_epoch

    def state(self, step: int = 0) -> train.TrainState:
        state = train.create_train_state(jax.random.key(0), self.model, self.config.train, self.steps_per_epoch)
        return state.replace(step=step)


# ----------------------------------------------------------------------------
# A tiny tanh MLP over 6x6 images (numpy weights): compiling its folds, not running them, is what costs time.

MLP_SIDE, MLP_HIDDEN, MLP_CLASSES = 6, 16, 4
# 21 examples in batches of 8: 3 batches, the last with 3 padded slots.
MLP_NUM_EXAMPLES, MLP_BATCH_SIZE = 21, 8
GRID = (0.1, 0.3)


def mlp_apply(variables, images, train=False):
    """A smooth (tanh) MLP with Linen's calling convention: no input gradient is exactly zero."""
    del train
    p = variables["params"]
    hidden = jnp.tanh(images.reshape((images.shape[0], -1)) @ p["w1"] + p["b1"])
    return hidden @ p["w2"] + p["b2"]


def mlp_logits_fn(params):
    return lambda z: mlp_apply({"params": params}, z)


@functools.cache
def mlp_params(seed: int = 0) -> dict:
    """Random weights, shifted so the all-zero padding image is confidently class 0, the padding label."""
    rng = np.random.default_rng(seed)
    params = {
        "w1": rng.normal(0, 1.0, (MLP_SIDE * MLP_SIDE, MLP_HIDDEN)).astype(np.float32),
        "b1": rng.normal(0, 0.5, MLP_HIDDEN).astype(np.float32),
        "w2": rng.normal(0, 1.0, (MLP_HIDDEN, MLP_CLASSES)).astype(np.float32),
        "b2": np.zeros(MLP_CLASSES, np.float32),
    }
    zero_logits = np.asarray(mlp_apply({"params": params}, jnp.zeros((1, MLP_SIDE, MLP_SIDE, 1))))[0]
    params["b2"] = (-zero_logits + 3.0 * np.eye(MLP_CLASSES)[0]).astype(np.float32)
    return jax.tree.map(jnp.asarray, params)


@functools.cache
def mlp_dataset(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels the model gets right on even indices and wrong (its runner-up) on odd ones.

    The odd examples make FGSM on predicted labels differ from FGSM on true labels.
    """
    images = np.random.default_rng(seed).integers(0, 256, (MLP_NUM_EXAMPLES + 5, MLP_SIDE, MLP_SIDE, 1), dtype=np.uint8)
    order = np.argsort(np.asarray(mlp_logits_fn(mlp_params())(data.to_float_images(images))), axis=-1)
    labels = np.where(np.arange(len(images)) % 2 == 0, order[:, -1], order[:, -2]).astype(np.int32)
    return images, labels


def mlp_eval_set(labels=None) -> eval_fold.EvalSet:
    images, default_labels = mlp_dataset()
    return eval_fold.make_eval_set(
        images, default_labels if labels is None else labels, MLP_NUM_EXAMPLES, MLP_BATCH_SIZE
    )


def small_robust_section():
    """config.robust with a short grid and three cheap attacks."""
    section = default.get_config().robust
    section.eps_grid = GRID
    section.l2_eps_grid = (1.0,)
    section.attacks = ("fgsm", "pgd", "fgm_l2")
    section.pgd_steps = 3
    section.pgd_restarts = 2
    section.chunk_size = 3
    return section


def validate_robust(section):
    """The default config with `section` as config.robust, validated."""
    config = default.get_config()
    config.robust = section
    validation.validate(config)


# ----------------------------------------------------------------------------
# Running an experiment in-process.

TIMING_FIELDS = ("epoch_seconds", "examples_per_second", "evaluation_seconds")


def run_experiment(config, run_dir, log=lambda message: None, **kwargs):
    return experiment.train_and_evaluate(config, str(run_dir), log=log, **kwargs)


def outputs(run_dir) -> dict[str, bytes]:
    """The files whose bytes must not depend on timing, interruption or resumption."""
    return {name: (run_dir / name).read_bytes() for name in ("metrics.jsonl", "summary.json", "config.json")}


class Interrupted(Exception):
    """Stands in for a kill: raised from the log line of an epoch, after its checkpoint was written."""


def interrupt_after_epoch(epoch: int, messages: list):
    def log(message: str) -> None:
        messages.append(message)
        if message.startswith(f"epoch {epoch}/"):
            raise Interrupted(message)

    return log


class ScriptedCheck:
    """Stands in for the per-epoch robustness check: epoch e (1-based) reports pgd[e - 1]."""

    def __init__(self, pgd: list, first_epoch: int = 1):
        self.pgd, self.epoch = pgd, first_epoch

    def __call__(self, config, apply_fn, validation):
        def check(params, key):
            value = self.pgd[self.epoch - 1]
            self.epoch += 1
            return {"fgsm": value, "pgd": value}

        return check


# ----------------------------------------------------------------------------
# Attacks jitted for speed: eagerly, every new shape compiles each op of the
# gradient on its own (about a second per call on a 2-core CPU). Strengths and
# keys stay traced arguments; the logits function is static.

fgsm = jax.jit(attacks.fgsm, static_argnums=0, static_argnames="targeted")


# Small settings for every registered attack.
LINF_ATTACKS = {
    "fgsm": {},
    "fgsm_random_start": {},
    "bim": {"num_steps": 4},
    "pgd": {"num_steps": 4, "num_restarts": 2},
    "apgd_ce": {"num_steps": 4, "num_restarts": 2},
}


L2_ATTACKS = {
    "fgm_l2": {},
    "pgd_l2": {"num_steps": 4, "num_restarts": 2},
    "deepfool": {"max_iter": 5},
}

bim = jax.jit(attacks.bim, static_argnums=0, static_argnames=("num_steps", "targeted"))
