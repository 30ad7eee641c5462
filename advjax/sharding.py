"""Data parallelism with JAX's own sharding: one `data` mesh axis, batches split, params replicated.

The compiled folds (advjax.loops) stay single-program: with a mesh, the batch
gathered inside the fold body is constrained to `P('data')` and the carry
(params, optimizer state, BatchNorm's running statistics, totals) to `P()`.
XLA's SPMD partitioner then runs each device on its share of every batch and
inserts the all-reduces (the gradient, the loss, the counts, and BatchNorm's
batch statistics, which are the whole batch's) inside the same compiled
epoch. No pmap, no per-device code, and the same program runs on one host or
many.

The mesh axis is `AxisType.Auto`: the shardings are hints the compiler
propagates (`with_sharding_constraint`), so the model, attack and loss code
need no sharding annotations and no `jax.set_mesh` context while tracing.
(`jax.make_mesh` defaults to Explicit axes, which put shardings into the
array types and check them op by op: more than a pure data-parallel split needs.)

Multi-host: call `initialize_distributed` first thing, before anything touches
a device; after it, `jax.devices()` lists every host's devices and
`make_data_mesh()` spans them all. Every process runs the same program on the
same (replicated) inputs.
"""

import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"

Tree = TypeVar("Tree")


def make_data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named `data` over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("cannot build a data mesh over no devices")
    # make_mesh orders the devices for fast collectives (a ring on TPU).
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def data_mesh_for(num_devices: int = 0) -> Mesh | None:
    """The mesh a run uses: over all devices (0) or the first `num_devices`; None for one device.

    None keeps a one-device run on exactly the single-device program. On
    several hosts use 0: a mesh must take devices from every process.
    """
    available = jax.devices()
    if num_devices < 0 or num_devices > len(available):
        raise ValueError(f"cannot use {num_devices} devices: there are {len(available)} ({available[0].platform})")
    devices = available[: num_devices or len(available)]
    return None if len(devices) == 1 else make_data_mesh(devices)


def num_data_shards(mesh: Mesh | None) -> int:
    """How many ways a batch is split: the size of the `data` axis, 1 without a mesh."""
    return 1 if mesh is None else mesh.shape[DATA_AXIS]


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device: params, optimizer state, keys, the training images."""
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Split along the leading (batch) dimension across the `data` axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh_or_num_devices: Mesh | int | None, field: str) -> None:
    """Refuses a batch that the devices cannot split evenly, naming the config field.

    XLA would pad an uneven split silently; we refuse it so every device does
    the same work and a batch means the same examples on any device count.
    """
    if isinstance(mesh_or_num_devices, Mesh) or mesh_or_num_devices is None:
        num_devices = num_data_shards(mesh_or_num_devices)
    else:
        num_devices = mesh_or_num_devices
    if batch_size % num_devices:
        lower = batch_size // num_devices * num_devices
        suggestions = " or ".join(str(b) for b in (lower, lower + num_devices) if b > 0)
        raise ValueError(
            f"{field}={batch_size} is not divisible by the {num_devices} devices of the data mesh: "
            f"each device takes an equal share of every batch; use a multiple of {num_devices}, e.g. {suggestions}"
        )


def _is_key_array(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def replicate(tree: Tree, mesh: Mesh) -> Tree:
    """Puts a copy of every array leaf (PRNG keys included) on every device of the mesh.

    Takes host (numpy) arrays or uncommitted device arrays (what jit returns
    by default); on several hosts JAX checks that each process passes the same
    value, which holds here because every process loads the same data and
    derives everything else from the same seed.
    """
    sharding = replicated(mesh)

    def put(leaf):
        if _is_key_array(leaf):
            # Multi-process device_put refuses typed keys: move their raw bits instead.
            data = jax.device_put(jax.random.key_data(leaf), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
        return jax.device_put(leaf, sharding)

    return jax.tree.map(put, tree)


def placer(mesh: Mesh | None) -> Callable:
    """tree -> the tree replicated on every device of `mesh`; unchanged without one."""
    return (lambda tree: tree) if mesh is None else (lambda tree: replicate(tree, mesh))


def shard_batch_major(tree: Tree, mesh: Mesh) -> Tree:
    """Splits arrays stored [num_batches, batch_size, ...] along the batch dimension (axis 1).

    Each device then holds exactly its share of every batch, so indexing one
    batch inside the fold needs no communication and each device stores 1/N.
    """
    return jax.device_put(tree, NamedSharding(mesh, P(None, DATA_AXIS)))


def constrain_batch(tree: Tree, mesh: Mesh | None) -> Tree:
    """Inside jit: asks for every leaf to be split along its batch (leading) dimension.

    Identity without a mesh, so the single-device program is traced exactly as
    before. Under the seed vmap the constraint applies to the per-seed batch:
    vmap adds the seed axis unsharded, giving P(None, 'data').
    """
    if mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, batch_sharded(mesh))


def constrain_replicated(tree: Tree, mesh: Mesh | None) -> Tree:
    """Inside jit: pins every leaf to a full copy per device (the fold's carry).

    Pinning the carry keeps its sharding the same across loop iterations and
    chunk calls (a loop carry has one sharding), and makes outputs readable on
    every host. Identity without a mesh.
    """
    if mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, replicated(mesh))


# JAX itself reads the coordinator from this variable when none is passed.
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"


class DeviceError(RuntimeError):
    """The devices or processes asked for are not there: a platform this machine lacks, a bad process id."""


def check_process_id(num_processes: int | None, process_id: int | None) -> None:
    """0 <= process_id < num_processes, when both are given; JAX itself would abort the process in C++."""
    if num_processes is not None and num_processes < 1:
        raise DeviceError(f"--num_processes={num_processes} must be at least 1")
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise DeviceError(
            f"--process_id={process_id} must be in 0..{num_processes - 1} for --num_processes={num_processes}"
        )


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto_detect: bool = False,
    environ: dict[str, str] | None = None,
    timeout_seconds: int = 300,
) -> bool:
    """Starts `jax.distributed` when several processes are asked for; returns whether it did.

    It is called when any argument is given, when `auto_detect` is set (JAX
    then reads Slurm, Open MPI, Cloud TPU or Kubernetes settings itself), or
    when JAX_COORDINATOR_ADDRESS is set in the environment (which JAX reads as
    the coordinator; the process count and id then come from the arguments or
    the cluster). Otherwise nothing happens: a single process needs no
    coordinator. Call it before any other JAX call touches a device. JAX
    aborts the process (in C++, uncatchable) when not every process joins
    within `timeout_seconds`; launch.py reports that first, naming who is missing.

    >>> initialize_distributed("10.0.0.1:1234", num_processes=2, process_id=0)
    """
    environ = os.environ if environ is None else environ
    asked = any(v is not None for v in (coordinator_address, num_processes, process_id))
    if not (asked or auto_detect or environ.get(COORDINATOR_ENV)):
        return False
    check_process_id(num_processes, process_id)
    if asked and not (coordinator_address or environ.get(COORDINATOR_ENV) or auto_detect):
        raise DeviceError("--num_processes and --process_id need --coordinator_address (or --distributed)")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=timeout_seconds,
    )
    return True


def describe(mesh: Mesh | None) -> dict[str, Any]:
    """What the run used, for logs and summary.json."""
    if mesh is None:
        return {"data_shards": 1, "processes": jax.process_count()}
    return {
        "data_shards": num_data_shards(mesh),
        "processes": jax.process_count(),
        "devices": [str(d) for d in mesh.devices.flat],
    }
