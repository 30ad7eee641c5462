"""Datasets by name (`data.name`): MNIST, Fashion-MNIST, CIFAR-10, or an image-classification set prepared for TFDS.

`data.name` is `mnist`, `fashion_mnist`, `cifar10` or `tfds:<name>`. The
sources (`data.source`):
- 'idx': the dataset's files in data.dir (else $ADVJAX_DATA_DIR): the four IDX
  files of MNIST or Fashion-MNIST, or CIFAR-10's binary version, either its
  archive cifar-10-binary.tar.gz (checksummed) or the extracted
  cifar-10-batches-bin/. The name dates from when IDX files were the only ones.
- 'download': the official files in a checksummed download cache.
- 'tfds': a dataset already prepared for TFDS, read through `tfds.data_source`.
  TFDS can only *prepare* a dataset through TensorFlow, a large dependency we
  do not otherwise need, while a download needs only the standard library.
- 'auto': 'tfds' for a `tfds:` name; else 'idx' if a directory is configured,
  else 'download'.

The formats are advjax.idx and advjax.cifar, the download cache
advjax.download. Every data fault raises `DataError` naming the dataset, the
offending file and the fault.

`load` also returns the data's identity for a run's record: the dataset's name,
the source and directory read, and a SHA-256 of the content, so a run names the
exact data it was trained on wherever the files lie. `dataset_info` gives what
the models need, the image shape and the class count, from the config alone.
"""

import hashlib
import os
import pathlib
import re
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from advjax import cifar, download, idx, tfds_data
from advjax.idx import DataError, Split, load_idx_dir

SOURCES: tuple[str, ...] = ("auto", "idx", "tfds", "download")
DATA_DIR_ENV = "ADVJAX_DATA_DIR"
TFDS_PREFIX = "tfds:"
# A data section written before data.name existed read MNIST, and still does.
LEGACY_NAME = "mnist"
# A TFDS dataset name (snake_case), with TFDS's optional /config and :version (whose parts may be '*').
_TFDS_NAME = re.compile(r"[a-z][a-z0-9_]*(/[\w.-]+)?(:(\d+|\*)(\.(\d+|\*)){2})?")


class DatasetInfo(NamedTuple):
    """What the rest of the library needs to know of a dataset."""

    name: str  # 'mnist', 'fashion_mnist', 'cifar10', or the TFDS name that 'tfds:<name>' names
    image_shape: tuple[int, int, int]  # (height, width, channels) of every image
    num_classes: int  # labels are 0..num_classes-1


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", (idx.IMAGE_SIZE, idx.IMAGE_SIZE, 1), idx.NUM_CLASSES),
    "fashion_mnist": DatasetInfo("fashion_mnist", (idx.IMAGE_SIZE, idx.IMAGE_SIZE, 1), idx.NUM_CLASSES),
    "cifar10": DatasetInfo("cifar10", (cifar.IMAGE_SIZE, cifar.IMAGE_SIZE, cifar.CHANNELS), cifar.NUM_CLASSES),
}
NAMES: tuple[str, ...] = tuple(DATASETS)
NAME_CHOICES = f"one of {NAMES}, or 'tfds:<name>' for a dataset prepared for TFDS (e.g. 'tfds:cifar100')"
# What data.dir must hold, for the messages that ask for it.
_DIR_HOLDS = {
    "mnist": "the four MNIST IDX files",
    "fashion_mnist": "the four Fashion-MNIST IDX files",
    "cifar10": f"CIFAR-10's binary version ({cifar.ARCHIVE_NAME} or {cifar.BATCHES_DIR}/)",
}


class Dataset(NamedTuple):
    train: Split  # the training images less the validation ones: 50,000 of MNIST's 60,000 by default
    validation: Split  # data.num_validation of them, drawn with data.split_seed
    test: Split


MNIST = Dataset  # its name when MNIST was the only dataset


def to_float_images(images: jax.Array) -> jax.Array:
    """uint8 images -> float32 in [0, 1], on the device: data stays uint8 until it is there.

    >>> x = to_float_images(jnp.asarray(mnist.test.images[:100]))  # float32 [100, 28, 28, 1]
    """
    return images.astype(jnp.float32) / 255.0


class DataConfig(Protocol):
    """The fields of the `data` section of the experiment config."""

    name: str  # one of NAMES or 'tfds:<name>'; a section without it reads LEGACY_NAME
    source: str  # one of SOURCES
    dir: str  # the dataset's files; '' means $ADVJAX_DATA_DIR
    cache_dir: str  # download cache; '' means download.default_cache_dir(name)
    tfds_data_dir: str  # '' means the TFDS default
    num_validation: int
    split_seed: int


# ----------------------------------------------------------------------------
# Names.


