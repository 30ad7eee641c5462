"""Tests for advjax.cifar and CIFAR-10 through advjax.data and advjax.download, on files written here in the
official binary format: no download, no real data."""

from __future__ import annotations

import hashlib
import io
import pathlib
import shutil
import tarfile

import chex
import numpy as np
import pytest

from advjax import cifar, data, download
from tests.helpers import data_config, expect_error, listing

NUM_PER_TRAIN_BATCH, NUM_TEST, NUM_VALIDATION = 4, 6, 5
BATCHES = (*cifar.TRAIN_BATCHES, cifar.TEST_BATCH)


def planes_and_labels(num: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random channel-major pixels [N, 3, 32, 32], as the files hold them, and labels covering 0..9."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (num, 3, 32, 32), np.uint8), (np.arange(num) + seed) % 10


def record_bytes(planes: np.ndarray, labels: np.ndarray) -> bytes:
    """The official format, written independently of the reader: per record a label byte, then the R, G, B planes."""
    return b"".join(bytes([label]) + plane.tobytes() for plane, label in zip(planes, labels.tolist()))


def synthetic_batches() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Batch file name -> (planes, labels)."""
    sizes = [NUM_PER_TRAIN_BATCH] * len(cifar.TRAIN_BATCHES) + [NUM_TEST]
    return {name: planes_and_labels(num, seed) for seed, (name, num) in enumerate(zip(BATCHES, sizes))}


def batch_files(edits: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """Batch file name -> its bytes; `edits` replaces some."""
    files = {name: record_bytes(*arrays) for name, arrays in synthetic_batches().items()}
    files["batches.meta.txt"] = "\n".join(("airplane", "automobile", "bird", "cat", "deer")).encode()
    return files | (edits or {})


def write_batches_dir(directory: pathlib.Path, files: dict[str, bytes]) -> pathlib.Path:
    """directory/cifar-10-batches-bin/ holding `files`, as the archive extracts; returns `directory`."""
    batches = directory / cifar.BATCHES_DIR
    batches.mkdir(parents=True)
    for name, content in files.items():
        (batches / name).write_bytes(content)
    return directory


def write_archive(directory: pathlib.Path, files: dict[str, bytes]) -> pathlib.Path:
    """directory/cifar-10-binary.tar.gz holding cifar-10-batches-bin/ with `files`; returns the archive's path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / cifar.ARCHIVE_NAME
    with tarfile.open(path, "w:gz") as tar:
        folder = tarfile.TarInfo(cifar.BATCHES_DIR)
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, content in files.items():
            member = tarfile.TarInfo(f"{cifar.BATCHES_DIR}/{name}")
            member.size = len(content)
            tar.addfile(member, io.BytesIO(content))
    return path


def declare_official(monkeypatch, archive: pathlib.Path) -> None:
    """Declares `archive`'s bytes to be the published archive's, for this test."""
    content = archive.read_bytes()
    spec = download.Archive(cifar.ARCHIVE_NAME, hashlib.sha256(content).hexdigest(), len(content))
    monkeypatch.setattr(download, "CIFAR10_ARCHIVE", spec)


def cifar_config(directory: pathlib.Path, **overrides):
    return data_config(name="cifar10", source="idx", dir=str(directory), num_validation=NUM_VALIDATION, **overrides)


def expected_train_test() -> tuple[data.Split, data.Split]:
    batches = synthetic_batches()
    hwc = {name: (planes.transpose(0, 2, 3, 1), labels) for name, (planes, labels) in batches.items()}
    train = [hwc[name] for name in cifar.TRAIN_BATCHES]
    return (
        data.Split(np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train])),
        data.Split(*hwc[cifar.TEST_BATCH]),
    )


def assert_splits_equal(actual: tuple[data.Split, data.Split], expected: tuple[data.Split, data.Split]) -> None:
    for got, want in zip(actual, expected):
        chex.assert_type([got.images, got.labels], [np.uint8, np.int32])
        np.testing.assert_array_equal(got.images, want.images)
        np.testing.assert_array_equal(got.labels, want.labels)


# The format -------------------------------------------------------------------------


