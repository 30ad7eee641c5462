"""Shared fixtures: the real MNIST directory, and a config shrunk to seconds."""

import atexit
import gzip
import os
import pathlib
import shutil
import struct
import tempfile

import jax
import numpy as np
import pytest

from configs import default

# Compilation dominates these tests: each train_and_evaluate builds fresh jits
# of the same programs. A persistent compilation cache, fresh per session (so
# never stale) and shared with the launch.py subprocesses through the
# environment, compiles each program once: a repeated tiny run drops from
# about 11 s to 2 s on the 2-core CI machine. It must be set before the first
# compilation, which is why it happens here, at import.
_COMPILATION_CACHE = tempfile.mkdtemp(prefix="advjax-test-jax-cache-")
atexit.register(shutil.rmtree, _COMPILATION_CACHE, ignore_errors=True)
for _name, _value in {
    "jax_compilation_cache_dir": _COMPILATION_CACHE,
    "jax_persistent_cache_min_compile_time_secs": 0.0,
    "jax_persistent_cache_min_entry_size_bytes": 0,
}.items():
    jax.config.update(_name, _value)
    os.environ[_name.upper()] = str(_value)

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@pytest.fixture
def mnist_dir() -> pathlib.Path:
    """$ADVJAX_DATA_DIR holding the four MNIST IDX files, or the test is skipped saying why."""
    configured = os.environ.get("ADVJAX_DATA_DIR", "")
    if not configured:
        pytest.skip("ADVJAX_DATA_DIR is unset; point it at a directory holding the four MNIST IDX files")
    path = pathlib.Path(configured)
    missing = [n for n in MNIST_FILES if not ((path / n).exists() or (path / f"{n}.gz").exists())]
    if missing:
        pytest.skip(f"ADVJAX_DATA_DIR={configured} lacks {missing}")
    return path


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


def _idx(array: np.ndarray) -> bytes:
    magic = {3: 2051, 1: 2049}[array.ndim]
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes()


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
        (path / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images), compresslevel=1))
        (path / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(labels), compresslevel=1))
    return path


@pytest.fixture(scope="session")
def synthetic_mnist_dir(tmp_path_factory) -> pathlib.Path:
    """A directory of IDX files in MNIST's format: 1200 training and 300 test images."""
    return write_synthetic_mnist(tmp_path_factory.mktemp("synthetic_mnist"))


def synthetic_config(data_dir: pathlib.Path, model: str = "bp", mode: str = "ordinary"):
    """tiny_config reading the synthetic directory (200 of its 1200 training images for validation)."""
    config = tiny_config(model, mode)
    config.data.source = "idx"
    config.data.dir = str(data_dir)
    config.data.num_validation = 200
    config.train.max_examples = 0
    return config
