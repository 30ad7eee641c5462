"""The checksummed download cache of the official files: MNIST's and Fashion-MNIST's IDX files, CIFAR-10's archive.

An IDX file's integrity is checked with the SHA-256 of its *decompressed*
content: mirrors re-gzip the files, so the ``.gz`` bytes differ between mirrors,
but the content every model is trained on does not. CIFAR-10's archive is
checked as published, by the SHA-256 of its bytes. A download goes to a
temporary file that is renamed into place only once it is verified.
"""

import hashlib
import os
import pathlib
import shutil
import tempfile
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

from absl import logging

from advjax import cifar
from advjax.idx import TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS, DataError, PathLike, iter_content

# fetch(url, dest) writes the resource at url to the file dest, or raises.
Fetch = Callable[[str, pathlib.Path], None]
# fault(path) describes how the file at path differs from what is expected, else None.
Fault = Callable[[pathlib.Path], str | None]

MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
# Zalando's own: the S3 site its README links, then its GitHub repository's copy (the same content).
FASHION_MNIST_MIRRORS: tuple[str, ...] = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
)
CIFAR10_MIRRORS: tuple[str, ...] = ("https://www.cs.toronto.edu/~kriz/",)
_DOWNLOAD_TIMEOUT_S = 60.0
_CHUNK_BYTES = 1 << 20


class IdxFile(NamedTuple):
    """An official IDX file, identified by its decompressed content."""

    name: str  # IDX name without '.gz'
    sha256: str
    num_bytes: int


MnistFile = IdxFile  # its older name


class Archive(NamedTuple):
    """An official archive, identified by its bytes as published."""

    name: str
    sha256: str
    num_bytes: int


MNIST_FILES: tuple[IdxFile, ...] = (
    IdxFile(
        TRAIN_IMAGES,
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        47_040_016,
    ),
    IdxFile(
        TRAIN_LABELS,
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        60_008,
    ),
    IdxFile(
        TEST_IMAGES,
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        7_840_016,
    ),
    IdxFile(
        TEST_LABELS,
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        10_008,
    ),
)


