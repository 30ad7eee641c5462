"""The IDX format of MNIST and its relatives: reading, checking and pairing images with labels.

Every data fault raises `DataError` with the offending file and the fault, so
that a bad path or a broken cache fails loudly instead of training on garbage.
"""

import gzip
import math
import os
import pathlib
import struct
import zlib
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

PathLike = str | os.PathLike[str]

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
_CHUNK_BYTES = 1 << 20


class DataError(ValueError):
    """A data file or data configuration is missing, malformed or corrupt."""


class Split(NamedTuple):
    images: np.ndarray  # uint8 [N, height, width, channels]: [N, 28, 28, 1] for the IDX datasets
    labels: np.ndarray  # int32 [N]


def iter_content(path: pathlib.Path) -> Iterator[bytes]:
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
        raise DataError(f"{path}: too short for an IDX header ({len(content)} bytes)")
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
        raise DataError(f"{path}: truncated IDX header: expected {header_bytes} bytes, got {len(content)} bytes")
    dims = struct.unpack_from(f">{ndim}I", content, 4)
    expected_bytes = header_bytes + math.prod(dims)
    if len(content) != expected_bytes:
        fault = "truncated" if len(content) < expected_bytes else "too long"
        raise DataError(
            f"{path}: {fault}: header dims {dims} imply expected {expected_bytes} bytes, actual {len(content)} bytes"
        )
    # frombuffer views immutable bytes (read-only); copy to a normal array.
    return np.frombuffer(content, np.uint8, offset=header_bytes).reshape(dims).copy()


def read_idx(path: PathLike) -> np.ndarray:
    """Reads an IDX file of unsigned bytes (raw or gzip): uint8 [N, 28, 28] or [N] for MNIST and Fashion-MNIST."""
    path = pathlib.Path(path)
    return _parse_idx(b"".join(iter_content(path)), path)


def find_idx_file(directory: pathlib.Path, name: str) -> pathlib.Path:
    """Returns directory/name or directory/name.gz, preferring the raw file."""
    candidates = (directory / name, directory / f"{name}.gz")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataError(f"{directory}: neither {candidates[0].name} nor {candidates[1].name} found")


_find_idx_file = find_idx_file  # its older name


def make_split(
    images: np.ndarray, labels: np.ndarray, images_source: str, labels_source: str, num_classes: int = NUM_CLASSES
) -> Split:
    """Validates counts and label values (in 0..num_classes-1); returns uint8 images, int32 labels."""
    if len(images) != len(labels):
        raise DataError(
            f"image/label count mismatch: {images_source} has {len(images)}"
            f" images but {labels_source} has {len(labels)} labels"
        )
    out_of_range = (labels < 0) | (labels >= num_classes)
    if out_of_range.any():
        raise DataError(
            f"{labels_source}: label out of range 0..{num_classes - 1}:"
            f" found values {np.unique(labels[out_of_range])[:10].tolist()}"
        )
    return Split(images.astype(np.uint8), labels.astype(np.int32))


def _load_idx_split(directory: pathlib.Path, images_name: str, labels_name: str) -> Split:
    images_path = find_idx_file(directory, images_name)
    labels_path = find_idx_file(directory, labels_name)
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    # Also catches a labels file stored under an images name, and vice versa.
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(
            f"{images_path}: expected {IMAGE_SIZE}x{IMAGE_SIZE} images, got an array of shape {images.shape}"
        )
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected a 1-D label array, got shape {labels.shape}")
    return make_split(images[..., np.newaxis], labels, str(images_path), str(labels_path))


def load_idx_dir(directory: PathLike) -> tuple[Split, Split]:
    """Loads (train, test) from the four IDX files in a directory: 60k and 10k for MNIST and Fashion-MNIST."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: IDX directory does not exist")
    return (
        _load_idx_split(directory, TRAIN_IMAGES, TRAIN_LABELS),
        _load_idx_split(directory, TEST_IMAGES, TEST_LABELS),
    )
