"""MNIST loading: IDX files, a checksummed download cache, or TFDS.

With no directory configured, the default is to download the four official IDX
files into a cache and verify them. TFDS can only *prepare* MNIST through
TensorFlow, a ~600 MB dependency we do not otherwise need, while a download
needs only the standard library. TFDS remains available (``source='tfds'``)
for a dataset that was already prepared.

Integrity is checked with the SHA-256 of the *decompressed* IDX content:
mirrors re-gzip the files, so the ``.gz`` bytes differ between mirrors, but the
content every model is trained on does not.

Every data fault raises `DataError` with the offending file and the fault, so
that a bad path or a broken cache fails loudly instead of training on garbage.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import pathlib
import shutil
import struct
import tempfile
import types
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from typing import NamedTuple, Protocol

import numpy as np
from absl import logging

PathLike = str | os.PathLike[str]
# fetch(url, dest) writes the resource at url to the file dest, or raises.
Fetch = Callable[[str, pathlib.Path], None]

MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
SOURCES: tuple[str, ...] = ("auto", "idx", "tfds", "download")
DATA_DIR_ENV = "ADVJAX_DATA_DIR"

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"

NUM_CLASSES = 10
IMAGE_SIZE = 28

_GZIP_MAGIC = b"\x1f\x8b"
IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801
# Both MNIST IDX types hold unsigned bytes; only the number of dims differs.
_NDIM_BY_MAGIC = {IDX_IMAGES_MAGIC: 3, IDX_LABELS_MAGIC: 1}

_DOWNLOAD_TIMEOUT_S = 60.0
_CHUNK_BYTES = 1 << 20


class DataError(ValueError):
    """A data file or data configuration is missing, malformed or corrupt."""


class Split(NamedTuple):
    images: np.ndarray  # uint8 [N, 28, 28, 1]
    labels: np.ndarray  # int32 [N]


class MNIST(NamedTuple):
    train: Split  # 50,000
    validation: Split  # 10,000
    test: Split  # 10,000


class MnistFile(NamedTuple):
    """An official MNIST file, identified by its decompressed content."""

    name: str  # IDX name without '.gz'
    sha256: str
    num_bytes: int


MNIST_FILES: tuple[MnistFile, ...] = (
    MnistFile(
        TRAIN_IMAGES,
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        47_040_016,
    ),
    MnistFile(
        TRAIN_LABELS,
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        60_008,
    ),
    MnistFile(
        TEST_IMAGES,
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        7_840_016,
    ),
    MnistFile(
        TEST_LABELS,
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        10_008,
    ),
)


class DataConfig(Protocol):
    """The fields of the `data` section of the experiment config."""

    source: str  # one of SOURCES
    dir: str  # IDX directory; '' means $ADVJAX_DATA_DIR
    cache_dir: str  # download cache; '' means default_cache_dir()
    tfds_data_dir: str  # '' means the TFDS default
    num_validation: int
    split_seed: int


# ----------------------------------------------------------------------------
# IDX files.


def _iter_content(path: pathlib.Path) -> Iterator[bytes]:
    """Yields the file's content in chunks, decompressed if it is gzip."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as f:
        # Decide by content, not extension: a mirror or a user may have unpacked
        # a file and kept its '.gz' name, or the other way round.
        compressed = f.read(len(_GZIP_MAGIC)) == _GZIP_MAGIC
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as f:
            while chunk := f.read(_CHUNK_BYTES):
                yield chunk
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        # Only the gzip reader raises these: truncated stream, bad CRC, bad data.
        raise DataError(f"{path}: corrupt gzip stream ({err})") from err


def _parse_idx(content: bytes, path: pathlib.Path) -> np.ndarray:
    """Parses IDX bytes (header + payload) into a uint8 array."""
    if len(content) < 4:
        raise DataError(
            f"{path}: too short for an IDX header ({len(content)} bytes)"
        )
    (magic,) = struct.unpack_from(">I", content, 0)
    ndim = _NDIM_BY_MAGIC.get(magic)
    if ndim is None:
        raise DataError(
            f"{path}: bad IDX magic number 0x{magic:08x} (expected"
            f" 0x{IDX_IMAGES_MAGIC:08x} for images or 0x{IDX_LABELS_MAGIC:08x}"
            " for labels)"
        )
    header_bytes = 4 + 4 * ndim
    if len(content) < header_bytes:
        raise DataError(
            f"{path}: truncated IDX header: expected {header_bytes} bytes, got"
            f" {len(content)} bytes"
        )
    dims = struct.unpack_from(f">{ndim}I", content, 4)
    expected_bytes = header_bytes + math.prod(dims)
    if len(content) != expected_bytes:
        fault = "truncated" if len(content) < expected_bytes else "too long"
        raise DataError(
            f"{path}: {fault}: header dims {dims} imply expected"
            f" {expected_bytes} bytes, actual {len(content)} bytes"
        )
    # frombuffer views immutable bytes (read-only); copy to a normal array.
    return np.frombuffer(content, np.uint8, offset=header_bytes).reshape(dims).copy()


