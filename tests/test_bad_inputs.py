"""Bad input of every kind: one clear message, a user error (launch.py: one `error:` line, exit 2), nothing corrupted.

Each case runs `train_and_evaluate` in-process (a subprocess would cost seconds
of imports each; tests/test_launch.py checks the exit status and the one line
for a few). Where a workdir matters, it starts as a copy of a finished run, and
must be byte-for-byte the same afterwards.

Counted across the test files, the distinct bad inputs tried:
- configs: here 6 (a value out of range, a wrong type, an unknown name, a grid
  that is not a list, a batch larger than the data, a missing field);
  tests/test_validation.py each field's bounds; tests/test_launch.py 4 on the
  command line and an unknown field;
- data: here 4 for MNIST (a missing directory, a truncated file, a corrupt gzip stream,
  image and label counts that differ) and 3 for CIFAR-10 (a wrong record size, a bad checksum, a truncated
  archive); tests/test_idx.py, tests/test_cifar.py and tests/test_data.py more, at the loaders;
  tests/test_launch.py a missing directory and a truncated file;
- workdirs: here 9 (its parent is a file, it is a file, read-only (immutable
  for root), written by another config, outputs without a config or a
  checkpoint, a damaged config.json, a checkpoint of another config, every
  checkpoint damaged, other data); a lost config.json is recovered;
  tests/test_launch.py a parent that is a file, another config, a live run,
  a full disk, signals; tests/test_checkpoint.py a damaged latest checkpoint
  and a silently flipped byte (an older one is used);
- sizes: here more training examples than the data hold; tests/test_validation.py each count;
- training: here a NaN from an absurd learning rate, with 1 and 2 seeds.
"""

import contextlib
import gzip
import json
import os
import pathlib
import shutil
import subprocess

import jax
import pytest

import launch
from advjax import checkpoint, experiment, models, train
from advjax import workdir as workdir_module
from tests import test_cifar
from tests.helpers import synthetic_config, write_synthetic_mnist

# Reading a damaged checkpoint, orbax leaves asyncio callbacks behind that
# complain ("Event loop is closed") whenever they run, often in a later test.
pytestmark = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.usefixtures("quick_compile_module"),
]


def snapshot(directory: pathlib.Path) -> dict[str, bytes]:
    """Every file under `directory` with its bytes ({} when it does not exist)."""
    if not directory.is_dir():
        return {}
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def refused(config, workdir: pathlib.Path, *fragments: str, new_files: tuple[str, ...] = ()) -> str:
    """Runs `config` in `workdir`; checks it stops with a user error naming `fragments`.

    Nothing in the workdir may change, and nothing may appear but `new_files`.
    """
    before = snapshot(workdir)
    with pytest.raises(launch.USER_ERRORS) as info:
        experiment.train_and_evaluate(config, str(workdir), log=lambda message: None)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert "\n" not in message  # launch.py prints it as one `error:` line
    after = snapshot(workdir)
    assert {name: after[name] for name in after if name not in new_files} == before
    return message


@pytest.fixture(scope="module")
def finished_run(synthetic_mnist_dir, tmp_path_factory) -> tuple:
    """A finished one-epoch run: (its config, its workdir). Copy it before changing it."""
    config = synthetic_config(synthetic_mnist_dir)
    workdir = tmp_path_factory.mktemp("finished") / "run"
    experiment.train_and_evaluate(config, str(workdir), log=lambda message: None)
    return config, workdir


@pytest.fixture
def run_copy(finished_run, tmp_path) -> tuple:
    config, workdir = finished_run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    return synthetic_config(pathlib.Path(config.data.dir)), copy


# Configs: refused before the workdir or the data are touched ----------------------


MISSING = object()


def edited(config, path: str, value):
    """`config` with the field at `path` set to `value` (of any type) or, for MISSING, deleted."""
    section, _, field = path.rpartition(".")
    node = config[section] if section else config
    with node.ignore_type():
        if value is MISSING:
            del node[field]
        else:
            node[field] = value
    return config


@pytest.mark.parametrize(
    "path,value,fragment",
    [
        ("train.eps", 1.5, "config.train.eps=1.5 is invalid: expected a number in [0.0, 1.0]"),
        ("train.epochs", "3", "config.train.epochs='3' is invalid: expected a positive integer"),
        ("data.source", "imagenet", "config.data.source='imagenet' is invalid: expected one of"),
        ("eval.sigma_grid", 0.5, "config.eval.sigma_grid=0.5 is invalid: expected a list of numbers"),
        ("train.batch_size", 60_000, "config.train.batch_size=60000 exceeds"),
        ("eval.eps", MISSING, "config.eval.eps is missing"),
    ],
    ids=["out_of_range", "wrong_type", "unknown_name", "grid_not_a_list", "batch_larger_than_data", "missing_field"],
)
def test_a_bad_config_is_refused_naming_the_field(run_copy, path, value, fragment):
    config, workdir = run_copy
    refused(edited(config, path, value), workdir, fragment)


