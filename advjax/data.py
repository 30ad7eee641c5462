"""MNIST loading: IDX files, a checksummed download cache, or TFDS.

With no directory configured, the default is to download the four official IDX
files into a cache and verify them. TFDS can only *prepare* MNIST through
TensorFlow, a large dependency we do not otherwise need, while a download
needs only the standard library. TFDS remains available (``source='tfds'``)
for a dataset that was already prepared.

The IDX format is advjax.idx and the download cache advjax.download. Every
data fault raises `DataError` with the offending file and the fault.
"""

import os
import types
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from advjax import download
from advjax.idx import DataError, Split, load_idx_dir, make_split

SOURCES: tuple[str, ...] = ("auto", "idx", "tfds", "download")
DATA_DIR_ENV = "ADVJAX_DATA_DIR"


class MNIST(NamedTuple):
    train: Split  # 50,000
    validation: Split  # 10,000
    test: Split  # 10,000


def to_float_images(images: jax.Array) -> jax.Array:
    """uint8 images -> float32 in [0, 1], on the device: data stays uint8 until it is there.

    >>> x = to_float_images(jnp.asarray(mnist.test.images[:100]))  # float32 [100, 28, 28, 1]
    """
    return images.astype(jnp.float32) / 255.0


class DataConfig(Protocol):
    """The fields of the `data` section of the experiment config."""

    source: str  # one of SOURCES
    dir: str  # IDX directory; '' means $ADVJAX_DATA_DIR
    cache_dir: str  # download cache; '' means default_cache_dir()
    tfds_data_dir: str  # '' means the TFDS default
    num_validation: int
    split_seed: int


# ----------------------------------------------------------------------------
# TFDS.


def _load_tfds_split(tfds: types.ModuleType, split: str, data_dir: str | None) -> Split:
    source = f"tfds mnist[{split}] (data_dir={data_dir or 'TFDS default'})"
    try:
        # download=False: preparing MNIST needs TensorFlow, which we do not have;
        # without it an unprepared dataset would attempt a doomed download.
        ds = tfds.data_source("mnist", split=split, data_dir=data_dir, download=False)
    # TFDS signals an unprepared dataset with assorted exception types.
    except Exception as err:  # pylint: disable=broad-exception-caught
        raise DataError(
            f"{source}: cannot open the dataset ({type(err).__name__}: {err}); "
            "prepare it with `tfds build mnist --file_format=array_record` or use "
            "data.source='idx' or 'download'"
        ) from err
    if len(ds) == 0:
        raise DataError(f"{source}: the split is empty")
    # Index records one by one: ds.__getitems__ is broken under tfds mock_data.
    records = [ds[i] for i in range(len(ds))]
    images = np.stack([np.asarray(r["image"]) for r in records])
    labels = np.array([r["label"] for r in records])
    return make_split(images, labels, source, source)


def load_tfds(data_dir: str | None = None) -> tuple[Split, Split]:
    """Loads (train, test) from a prepared TFDS MNIST (array_record format)."""
    try:
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    except ImportError as err:
        raise DataError(
            "tensorflow_datasets is not installed; install it or use data.source='idx' or 'download'"
        ) from err
    return (
        _load_tfds_split(tfds, "train", data_dir),
        _load_tfds_split(tfds, "test", data_dir),
    )


# ----------------------------------------------------------------------------
# Splits and the top-level entry point.


def _take(split: Split, indices: np.ndarray) -> Split:
    return Split(split.images[indices], split.labels[indices])


def split_train_validation(train: Split, num_validation: int, seed: int) -> tuple[Split, Split]:
    """Randomly splits off `num_validation` examples; deterministic per seed."""
    num_examples = len(train.labels)
    if not 0 < num_validation < num_examples:
        raise DataError(
            f"num_validation must be in 1..{num_examples - 1} for a training set"
            f" of {num_examples} examples, got {num_validation}"
        )
    permutation = np.random.Generator(np.random.PCG64(seed)).permutation(num_examples)
    return (
        _take(train, permutation[num_validation:]),
        _take(train, permutation[:num_validation]),
    )


def resolve_data_dir(configured: str) -> str:
    """The configured IDX directory, else $ADVJAX_DATA_DIR, else ''."""
    return configured or os.environ.get(DATA_DIR_ENV, "")


def _load_train_test(config: DataConfig) -> tuple[Split, Split]:
    if config.source not in SOURCES:
        raise DataError(f"unknown data.source {config.source!r}; valid sources: {', '.join(SOURCES)}")
    data_dir = resolve_data_dir(config.dir)
    source = config.source
    if source == "auto":
        # A user who pointed at a directory wants that directory: its errors are
        # raised, never papered over by silently falling back to a download.
        source = "idx" if data_dir else "download"
    if source == "idx":
        if not data_dir:
            raise DataError(
                f"data.source='idx' needs a directory: set data.dir or"
                f" ${DATA_DIR_ENV} to a directory holding the four MNIST IDX files"
            )
        return load_idx_dir(data_dir)
    if source == "download":
        return load_idx_dir(download.download_mnist(config.cache_dir or download.default_cache_dir()))
    return load_tfds(config.tfds_data_dir or None)


def load_mnist(data_config: DataConfig) -> MNIST:
    """Loads MNIST as configured and splits train into train + validation."""
    train, test = _load_train_test(data_config)
    train, validation = split_train_validation(train, data_config.num_validation, data_config.split_seed)
    return MNIST(train=train, validation=validation, test=test)
