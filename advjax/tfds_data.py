"""Datasets already prepared for TFDS, read through `tfds.data_source` (data.source='tfds').

TFDS can only *prepare* a dataset through TensorFlow, a large dependency advjax
does not otherwise need, so a dataset must be prepared (array_record format)
before advjax reads it. Faults raise `DataError` naming the dataset and split.
"""

import types

import numpy as np

from advjax.idx import DataError, make_split


def import_tfds() -> types.ModuleType:
    try:
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    except ImportError as err:
        raise DataError(
            "tensorflow_datasets is not installed; install it or use data.source='idx' or 'download'"
        ) from err
    return tfds


def source_text(name: str, split: str, data_dir: str | None) -> str:
    return f"tfds {name}[{split}] (data_dir={data_dir or 'TFDS default'})"


def open_split(tfds: types.ModuleType, name: str, split: str, data_dir: str | None, has_files: bool = False):
    """The TFDS data source of one split of a prepared dataset; `has_files`: advjax also reads the dataset's
    own files (the error then says so)."""
    try:
        # download=False: preparing a dataset needs TensorFlow, which we do not have;
        # without it an unprepared dataset would attempt a doomed download.
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    # TFDS signals an unprepared dataset with assorted exception types.
    except Exception as err:  # pylint: disable=broad-exception-caught
        # The first line only: an unknown name's message goes on to list every dataset TFDS knows.
        cause = (str(err).splitlines() or [""])[0]
        others = f" or use data.name={name!r} with data.source='idx' or 'download'" if has_files else ""
        raise DataError(
            f"{source_text(name, split, data_dir)}: cannot open the dataset ({type(err).__name__}: {cause}); "
            f"prepare it with `tfds build {name} --file_format=array_record`{others}"
        ) from err


def shape_and_classes(data_source, source: str) -> tuple[tuple[int, int, int], int]:
    """The image shape and class count of a TFDS data source's 'image' and 'label' features."""
    features = data_source.dataset_info.features
    try:
        shape, num_classes = tuple(features["image"].shape), features["label"].num_classes
    # A feature that is missing, or a label that is not a class label.
    except (KeyError, AttributeError, TypeError) as err:
        raise DataError(
            f"{source}: not an image-classification dataset: advjax reads its 'image' feature and its 'label' "
            f"class label ({type(err).__name__}: {err})"
        ) from err
    if len(shape) != 3 or not all(isinstance(d, int) for d in shape) or not isinstance(num_classes, int):
        raise DataError(
            f"{source}: images of shape {shape} with {num_classes} classes; advjax needs one fixed "
            "(height, width, channels) shape and a known number of classes"
        )
    return shape, num_classes


def load_split(tfds: types.ModuleType, name: str, split: str, data_dir: str | None, has_files: bool = False):
    """(Split, image shape, class count) of one split."""
    source = source_text(name, split, data_dir)
    data_source = open_split(tfds, name, split, data_dir, has_files)
    shape, num_classes = shape_and_classes(data_source, source)
    if len(data_source) == 0:
        raise DataError(f"{source}: the split is empty")
    # Index records one by one: ds.__getitems__ is broken under tfds mock_data.
    records = [data_source[i] for i in range(len(data_source))]
    images = np.stack([np.asarray(r["image"]) for r in records])
    labels = np.array([r["label"] for r in records])
    if images.dtype != np.uint8:
        raise DataError(f"{source}: images of dtype {images.dtype}; advjax reads uint8 images")
    return make_split(images, labels, source, source, num_classes), shape, num_classes
