"""The checksummed download cache of the four official MNIST files.

Integrity is checked with the SHA-256 of the *decompressed* IDX content:
mirrors re-gzip the files, so the ``.gz`` bytes differ between mirrors, but the
content every model is trained on does not. A download goes to a temporary
file that is renamed into place only once it is verified.
"""

import hashlib
import os
import pathlib
import shutil
import tempfile
import urllib.request
from collections.abc import Callable
from typing import NamedTuple

from absl import logging

from advjax.idx import TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS, DataError, PathLike, iter_content

# fetch(url, dest) writes the resource at url to the file dest, or raises.
Fetch = Callable[[str, pathlib.Path], None]

MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
_DOWNLOAD_TIMEOUT_S = 60.0


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
    for chunk in iter_content(path):
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


def _fetch_verified(url: str, target: pathlib.Path, spec: MnistFile, fetch: Fetch) -> None:
    """Fetches url, verifies it, and only then moves it to target."""
    # A temp file in the target's directory makes os.replace atomic, so the
    # cache never holds a half-written or unverified file under the real name.
    fd, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f"{target.name}.", suffix=".part")
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


def _download_file(target: pathlib.Path, mirrors: tuple[str, ...], fetch: Fetch) -> None:
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
        f"{target}: could not download a verified copy; tried:\n  " + "\n  ".join(failures or ["(no mirrors given)"])
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