def test_a_record_is_a_label_then_the_red_green_and_blue_planes():
    planes = np.zeros((1, 3, 32, 32), np.uint8)
    planes[0, :, 1, 2] = (10, 20, 30)  # row 1, column 2 of each plane
    split = cifar.parse_batch(record_bytes(planes, np.array([7])), "one.bin")
    chex.assert_shape(split.images, (1, 32, 32, 3))
    assert split.images[0, 1, 2].tolist() == [10, 20, 30]
    assert split.images.sum() == 60 and split.labels.tolist() == [7]


def test_the_directory_and_the_archive_read_as_written(tmp_path):
    files = batch_files()
    from_dir = cifar.read_batches_dir(write_batches_dir(tmp_path / "dir", files))
    from_archive = cifar.read_archive(write_archive(tmp_path / "archive", files))
    assert_splits_equal(from_dir, expected_train_test())
    assert_splits_equal(from_archive, expected_train_test())


def test_the_batches_directory_itself_may_be_named(tmp_path):
    directory = write_batches_dir(tmp_path, batch_files()) / cifar.BATCHES_DIR
    assert_splits_equal(cifar.read_batches_dir(directory), expected_train_test())


# Through advjax.data --------------------------------------------------------------


def test_load_reads_the_declared_archive_or_the_directory_as_the_same_data(tmp_path, monkeypatch):
    files = batch_files()
    archive = write_archive(tmp_path / "archive", files)
    declare_official(monkeypatch, archive)
    dataset, identity = data.load(cifar_config(archive.parent))
    from_dir = data.load(cifar_config(write_batches_dir(tmp_path / "dir", files)))[1]

    num_train = NUM_PER_TRAIN_BATCH * len(cifar.TRAIN_BATCHES)
    assert [len(split.labels) for split in dataset] == [num_train - NUM_VALIDATION, NUM_VALIDATION, NUM_TEST]
    chex.assert_shape(dataset.train.images, (num_train - NUM_VALIDATION, 32, 32, 3))
    np.testing.assert_array_equal(dataset.test.images, expected_train_test()[1].images)
    assert identity == {
        "name": "cifar10",
        "source": "idx",
        "location": str(archive.parent),
        "sha256": from_dir["sha256"],
    }
    assert data.dataset_info(cifar_config(archive.parent)) == data.DatasetInfo("cifar10", (32, 32, 3), 10)


@pytest.mark.parametrize("edit", [lambda b: b[:-1], lambda b: b + b"\0"], ids=["short", "long"])
@pytest.mark.parametrize("packed", [False, True], ids=["directory", "archive"])
def test_a_wrong_record_size_names_the_dataset_and_the_file(tmp_path, monkeypatch, edit, packed):
    name = cifar.TRAIN_BATCHES[2]
    files = batch_files({name: edit(record_bytes(*synthetic_batches()[name]))})
    if packed:
        declare_official(monkeypatch, write_archive(tmp_path, files))
    else:
        write_batches_dir(tmp_path, files)
    expect_error(
        data.load, cifar_config(tmp_path), must_contain=("cifar10: ", name, f"{cifar.RECORD_BYTES}-byte records")
    )


