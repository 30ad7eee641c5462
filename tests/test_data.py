"""Tests for advjax.data: the sources (IDX, download, TFDS) of load_mnist, the train/validation split, and
datasets by name (data.name; CIFAR-10's own tests are tests/test_cifar.py)."""

from __future__ import annotations

import gzip
import os
import pathlib
import shutil

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from advjax import data, download, idx
from tests.helpers import IDX_NUM_TEST, IDX_NUM_TRAIN, IDX_NUM_VALIDATION, CopyFetch, data_config, expect_error, listing

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


SYNTHETIC_SIZES = [IDX_NUM_TRAIN - IDX_NUM_VALIDATION, IDX_NUM_VALIDATION, IDX_NUM_TEST]


def test_load_mnist_auto_prefers_configured_dir_over_env(tmp_path, idx_dir, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "not-this-one"))
    mnist = data.load_mnist(data_config(dir=str(idx_dir)))
    assert split_sizes(mnist) == SYNTHETIC_SIZES


def test_load_mnist_auto_uses_env_dir(tmp_path, idx_dir, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(idx_dir))
    mnist = data.load_mnist(data_config(cache_dir=str(tmp_path / "cache")))
    assert split_sizes(mnist) == SYNTHETIC_SIZES


def test_load_mnist_auto_does_not_fall_back_from_a_bad_dir(tmp_path):
    missing, cache = tmp_path / "typo", tmp_path / "cache"
    message = expect_error(
        data.load_mnist,
        data_config(dir=str(missing), cache_dir=str(cache)),
        must_contain=(str(missing), "does not exist"),
    )
    assert "download" not in message
    assert not cache.exists()


def test_load_mnist_auto_without_dir_uses_verified_cache(tmp_path, synthetic_mirror, monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    cache = tmp_path / "cache"
    download.download_mnist(cache, fetch=CopyFetch(synthetic_mirror))
    # load_mnist uses the real network fetch; a verified cache needs no network.
    mnist = data.load_mnist(data_config(cache_dir=str(cache)))
    assert split_sizes(mnist) == SYNTHETIC_SIZES


def test_load_mnist_tfds_source():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=30):
        mnist = data.load_mnist(data_config(source="tfds"))
    assert split_sizes(mnist) == [30 - IDX_NUM_VALIDATION, IDX_NUM_VALIDATION, 30]


