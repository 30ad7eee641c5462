"""Tests for advjax.data: IDX parsing, the download cache, TFDS and the splits."""

from __future__ import annotations

import gzip
import hashlib
import os
import pathlib
import shutil
import struct

import chex
import ml_collections
import numpy as np
import pytest

from advjax import data, download, idx

IDX_NAMES = (idx.TRAIN_IMAGES, idx.TRAIN_LABELS, idx.TEST_IMAGES, idx.TEST_LABELS)
GZ_NAMES = sorted(f"{name}.gz" for name in IDX_NAMES)
NUM_TRAIN, NUM_TEST, NUM_VALIDATION = 60, 20, 10
MIRRORS = ("https://a.example/mnist/", "https://b.example/mnist")


# ----------------------------------------------------------------------------
# Helpers.


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """Encodes a uint8 array as IDX: big-endian magic, dims, then the bytes."""
    magic = magic or {3: 2051, 1: 2049}[array.ndim]
    dims = b"".join(struct.pack(">I", d) for d in array.shape)
    return struct.pack(">I", magic) + dims + array.astype(np.uint8).tobytes()


def write(path: pathlib.Path, content: bytes, *, compress: bool = False) -> pathlib.Path:
    path.write_bytes(gzip.compress(content) if compress else content)
    return path


def flip_last_byte(content: bytes) -> bytes:
    return content[:-1] + bytes([content[-1] ^ 1])


def synthetic_arrays() -> dict[str, np.ndarray]:
    """IDX name -> array, with every class present in each split."""
    rng = np.random.default_rng(0)
    return {
        idx.TRAIN_IMAGES: rng.integers(0, 256, (NUM_TRAIN, 28, 28), np.uint8),
        idx.TRAIN_LABELS: np.arange(NUM_TRAIN, dtype=np.uint8) % 10,
        idx.TEST_IMAGES: rng.integers(0, 256, (NUM_TEST, 28, 28), np.uint8),
        idx.TEST_LABELS: np.arange(NUM_TEST, dtype=np.uint8) % 10,
    }


def write_gz_dir(directory: pathlib.Path) -> pathlib.Path:
    """Writes the synthetic arrays as the four gzipped IDX files."""
    directory.mkdir(parents=True)
    for name, array in synthetic_arrays().items():
        write(directory / f"{name}.gz", idx_bytes(array), compress=True)
    return directory