# Data: refused before anything is written -------------------------------------


def damaged_data(source: pathlib.Path, target: pathlib.Path, damage) -> pathlib.Path:
    shutil.copytree(source, target)
    damage(target)
    return target


def truncate_train_images(directory: pathlib.Path) -> None:
    packed = directory / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(packed.read_bytes())
    packed.unlink()
    (directory / "train-images-idx3-ubyte").write_bytes(raw[: len(raw) // 2])


def corrupt_test_labels_gzip(directory: pathlib.Path) -> None:
    path = directory / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20] + b"\x00" * 40)


def drop_test_labels(directory: pathlib.Path) -> None:
    path = directory / "t10k-labels-idx1-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    count = int.from_bytes(raw[4:8], "big") - 10
    path.write_bytes(gzip.compress(raw[:4] + count.to_bytes(4, "big") + raw[8 : 8 + count]))


@pytest.mark.parametrize(
    "damage,fragments",
    [
        (lambda d: shutil.rmtree(d), ("mnist: ", "IDX directory does not exist")),
        (truncate_train_images, ("mnist: ", "train-images-idx3-ubyte", "truncated")),
        (corrupt_test_labels_gzip, ("mnist: ", "t10k-labels-idx1-ubyte.gz", "corrupt gzip stream")),
        (drop_test_labels, ("mnist: ", "image/label count mismatch", "t10k-labels-idx1-ubyte.gz")),
    ],
    ids=["missing_directory", "truncated_file", "corrupt_gzip", "count_mismatch"],
)
def test_bad_data_is_refused_naming_the_file_and_nothing_is_written(synthetic_mnist_dir, tmp_path, damage, fragments):
    config = synthetic_config(damaged_data(synthetic_mnist_dir, tmp_path / "mnist", damage))
    refused(config, tmp_path / "run", *fragments)
    assert snapshot(tmp_path / "run") == {}


def cifar10_dir(target: pathlib.Path, edit_batches, edit_archive, monkeypatch) -> pathlib.Path:
    """A CIFAR-10 archive in the official binary format, declared official before `edit_archive` damages it."""
    files = test_cifar.batch_files(edit_batches(test_cifar.batch_files()) if edit_batches else None)
    archive = test_cifar.write_archive(target, files)
    test_cifar.declare_official(monkeypatch, archive)
    if edit_archive:
        archive.write_bytes(edit_archive(archive.read_bytes()))
    return target


def flip_middle_byte(content: bytes) -> bytes:
    middle = len(content) // 2
    return content[:middle] + bytes([content[middle] ^ 1]) + content[middle + 1 :]


