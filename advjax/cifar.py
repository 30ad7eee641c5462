"""CIFAR-10's official binary version: reading its records from the archive or from the extracted directory.

`cifar-10-binary.tar.gz` holds `cifar-10-batches-bin/` with data_batch_1..5.bin
(training) and test_batch.bin. Each file is a run of 3073-byte records: one
label byte, then 3072 pixel bytes, the red, green and blue 32x32 planes in turn,
each row by row. Nothing here unpickles or extracts: the batches are read as
bytes, from the archive's members or from the files.

Every fault raises `DataError` naming the file (and, in an archive, the member).
Checking the archive's checksum is advjax.download's; this module only parses.
"""

import gzip
import pathlib
import tarfile
import zlib

import numpy as np

from advjax.idx import DataError, PathLike, Split, make_split

ARCHIVE_NAME = "cifar-10-binary.tar.gz"
BATCHES_DIR = "cifar-10-batches-bin"
TRAIN_BATCHES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_BATCH = "test_batch.bin"
NUM_CLASSES = 10
IMAGE_SIZE = 32
CHANNELS = 3
IMAGE_BYTES = CHANNELS * IMAGE_SIZE * IMAGE_SIZE
RECORD_BYTES = 1 + IMAGE_BYTES


def parse_batch(content: bytes, source: str) -> Split:
    """One batch file's bytes -> uint8 images [N, 32, 32, 3] (height, width, channels) and int32 labels [N].

    >>> split = parse_batch(pathlib.Path("test_batch.bin").read_bytes(), "test_batch.bin")
    """
    num_records, remainder = divmod(len(content), RECORD_BYTES)
    if remainder or not num_records:
        raise DataError(
            f"{source}: {len(content)} bytes is not a positive whole number of {RECORD_BYTES}-byte records "
            f"(1 label byte + {IMAGE_BYTES} pixel bytes each)"
        )
    records = np.frombuffer(content, np.uint8).reshape(num_records, RECORD_BYTES)
    # Channel-major planes on disk; the library's images are channel-last.
    planes = records[:, 1:].reshape(num_records, CHANNELS, IMAGE_SIZE, IMAGE_SIZE)
    images = np.ascontiguousarray(planes.transpose(0, 2, 3, 1))
    return make_split(images, records[:, 0], source, source, NUM_CLASSES)


def _concatenate(splits: list[Split]) -> Split:
    return Split(np.concatenate([s.images for s in splits]), np.concatenate([s.labels for s in splits]))


def _train_and_test(read: dict[str, bytes], source: str) -> tuple[Split, Split]:
    """(train, test) from each batch file's bytes, keyed by file name; `source` names where they lie."""
    train = _concatenate([parse_batch(read[name], f"{source}/{name}") for name in TRAIN_BATCHES])
    return train, parse_batch(read[TEST_BATCH], f"{source}/{TEST_BATCH}")


def batches_dir(directory: PathLike) -> pathlib.Path:
    """The directory holding the batch files: `directory`/cifar-10-batches-bin, or `directory` itself."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: CIFAR-10 directory does not exist")
    nested = directory / BATCHES_DIR
    if nested.is_dir():
        return nested
    if (directory / TRAIN_BATCHES[0]).is_file():
        return directory
    raise DataError(
        f"{directory}: neither {ARCHIVE_NAME} nor {BATCHES_DIR}/ nor {TRAIN_BATCHES[0]} found "
        "(CIFAR-10's binary version, https://www.cs.toronto.edu/~kriz/cifar.html)"
    )


def read_batches_dir(directory: PathLike) -> tuple[Split, Split]:
    """(train 50k, test 10k) from the extracted batch files in `batches_dir(directory)`."""
    found = batches_dir(directory)
    read = {}
    for name in (*TRAIN_BATCHES, TEST_BATCH):
        path = found / name
        if not path.is_file():
            raise DataError(f"{path}: file not found (CIFAR-10's binary version holds {TRAIN_BATCHES + (TEST_BATCH,)})")
        read[name] = path.read_bytes()
    return _train_and_test(read, str(found))


def _read_members(archive: pathlib.Path) -> dict[str, bytes]:
    """The batch files' bytes in the archive, by file name; members are read, never extracted to disk."""
    wanted = {f"{BATCHES_DIR}/{name}": name for name in (*TRAIN_BATCHES, TEST_BATCH)}
    read = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if member.name in wanted and member.isfile():
                read[wanted[member.name]] = tar.extractfile(member).read()
    missing = [member for member, name in wanted.items() if name not in read]
    if missing:
        raise DataError(f"{archive}: not in the archive: {', '.join(missing)}")
    return read


def read_archive(archive: PathLike) -> tuple[Split, Split]:
    """(train 50k, test 10k) from `cifar-10-binary.tar.gz`, as published; its checksum is not checked here."""
    archive = pathlib.Path(archive)
    if not archive.is_file():
        raise DataError(f"{archive}: file not found")
    try:
        read = _read_members(archive)
    # What gzip and tarfile raise for a cut-off or damaged archive.
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise DataError(f"{archive}: truncated or corrupt archive ({type(err).__name__}: {err})") from err
    return _train_and_test(read, f"{archive}:{BATCHES_DIR}")
