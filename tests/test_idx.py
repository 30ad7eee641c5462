"""Tests for advjax.idx: parsing IDX files, gzipped or not, and loading a directory of them."""

from __future__ import annotations

import gzip

import chex
import numpy as np
import pytest

from advjax import idx
from tests.helpers import (
    IDX_NUM_TEST,
    IDX_NUM_TRAIN,
    expect_error,
    idx_bytes,
    synthetic_arrays,
    write_file,
)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_detects_gzip_by_content(tmp_path, compress, suffix):
    # The suffix is deliberately uninformative half the time.
    arrays = synthetic_arrays()
    images, labels = arrays[idx.TRAIN_IMAGES], arrays[idx.TRAIN_LABELS]
    images_path = tmp_path / f"images{suffix}"
    labels_path = tmp_path / f"labels{suffix}"
    write_file(images_path, idx_bytes(images), compress=compress)
    write_file(labels_path, idx_bytes(labels), compress=compress)

    read_images = idx.read_idx(images_path)
    read_labels = idx.read_idx(labels_path)

    chex.assert_shape([read_images, read_labels], [(IDX_NUM_TRAIN, 28, 28), (IDX_NUM_TRAIN,)])
    chex.assert_type([read_images, read_labels], np.uint8)
    np.testing.assert_array_equal(read_images, images)
    np.testing.assert_array_equal(read_labels, labels)


def test_load_idx_dir_shapes_dtypes_and_values(idx_dir):
    arrays = synthetic_arrays()
    train, test = idx.load_idx_dir(idx_dir)

    chex.assert_shape(
        [train.images, train.labels, test.images, test.labels],
        [(IDX_NUM_TRAIN, 28, 28, 1), (IDX_NUM_TRAIN,), (IDX_NUM_TEST, 28, 28, 1), (IDX_NUM_TEST,)],
    )
    chex.assert_type([train.images, test.images], np.uint8)
    chex.assert_type([train.labels, test.labels], np.int32)
    np.testing.assert_array_equal(train.images[..., 0], arrays[idx.TRAIN_IMAGES])
    np.testing.assert_array_equal(test.labels, arrays[idx.TEST_LABELS])


def test_load_idx_dir_prefers_the_raw_file_when_both_exist(idx_dir):
    labels = np.full(IDX_NUM_TRAIN, 7, np.uint8)
    write_file(idx_dir / idx.TRAIN_LABELS, idx_bytes(labels))
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
    path = write_file(tmp_path / "bad-magic", content)
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
    path = write_file(tmp_path / "sized-idx", edit(content))
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
    path = write_file(tmp_path / "broken.gz", corrupt(compressed))
    expect_error(idx.read_idx, path, must_contain=("broken.gz", "corrupt gzip"))


def test_load_idx_dir_count_mismatch(idx_dir):
    labels = np.zeros(7, np.uint8)
    write_file(idx_dir / f"{idx.TRAIN_LABELS}.gz", idx_bytes(labels), compress=True)
    expect_error(
        idx.load_idx_dir,
        idx_dir,
        must_contain=(
            "mismatch",
            idx.TRAIN_IMAGES,
            idx.TRAIN_LABELS,
            f"{IDX_NUM_TRAIN} images",
            "7 labels",
        ),
    )


def test_load_idx_dir_label_out_of_range(idx_dir):
    labels = np.arange(IDX_NUM_TEST, dtype=np.uint8) % 10
    labels[3] = 10
    write_file(idx_dir / f"{idx.TEST_LABELS}.gz", idx_bytes(labels), compress=True)
    expect_error(
        idx.load_idx_dir,
        idx_dir,
        must_contain=(idx.TEST_LABELS, "out of range", "[10]"),
    )
