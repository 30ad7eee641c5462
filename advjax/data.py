"""MNIST loading: IDX files, a checksummed download cache, or TFDS.

With no directory configured, the default is to download the four official IDX
files into a cache and verify them. TFDS can only *prepare* MNIST through
TensorFlow, a large dependency we do not otherwise need, while a download
needs only the standard library. TFDS remains available (``source='tfds'``)
for a dataset that was already prepared.

The IDX format is advjax.idx and the download cache advjax.download. Every
data fault raises `DataError` with the offending file and the fault.

`load` also returns the data's identity for a run's record: the source and
directory read, and a SHA-256 of the content, so a run names the exact data it
was trained on wherever the files lie.
"""

import hashlib
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


def _import_tfds() -> types.ModuleType:
    try:
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    except ImportError as err:
        raise DataError(
            "tensorflow_datasets is not installed; install it or use data.source='idx' or 'download'"
        ) from err
    return tfds


def load_tfds(data_dir: str | None = None) -> tuple[Split, Split]:
    """Loads (train, test) from a prepared TFDS MNIST (array_record format)."""
    tfds = _import_tfds()
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


def locate(data_config: DataConfig) -> tuple[str, str]:
    """(source, location): the source `data.source` stands for ('idx', 'download' or 'tfds') and the
    absolute directory it reads (the IDX directory, the download cache, the TFDS data dir), from the config alone.

    >>> source, location = locate(config.data)  # ('idx', '/data/mnist') with data.dir='/data/mnist'
    """
    if data_config.source not in SOURCES:
        raise DataError(f"unknown data.source {data_config.source!r}; valid sources: {', '.join(SOURCES)}")
    data_dir = resolve_data_dir(data_config.dir)
    source = data_config.source
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
        return source, os.path.abspath(data_dir)
    if source == "download":
        return source, os.path.abspath(data_config.cache_dir or download.default_cache_dir())
    # The default is named and passed explicitly, so the location recorded is the one TFDS reads.
    configured = data_config.tfds_data_dir or _import_tfds().core.constants.get_default_data_dir()
    return source, os.path.abspath(os.path.expanduser(configured))


def _load_train_test(config: DataConfig) -> tuple[Split, Split, str, str]:
    """(train, test, source, location), with source and location as `locate` resolves them."""
    source, location = locate(config)
    if source == "idx":
        train, test = load_idx_dir(location)
    elif source == "download":
        train, test = load_idx_dir(download.download_mnist(location))
    else:
        train, test = load_tfds(location)
    return train, test, source, location


def content_sha256(train: Split, test: Split) -> str:
    """The SHA-256 of the arrays as loaded, before the validation split: each one's name, dtype, shape and bytes.

    It depends on the content alone, not on where it lies or how it is compressed.

    >>> content_sha256(*load_idx_dir("/data/mnist"))  # 64 hex digits
    """
    digest = hashlib.sha256()
    arrays = {"train.images": train.images, "train.labels": train.labels}
    arrays |= {"test.images": test.images, "test.labels": test.labels}
    for name, array in arrays.items():
        # Little-endian whatever the machine, so the digest of the same content is the same everywhere.
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        digest.update(f"{name} {array.dtype.name} {array.shape}\n".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def _identity(source: str, location: str, train: Split, test: Split) -> dict:
    return {"name": "mnist", "source": source, "location": location, "sha256": content_sha256(train, test)}


def load(data_config: DataConfig) -> tuple[MNIST, dict]:
    """(MNIST, its identity): the data as `load_mnist` loads them, and what a run records of them:
    {"name": "mnist", "source": "idx" | "download" | "tfds", "location": the directory read,
    "sha256": `content_sha256` of the arrays as loaded}.

    >>> mnist, data_identity = load(config.data)
    """
    train, test, source, location = _load_train_test(data_config)
    data_identity = _identity(source, location, train, test)
    train, validation = split_train_validation(train, data_config.num_validation, data_config.split_seed)
    return MNIST(train=train, validation=validation, test=test), data_identity


def load_mnist(data_config: DataConfig) -> MNIST:
    """Loads MNIST as configured and splits train into train + validation.

    >>> mnist = load_mnist(config.data)  # 50,000 train / 10,000 validation / 10,000 test
    """
    train, test, _, _ = _load_train_test(data_config)
    train, validation = split_train_validation(train, data_config.num_validation, data_config.split_seed)
    return MNIST(train=train, validation=validation, test=test)
