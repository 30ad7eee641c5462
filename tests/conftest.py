"""Shared fixtures: the persistent compilation cache, real and synthetic MNIST directories, compile settings.

Plain helpers (configs, synthetic data, linear models) are in tests/helpers.py.
"""

import atexit
import hashlib
import os
import pathlib
import shutil
import tempfile

import chex
import jax
import numpy as np
import pytest

from advjax import download
from tests.helpers import (
    IMAGE_SHAPE,
    idx_bytes,
    optimizations_disabled,
    synthetic_arrays,
    write_gz_dir,
    write_synthetic_mnist,
)

# Compilation dominates these tests: each train_and_evaluate builds fresh jits
# of the same programs. A persistent compilation cache, fresh per session (so
# never stale) and shared with the launch.py subprocesses through the
# environment, compiles each program once: a repeated tiny run drops from
# about 11 s to 2 s on the 2-core CI machine. It must be set before the first
# compilation, which is why it happens here, at import. pytest-xdist's workers
# inherit the directory from the process that started them, so they share it.
_COMPILATION_CACHE = os.environ.get("ADVJAX_TEST_COMPILATION_CACHE", "")
if not _COMPILATION_CACHE:
    _COMPILATION_CACHE = tempfile.mkdtemp(prefix="advjax-test-jax-cache-")
    os.environ["ADVJAX_TEST_COMPILATION_CACHE"] = _COMPILATION_CACHE
    atexit.register(shutil.rmtree, _COMPILATION_CACHE, ignore_errors=True)
for _name, _value in {
    "jax_compilation_cache_dir": _COMPILATION_CACHE,
    "jax_persistent_cache_min_compile_time_secs": 0.0,
    "jax_persistent_cache_min_entry_size_bytes": 0,
}.items():
    jax.config.update(_name, _value)
    os.environ[_name.upper()] = str(_value)

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@pytest.fixture(autouse=True)
def _fresh_trace_counters():
    # chex keys its trace counters by call stack, so parametrized cases would share one.
    chex.clear_trace_counter()
    yield
    chex.clear_trace_counter()


@pytest.fixture(autouse=True)
def _quick_tier_compiles_quickly(request):
    """The quick tier's programs are tiny: most of XLA's optimisation passes would cost more than they save.
    A test that depends on full optimizations (exact rounding, compiled memory) sets them itself."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    with optimizations_disabled():
        yield


@pytest.fixture
def quick_compile():
    """Skip most of XLA's optimisation passes: for these tiny programs with loops,
    compiling costs several times more than running (about 3x per PGD test on 2 cores)."""
    with optimizations_disabled():
        yield


@pytest.fixture(scope="module")
def quick_compile_module():
    """quick_compile for a whole module (`pytestmark = pytest.mark.usefixtures("quick_compile_module")`)."""
    with optimizations_disabled():
        yield


@pytest.fixture
def mnist_dir() -> pathlib.Path:
    """$ADVJAX_DATA_DIR holding the four MNIST IDX files, or the test is skipped saying why."""
    configured = os.environ.get("ADVJAX_DATA_DIR", "")
    if not configured:
        pytest.skip("ADVJAX_DATA_DIR is unset; point it at a directory holding the four MNIST IDX files")
    path = pathlib.Path(configured)
    missing = [n for n in MNIST_FILES if not ((path / n).exists() or (path / f"{n}.gz").exists())]
    if missing:
        pytest.skip(f"ADVJAX_DATA_DIR={configured} lacks {missing}")
    return path


@pytest.fixture(scope="session")
def synthetic_mnist_dir(tmp_path_factory) -> pathlib.Path:
    """A directory of IDX files in MNIST's format: 1200 training and 300 test images."""
    return write_synthetic_mnist(tmp_path_factory.mktemp("synthetic_mnist"))


@pytest.fixture
def idx_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    """The four gzipped IDX files of helpers.synthetic_arrays."""
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
def saturated_images() -> jax.Array:
    """A checkerboard of pixels exactly at 0 and at 1."""
    board = (np.indices((28, 28)).sum(axis=0) % 2).astype(np.float32)
    return jax.numpy.asarray(np.broadcast_to(board[None, :, :, None], (3, *IMAGE_SHAPE)).copy())