def dataset_name(data_config: DataConfig) -> str:
    """data.name, or LEGACY_NAME for a data section written before data.name existed."""
    return getattr(data_config, "name", LEGACY_NAME)


def is_valid_name(name: object) -> bool:
    """Whether `name` is one of NAMES or 'tfds:<name>' with <name> of TFDS's form."""
    if not isinstance(name, str):
        return False
    if name.startswith(TFDS_PREFIX):
        return _TFDS_NAME.fullmatch(name.removeprefix(TFDS_PREFIX)) is not None
    return name in DATASETS


def check_name(name: object) -> None:
    """Raises DataError unless `is_valid_name(name)`."""
    if not is_valid_name(name):
        raise DataError(f"data.name={name!r} is invalid: expected {NAME_CHOICES}")


def check_source(name: str, source: str) -> None:
    """Raises DataError unless data.source is one of SOURCES and can read data.name (a `tfds:` name needs TFDS)."""
    if source not in SOURCES:
        raise DataError(f"unknown data.source {source!r}; valid sources: {', '.join(SOURCES)}")
    if name.startswith(TFDS_PREFIX) and source not in ("auto", "tfds"):
        raise DataError(
            f"data.name={name!r} is read through TFDS alone, but data.source={source!r}: "
            "set data.source to 'auto' or 'tfds'"
        )


def tfds_name(name: str) -> str:
    """The TFDS dataset data.name reads with data.source='tfds': 'tfds:cifar100' -> 'cifar100', 'mnist' -> 'mnist'."""
    return name.removeprefix(TFDS_PREFIX)


# ----------------------------------------------------------------------------
# TFDS (advjax.tfds_data).


def _load_tfds(name: str, data_dir: str | None) -> tuple[Split, Split, DatasetInfo]:
    """(train, test, info) of a dataset prepared for TFDS (array_record format)."""
    tfds = tfds_data.import_tfds()
    train, shape, num_classes = tfds_data.load_split(tfds, name, "train", data_dir, name in DATASETS)
    test, _, _ = tfds_data.load_split(tfds, name, "test", data_dir, name in DATASETS)
    return train, test, DatasetInfo(name, shape, num_classes)


def load_tfds(data_dir: str | None = None, name: str = LEGACY_NAME) -> tuple[Split, Split]:
    """Loads (train, test) from a dataset prepared for TFDS (array_record format), by its TFDS name."""
    train, test, _ = _load_tfds(name, data_dir)
    return train, test


# ----------------------------------------------------------------------------
# The dataset's files: a directory, or the download cache.


def _check_not_another_idx_dataset(name: str, directory: str) -> None:
    """Refuses a directory holding another IDX dataset's official files: MNIST and Fashion-MNIST share
    their file names and format, and $ADVJAX_DATA_DIR serves every data.name."""
    labels = idx.find_idx_file(pathlib.Path(directory), idx.TRAIN_LABELS)
    other = download.official_idx_dataset(labels)  # labels alone: 60 kB, and no two datasets share them
    if other is not None and other != name:
        raise DataError(
            f"{labels}: holds {other}'s official training labels, not {name}'s: "
            f"set data.name={other!r}, or point data.dir at {name}'s files"
        )


def _read_cifar10_dir(directory: pathlib.Path) -> tuple[Split, Split]:
    """The archive if `directory` holds it, verified (it is the published artifact), else the extracted batches."""
    archive = directory / cifar.ARCHIVE_NAME
    if archive.is_file():
        download.verify_archive(archive, download.CIFAR10_ARCHIVE)
        return cifar.read_archive(archive)
    return cifar.read_batches_dir(directory)


def _read_dir(name: str, directory: str) -> tuple[Split, Split]:
    """(train, test) of a built-in dataset from the files in `directory`."""
    if name == "cifar10":
        return _read_cifar10_dir(pathlib.Path(directory))
    train, test = load_idx_dir(directory)
    _check_not_another_idx_dataset(name, directory)
    return train, test


def _read_download(name: str, cache_dir: str) -> tuple[Split, Split]:
    """(train, test) of a built-in dataset from its verified download cache, downloading what is missing."""
    if name == "cifar10":
        return cifar.read_archive(download.download_cifar10(cache_dir))
    fetch = {"mnist": download.download_mnist, "fashion_mnist": download.download_fashion_mnist}[name]
    return load_idx_dir(fetch(cache_dir))


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
    """The configured directory, else $ADVJAX_DATA_DIR, else ''."""
    return configured or os.environ.get(DATA_DIR_ENV, "")


