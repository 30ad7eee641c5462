"""Tests for advjax.sharding and the mesh hooks of the epoch, the evaluator and the sweeps.

The multi-device comparisons run tests/sharding_equivalence.py in subprocesses
with 4 and 8 simulated CPU devices (the device count is fixed when JAX's
backend starts; this process keeps its one device). Each subprocess computes
everything once on one device and once data-parallel on the mesh; the tests
here check that the two agree and that the mesh run really was split. The
8-device run covers one case of each kind, to keep the time down.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from advjax import evaluate, models, objectives, sharding, train
from tests.helpers import tiny_config

REPO = pathlib.Path(__file__).resolve().parent.parent
DEVICE_COUNTS = (4, 8)
QUICK = {8}  # device counts that run one case of each kind (--quick)
NUM_EVAL = 150  # tests/sharding_equivalence.py's evaluation size: one example is 1/150


# ----------------------------------------------------------------------------
# The multi-device runs: both device counts at once, each in its own process.


@pytest.fixture(scope="module")
def reports() -> dict[int, dict]:
    """{device count: the JSON printed by tests/sharding_equivalence.py}."""
    # CPU only: on a GPU machine the simulated devices must still be CPUs.
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    runs = {
        n: subprocess.Popen(
            [sys.executable, "-m", "tests.sharding_equivalence", str(n)] + (["--quick"] if n in QUICK else []),
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in DEVICE_COUNTS
    }
    out = {}
    for n, run in runs.items():
        stdout, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, f"{n} devices: exit {run.returncode}\n{stderr[-3000:]}"
        out[n] = json.loads(stdout.strip().splitlines()[-1])
    return out


TRAIN_CASES = [
    (4, "ordinary_chunked"),
    (4, "fgsm_scan"),
    (4, "ordinary_chunked_2_seeds"),
    (8, "fgsm_scan"),
    (8, "ordinary_chunked_2_seeds"),
]
EVALUATE_CASES = [(4, "chunked"), (4, "scan_2_seeds"), (8, "scan_2_seeds")]
SWEEP_CASES = [(4, "gaussian_chunked"), (4, "fgsm_scan_2_seeds"), (8, "gaussian_chunked")]


@pytest.mark.slow
@pytest.mark.parametrize("devices", DEVICE_COUNTS)
def test_subprocess_sees_a_mesh_over_all_devices(reports, devices):
    assert reports[devices]["device_count"] == devices
    assert reports[devices]["mesh_shape"] == {"data": devices}


@pytest.mark.slow
@pytest.mark.parametrize("devices", DEVICE_COUNTS)
def test_data_mesh_for_a_device_count(reports, devices):
    """0 takes every device, 1 means no mesh (the single-device program), n the first n."""
    assert reports[devices]["data_mesh_for"] == {"0": {"data": devices}, "1": None, "2": {"data": 2}}
    assert reports[devices]["describe"]["data_shards"] == devices
    assert len(reports[devices]["describe"]["devices"]) == devices


@pytest.mark.slow
@pytest.mark.parametrize("devices, case", TRAIN_CASES)
def test_data_parallel_epoch_matches_one_device(reports, devices, case):
    """Same params, loss and accuracy counts after an epoch of 8 steps: only summation order differs."""
    result = reports[devices]["train"][case]
    assert result["params_max_difference"] < 1e-5
    assert result["loss_max_difference"] < 1e-4  # a sum of 8 losses near 2
    assert result["correct_equal"]


@pytest.mark.slow
@pytest.mark.parametrize("devices, case", TRAIN_CASES)
def test_data_parallel_epoch_keeps_state_replicated(reports, devices, case):
    result = reports[devices]["train"][case]
    for facts in (result["params_sharding"], result["loss_sharding"]):
        assert facts == {"spec": "P()", "num_devices": devices, "fully_replicated": True}


@pytest.mark.slow
@pytest.mark.parametrize("case", ("fgsm_scan", "ordinary_chunked_2_seeds"))
@pytest.mark.parametrize("devices", DEVICE_COUNTS)
def test_compiled_epoch_splits_the_batch_and_all_reduces(reports, devices, case):
    """The partitioned program works on 64/N examples per device and sums gradients across devices.

    With 2 seeds the constraint sits inside the seed vmap: the seed axis stays
    whole and the batch axis is split ([2, 64/N, 784] per device).
    """
    result = reports[devices]["train"][case]
    assert result["hlo_has_all_reduce"]
    assert result["hlo_has_per_device_batch"]
    assert not result["hlo_has_whole_batch"]


def assert_same_accuracy(single, on_mesh):
    """At most one example may differ: sign(grad) at a gradient within rounding of 0 can flip."""
    np.testing.assert_allclose(np.asarray(on_mesh), np.asarray(single), rtol=0, atol=1 / NUM_EVAL + 1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("devices, case", EVALUATE_CASES)
def test_data_parallel_evaluation_matches_one_device(reports, devices, case):
    result = reports[devices]["evaluate"][case]
    assert set(result["accuracy_mesh"]) == set(evaluate.PERTURBATIONS)
    for perturbation, single in result["accuracy_single"].items():
        assert_same_accuracy(single, result["accuracy_mesh"][perturbation])
    assert result["stats_max_difference"] < 1e-5
    # The eval set lives split along its batch dimension, 1/N per device.
    assert result["eval_images_sharding"] == {
        "spec": "P(None, 'data')",
        "num_devices": devices,
        "fully_replicated": False,
    }


@pytest.mark.slow
@pytest.mark.parametrize("devices, case", SWEEP_CASES)
def test_data_parallel_sweep_matches_one_device(reports, devices, case):
    result = reports[devices]["sweep"][case]
    assert_same_accuracy(result["accuracy_single"], result["accuracy_mesh"])


@pytest.mark.slow
@pytest.mark.parametrize("devices", DEVICE_COUNTS)
def test_batch_sizes_the_devices_cannot_split_are_refused(reports, devices):
    refusals = reports[devices]["refusals"]
    bad = devices * 8 + 1
    assert refusals["train"].startswith(f"train.batch_size={bad} is not divisible by the {devices} devices")
    assert refusals["eval"].startswith(f"eval.batch_size={bad} is not divisible by the {devices} devices")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_run_as_one_data_parallel_program():
    """Multi-host, simulated: 2 processes x 2 CPU devices joined by jax.distributed into one 4-device mesh.

    Every process must end with the same replicated params and results, and
    they must match one device's.
    """
    port, num_processes = free_port(), 2
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.multihost_check", str(i), str(num_processes), str(port)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(num_processes)
    ]
    reports = []
    for i, run in enumerate(runs):
        stdout, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, f"process {i}: exit {run.returncode}\n{stderr[-3000:]}"
        reports.append(json.loads(stdout.strip().splitlines()[-1]))
    for r in reports:
        assert r["started"] and r["process_count"] == 2
        assert (r["device_count"], r["local_device_count"], r["mesh_shape"]) == (4, 2, {"data": 4})
        assert r["params_max_difference"] < 1e-5
        np.testing.assert_allclose(r["loss_mesh"], r["loss_single"], rtol=1e-5)
        for perturbation, accuracy in r["accuracy_single"].items():
            assert_same_accuracy(accuracy, r["accuracy_mesh"][perturbation])
        assert_same_accuracy(r["sweep_single"], r["sweep_mesh"])
    # One program: every process holds the very same replicated result.
    for key in ("params_checksum", "loss_mesh", "accuracy_mesh", "sweep_mesh"):
        assert reports[0][key] == reports[1][key]


# ----------------------------------------------------------------------------
# In this process (one device).


@pytest.mark.parametrize(
    "batch_size, devices, suggestion",
    [(100, 3, "e.g. 99 or 102"), (6, 4, "e.g. 4 or 8"), (2, 4, "e.g. 4")],
)
def test_check_batch_size_names_the_field_and_suggests_sizes(batch_size, devices, suggestion):
    with pytest.raises(
        ValueError, match=f"eval.batch_size={batch_size} is not divisible by the {devices} devices"
    ) as e:
        sharding.check_batch_size(batch_size, devices, "eval.batch_size")
    assert str(e.value).endswith(suggestion)


def test_check_batch_size_accepts_even_splits_and_no_mesh():
    sharding.check_batch_size(128, 8, "train.batch_size")
    sharding.check_batch_size(7, None, "train.batch_size")
    sharding.check_batch_size(7, sharding.make_data_mesh(jax.devices()[:1]), "train.batch_size")


def test_data_mesh_has_one_auto_axis_over_all_devices():
    mesh = sharding.make_data_mesh()
    assert mesh.axis_names == ("data",)
    assert mesh.axis_types == (AxisType.Auto,)
    assert sharding.num_data_shards(mesh) == jax.device_count()
    assert sharding.num_data_shards(None) == 1


def test_one_device_gets_no_mesh_and_too_many_devices_are_refused():
    assert sharding.data_mesh_for(0) is None if jax.device_count() == 1 else True
    assert sharding.data_mesh_for(1) is None
    with pytest.raises(
        ValueError, match=f"cannot use {jax.device_count() + 1} devices: there are {jax.device_count()}"
    ):
        sharding.data_mesh_for(jax.device_count() + 1)


def test_constraints_are_the_identity_without_a_mesh():
    tree = {"x": np.ones(3)}
    assert sharding.constrain_batch(tree, None) is tree
    assert sharding.constrain_replicated(tree, None) is tree


def test_a_one_device_mesh_computes_what_no_mesh_computes(quick_compile):
    """The mesh path in this process: same epoch, bit for bit, as without a mesh."""
    config = tiny_config("bp")
    config.model.hidden = (16,)
    model = models.build_model(config.model)
    objective = objectives.make_objective(model.apply, config.train)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, 32).astype(np.int32)
    mesh = sharding.make_data_mesh(jax.devices()[:1])

    def run(mesh):
        epoch = train.make_epoch_fn(objective, 32, 8, form="chunked", chunk_size=4, mesh=mesh)
        state = train.create_train_state(jax.random.key(0), model, config.train, epoch.num_steps)
        args = (state, train.EpochTotals.zeros(), images, labels, jax.numpy.arange(32), jax.random.key(1))
        state, totals = epoch(*(args if mesh is None else sharding.replicate(args, mesh)))
        return state.params, state.opt_state, totals  # not the whole state: its optimizer object differs per run

    chex.assert_trees_all_equal(run(None), run(mesh))


# ----------------------------------------------------------------------------
# jax.distributed: started only when asked.


@pytest.fixture
def distributed_calls(monkeypatch) -> list[dict]:
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    return calls


def test_single_process_starts_no_coordinator(distributed_calls):
    assert sharding.initialize_distributed(environ={}) is False
    assert distributed_calls == []


def test_explicit_arguments_start_jax_distributed(distributed_calls):
    assert sharding.initialize_distributed("10.0.0.1:1234", 2, 1, environ={}) is True
    assert distributed_calls == [
        {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1, "initialization_timeout": 300}
    ]


@pytest.mark.parametrize("how", ("auto_detect", "environment"))
def test_cluster_detection_is_left_to_jax(distributed_calls, how):
    """Slurm, Open MPI, Cloud TPU or JAX_COORDINATOR_ADDRESS: JAX fills in what is not passed."""
    if how == "auto_detect":
        started = sharding.initialize_distributed(auto_detect=True, environ={})
    else:
        started = sharding.initialize_distributed(environ={sharding.COORDINATOR_ENV: "10.0.0.1:1234"})
    assert started is True
    assert distributed_calls == [
        {"coordinator_address": None, "num_processes": None, "process_id": None, "initialization_timeout": 300}
    ]


@pytest.mark.parametrize("num_processes, process_id", [(2, 5), (2, -1), (0, 0)])
def test_a_process_id_outside_the_cluster_is_refused_before_jax_aborts(distributed_calls, num_processes, process_id):
    with pytest.raises(sharding.DeviceError, match="--process_id|--num_processes"):
        sharding.initialize_distributed("10.0.0.1:1234", num_processes, process_id, environ={})
    assert distributed_calls == []