def listing(directory: pathlib.Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def make_config(**overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(
        dict(
            source="auto",
            dir="",
            cache_dir="",
            tfds_data_dir="",
            num_validation=NUM_VALIDATION,
            split_seed=0,
        )
    )
    config.update(overrides)
    return config


class CopyFetch:
    """A `fetch` that copies files from a local directory and records the URLs."""

    def __init__(self, source: pathlib.Path):
        self.source = source
        self.urls: list[str] = []

    def __call__(self, url: str, dest: pathlib.Path) -> None:
        self.urls.append(url)
        name = url.rsplit("/", 1)[-1].removesuffix(".gz")
        shutil.copyfile(idx._find_idx_file(self.source, name), dest)


def expect_error(fn, *args, must_contain: tuple[str, ...], **kwargs) -> str:
    """Calls fn, expects a DataError, checks its message; returns the message."""
    with pytest.raises(data.DataError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    for fragment in must_contain:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


@pytest.fixture
def idx_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    return write_gz_dir(tmp_path / "idx")


@pytest.fixture
def synthetic_mirror(tmp_path, monkeypatch) -> pathlib.Path:
    """Synthetic .gz files, declared to be the official ones for this test."""
    specs = []
    for name, array in synthetic_arrays().items():
        content = idx_bytes(array)
        digest = hashlib.sha256(content).hexdigest()
        specs.append(download.MnistFile(name, digest, len(content)))
    monkeypatch.setattr(download, "MNIST_FILES", tuple(specs))
    return write_gz_dir(tmp_path / "mirror")


@pytest.fixture
def real_mnist_dir() -> pathlib.Path:
    directory = os.environ.get(data.DATA_DIR_ENV)
    if not directory:
        pytest.skip("ADVJAX_DATA_DIR is unset; point it at a directory holding the four MNIST IDX files")
    directory = pathlib.Path(directory)
    try:
        for name in IDX_NAMES:
            idx._find_idx_file(directory, name)
    except data.DataError as err:
        pytest.skip(f"ADVJAX_DATA_DIR lacks the MNIST IDX files: {err}")
    return directory


# ----------------------------------------------------------------------------
# read_idx and load_idx_dir.


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_detects_gzip_by_content(tmp_path, compress, suffix):
    # The suffix is deliberately uninformative half the time.
    arrays = synthetic_arrays()
    images, labels = arrays[idx.TRAIN_IMAGES], arrays[idx.TRAIN_LABELS]
    images_path = tmp_path / f"images{suffix}"
    labels_path = tmp_path / f"labels{suffix}"
    write(images_path, idx_bytes(images), compress=compress)
    write(labels_path, idx_bytes(labels), compress=compress)

    read_images = idx.read_idx(images_path)
    read_labels = idx.read_idx(labels_path)

    chex.assert_shape([read_images, read_labels], [(NUM_TRAIN, 28, 28), (NUM_TRAIN,)])
    chex.assert_type([read_images, read_labels], np.uint8)
    np.testing.assert_array_equal(read_images, images)
    np.testing.assert_array_equal(read_labels, labels)


def test_load_idx_dir_shapes_dtypes_and_values(idx_dir):
    arrays = synthetic_arrays()
    train, test = idx.load_idx_dir(idx_dir)

    chex.assert_shape(
        [train.images, train.labels, test.images, test.labels],
        [(NUM_TRAIN, 28, 28, 1), (NUM_TRAIN,), (NUM_TEST, 28, 28, 1), (NUM_TEST,)],
    )
    chex.assert_type([train.images, test.images], np.uint8)
    chex.assert_type([train.labels, test.labels], np.int32)
    np.testing.assert_array_equal(train.images[..., 0], arrays[idx.TRAIN_IMAGES])
    np.testing.assert_array_equal(test.labels, arrays[idx.TEST_LABELS])


def test_load_idx_dir_prefers_the_raw_file_when_both_exist(idx_dir):
    labels = np.full(NUM_TRAIN, 7, np.uint8)
    write(idx_dir / idx.TRAIN_LABELS, idx_bytes(labels))
    train, _ = idx.load_idx_dir(idx_dir)
    np.testing.assert_array_equal(train.labels, labels)


def test_read_idx_missing_file(tmp_path):
    expect_error(idx.read_idx, tmp_path / "absent-idx", must_contain=("absent-idx", "not found"))


def test_load_idx_dir_missing_directory(tmp_path):
    missing = tmp_path / "no-such-dir"
    expect_error(idx.load_idx_dir, missing, must_contain=(str(missing), "does not exist"))


def test_load_idx_dir_missing_file_lists_both_names(idx_dir):
    (idx_dir / f"{idx.TEST_LABELS}.gz").unlink()
    expect_error(
        idx.load_idx_dir,
        idx_dir,
        must_contain=(str(idx_dir), idx.TEST_LABELS, f"{idx.TEST_LABELS}.gz"),
    )


def test_read_idx_wrong_magic(tmp_path):
    content = idx_bytes(np.zeros(3, np.uint8), magic=0x0802)
    path = write(tmp_path / "bad-magic", content)
    expect_error(idx.read_idx, path, must_contain=("bad-magic", "magic", "0x00000802"))


@pytest.mark.parametrize(
    "array",
    [np.zeros((4, 28, 28), np.uint8), np.zeros(4, np.uint8)],
    ids=["images", "labels"],
)
@pytest.mark.parametrize(
    "edit, fault",
    [(lambda b: b[:-1], "truncated"), (lambda b: b + b"\0", "too long")],
    ids=["truncated", "too-long"],
)
def test_read_idx_payload_size_mismatch(tmp_path, array, edit, fault):
    content = idx_bytes(array)
    path = write(tmp_path / "sized-idx", edit(content))
    expect_error(
        idx.read_idx,
        path,
        must_contain=("sized-idx", fault, str(len(content)), str(len(edit(content)))),
    )


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda gz: gz[: len(gz) // 2],
        lambda gz: gz[:-8] + bytes(8),  # CRC and size trailer zeroed
    ],
    ids=["truncated", "bad-crc"],
)
def test_read_idx_corrupt_gzip(tmp_path, corrupt):
    compressed = gzip.compress(idx_bytes(synthetic_arrays()[idx.TEST_IMAGES]))
    path = write(tmp_path / "broken.gz", corrupt(compressed))
    expect_error(idx.read_idx, path, must_contain=("broken.gz", "corrupt gzip"))


def test_load_idx_dir_count_mismatch(idx_dir):
    labels = np.zeros(7, np.uint8)
    write(idx_dir / f"{idx.TRAIN_LABELS}.gz", idx_bytes(labels), compress=True)
    expect_error(
        idx.load_idx_dir,
        idx_dir,
        must_contain=(
            "mismatch",
            idx.TRAIN_IMAGES,
            idx.TRAIN_LABELS,
            f"{NUM_TRAIN} images",
            "7 labels",
        ),
    )


def test_load_idx_dir_label_out_of_range(idx_dir):
    labels = np.arange(NUM_TEST, dtype=np.uint8) % 10
    labels[3] = 10
    write(idx_dir / f"{idx.TEST_LABELS}.gz", idx_bytes(labels), compress=True)
    expect_error(
        idx.load_idx_dir,
        idx_dir,
        must_contain=(idx.TEST_LABELS, "out of range", "[10]"),
    )


# ----------------------------------------------------------------------------
# download_mnist.


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


def test_download_real_files_verify_and_are_not_refetched(tmp_path, real_mnist_dir):
    cache, fetch = tmp_path / "cache", CopyFetch(real_mnist_dir)

    download.download_mnist(cache, fetch=fetch)
    download.download_mnist(cache, fetch=fetch)  # verifies the cache, fetches nothing

    assert len(fetch.urls) == len(IDX_NAMES)
    assert all(url.startswith(download.MIRRORS[0]) for url in fetch.urls)
    assert listing(cache) == GZ_NAMES


def test_default_cache_dir_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert download.default_cache_dir() == tmp_path / "xdg" / "advjax" / "mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert download.default_cache_dir() == tmp_path / "home/.cache/advjax/mnist"


# ----------------------------------------------------------------------------
# split_train_validation.


def id_split(num_examples: int) -> data.Split:
    """Labels are example ids, and each image carries its id in one pixel."""
    ids = np.arange(num_examples, dtype=np.int32)
    images = np.zeros((num_examples, 28, 28, 1), np.uint8)
    images[:, 0, 0, 0] = ids % 256
    return data.Split(images, ids)


def test_split_sizes_and_partition():
    train, validation = data.split_train_validation(id_split(1000), 200, seed=0)

    chex.assert_shape([train.images, validation.images], [(800, 28, 28, 1), (200, 28, 28, 1)])
    ids = np.concatenate([train.labels, validation.labels])
    np.testing.assert_array_equal(np.sort(ids), np.arange(1000))
    for split in (train, validation):  # images stay with their labels
        np.testing.assert_array_equal(split.images[:, 0, 0, 0], split.labels % 256)


def test_split_is_deterministic_per_seed():
    full = id_split(1000)
    _, first = data.split_train_validation(full, 200, seed=3)
    _, again = data.split_train_validation(full, 200, seed=3)
    _, other = data.split_train_validation(full, 200, seed=4)

    np.testing.assert_array_equal(first.labels, again.labels)
    assert set(first.labels.tolist()) != set(other.labels.tolist())


@pytest.mark.parametrize("num_validation", [-1, 0, 1000, 1001])
def test_split_rejects_invalid_sizes(num_validation):
    with pytest.raises(data.DataError, match="num_validation"):
        data.split_train_validation(id_split(1000), num_validation, seed=0)


# ----------------------------------------------------------------------------
# TFDS.


def test_load_tfds_under_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):  # 6 examples in every split
        splits = data.load_tfds()
    for split in splits:
        chex.assert_shape([split.images, split.labels], [(6, 28, 28, 1), (6,)])
        chex.assert_type([split.images, split.labels], [np.uint8, np.int32])
        assert split.labels.min() >= 0 and split.labels.max() < 10


def test_load_tfds_unprepared_dataset_gives_a_hint(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    expect_error(
        data.load_tfds,
        str(tmp_path),
        must_contain=(str(tmp_path), "tfds build mnist"),
    )
    assert listing(tmp_path) == []  # nothing was downloaded or prepared


# ----------------------------------------------------------------------------
# load_mnist.


def split_sizes(mnist: data.MNIST) -> list[int]:
    return [len(split.labels) for split in mnist]


SYNTHETIC_SIZES = [NUM_TRAIN - NUM_VALIDATION, NUM_VALIDATION, NUM_TEST]


def test_load_mnist_auto_prefers_configured_dir_over_env(tmp_path, idx_dir, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "not-this-one"))
    mnist = data.load_mnist(make_config(dir=str(idx_dir)))
    assert split_sizes(mnist) == SYNTHETIC_SIZES


def test_load_mnist_auto_uses_env_dir(tmp_path, idx_dir, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(idx_dir))
    mnist = data.load_mnist(make_config(cache_dir=str(tmp_path / "cache")))
    assert split_sizes(mnist) == SYNTHETIC_SIZES


def test_load_mnist_auto_does_not_fall_back_from_a_bad_dir(tmp_path):
    missing, cache = tmp_path / "typo", tmp_path / "cache"
    message = expect_error(
        data.load_mnist,
        make_config(dir=str(missing), cache_dir=str(cache)),
        must_contain=(str(missing), "does not exist"),
    )
    assert "download" not in message
    assert not cache.exists()


def test_load_mnist_auto_without_dir_uses_verified_cache(tmp_path, synthetic_mirror, monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    cache = tmp_path / "cache"
    download.download_mnist(cache, fetch=CopyFetch(synthetic_mirror))
    # load_mnist uses the real network fetch; a verified cache needs no network.
    mnist = data.load_mnist(make_config(cache_dir=str(cache)))
    assert split_sizes(mnist) == SYNTHETIC_SIZES


def test_load_mnist_tfds_source():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=30):
        mnist = data.load_mnist(make_config(source="tfds"))
    assert split_sizes(mnist) == [30 - NUM_VALIDATION, NUM_VALIDATION, 30]


def test_load_mnist_idx_without_dir(monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    expect_error(
        data.load_mnist,
        make_config(source="idx"),
        must_contain=("data.dir", data.DATA_DIR_ENV),
    )


def test_load_mnist_unknown_source():
    expect_error(
        data.load_mnist,
        make_config(source="hdf5"),
        must_contain=("hdf5", *data.SOURCES),
    )


def test_load_mnist_real_files(real_mnist_dir):
    config = make_config(source="idx", dir=str(real_mnist_dir), num_validation=10_000)
    mnist = data.load_mnist(config)

    assert split_sizes(mnist) == [50_000, 10_000, 10_000]
    for split in mnist:
        chex.assert_type([split.images, split.labels], [np.uint8, np.int32])
        chex.assert_shape(split.images, (len(split.labels), 28, 28, 1))
        assert split.images.max() == 255
        np.testing.assert_array_equal(np.unique(split.labels), np.arange(10))
