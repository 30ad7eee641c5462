"""One process of a simulated multi-host run: N processes of 2 CPU devices each, one global mesh.

    python -m tests.multihost_check PROCESS_ID NUM_PROCESSES COORDINATOR_PORT

Started N times by tests/test_sharding.py. Every process trains an epoch,
evaluates and sweeps data-parallel over all processes' devices (through
`sharding.initialize_distributed` and the gloo CPU collectives), then computes
the same on its own first device without a mesh, and prints JSON.
"""

import json
import sys

import jax

LOCAL_DEVICES = 2

if __name__ == "__main__":
    jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)  # before anything touches a device
    jax.config.update("jax_disable_most_optimizations", True)

import numpy as np  # noqa: E402

from advjax import eval_fold, evaluate, models, objectives, sharding, train  # noqa: E402
from tests.sharding_equivalence import (  # noqa: E402
    EPS,
    EVAL_BATCH,
    NUM_EVAL,
    NUM_TRAIN,
    SIGMA,
    TRAIN_BATCH,
    max_difference,
    setup,
    synthetic_data,
)


def run(mesh) -> dict:
    """An epoch of BP, the full evaluation and a sigma sweep; on the mesh, or on one device when None."""
    config, model = setup("ordinary")
    images, labels = synthetic_data(NUM_TRAIN, 0)
    epoch = train.make_epoch_fn(
        objectives.make_objective(model.apply, config.train), NUM_TRAIN, TRAIN_BATCH, form="chunked", mesh=mesh
    )
    state = train.create_train_state(jax.random.key(0), model, config.train, epoch.num_steps)
    permutation = train.epoch_permutation(jax.random.key(1), 1, NUM_TRAIN)
    inputs = (state, train.EpochTotals.zeros(), images, labels, permutation, jax.random.key(2), jax.random.key(3))
    eval_set = eval_fold.make_eval_set(*synthetic_data(NUM_EVAL, 4), NUM_EVAL, EVAL_BATCH)
    if mesh is not None:
        inputs = sharding.replicate(inputs, mesh)
        eval_set = eval_fold.shard_eval_set(eval_set, mesh)
    *epoch_inputs, eval_key = inputs
    state, totals = epoch(*epoch_inputs)
    results = evaluate.make_evaluator(models.eval_apply(model.apply), form="scan", mesh=mesh)(
        state.params, eval_set, eval_key, EPS, SIGMA
    )
    sweep = evaluate.make_sweep(models.eval_apply(model.apply), "gaussian", form="chunked", mesh=mesh)(
        state.params, eval_set, eval_key, (0.0, 0.3)
    )
    return {
        # Replicated outputs are readable on every process.
        "params": jax.tree.map(np.asarray, state.params),
        "loss": float(totals.loss),
        "accuracy": results["accuracy"],
        "sweep": sweep.tolist(),
    }


def main(process_id: int, num_processes: int, port: int) -> dict:
    started = sharding.initialize_distributed(f"localhost:{port}", num_processes, process_id)
    mesh = sharding.make_data_mesh()
    on_mesh = run(mesh)
    single = run(None)
    return {
        "started": started,
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "mesh_shape": dict(mesh.shape),
        "params_max_difference": max_difference(single["params"], on_mesh["params"]),
        "params_checksum": float(sum(np.sum(leaf) for leaf in jax.tree.leaves(on_mesh["params"]))),
        **{
            f"{k}_{where}": r[k]
            for k in ("loss", "accuracy", "sweep")
            for where, r in (("single", single), ("mesh", on_mesh))
        },
    }


if __name__ == "__main__":
    print(json.dumps(main(*map(int, sys.argv[1:4]))))
