"""launch.py end to end, as a user runs it, and its refusals of bad input."""

import gzip
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import advjax
from advjax import data
from tests.helpers import QUICK_COMPILE_ENV, write_synthetic_mnist

# Every test here starts launch.py in a subprocess.
pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]
PERTURBATIONS = {"clean", "fgsm", "gaussian", "matched_gaussian"}
SHRINK = [
    "--config.train.epochs=2",
    "--config.train.max_examples=2048",
    "--config.eval.num_train=300",
    "--config.eval.num_validation=300",
    "--config.eval.num_test=500",
    "--config.eval.batch_size=100",
]


def launch_command(config: str, workdir, *overrides: str) -> list[str]:
    return [sys.executable, "launch.py", f"--config=configs/{config}.py", f"--workdir={workdir}", *overrides]


def launch(config: str, workdir, *overrides: str, data_dir=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if data_dir is not None:
        env["ADVJAX_DATA_DIR"] = str(data_dir)
    command = launch_command(config, workdir, *overrides)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def synthetic_overrides(data_dir, *extra: str) -> list[str]:
    return [
        "--config.data.source=idx",
        f"--config.data.dir={data_dir}",
        "--config.data.num_validation=200",
        "--config.eval.num_train=200",
        "--config.eval.num_validation=200",
        "--config.eval.num_test=300",
        "--config.eval.batch_size=100",
        *extra,
    ]


def independent_fgsm_accuracy(apply_fn, params, images, labels, eps) -> float:
    """FGSM written from scratch, sharing no code with advjax.attacks."""

    def loss(x, y):
        logits = apply_fn(params, x)
        return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    x = jnp.asarray(images, jnp.float32) / 255.0
    y = jnp.asarray(labels)
    x_adv = jnp.clip(x + eps * jnp.sign(jax.grad(loss)(x, y)), 0.0, 1.0)
    return float(jnp.mean(jnp.argmax(apply_fn(params, x_adv), -1) == y))


def test_bp_adv_end_to_end_writes_everything_and_restores(tmp_path, mnist_dir):
    workdir = tmp_path / "run"
    result = launch("bp_adv", workdir, *SHRINK, data_dir=mnist_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epoch 2/2" in result.stderr
    assert "| validation |" in result.stdout

    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(np.isfinite(r["train_loss"]) and 0 <= r["validation_accuracy"] <= 1 for r in records)

    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["config"]["train"]["mode"] == "fgsm"
    assert set(summary["accuracy"]) == {"train", "validation", "test"}
    for split in ("train", "validation", "test"):
        assert set(summary["accuracy"][split]) == PERTURBATIONS
        assert set(summary["perturbation_stats"][split]) == PERTURBATIONS - {"clean"}
        assert summary["perturbation_stats"][split]["fgsm"]["linf"] == pytest.approx(0.1, abs=1e-6)
    assert any((workdir / "checkpoints").iterdir())

    restored = advjax.restore(str(workdir))
    mnist = data.load_mnist(restored.config.data)
    n = restored.config.eval.num_validation
    ours = independent_fgsm_accuracy(
        jax.jit(restored.apply_fn), restored.params, mnist.validation.images[:n], mnist.validation.labels[:n], 0.1
    )
    assert abs(ours - summary["accuracy"]["validation"]["fgsm"]) <= 0.005


def test_cnn_end_to_end_on_a_shrunk_config(tmp_path, mnist_dir):
    overrides = [
        "--config.train.epochs=1",
        "--config.train.max_examples=256",
        "--config.train.batch_size=32",
        "--config.eval.num_train=100",
        "--config.eval.num_validation=100",
        "--config.eval.num_test=100",
        "--config.eval.batch_size=50",
        "--config.data.num_validation=500",
    ]
    result = launch("cnn_adv", tmp_path / "run", *overrides, data_dir=mnist_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["model"]["name"] == "cnn"
    assert summary["eval_sizes"] == {"train": 100, "validation": 100, "test": 100}


@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.train.eps=-0.1", "config.train.eps=-0.1"),
        ("--config.eval.sigma=-1.0", "config.eval.sigma=-1.0"),
        ("--config.train.alpha=1.5", "config.train.alpha=1.5"),
        ("--config.model.name=resnet", "config.model.name='resnet'"),
    ],
)
def test_bad_config_value_stops_before_anything_is_written(tmp_path, override, message):
    workdir = tmp_path / "run"
    result = launch("bp_adv", workdir, override, data_dir=tmp_path / "unused")
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stderr.count("error:") == 1
    assert not workdir.exists()


def test_wrong_data_directory_is_named_and_nothing_is_trained(tmp_path):
    missing = tmp_path / "no_such_dir"
    result = launch("bp", tmp_path / "run", data_dir=missing)
    assert result.returncode == 2
    assert str(missing) in result.stderr and "does not exist" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_corrupt_data_file_is_named_and_nothing_is_trained(tmp_path, mnist_dir):
    corrupt = tmp_path / "mnist"
    shutil.copytree(mnist_dir, corrupt)
    target = next(corrupt.glob("t10k-labels-idx1-ubyte*"))
    payload = gzip.decompress(target.read_bytes()) if target.suffix == ".gz" else target.read_bytes()
    target.unlink()
    (corrupt / "t10k-labels-idx1-ubyte").write_bytes(payload[:5000])  # truncated
    result = launch("bp", tmp_path / "run", data_dir=corrupt)
    assert result.returncode == 2
    assert "t10k-labels-idx1-ubyte" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_workdir_that_cannot_be_created_is_refused(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = launch("bp", blocker / "run", data_dir=tmp_path)
    assert result.returncode == 2
    assert "not writable" in result.stderr


def test_a_defense_config_refuses_an_unknown_network_in_one_error_line_naming_the_choices(tmp_path):
    command = [sys.executable, "launch.py", "--config=configs/pgd.py:mlp", f"--workdir={tmp_path / 'run'}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.count("error:") == 1 and "Traceback" not in result.stderr, result.stderr
    assert "('cnn', 'bp')" in errors[0] and "'mlp'" in errors[0] and "configs/pgd.py" in errors[0]
    assert not (tmp_path / "run").exists()


def test_an_unknown_config_field_on_the_command_line_is_one_error_line(tmp_path):
    result = launch("bp", tmp_path / "run", "--config.train.epoch=3", data_dir=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr
    assert 'Did you mean "epochs"' in result.stderr
    assert not (tmp_path / "run").exists()


# Resume after a kill. The synthetic training split (3000 - 200 images, FGSM
# training) makes each epoch last about a second on the 2-core CI machine once
# compiled, while the poll below reacts within 10 ms of the first checkpoint:
# the kill lands long before epochs 2-3 and the evaluation are done.
KILL_TEST_TRAIN_IMAGES = 3000


@pytest.fixture(scope="module")
def kill_test_setup(tmp_path_factory) -> tuple[list[str], pathlib.Path]:
    """(overrides, workdir of the same run uninterrupted); the run also fills the compilation cache."""
    root = tmp_path_factory.mktemp("resume")
    data_dir = write_synthetic_mnist(root / "mnist", num_train=KILL_TEST_TRAIN_IMAGES)
    overrides = synthetic_overrides(data_dir, "--config.train.epochs=3")
    whole = launch("bp_adv", root / "whole", *overrides)
    assert whole.returncode == 0, whole.stderr[-3000:]
    return overrides, root / "whole"


def kill_after_first_checkpoint(command: list[str], workdir: pathlib.Path, log_path: pathlib.Path) -> subprocess.Popen:
    """Starts `command` and SIGKILLs it as soon as the checkpoint of epoch 1 is committed."""
    committed = workdir / "checkpoints" / "1"  # orbax renames a checkpoint into place once complete
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while process.poll() is None and not committed.is_dir() and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()
    return process


def checkpointed_epochs(workdir: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_a_run_killed_after_an_epoch_resumes_and_ends_as_an_uninterrupted_one(tmp_path, kill_test_setup):
    overrides, whole = kill_test_setup
    workdir = tmp_path / "run"

    killed = kill_after_first_checkpoint(
        launch_command("bp_adv", workdir, *overrides), workdir, tmp_path / "killed.log"
    )
    log = (tmp_path / "killed.log").read_text()
    assert killed.returncode == -signal.SIGKILL, (
        f"the run ended (status {killed.returncode}) before it could be killed: give it more "
        f"training images than {KILL_TEST_TRAIN_IMAGES}\n{log[-3000:]}"
    )
    done = checkpointed_epochs(workdir)
    assert done and max(done) < 3 and not (workdir / "summary.json").exists(), (done, log[-3000:])

    resumed = launch("bp_adv", workdir, *overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed after epoch {max(done)}/3" in resumed.stderr
    assert f"] epoch {max(done)}/3 " not in resumed.stderr  # the checkpointed epochs are not trained again
    assert "] epoch 3/3 " in resumed.stderr
    for name in ("summary.json", "metrics.jsonl"):
        assert (workdir / name).read_bytes() == (whole / name).read_bytes(), name


def test_a_workdir_of_another_config_is_refused_and_overwrite_replaces_its_run(tmp_path, kill_test_setup):
    overrides, whole = kill_test_setup
    workdir = tmp_path / "run"
    shutil.copytree(whole, workdir)
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    # A different config with the same programs and numbers: BP's epoch is one loop, which chunk_size does not shape.
    other = [*overrides, "--config.train.chunk_size=4"]

    refused = launch("bp_adv", workdir, *other)
    assert refused.returncode == 2 and refused.stderr.count("error:") == 1
    assert "config.train.chunk_size: 8 there, 4 now" in refused.stderr and "--overwrite" in refused.stderr
    assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before

    replaced = launch("bp_adv", workdir, *other, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert "resumed" not in replaced.stderr and "] epoch 1/3 " in replaced.stderr
    assert checkpointed_epochs(workdir) == [2, 3]
    assert (workdir / "metrics.jsonl").read_bytes() == (whole / "metrics.jsonl").read_bytes()
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["config"]["train"]["chunk_size"] == 4
    assert summary["accuracy"] == json.loads((whole / "summary.json").read_text())["accuracy"]


def test_launch_on_four_simulated_devices_equals_one_device(tmp_path, synthetic_mnist_dir):
    # The wiring end to end: launch.py builds a 4-device data mesh from
    # config.num_devices=0 and trains, evaluates and sweeps on it; the results
    # must be those of one device (the library-level checks are in test_sharding.py).
    overrides = synthetic_overrides(
        synthetic_mnist_dir,
        "--config.train.epochs=2",
        "--config.train.max_examples=512",
        "--config.train.batch_size=64",
        "--config.eval.sigma_grid=(0.0,0.5)",
    )
    # Both runs compile quickly, as the quick tier does: the wiring is under test, not XLA's passes.
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu", **QUICK_COMPILE_ENV
    )
    runs = {}
    for devices in (1, 4):
        workdir = tmp_path / f"devices{devices}"
        command = launch_command("bp", workdir, *overrides, f"--config.num_devices={devices}")
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        runs[devices] = json.loads((workdir / "summary.json").read_text())
    assert runs[1]["data_shards"] == 1 and runs[4]["data_shards"] == 4
    # The 4-device model differs from the 1-device one by float rounding (its
    # gradients are summed in another order), and on these synthetic digits a
    # rounding-level change flips the sign of near-zero input gradients: a
    # noisy or FGSM image's prediction may flip for a few of the 200-300 examples.
    for split, accuracy in runs[1]["accuracy"].items():
        assert runs[4]["accuracy"][split] == pytest.approx(accuracy, abs=0.02), split
        assert runs[4]["accuracy"][split]["clean"] == accuracy["clean"], split
    assert runs[4]["sweeps"]["gaussian"]["accuracy"] == pytest.approx(
        runs[1]["sweeps"]["gaussian"]["accuracy"], abs=0.02
    )
    for sharded, single in zip(runs[4]["epochs"], runs[1]["epochs"], strict=True):
        assert sharded["train_loss"] == pytest.approx(single["train_loss"], rel=1e-4)  # sums in another order
        assert sharded["validation_accuracy"] == single["validation_accuracy"]
        assert sharded["train_accuracy"] == pytest.approx(single["train_accuracy"], abs=0.01)


def test_a_batch_the_devices_cannot_split_is_refused(tmp_path, synthetic_mnist_dir):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    command = launch_command(
        "bp", tmp_path / "run", *synthetic_overrides(synthetic_mnist_dir, "--config.train.batch_size=30")
    )
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    assert "train.batch_size=30 is not divisible by the 4 devices" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


# Faults of the machine and of concurrent launches: one line each, no traceback, no process left behind.


def the_one_line(result: subprocess.CompletedProcess, *fragments: str, status: int = 2, prefix: str = "error:") -> str:
    """The single `error:` (or `interrupted`, `warning:`) line of a launch, checked for `fragments` and `status`."""
    assert result.returncode == status, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def start_and_wait_for_epoch_1(command: list[str], workdir: pathlib.Path, log_path: pathlib.Path) -> subprocess.Popen:
    """Starts `command`; returns once its checkpoint of epoch 1 is committed (or the process ended)."""
    log = open(log_path, "w")  # closed when the process's output is read back
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while process.poll() is None and not (workdir / "checkpoints" / "1").is_dir() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, log_path.read_text()[-3000:]
    return process


def test_a_live_run_is_neither_joined_nor_overwritten_by_a_second_launch(tmp_path, kill_test_setup):
    overrides, _ = kill_test_setup
    workdir = tmp_path / "run"
    long_run = [*overrides, "--config.train.epochs=60"]  # outlives the second launches' start-up
    live = start_and_wait_for_epoch_1(launch_command("bp_adv", workdir, *long_run), workdir, tmp_path / "live.log")
    try:
        commands = [
            launch_command("bp_adv", workdir, *long_run),
            [*launch_command("bp_adv", workdir, *long_run), "--overwrite", "--config.seed=1"],
        ]
        seconds = [
            subprocess.Popen(c, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands
        ]
        results = [subprocess.CompletedProcess(p.args, 0, *p.communicate(timeout=300)) for p in seconds]
        for p, result in zip(seconds, results):
            result.returncode = p.returncode
        assert live.poll() is None, "the live run ended before the second launches were refused: lengthen it"
    finally:
        live.send_signal(signal.SIGTERM)
        live.wait(timeout=10)
    for result in results:
        the_one_line(result, f"{workdir} is in use by process {live.pid} on ", "use another --workdir")
    assert live.returncode == 143, (tmp_path / "live.log").read_text()[-3000:]
    # Nothing of the live run was deleted or rewritten by the launch with --overwrite --config.seed=1.
    assert json.loads((workdir / "config.json").read_text())["seed"] == 0
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, len(records) + 1)) and records
    # The signal may land between an epoch's checkpoint and its metrics.jsonl, which a relaunch rewrites from it.
    assert max(checkpointed_epochs(workdir)) in (len(records), len(records) + 1)


@pytest.mark.parametrize("stop, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_run_stops_in_one_line_and_the_relaunch_ends_as_an_uninterrupted_run(
    tmp_path, kill_test_setup, stop, status
):
    overrides, whole = kill_test_setup
    workdir = tmp_path / "run"
    process = start_and_wait_for_epoch_1(launch_command("bp_adv", workdir, *overrides), workdir, tmp_path / "run.log")
    process.send_signal(stop)
    process.wait(timeout=10)  # promptly: no background thread holds the process
    log = (tmp_path / "run.log").read_text()
    stopped = subprocess.CompletedProcess(process.args, process.returncode, "", log)
    line = the_one_line(
        stopped, f"interrupted by {stop.name} ", "relaunch the same command to", status=status, prefix="interrupted"
    )
    done = checkpointed_epochs(workdir)
    assert f"resume after epoch {max(done)}" in line or not done, line

    resumed = launch("bp_adv", workdir, *overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name in ("summary.json", "metrics.jsonl"):
        assert (workdir / name).read_bytes() == (whole / name).read_bytes(), name


@pytest.fixture
def small_filesystem(tmp_path):
    """A 1 MiB tmpfs: room for config.json, none for a checkpoint. Needs root."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a full filesystem is simulated with a small tmpfs, which only root can mount")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)]).returncode:
        pytest.skip("this machine does not let root mount a tmpfs")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_a_full_disk_while_checkpointing_is_one_line_naming_the_checkpoint(small_filesystem, synthetic_mnist_dir):
    workdir = small_filesystem / "run"
    result = launch("bp", workdir, *synthetic_overrides(synthetic_mnist_dir), "--config.train.epochs=1")
    the_one_line(result, f"cannot write the checkpoint of epoch 1 to {workdir}/checkpoints", "No space left on device")


def test_an_unusable_compilation_cache_is_a_warning_and_the_run_goes_on(tmp_path, synthetic_mnist_dir):
    overrides = synthetic_overrides(synthetic_mnist_dir, "--config.train.epochs=1")
    result = launch("bp", tmp_path / "run", *overrides, "--compilation_cache=/proc/forbidden")
    the_one_line(result, "/proc/forbidden", "running without the compilation cache", status=0, prefix="warning:")
    assert (tmp_path / "run" / "summary.json").exists()
    # timings.json names each executable, marks those read from a cache, and the log counts them.
    compiled = json.loads((tmp_path / "run" / "timings.json").read_text())["compilation"]
    names = [e["name"] for e in compiled["executables"]]
    assert compiled["num_executables"] == len(names) > 0
    assert sum(e["from_cache"] for e in compiled["executables"]) == compiled["cache_hits"]
    assert all(name.startswith("jit(") for name in names), names
    # Named by role (loops.named), not by the helper that compiled them.
    assert {"jit(create_states)", "jit(epoch_permutation)", "jit(train_epoch)"} <= set(names), names
    assert any(name.startswith("jit(evaluate") for name in names), names
    assert sum(e["seconds"] for e in compiled["executables"]) == pytest.approx(compiled["backend_seconds"])
    assert f"compilation: {len(names)} executables," in result.stderr


@pytest.mark.parametrize(
    "arguments, fragments",
    [
        (["--config=configs/no_such.py", "--config.train.epochs=1"], ("--config=configs/no_such.py: no such file",)),
        (["--config=configs", "--config.train.epochs=1"], ("--config=configs is a directory",)),
        (["--config=configs/bp_adv.py", "stray"], ("unexpected arguments ['stray']",)),
        (["--config=configs/bp_adv.py", "--num_processes=2", "--process_id=5"], ("--process_id=5 must be in 0..1",)),
    ],
    ids=["missing_config", "config_is_a_directory", "stray_argument", "process_id_out_of_range"],
)
def test_a_bad_command_line_is_one_error_line(tmp_path, arguments, fragments):
    command = [sys.executable, "launch.py", *arguments, f"--workdir={tmp_path / 'run'}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    the_one_line(result, *fragments)


def test_a_relative_config_path_from_another_directory_names_the_file_and_a_likely_one(tmp_path):
    command = [sys.executable, str(REPO / "launch.py"), "--config=configs/bp_adv.py", f"--workdir={tmp_path / 'r'}"]
    result = subprocess.run([*command, "--config.train.epochs=1"], cwd=tmp_path, capture_output=True, text=True)
    the_one_line(result, f"relative paths are read from {tmp_path}", f"did you mean {REPO / 'configs/bp_adv.py'}?")


def test_a_config_file_without_get_config_is_named(tmp_path):
    (tmp_path / "mine.py").write_text("EPOCHS = 3\n")
    for extra in ([], ["--config.train.epochs=1"]):
        command = [sys.executable, "launch.py", f"--config={tmp_path / 'mine.py'}", f"--workdir={tmp_path / 'r'}"]
        result = subprocess.run([*command, *extra], cwd=REPO, capture_output=True, text=True, timeout=120)
        the_one_line(result, f"--config={tmp_path / 'mine.py'} defines no get_config()")


def test_a_platform_the_machine_lacks_is_one_error_line(tmp_path):
    if any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("this machine has a GPU")
    env = dict(os.environ, JAX_PLATFORMS="cuda")
    command = launch_command("bp_adv", tmp_path / "run")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    the_one_line(result, "JAX_PLATFORMS=cuda", "unset JAX_PLATFORMS")


@pytest.mark.parametrize(
    "process_id, missing", [(1, "process 0 (the coordinator at localhost:"), (0, "processes 1..1")]
)
def test_a_missing_cluster_peer_is_named_within_the_join_timeout(tmp_path, process_id, missing):
    port = 29500 + os.getpid() % 400 + process_id
    cluster = [f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={process_id}"]
    command = [*launch_command("bp_adv", tmp_path / "run"), *cluster, "--distributed_timeout=3"]
    start = time.monotonic()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    the_one_line(result, missing, "within 3 s")
    assert time.monotonic() - start < 60