def test_load_mnist_idx_without_dir(monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    expect_error(
        data.load_mnist,
        data_config(source="idx"),
        must_contain=("data.dir", data.DATA_DIR_ENV),
    )


def test_load_mnist_unknown_source():
    expect_error(
        data.load_mnist,
        data_config(source="hdf5"),
        must_contain=("hdf5", *data.SOURCES),
    )


def test_load_mnist_real_files(mnist_dir):
    config = data_config(source="idx", dir=str(mnist_dir), num_validation=10_000)
    mnist = data.load_mnist(config)

    assert split_sizes(mnist) == [50_000, 10_000, 10_000]
    for split in mnist:
        chex.assert_type([split.images, split.labels], [np.uint8, np.int32])
        chex.assert_shape(split.images, (len(split.labels), 28, 28, 1))
        assert split.images.max() == 255
        np.testing.assert_array_equal(np.unique(split.labels), np.arange(10))


@pytest.mark.usefixtures("quick_compile")  # compiled as the training tests compile it (tests/test_train.py)
def test_to_float_images_scales_uint8_to_unit_interval():
    images = np.array([0, 1, 128, 254, 255], np.uint8).reshape(5, 1, 1, 1)
    out = data.to_float_images(jnp.asarray(images))
    assert out.dtype == jnp.float32
    # XLA:CPU's float division may differ from numpy's by 1 ulp (254/255
    # does), so only the endpoints are compared exactly.
    chex.assert_trees_all_close(out, images.astype(np.float32) / np.float32(255.0), rtol=1e-6, atol=0)
    assert float(out[0, 0, 0, 0]) == 0.0 and float(out[-1, 0, 0, 0]) == 1.0


# ----------------------------------------------------------------------------
# The data's identity (load).

# The official files as loaded (advjax.download.MNIST_FILES): a change of content_sha256 changes every run's identity.
MNIST_SHA256 = "202e3be4c8ff396382c51a1cbb79eec32c01a789b80faec2c63682098c9f8bc8"


def test_load_returns_the_data_load_mnist_does_and_their_identity(idx_dir):
    config = data_config(source="idx", dir=str(idx_dir))
    mnist, identity = data.load(config)
    chex.assert_trees_all_equal(tuple(mnist), tuple(data.load_mnist(config)))
    assert identity == {"name": "mnist", "source": "idx", "location": str(idx_dir), "sha256": identity["sha256"]}
    assert len(identity["sha256"]) == 64 and int(identity["sha256"], 16) >= 0


def test_the_same_content_elsewhere_or_unpacked_has_the_same_digest(tmp_path, idx_dir):
    copy = shutil.copytree(idx_dir, tmp_path / "copy")
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    for packed in idx_dir.iterdir():
        (unpacked / packed.name.removesuffix(".gz")).write_bytes(gzip.decompress(packed.read_bytes()))
    identities = [data.load(data_config(dir=str(d)))[1] for d in (idx_dir, copy, unpacked)]
    assert len({i["sha256"] for i in identities}) == 1
    assert [i["location"] for i in identities] == [str(idx_dir), str(copy), str(unpacked)]


def test_the_digest_does_not_depend_on_the_validation_split(idx_dir):
    digests = {
        data.load(data_config(dir=str(idx_dir), num_validation=n, split_seed=seed))[1]["sha256"]
        for n, seed in ((10, 0), (20, 0), (10, 1))
    }
    assert len(digests) == 1


@pytest.mark.parametrize("name", [idx.TRAIN_IMAGES, idx.TRAIN_LABELS, idx.TEST_IMAGES, idx.TEST_LABELS])
def test_one_changed_value_changes_the_digest(tmp_path, idx_dir, name):
    copy = shutil.copytree(idx_dir, tmp_path / "copy")
    packed = copy / f"{name}.gz"
    content = bytearray(gzip.decompress(packed.read_bytes()))
    content[-1] = (content[-1] + 1) % 10  # the last pixel or label, still a valid label
    packed.write_bytes(gzip.compress(bytes(content)))
    assert data.load(data_config(dir=str(copy)))[1]["sha256"] != data.load(data_config(dir=str(idx_dir)))[1]["sha256"]


def test_the_digest_covers_dtype_and_shape():
    images = np.zeros((4, 28, 28, 1), np.uint8)
    split = data.Split(images, np.zeros(4, np.int32))
    reshaped = data.Split(images.reshape(2, 56, 28, 1), np.zeros(4, np.int32))
    as_int64 = data.Split(images, np.zeros(4, np.int64))
    digests = {data.content_sha256(s, split) for s in (split, reshaped, as_int64)}
    assert len(digests) == 3


def test_identity_names_a_relative_directory_absolutely(tmp_path, idx_dir, monkeypatch):
    monkeypatch.chdir(idx_dir.parent)
    identity = data.load(data_config(source="auto", dir=idx_dir.name))[1]
    assert (identity["source"], identity["location"]) == ("idx", str(idx_dir))


def test_identity_names_the_download_cache(tmp_path, synthetic_mirror, monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    cache = tmp_path / "cache"
    download.download_mnist(cache, fetch=CopyFetch(synthetic_mirror))
    identity = data.load(data_config(cache_dir=str(cache)))[1]
    assert (identity["source"], identity["location"]) == ("download", str(cache))
    assert identity["sha256"] == data.load(data_config(source="idx", dir=str(synthetic_mirror)))[1]["sha256"]


def test_identity_names_the_tfds_data_dir_read(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    with tfds.testing.mock_data(num_examples=30):
        default_dir = data.load(data_config(source="tfds"))[1]
        given = data.load(data_config(source="tfds", tfds_data_dir=str(tmp_path / "given")))[1]
    assert (default_dir["source"], default_dir["location"]) == ("tfds", str(tmp_path / "tfds"))
    assert given["location"] == str(tmp_path / "given")


def test_identity_of_the_real_files(mnist_dir):
    mnist, identity = data.load(data_config(source="idx", dir=str(mnist_dir), num_validation=10_000))
    assert identity == {
        "name": "mnist",
        "source": "idx",
        "location": os.path.abspath(mnist_dir),
        "sha256": MNIST_SHA256,
    }


# ----------------------------------------------------------------------------
# Datasets by name (data.name).

FASHION_MNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
# The official files as loaded (advjax.download.FASHION_MNIST_FILES), as MNIST_SHA256 above.
FASHION_MNIST_SHA256 = "8d09043b1fa170cbdb592266935b285306a4ad084b59e0030e3dc3a588c11e40"


@pytest.fixture
def fashion_mnist_dir() -> pathlib.Path:
    """Debian's dataset-fashion-mnist files, or the test is skipped saying why."""
    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip(f"{FASHION_MNIST_DIR} is absent: install Debian's dataset-fashion-mnist package")
    return FASHION_MNIST_DIR


def test_a_data_section_without_a_name_reads_mnist(idx_dir):
    assert "name" not in data_config()
    assert data.dataset_name(data_config()) == "mnist"
    assert data.dataset_info(data_config(dir=str(idx_dir))) == data.DatasetInfo("mnist", (28, 28, 1), 10)
    assert data.load(data_config(dir=str(idx_dir)))[1]["name"] == "mnist"


@pytest.mark.parametrize("name", ["imagenet", "MNIST", "tfds:", "tfds:Fashion MNIST", "tfds:cifar10:3", "tfds"])
def test_an_invalid_name_is_refused_naming_the_field_and_the_choices(idx_dir, name):
    expect_error(
        data.load,
        data_config(name=name, dir=str(idx_dir)),
        must_contain=(f"data.name={name!r} is invalid", *data.NAMES, "tfds:<name>"),
    )


@pytest.mark.parametrize("source", ["idx", "download"])
def test_a_tfds_name_is_read_through_tfds_alone(idx_dir, source):
    expect_error(
        data.locate,
        data_config(name="tfds:fashion_mnist", source=source, dir=str(idx_dir)),
        must_contain=("data.name='tfds:fashion_mnist'", f"data.source={source!r}", "'auto' or 'tfds'"),
    )


def test_a_tfds_name_ignores_the_data_dir_under_auto(idx_dir, monkeypatch):
    pytest.importorskip("tensorflow_datasets")
    monkeypatch.setenv("TFDS_DATA_DIR", str(idx_dir.parent / "tfds"))
    assert data.locate(data_config(name="tfds:cifar10", dir=str(idx_dir))) == ("tfds", str(idx_dir.parent / "tfds"))


def test_the_download_cache_is_one_per_dataset(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for name in data.NAMES:
        assert data.locate(data_config(name=name)) == ("download", str(tmp_path / "advjax" / name))


@pytest.mark.parametrize(
    "name,shape,num_classes",
    [("tfds:fashion_mnist", (28, 28, 1), 10), ("tfds:cifar10", (32, 32, 3), 10), ("tfds:cifar100", (32, 32, 3), 100)],
)
def test_a_tfds_dataset_by_name(name, shape, num_classes):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        info = data.dataset_info(data_config(name=name))
        dataset, identity = data.load(data_config(name=name, num_validation=2))
    assert info == data.DatasetInfo(name.removeprefix("tfds:"), shape, num_classes)
    assert (identity["name"], identity["source"]) == (info.name, "tfds")
    assert [len(split.labels) for split in dataset] == [10, 2, 12]
    for split in dataset:
        chex.assert_shape(split.images, (len(split.labels), *shape))
        chex.assert_type([split.images, split.labels], [np.uint8, np.int32])
        assert 0 <= split.labels.min() and split.labels.max() < num_classes


def test_a_built_in_name_with_the_tfds_source_reads_the_same_tfds_dataset():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        by_source = data.load(data_config(name="cifar10", source="tfds", num_validation=2))
        by_name = data.load(data_config(name="tfds:cifar10", num_validation=2))
    chex.assert_trees_all_equal(tuple(by_source[0]), tuple(by_name[0]))
    assert by_source[1] == by_name[1]


@pytest.mark.parametrize(
    "name,fragment",
    [
        ("tfds:imdb_reviews", "not an image-classification dataset"),  # text, no 'image' feature
        ("tfds:imagenette/160px", "images of shape (None, None, 3)"),  # images of many sizes
        ("tfds:no_such_dataset", "cannot open the dataset"),
    ],
)
def test_a_tfds_dataset_advjax_cannot_read_is_refused_in_one_line(name, fragment):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=4):
        message = expect_error(data.load, data_config(name=name), must_contain=(f"{name}: ", fragment))
    assert "\n" not in message


def test_an_unprepared_tfds_dataset_gives_a_hint_that_fits_its_name(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    message = expect_error(
        data.load,
        data_config(name="tfds:svhn_cropped", tfds_data_dir=str(tmp_path)),
        must_contain=("tfds:svhn_cropped: ", str(tmp_path), "tfds build svhn_cropped"),
    )
    assert "data.source='idx'" not in message  # a tfds: name has no other source


def test_fashion_mnist_real_files(fashion_mnist_dir):
    config = data_config(name="fashion_mnist", dir=str(fashion_mnist_dir), num_validation=10_000)
    dataset, identity = data.load(config)
    assert split_sizes(dataset) == [50_000, 10_000, 10_000]
    for split in dataset:
        chex.assert_type([split.images, split.labels], [np.uint8, np.int32])
        chex.assert_shape(split.images, (len(split.labels), 28, 28, 1))
        np.testing.assert_array_equal(np.unique(split.labels), np.arange(10))
    assert identity == {
        "name": "fashion_mnist",
        "source": "idx",
        "location": str(fashion_mnist_dir),
        "sha256": FASHION_MNIST_SHA256,
    }


def test_another_idx_datasets_official_files_are_refused(tmp_path, synthetic_mirror):
    # synthetic_mirror's files are declared MNIST's: read as Fashion-MNIST, they are refused, naming both.
    expect_error(
        data.load,
        data_config(name="fashion_mnist", dir=str(synthetic_mirror)),
        must_contain=("fashion_mnist: ", f"{idx.TRAIN_LABELS}.gz", "mnist's official", "data.name='mnist'"),
    )
    assert data.load(data_config(name="mnist", dir=str(synthetic_mirror)))[1]["name"] == "mnist"


def test_mnist_refuses_fashion_mnists_files(fashion_mnist_dir):
    expect_error(
        data.load,
        data_config(name="mnist", dir=str(fashion_mnist_dir)),
        must_contain=("mnist: ", str(fashion_mnist_dir), "fashion_mnist's official", "data.name='fashion_mnist'"),
    )


def test_a_bad_idx_file_names_the_dataset(idx_dir):
    (idx_dir / f"{idx.TEST_IMAGES}.gz").write_bytes(b"\x1f\x8b not a gzip stream")
    expect_error(
        data.load,
        data_config(name="fashion_mnist", dir=str(idx_dir)),
        must_contain=("fashion_mnist: ", f"{idx.TEST_IMAGES}.gz", "corrupt gzip"),
    )