def read_idx(path: PathLike) -> np.ndarray:
    """Reads an MNIST IDX file (raw or gzip): uint8 [N, 28, 28] or [N]."""
    path = pathlib.Path(path)
    return _parse_idx(b"".join(_iter_content(path)), path)


def _find_idx_file(directory: pathlib.Path, name: str) -> pathlib.Path:
    """Returns directory/name or directory/name.gz, preferring the raw file."""
    candidates = (directory / name, directory / f"{name}.gz")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataError(
        f"{directory}: neither {candidates[0].name} nor {candidates[1].name} found"
    )


def _make_split(
    images: np.ndarray, labels: np.ndarray, images_source: str, labels_source: str
) -> Split:
    """Validates counts and label values; returns uint8 images, int32 labels."""
    if len(images) != len(labels):
        raise DataError(
            f"image/label count mismatch: {images_source} has {len(images)}"
            f" images but {labels_source} has {len(labels)} labels"
        )
    out_of_range = (labels < 0) | (labels >= NUM_CLASSES)
    if out_of_range.any():
        raise DataError(
            f"{labels_source}: label out of range 0..{NUM_CLASSES - 1}:"
            f" found values {np.unique(labels[out_of_range])[:10].tolist()}"
        )
    return Split(images.astype(np.uint8), labels.astype(np.int32))


def _load_idx_split(
    directory: pathlib.Path, images_name: str, labels_name: str
) -> Split:
    images_path = _find_idx_file(directory, images_name)
    labels_path = _find_idx_file(directory, labels_name)
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    # Also catches a labels file stored under an images name, and vice versa.
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(
            f"{images_path}: expected {IMAGE_SIZE}x{IMAGE_SIZE} images, got an"
            f" array of shape {images.shape}"
        )
    if labels.ndim != 1:
        raise DataError(
            f"{labels_path}: expected a 1-D label array, got shape {labels.shape}"
        )
    return _make_split(
        images[..., np.newaxis], labels, str(images_path), str(labels_path)
    )


def load_idx_dir(directory: PathLike) -> tuple[Split, Split]:
    """Loads (train 60k, test 10k) from the four IDX files in a directory."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: MNIST directory does not exist")
    return (
        _load_idx_split(directory, TRAIN_IMAGES, TRAIN_LABELS),
        _load_idx_split(directory, TEST_IMAGES, TEST_LABELS),
    )


# ----------------------------------------------------------------------------
# Download cache.


def default_cache_dir() -> pathlib.Path:
    """$XDG_CACHE_HOME/advjax/mnist, else ~/.cache/advjax/mnist."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(cache_home) / "advjax" / "mnist"


def _spec_for(name: str) -> MnistFile:
    """The expected content of an MNIST file named `name` (with or without .gz)."""
    idx_name = name.removesuffix(".gz")
    for spec in MNIST_FILES:
        if spec.name == idx_name:
            return spec
    known = ", ".join(spec.name for spec in MNIST_FILES)
    raise DataError(f"{name}: not an MNIST file (expected one of {known})")


def _checksum_fault(path: pathlib.Path, spec: MnistFile) -> str | None:
    """Describes how the decompressed content differs from `spec`, else None."""
    digest = hashlib.sha256()
    num_bytes = 0
    for chunk in _iter_content(path):
        digest.update(chunk)
        num_bytes += len(chunk)
    if (digest.hexdigest(), num_bytes) == (spec.sha256, spec.num_bytes):
        return None
    return (
        f"checksum mismatch: expected sha256 {spec.sha256} ({spec.num_bytes}"
        f" bytes), got {digest.hexdigest()} ({num_bytes} bytes)"
    )


def verify_mnist_file(path: PathLike) -> None:
    """Raises DataError unless `path` holds the official content for its name."""
    path = pathlib.Path(path)
    fault = _checksum_fault(path, _spec_for(path.name))
    if fault is not None:
        raise DataError(f"{path}: {fault}")


def _urllib_fetch(url: str, dest: pathlib.Path) -> None:
    """Downloads url to dest with the standard library."""
    with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
        with open(dest, "wb") as out:
            shutil.copyfileobj(response, out)