def test_an_archive_with_a_bad_checksum_is_refused(tmp_path, monkeypatch):
    archive = write_archive(tmp_path, batch_files())
    declare_official(monkeypatch, archive)
    content = bytearray(archive.read_bytes())
    content[len(content) // 2] ^= 1  # same size, other bytes
    archive.write_bytes(bytes(content))
    expect_error(data.load, cifar_config(tmp_path), must_contain=("cifar10: ", str(archive), "checksum mismatch"))


def test_the_official_checksum_refuses_a_synthetic_archive(tmp_path):
    archive = write_archive(tmp_path, batch_files())
    expect_error(
        data.load,
        cifar_config(tmp_path),
        must_contain=("cifar10: ", str(archive), "truncated", str(download.CIFAR10_ARCHIVE.num_bytes)),
    )


def test_a_truncated_archive_is_refused(tmp_path, monkeypatch):
    archive = write_archive(tmp_path, batch_files())
    declare_official(monkeypatch, archive)
    whole = archive.read_bytes()
    archive.write_bytes(whole[: len(whole) // 2])
    expect_error(data.load, cifar_config(tmp_path), must_contain=("cifar10: ", str(archive), "truncated"))
    # Unverified, the reader itself says so too.
    expect_error(cifar.read_archive, archive, must_contain=(str(archive), "truncated or corrupt archive"))


def test_a_missing_batch_is_named(tmp_path, monkeypatch):
    files = batch_files()
    del files[cifar.TEST_BATCH]
    write_batches_dir(tmp_path / "dir", files)
    expect_error(data.load, cifar_config(tmp_path / "dir"), must_contain=("cifar10: ", cifar.TEST_BATCH, "not found"))
    declare_official(monkeypatch, write_archive(tmp_path / "archive", files))
    expect_error(
        data.load,
        cifar_config(tmp_path / "archive"),
        must_contain=("cifar10: ", cifar.ARCHIVE_NAME, f"{cifar.BATCHES_DIR}/{cifar.TEST_BATCH}"),
    )


def test_a_directory_without_cifar_files_says_what_it_needs(tmp_path):
    tmp_path.joinpath("readme.txt").write_text("not CIFAR-10")
    expect_error(data.load, cifar_config(tmp_path), must_contain=("cifar10: ", cifar.ARCHIVE_NAME, cifar.BATCHES_DIR))
    expect_error(data.load, cifar_config(tmp_path / "typo"), must_contain=("cifar10: ", "typo", "does not exist"))


def test_a_label_out_of_range_is_named(tmp_path):
    name = cifar.TRAIN_BATCHES[1]
    planes, labels = synthetic_batches()[name]
    labels = labels.copy()
    labels[2] = 10
    write_batches_dir(tmp_path, batch_files({name: record_bytes(planes, labels)}))
    expect_error(data.load, cifar_config(tmp_path), must_contain=("cifar10: ", name, "out of range 0..9", "[10]"))


# The download cache ------------------------------------------------------------------


class ArchiveFetch:
    """A `fetch` that copies one local archive, recording the URLs."""

    def __init__(self, archive: pathlib.Path):
        self.archive, self.urls = archive, []

    def __call__(self, url: str, dest: pathlib.Path) -> None:
        self.urls.append(url)
        shutil.copyfile(self.archive, dest)


def test_download_verifies_and_does_not_refetch(tmp_path, monkeypatch):
    archive = write_archive(tmp_path / "mirror", batch_files())
    declare_official(monkeypatch, archive)
    cache, fetch = tmp_path / "cache", ArchiveFetch(archive)

    assert download.download_cifar10(cache, fetch=fetch) == cache / cifar.ARCHIVE_NAME
    download.download_cifar10(cache, fetch=fetch)

    assert fetch.urls == [f"{download.CIFAR10_MIRRORS[0]}{cifar.ARCHIVE_NAME}"]
    assert listing(cache) == [cifar.ARCHIVE_NAME]
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    _, identity = data.load(data_config(name="cifar10", cache_dir=str(cache), num_validation=NUM_VALIDATION))
    assert (identity["name"], identity["source"], identity["location"]) == ("cifar10", "download", str(cache))


def test_download_of_an_archive_that_fails_its_checksum_leaves_nothing(tmp_path):
    fetch = ArchiveFetch(write_archive(tmp_path / "mirror", batch_files()))
    cache = tmp_path / "cache"
    expect_error(
        download.download_cifar10,
        cache,
        mirrors=("https://a.example/", "https://b.example/"),
        fetch=fetch,
        must_contain=("https://a.example/", "https://b.example/", "truncated", cifar.ARCHIVE_NAME),
    )
    assert listing(cache) == []


def test_a_damaged_cached_archive_is_fetched_again(tmp_path, monkeypatch):
    archive = write_archive(tmp_path / "mirror", batch_files())
    declare_official(monkeypatch, archive)
    cache, fetch = tmp_path / "cache", ArchiveFetch(archive)
    target = download.download_cifar10(cache, fetch=fetch)
    target.write_bytes(target.read_bytes()[:100])
    download.download_cifar10(cache, fetch=fetch)
    assert len(fetch.urls) == 2 and target.read_bytes() == archive.read_bytes()