@pytest.mark.parametrize(
    "edit_batches,edit_archive,fragments",
    [
        (lambda files: {"data_batch_2.bin": files["data_batch_2.bin"][:-1]}, None, ("data_batch_2.bin", "3073-byte")),
        (None, flip_middle_byte, ("cifar-10-binary.tar.gz", "checksum mismatch")),
        (None, lambda b: b[: len(b) // 2], ("cifar-10-binary.tar.gz", "truncated")),
    ],
    ids=["wrong_record_size", "bad_checksum", "truncated_archive"],
)
def test_bad_cifar10_data_is_refused_naming_the_dataset_and_the_file(
    tmp_path, monkeypatch, edit_batches, edit_archive, fragments
):
    config = synthetic_config(cifar10_dir(tmp_path / "cifar10", edit_batches, edit_archive, monkeypatch))
    config.data.name, config.data.num_validation, config.eval.num_validation = "cifar10", 5, 5
    refused(config, tmp_path / "run", "cifar10: ", *fragments)
    assert snapshot(tmp_path / "run") == {}


# Workdirs ------------------------------------------------------------------------


def test_a_workdir_under_a_file_is_refused(synthetic_mnist_dir, tmp_path):
    (tmp_path / "a_file").write_text("keep me")
    refused(synthetic_config(synthetic_mnist_dir), tmp_path / "a_file" / "run", "is not writable")
    assert (tmp_path / "a_file").read_text() == "keep me"


def test_a_workdir_that_is_a_file_is_refused(synthetic_mnist_dir, tmp_path):
    (tmp_path / "run").write_text("keep me")
    refused(synthetic_config(synthetic_mnist_dir), tmp_path / "run", "is a file, not a directory")
    assert (tmp_path / "run").read_text() == "keep me"


@contextlib.contextmanager
def unwritable(directory: pathlib.Path):
    """Makes `directory` unwritable: by its mode, or for root (whom modes do not stop) as immutable."""
    as_root = os.geteuid() == 0
    if as_root:
        if (
            shutil.which("chattr") is None
            or subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode
        ):
            pytest.skip("running as root, and this file system cannot make a directory immutable")
    else:
        directory.chmod(0o555)
    try:
        yield
    finally:
        if as_root:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
        else:
            directory.chmod(0o755)


def test_a_read_only_workdir_is_refused(run_copy):
    config, workdir = run_copy
    with unwritable(workdir):
        refused(config, workdir, "is not writable")


def test_a_workdir_of_another_config_is_refused_naming_the_field(run_copy):
    config, workdir = run_copy
    config.train.learning_rate = 1e-3
    refused(
        config,
        workdir,
        "holds a run of a different config",
        "config.train.learning_rate: 0.002 there, 0.001 now",
        "--overwrite",
    )


def test_outputs_without_a_config_or_a_checkpoint_are_refused(run_copy):
    config, workdir = run_copy
    (workdir / "config.json").unlink()
    shutil.rmtree(workdir / "checkpoints")
    refused(config, workdir, "but no config.json", "--overwrite")


def test_a_lost_config_json_is_recovered_from_the_checkpoint_and_the_run_goes_on(run_copy):
    config, workdir = run_copy
    before = snapshot(workdir)
    (workdir / "config.json").unlink()
    messages = []
    experiment.train_and_evaluate(config, str(workdir), log=messages.append)
    assert any("config.json was missing; recovered it from the checkpoint of epoch 1" in m for m in messages)
    after = snapshot(workdir)
    assert json.loads(after["config.json"]) == json.loads(before["config.json"])
    assert after["summary.json"] == before["summary.json"]


def test_a_relaunch_on_other_data_is_refused_naming_both_fingerprints(run_copy, tmp_path):
    config, workdir = run_copy
    other = tmp_path / "other_mnist"
    shutil.copytree(config.data.dir, other)
    images = other / "train-images-idx3-ubyte.gz"
    content = bytearray(gzip.decompress(images.read_bytes()))
    content[-1] ^= 0xFF  # one pixel of the last training image
    images.write_bytes(gzip.compress(bytes(content)))
    config.data.dir = str(other)
    saved = json.loads((workdir / "config.json").read_text())[workdir_module.DATA_KEY]
    message = refused(config, workdir, "holds a run trained on other data", f"sha256 {saved['sha256'][:16]}")
    assert str(other) in message and "--overwrite" in message


def test_the_same_data_in_another_directory_resumes(run_copy, tmp_path):
    config, workdir = run_copy
    before = snapshot(workdir)["summary.json"]
    shutil.copytree(config.data.dir, tmp_path / "moved")
    config.data.dir = str(tmp_path / "moved")
    experiment.train_and_evaluate(config, str(workdir), log=lambda message: None)
    assert json.loads(snapshot(workdir)["summary.json"])["accuracy"] == json.loads(before)["accuracy"]


def test_more_training_examples_than_the_data_holds_are_refused_before_training(tmp_path):
    small = write_synthetic_mnist(tmp_path / "small", num_train=2000, num_test=300)
    config = synthetic_config(small)
    config.train.max_examples = 5000
    refused(config, tmp_path / "run", "config.train.max_examples=5000", "exceeds")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_damaged_config_json_is_refused(run_copy):
    config, workdir = run_copy
    text = (workdir / "config.json").read_text()
    (workdir / "config.json").write_text(text[: len(text) // 2])
    refused(config, workdir, "config.json cannot be read", "--overwrite")


def test_a_checkpoint_of_another_config_is_refused(run_copy):
    # config.json matches, but the checkpoints were copied in from another run.
    config, workdir = run_copy
    other = synthetic_config(pathlib.Path(config.data.dir))
    other.model.hidden = (32,)
    shutil.rmtree(workdir / "checkpoints")
    state = train.create_train_state(jax.random.key(0), models.build_model(other.model), other.train, 7)
    with checkpoint.open_manager(str(workdir), keep=2) as manager:
        checkpoint.save_epoch(manager, 1, state, other, [{"epoch": 1}])
    refused(config, workdir, "was written by a different config", "config.model.hidden: [32] there, [256, 256] now")


def test_a_run_whose_every_checkpoint_is_damaged_is_refused(run_copy):
    config, workdir = run_copy
    for path in (workdir / "checkpoints" / "1" / checkpoint.STATE_ITEM).rglob("*"):
        if path.is_file() and path.stat().st_size:
            path.write_bytes(b"\x00" * 8)
    refused(config, workdir, "no checkpoint under", "can be restored", "--overwrite")


# Training ------------------------------------------------------------------------


@pytest.mark.parametrize("num_seeds", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_nan_from_an_absurd_learning_rate_names_the_epoch_and_step(synthetic_mnist_dir, tmp_path, num_seeds):
    config = synthetic_config(synthetic_mnist_dir)
    config.num_seeds = num_seeds
    config.train.learning_rate, config.train.schedule = 1e30, "constant"
    config.model.hidden, config.train.chunk_size = (32,), 2  # quicker to compile; diverges all the same
    # The first update sends the params to ~1e30: the second step's loss is the first non-finite one.
    message = refused(
        config,
        tmp_path / "run",
        "became non-finite in epoch 1 at step 2",
        "train.learning_rate",
        new_files=("config.json",),
    )
    assert ("of seed 0" in message) == (num_seeds > 1)
