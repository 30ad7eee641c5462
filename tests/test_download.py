"""Tests for advjax.download: the checksummed download cache, with a fetch that copies local files."""

from __future__ import annotations

import gzip
import pathlib

import numpy as np
import pytest

from advjax import data, download, idx
from tests.helpers import (
    GZ_NAMES,
    IDX_NAMES,
    MIRRORS,
    CopyFetch,
    expect_error,
    flip_last_byte,
    listing,
    synthetic_arrays,
)

GZ_NAMES_IN_TABLE_ORDER = [f"{spec.name}.gz" for spec in download.FASHION_MNIST_FILES]


def test_download_checksum_mismatch_on_every_mirror_leaves_nothing(tmp_path, idx_dir):
    # Synthetic files cannot match the official checksums.
    cache, fetch = tmp_path / "cache", CopyFetch(idx_dir)
    urls = [
        "https://a.example/mnist/train-images-idx3-ubyte.gz",
        "https://b.example/mnist/train-images-idx3-ubyte.gz",
    ]
    expect_error(
        download.download_mnist,
        cache,
        mirrors=MIRRORS,
        fetch=fetch,
        must_contain=(f"{idx.TRAIN_IMAGES}.gz", *urls, "checksum mismatch"),
    )
    assert fetch.urls == urls
    assert listing(cache) == []


def test_download_fetch_failure_midway_leaves_nothing(tmp_path):
    def failing_fetch(url: str, dest: pathlib.Path) -> None:
        dest.write_bytes(b"\x1f\x8b half a download")
        raise ConnectionResetError("connection reset mid-transfer")

    cache = tmp_path / "cache"
    message = expect_error(
        download.download_mnist,
        cache,
        mirrors=MIRRORS,
        fetch=failing_fetch,
        must_contain=(f"{idx.TRAIN_IMAGES}.gz", "connection reset"),
    )
    assert message.count("connection reset") == len(MIRRORS)
    assert listing(cache) == []


def test_download_verifies_and_does_not_refetch(tmp_path, synthetic_mirror):
    cache, fetch = tmp_path / "cache", CopyFetch(synthetic_mirror)

    assert download.download_mnist(cache, mirrors=MIRRORS, fetch=fetch) == cache
    assert download.download_mnist(cache, mirrors=MIRRORS, fetch=fetch) == cache

    assert len(fetch.urls) == len(IDX_NAMES)
    assert listing(cache) == GZ_NAMES
    train, _ = idx.load_idx_dir(cache)
    np.testing.assert_array_equal(train.labels, synthetic_arrays()[idx.TRAIN_LABELS])


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda gz: gzip.compress(flip_last_byte(gzip.decompress(gz))),
        lambda gz: gz[: len(gz) // 2],
    ],
    ids=["wrong-content", "truncated-gzip"],
)
def test_download_replaces_corrupted_cached_file(tmp_path, synthetic_mirror, corrupt):
    cache, fetch = tmp_path / "cache", CopyFetch(synthetic_mirror)
    download.download_mnist(cache, mirrors=MIRRORS, fetch=fetch)
    target = cache / f"{idx.TEST_LABELS}.gz"
    target.write_bytes(corrupt(target.read_bytes()))
    with pytest.raises(data.DataError):
        download.verify_mnist_file(target)

    download.download_mnist(cache, mirrors=MIRRORS, fetch=fetch)

    assert fetch.urls[len(IDX_NAMES) :] == [f"{MIRRORS[0]}{target.name}"]
    download.verify_mnist_file(target)
    assert listing(cache) == GZ_NAMES


def test_download_real_files_verify_and_are_not_refetched(tmp_path, mnist_dir):
    cache, fetch = tmp_path / "cache", CopyFetch(mnist_dir)

    download.download_mnist(cache, fetch=fetch)
    download.download_mnist(cache, fetch=fetch)  # verifies the cache, fetches nothing

    assert len(fetch.urls) == len(IDX_NAMES)
    assert all(url.startswith(download.MIRRORS[0]) for url in fetch.urls)
    assert listing(cache) == GZ_NAMES


def test_default_cache_dir_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert download.default_cache_dir("mnist") == tmp_path / "xdg" / "advjax" / "mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert download.default_cache_dir("cifar10") == tmp_path / "home/.cache/advjax/cifar10"


# Fashion-MNIST: its checksum table against the files of Debian's dataset-fashion-mnist package.

FASHION_MNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def fashion_mnist_dir() -> pathlib.Path:
    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip(f"{FASHION_MNIST_DIR} is absent: install Debian's dataset-fashion-mnist package")
    return FASHION_MNIST_DIR


@pytest.mark.parametrize("name", IDX_NAMES)
def test_fashion_mnist_checksums_match_the_debian_files(fashion_mnist_dir, name):
    path = fashion_mnist_dir / f"{name}.gz"
    download.verify_idx_file(path, download.FASHION_MNIST_FILES, "Fashion-MNIST")
    assert download.official_idx_dataset(path) == "fashion_mnist"
    # The two tables are distinct: MNIST's refuses these files.
    expect_error(download.verify_idx_file, path, download.MNIST_FILES, "MNIST", must_contain=("checksum mismatch",))


def test_fashion_mnist_download_verifies_zalandos_files_and_does_not_refetch(tmp_path, fashion_mnist_dir):
    cache, fetch = tmp_path / "cache", CopyFetch(fashion_mnist_dir)

    assert download.download_fashion_mnist(cache, fetch=fetch) == cache
    download.download_fashion_mnist(cache, fetch=fetch)

    assert fetch.urls == [f"{download.FASHION_MNIST_MIRRORS[0]}{name}" for name in GZ_NAMES_IN_TABLE_ORDER]
    assert download.FASHION_MNIST_MIRRORS[0].startswith("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com")
    assert listing(cache) == GZ_NAMES


def test_fashion_mnist_download_refuses_mnists_files(tmp_path, mnist_dir):
    cache = tmp_path / "cache"
    expect_error(
        download.download_fashion_mnist,
        cache,
        mirrors=MIRRORS,
        fetch=CopyFetch(mnist_dir),
        must_contain=(f"{idx.TRAIN_IMAGES}.gz", "checksum mismatch"),
    )
    assert listing(cache) == []


def test_an_unknown_file_name_names_the_dataset(tmp_path):
    expect_error(
        download.verify_idx_file,
        tmp_path / "labels.gz",
        download.FASHION_MNIST_FILES,
        "Fashion-MNIST",
        must_contain=("labels.gz", "not a Fashion-MNIST file", idx.TRAIN_IMAGES),
    )