def locate(data_config: DataConfig) -> tuple[str, str]:
    """(source, location): the source `data.source` stands for ('idx', 'download' or 'tfds') and the
    absolute directory it reads (the dataset's directory, the download cache, the TFDS data dir), from the config alone.

    >>> source, location = locate(config.data)  # ('idx', '/data/mnist') with data.dir='/data/mnist'
    """
    name = dataset_name(data_config)
    check_name(name)
    check_source(name, data_config.source)
    data_dir = resolve_data_dir(data_config.dir)
    source = data_config.source
    if source == "auto":
        # A user who pointed at a directory wants that directory: its errors are
        # raised, never papered over by silently falling back to a download.
        source = "tfds" if name.startswith(TFDS_PREFIX) else "idx" if data_dir else "download"
    if source == "idx":
        if not data_dir:
            raise DataError(
                f"data.source='idx' needs a directory: set data.dir or"
                f" ${DATA_DIR_ENV} to a directory holding {_DIR_HOLDS[name]}"
            )
        return source, os.path.abspath(data_dir)
    if source == "download":
        return source, os.path.abspath(data_config.cache_dir or download.default_cache_dir(name))
    # The default is named and passed explicitly, so the location recorded is the one TFDS reads.
    configured = data_config.tfds_data_dir or tfds_data.import_tfds().core.constants.get_default_data_dir()
    return source, os.path.abspath(os.path.expanduser(configured))


def dataset_info(data_config: DataConfig) -> DatasetInfo:
    """The configured dataset's name, image shape and class count, before its images are read
    (a TFDS dataset's from its metadata); `load` checks the data against it.

    >>> dataset_info(config.data)  # DatasetInfo(name='cifar10', image_shape=(32, 32, 3), num_classes=10)
    """
    _, location = locate(data_config)
    name = dataset_name(data_config)
    if name in DATASETS:
        return DATASETS[name]
    name_in_tfds = tfds_name(name)
    try:
        tfds = tfds_data.import_tfds()
        data_source = tfds_data.open_split(tfds, name_in_tfds, "train", location, name_in_tfds in DATASETS)
        source = tfds_data.source_text(name_in_tfds, "train", location)
        return DatasetInfo(name_in_tfds, *tfds_data.shape_and_classes(data_source, source))
    except DataError as err:
        raise DataError(f"{name}: {err}") from err


def _check_shape(split: Split, info: DatasetInfo, which: str) -> None:
    if split.images.shape[1:] != info.image_shape:
        raise DataError(
            f"{which} images of shape {split.images.shape[1:]}, expected {info.image_shape} for {info.name}"
        )


def _read(name: str, source: str, location: str) -> tuple[Split, Split, DatasetInfo]:
    """(train, test, info) of data.name from the source and location `locate` resolved."""
    if source == "tfds":
        train, test, tfds_info = _load_tfds(tfds_name(name), location)
        info = DATASETS.get(name, tfds_info)
    else:
        train, test = (_read_dir if source == "idx" else _read_download)(name, location)
        info = DATASETS[name]
    _check_shape(train, info, f"{source} {location}: training")
    _check_shape(test, info, f"{source} {location}: test")
    return train, test, info


def _load_train_test(config: DataConfig) -> tuple[Split, Split, DatasetInfo, str, str]:
    """(train, test, info, source, location), with source and location as `locate` resolves them."""
    source, location = locate(config)
    name = dataset_name(config)
    try:
        train, test, info = _read(name, source, location)
    except DataError as err:
        # The files of MNIST and Fashion-MNIST share their names: a message names the dataset too.
        raise DataError(f"{name}: {err}") from err
    return train, test, info, source, location


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


def _identity(info: DatasetInfo, source: str, location: str, train: Split, test: Split) -> dict:
    return {"name": info.name, "source": source, "location": location, "sha256": content_sha256(train, test)}


def load(data_config: DataConfig) -> tuple[Dataset, dict]:
    """(the dataset, its identity): the data as `load_mnist` loads them, and what a run records of them:
    {"name": `dataset_info(data_config).name`, "source": "idx" | "download" | "tfds", "location": the directory
    read, "sha256": `content_sha256` of the arrays as loaded}.

    >>> dataset, data_identity = load(config.data)
    """
    train, test, info, source, location = _load_train_test(data_config)
    data_identity = _identity(info, source, location, train, test)
    train, validation = split_train_validation(train, data_config.num_validation, data_config.split_seed)
    return Dataset(train=train, validation=validation, test=test), data_identity


def load_mnist(data_config: DataConfig) -> Dataset:
    """Loads the configured dataset (MNIST by default) and splits train into train + validation.

    >>> mnist = load_mnist(config.data)  # MNIST: 50,000 train / 10,000 validation / 10,000 test
    """
    train, test, _, _, _ = _load_train_test(data_config)
    train, validation = split_train_validation(train, data_config.num_validation, data_config.split_seed)
    return Dataset(train=train, validation=validation, test=test)


load_dataset = load_mnist  # the same, under a name that fits every dataset