def _fetch_verified(
    url: str, target: pathlib.Path, spec: MnistFile, fetch: Fetch
) -> None:
    """Fetches url, verifies it, and only then moves it to target."""
    # A temp file in the target's directory makes os.replace atomic, so the
    # cache never holds a half-written or unverified file under the real name.
    fd, temp_name = tempfile.mkstemp(
        dir=target.parent, prefix=f"{target.name}.", suffix=".part"
    )
    os.close(fd)
    temp = pathlib.Path(temp_name)
    try:
        fetch(url, temp)
        fault = _checksum_fault(temp, spec)
        if fault is not None:
            raise DataError(fault)
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)


def _download_file(
    target: pathlib.Path, mirrors: tuple[str, ...], fetch: Fetch
) -> None:
    """Fetches target from the first mirror that serves verified content."""
    spec = _spec_for(target.name)
    failures = []
    for mirror in mirrors:
        url = f"{mirror.rstrip('/')}/{target.name}"
        logging.info("Downloading %s to %s", url, target)
        try:
            _fetch_verified(url, target, spec, fetch)
            return
        # `fetch` is pluggable and networks fail in many ways; whatever went wrong
        # with one mirror, try the next one and report every failure at the end.
        except Exception as err:  # pylint: disable=broad-exception-caught
            logging.warning("Download of %s failed: %s", url, err)
            failures.append(f"{url}: {err}")
    raise DataError(
        f"{target}: could not download a verified copy; tried:\n  "
        + "\n  ".join(failures or ["(no mirrors given)"])
    )


def download_mnist(
    cache_dir: PathLike,
    *,
    mirrors: tuple[str, ...] = MIRRORS,
    fetch: Fetch | None = None,
) -> pathlib.Path:
    """Ensures the four verified MNIST .gz files are in cache_dir; returns it."""
    cache_dir = pathlib.Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fetch = fetch or _urllib_fetch
    for spec in MNIST_FILES:
        target = cache_dir / f"{spec.name}.gz"
        if target.exists():
            try:
                verify_mnist_file(target)
                continue
            except DataError as err:
                # A corrupt cache entry must not be trusted; fetch it again.
                logging.warning("Re-downloading invalid cached file: %s", err)
        _download_file(target, mirrors, fetch)
    return cache_dir


# ----------------------------------------------------------------------------
# TFDS.


def _load_tfds_split(
    tfds: types.ModuleType, split: str, data_dir: str | None
) -> Split:
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
    return _make_split(images, labels, source, source)


def load_tfds(data_dir: str | None = None) -> tuple[Split, Split]:
    """Loads (train, test) from a prepared TFDS MNIST (array_record format)."""
    try:
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    except ImportError as err:
        raise DataError(
            "tensorflow_datasets is not installed; install it or use"
            " data.source='idx' or 'download'"
        ) from err
    return (
        _load_tfds_split(tfds, "train", data_dir),
        _load_tfds_split(tfds, "test", data_dir),
    )


# ----------------------------------------------------------------------------
# Splits and the top-level entry point.


def _take(split: Split, indices: np.ndarray) -> Split:
    return Split(split.images[indices], split.labels[indices])


def split_train_validation(
    train: Split, num_validation: int, seed: int
) -> tuple[Split, Split]:
    """Randomly splits off `num_validation` examples; deterministic per seed."""
    num_examples = len(train.labels)
    if not 0 < num_validation < num_examples:
        raise DataError(
            f"num_validation must be in 1..{num_examples - 1} for a training set"
            f" of {num_examples} examples, got {num_validation}"
        )
    permutation = np.random.Generator(np.random.PCG64(seed)).permutation(
        num_examples
    )
    return (
        _take(train, permutation[num_validation:]),
        _take(train, permutation[:num_validation]),
    )


def resolve_data_dir(configured: str) -> str:
    """The configured IDX directory, else $ADVJAX_DATA_DIR, else ''."""
    return configured or os.environ.get(DATA_DIR_ENV, "")


def _load_train_test(config: DataConfig) -> tuple[Split, Split]:
    if config.source not in SOURCES:
        raise DataError(
            f"unknown data.source {config.source!r}; valid sources:"
            f" {', '.join(SOURCES)}"
        )
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
        return load_idx_dir(download_mnist(config.cache_dir or default_cache_dir()))
    return load_tfds(config.tfds_data_dir or None)


def load_mnist(data_config: DataConfig) -> MNIST:
    """Loads MNIST as configured and splits train into train + validation."""
    train, test = _load_train_test(data_config)
    train, validation = split_train_validation(
        train, data_config.num_validation, data_config.split_seed
    )
    return MNIST(train=train, validation=validation, test=test)
