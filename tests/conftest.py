"""Shared fixtures: the real MNIST directory, and a config shrunk to seconds."""

import os
import pathlib

import pytest

from configs import default

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
    return config