# The decompressed content of Zalando's four files, as Debian's dataset-fashion-mnist package installs them
# (its .gz files are recompressed: their MD5s differ from those Zalando's README publishes, their content does not).
FASHION_MNIST_FILES: tuple[IdxFile, ...] = (
    IdxFile(TRAIN_IMAGES, "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 47_040_016),
    IdxFile(TRAIN_LABELS, "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60_008),
    IdxFile(TEST_IMAGES, "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 7_840_016),
    IdxFile(TEST_LABELS, "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10_008),
)

# SHA-256 and size as TFDS lists them (tensorflow_datasets/url_checksums/cifar10.txt); the CIFAR page
# (https://www.cs.toronto.edu/~kriz/cifar.html) publishes the same archive's MD5, c32a1d4ab5d03f1284b67883e8d87530.
CIFAR10_ARCHIVE = Archive(
    cifar.ARCHIVE_NAME, "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd", 170_052_171
)


def idx_files() -> dict[str, tuple[IdxFile, ...]]:
    """Each IDX dataset's official files, by data.name (read at call time, so a test may declare others)."""
    return {"mnist": MNIST_FILES, "fashion_mnist": FASHION_MNIST_FILES}


def default_cache_dir(name: str) -> pathlib.Path:
    """$XDG_CACHE_HOME/advjax/<name>, else ~/.cache/advjax/<name>: one cache per dataset (data.name)."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(cache_home) / "advjax" / name


def _spec_for(name: str, files: tuple[IdxFile, ...], dataset: str) -> IdxFile:
    """The expected content of the file of `files` named `name` (with or without .gz)."""
    idx_name = name.removesuffix(".gz")
    for spec in files:
        if spec.name == idx_name:
            return spec
    known = ", ".join(spec.name for spec in files)
    raise DataError(f"{name}: not a {dataset} file (expected one of {known})")


def _digest(chunks: Iterable[bytes]) -> tuple[str, int]:
    """(SHA-256 in hex, number of bytes) of the concatenated chunks."""
    digest = hashlib.sha256()
    num_bytes = 0
    for chunk in chunks:
        digest.update(chunk)
        num_bytes += len(chunk)
    return digest.hexdigest(), num_bytes


def _mismatch(expected: IdxFile | Archive, sha256: str, num_bytes: int) -> str | None:
    if (sha256, num_bytes) == (expected.sha256, expected.num_bytes):
        return None
    return (
        f"checksum mismatch: expected sha256 {expected.sha256} ({expected.num_bytes}"
        f" bytes), got {sha256} ({num_bytes} bytes)"
    )


def idx_fault(path: pathlib.Path, spec: IdxFile) -> str | None:
    """Describes how the file's decompressed content differs from `spec`, else None."""
    return _mismatch(spec, *_digest(iter_content(path)))


def _iter_bytes(path: pathlib.Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            yield chunk


def archive_fault(path: pathlib.Path, spec: Archive) -> str | None:
    """Describes how the file's bytes differ from the published archive `spec`, else None."""
    if not path.is_file():
        return "file not found"
    size = path.stat().st_size
    if size < spec.num_bytes:  # the commonest fault, an interrupted copy, is named as such
        return f"truncated: {size} of the published archive's {spec.num_bytes} bytes"
    return _mismatch(spec, *_digest(_iter_bytes(path)))


def verify_idx_file(path: PathLike, files: tuple[IdxFile, ...], dataset: str) -> None:
    """Raises DataError unless `path` holds the official content of the file of `files` it is named after."""
    path = pathlib.Path(path)
    fault = idx_fault(path, _spec_for(path.name, files, dataset))
    if fault is not None:
        raise DataError(f"{path}: {fault}")


def verify_mnist_file(path: PathLike) -> None:
    """Raises DataError unless `path` holds the official content for its name."""
    verify_idx_file(path, MNIST_FILES, "MNIST")


def verify_archive(path: PathLike, spec: Archive) -> None:
    """Raises DataError unless `path` holds the published archive `spec`, byte for byte."""
    path = pathlib.Path(path)
    fault = archive_fault(path, spec)
    if fault is not None:
        raise DataError(f"{path}: {fault}")


def official_idx_dataset(path: PathLike) -> str | None:
    """The data.name of the IDX dataset whose official content `path` holds (by its name), else None."""
    path = pathlib.Path(path)
    for name, files in idx_files().items():
        specs = [spec for spec in files if spec.name == path.name.removesuffix(".gz")]
        if specs and idx_fault(path, specs[0]) is None:
            return name
    return None


def _urllib_fetch(url: str, dest: pathlib.Path) -> None:
    """Downloads url to dest with the standard library."""
    with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
        with open(dest, "wb") as out:
            shutil.copyfileobj(response, out)


def _fetch_verified(url: str, target: pathlib.Path, fault: Fault, fetch: Fetch) -> None:
    """Fetches url, verifies it, and only then moves it to target."""
    # A temp file in the target's directory makes os.replace atomic, so the
    # cache never holds a half-written or unverified file under the real name.
    fd, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f"{target.name}.", suffix=".part")
    os.close(fd)
    temp = pathlib.Path(temp_name)
    try:
        fetch(url, temp)
        found = fault(temp)
        if found is not None:
            raise DataError(found)
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)


def _download_file(target: pathlib.Path, mirrors: tuple[str, ...], fault: Fault, fetch: Fetch) -> None:
    """Fetches target from the first mirror that serves verified content."""
    failures = []
    for mirror in mirrors:
        url = f"{mirror.rstrip('/')}/{target.name}"
        logging.info("Downloading %s to %s", url, target)
        try:
            _fetch_verified(url, target, fault, fetch)
            return
        # `fetch` is pluggable and networks fail in many ways; whatever went wrong
        # with one mirror, try the next one and report every failure at the end.
        except Exception as err:  # pylint: disable=broad-exception-caught
            logging.warning("Download of %s failed: %s", url, err)
            failures.append(f"{url}: {err}")
    raise DataError(
        f"{target}: could not download a verified copy; tried:\n  " + "\n  ".join(failures or ["(no mirrors given)"])
    )


def _ensure(target: pathlib.Path, mirrors: tuple[str, ...], fault: Fault, fetch: Fetch) -> None:
    """Leaves a verified cached `target` as it is; fetches it if absent or invalid."""
    if target.exists():
        try:
            found = fault(target)
        except DataError as err:  # unreadable, as a cut-off gzip stream is
            found = str(err)
        if found is None:
            return
        # A corrupt cache entry must not be trusted; fetch it again.
        logging.warning("Re-downloading invalid cached file: %s: %s", target, found)
    _download_file(target, mirrors, fault, fetch)


def download_idx(
    cache_dir: PathLike, files: tuple[IdxFile, ...], mirrors: tuple[str, ...], *, fetch: Fetch | None = None
) -> pathlib.Path:
    """Ensures the verified .gz of each of `files` is in cache_dir; returns it."""
    cache_dir = pathlib.Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for spec in files:
        _ensure(
            cache_dir / f"{spec.name}.gz",
            mirrors,
            lambda path, spec=spec: idx_fault(path, spec),
            fetch or _urllib_fetch,
        )
    return cache_dir


def download_mnist(
    cache_dir: PathLike,
    *,
    mirrors: tuple[str, ...] = MIRRORS,
    fetch: Fetch | None = None,
) -> pathlib.Path:
    """Ensures the four verified MNIST .gz files are in cache_dir; returns it."""
    return download_idx(cache_dir, MNIST_FILES, mirrors, fetch=fetch)


def download_fashion_mnist(
    cache_dir: PathLike, *, mirrors: tuple[str, ...] = FASHION_MNIST_MIRRORS, fetch: Fetch | None = None
) -> pathlib.Path:
    """Ensures the four verified Fashion-MNIST .gz files are in cache_dir; returns it."""
    return download_idx(cache_dir, FASHION_MNIST_FILES, mirrors, fetch=fetch)


def download_cifar10(
    cache_dir: PathLike, *, mirrors: tuple[str, ...] = CIFAR10_MIRRORS, fetch: Fetch | None = None
) -> pathlib.Path:
    """Ensures the verified cifar-10-binary.tar.gz is in cache_dir; returns its path."""
    cache_dir = pathlib.Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / CIFAR10_ARCHIVE.name
    spec = CIFAR10_ARCHIVE  # read once, so a test may declare another archive for the whole call
    _ensure(target, mirrors, lambda path: archive_fault(path, spec), fetch or _urllib_fetch)
    return target
