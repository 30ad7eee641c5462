"""Runs each computation on one device and data-parallel on N simulated CPU devices; prints JSON.

    python -m tests.sharding_equivalence N [--quick]

Run by tests/test_sharding.py in a subprocess, because the device count is
fixed when JAX's backend starts and the pytest process must keep one device.
This script only measures (largest differences, shardings, facts about the
compiled program); the test decides what passes.
"""

import json
import sys

import jax

if __name__ == "__main__":
    jax.config.update("jax_num_cpu_devices", int(sys.argv[1]))  # before anything touches a device
    # Compilation dominates at these sizes; the partitioner runs either way.
    jax.config.update("jax_disable_most_optimizations", True)

import jax.numpy as jnp
import numpy as np

from advjax import eval_fold, evaluate, models, objectives, seeds, sharding, train
from tests.helpers import synthetic_digits, tiny_config

NUM_TRAIN, TRAIN_BATCH = 512, 64  # 8 steps
NUM_EVAL, EVAL_BATCH = 150, 40  # 4 batches, the last with 10 padded slots
EPS, SIGMA = 0.02, 0.3  # a small eps: the briefly trained model keeps some FGSM accuracy


def synthetic_data(num: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable digits, so that the evaluated model is good and FGSM flips some answers, not all."""
    images, labels = synthetic_digits(num, seed)
    return images[..., None], labels.astype(np.int32)


def setup(mode: str):
    config = tiny_config("bp", mode)
    config.model.hidden = (32,)
    config.train.schedule = "constant"
    model = models.build_model(config.model)
    return config, model


def seed_keys(num_seeds: int, salt: int) -> jax.Array:
    keys = jax.random.split(jax.random.key(salt), num_seeds)
    return keys[0] if num_seeds == 1 else keys


def max_difference(a, b) -> float:
    return max(
        float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def sharding_facts(array: jax.Array) -> dict:
    return {
        "spec": str(getattr(array.sharding, "spec", None)),
        "num_devices": len(array.sharding.device_set),
        "fully_replicated": array.sharding.is_fully_replicated,
    }


def partitioned_epoch_facts(objective, num_seeds: int, mesh, args) -> dict:
    """What the compiler made of a scan-form epoch on the mesh: per-device batch shape and all-reduces."""
    epoch = train.make_epoch_fn(objective, NUM_TRAIN, TRAIN_BATCH, form="scan", num_seeds=num_seeds, mesh=mesh)
    hlo = epoch.fold.lower(*epoch.fold_args(*args)).compile().as_text()
    seeds = "" if num_seeds == 1 else f"{num_seeds},"  # the seed vmap's axis stays whole on each device
    per_device = TRAIN_BATCH // sharding.num_data_shards(mesh)
    return {
        "hlo_has_all_reduce": "all-reduce" in hlo,
        "hlo_has_per_device_batch": f"f32[{seeds}{per_device},784]" in hlo,
        "hlo_has_whole_batch": f"f32[{seeds}{TRAIN_BATCH},784]" in hlo,
    }


def train_case(mode: str, form: str, num_seeds: int, mesh, inspect: bool = False) -> tuple[dict, dict]:
    """Facts about one epoch on one device against one on the mesh, and the single-device params."""
    config, model = setup(mode)
    images, labels = synthetic_data(NUM_TRAIN, 0)
    objective = objectives.make_objective(model.apply, config.train)
    map_seeds = lambda f: seeds.map_over_seeds(f, num_seeds)
    facts = {}

    def run(mesh):
        epoch = train.make_epoch_fn(objective, NUM_TRAIN, TRAIN_BATCH, form=form, num_seeds=num_seeds, mesh=mesh)
        state = train.create_states(seed_keys(num_seeds, 0), model, config.train, epoch.num_steps, num_seeds)
        permutation = map_seeds(lambda key: train.epoch_permutation(key, 1, NUM_TRAIN))(seed_keys(num_seeds, 1))
        args = (state, train.EpochTotals.zeros(num_seeds), images, labels, permutation, seed_keys(num_seeds, 2))
        if mesh is not None:
            args = sharding.replicate(args, mesh)
            if inspect:  # before the run, which donates the state
                facts.update(partitioned_epoch_facts(objective, num_seeds, mesh, args))
        return epoch(*args)

    single_state, single_totals = run(None)
    mesh_state, mesh_totals = run(mesh)
    out = {
        "params_max_difference": max_difference(single_state.params, mesh_state.params),
        "loss_max_difference": max_difference(single_totals.loss, mesh_totals.loss),
        "correct_equal": bool(np.array_equal(single_totals.correct, mesh_totals.correct)),
        "params_sharding": sharding_facts(jax.tree.leaves(mesh_state.params)[0]),
        "loss_sharding": sharding_facts(mesh_totals.loss),
        **facts,
    }
    return out, single_state.params


def eval_set():
    images, labels = synthetic_data(NUM_EVAL + 10, 4)
    return eval_fold.make_eval_set(images, labels, NUM_EVAL, EVAL_BATCH)


def evaluate_case(model, params, form: str, num_seeds: int, mesh) -> dict:
    key = seed_keys(num_seeds, 5)
    build = lambda mesh: evaluate.make_evaluator(
        models.eval_apply(model.apply), form=form, num_seeds=num_seeds, mesh=mesh
    )
    single = build(None)(params, eval_set(), key, EPS, SIGMA)
    sharded_set = eval_fold.shard_eval_set(eval_set(), mesh)
    on_mesh = build(mesh)(sharding.replicate(params, mesh), sharded_set, sharding.replicate(key, mesh), EPS, SIGMA)
    return {
        "accuracy_single": single["accuracy_per_seed"],
        "accuracy_mesh": on_mesh["accuracy_per_seed"],
        "stats_max_difference": max(
            abs(single["perturbation_stats"][p][s] - on_mesh["perturbation_stats"][p][s])
            for p in single["perturbation_stats"]
            for s in single["perturbation_stats"][p]
        ),
        "eval_images_sharding": sharding_facts(sharded_set.images),
    }


def sweep_case(model, params, perturbation: str, form: str, num_seeds: int, mesh) -> dict:
    key = seed_keys(num_seeds, 6)
    grid = (0.0, 0.3, 0.6) if perturbation == "gaussian" else (0.0, 0.01, 0.02)
    build = lambda mesh: evaluate.make_sweep(
        models.eval_apply(model.apply), perturbation, form=form, num_seeds=num_seeds, mesh=mesh
    )
    single = build(None)(params, eval_set(), key, grid)
    on_mesh = build(mesh)(
        sharding.replicate(params, mesh),
        eval_fold.shard_eval_set(eval_set(), mesh),
        sharding.replicate(key, mesh),
        grid,
    )
    return {"accuracy_single": single.tolist(), "accuracy_mesh": on_mesh.tolist()}


def refusal_case(mesh) -> dict:
    """The messages for batch sizes the devices cannot split."""
    config, model = setup("ordinary")
    objective = objectives.make_objective(model.apply, config.train)
    bad = sharding.num_data_shards(mesh) * 8 + 1
    messages = {}
    try:
        train.make_epoch_fn(objective, NUM_TRAIN, bad, mesh=mesh)
    except ValueError as e:
        messages["train"] = str(e)
    images, labels = synthetic_data(NUM_EVAL, 4)
    try:
        eval_fold.shard_eval_set(eval_fold.make_eval_set(images, labels, NUM_EVAL, bad), mesh)
    except ValueError as e:
        messages["eval"] = str(e)
    return messages


def main(num_devices: int, quick: bool = False) -> dict:
    """Every case, or with `quick` one of each kind (FGSM training, a 2-seed evaluation, a sweep)."""
    assert jax.device_count() == num_devices, jax.devices()
    mesh = sharding.make_data_mesh()
    _, model = setup("ordinary")
    # The evaluations use trained (single-device) params, on one device and on the mesh.
    report = {"device_count": jax.device_count(), "mesh_shape": dict(mesh.shape), "refusals": refusal_case(mesh)}
    meshes = {n: sharding.data_mesh_for(n) for n in (0, 1, 2)}
    report["data_mesh_for"] = {n: None if m is None else dict(m.shape) for n, m in meshes.items()}
    report["describe"] = sharding.describe(mesh)
    fgsm, _ = train_case("fgsm", "scan", 1, mesh, inspect=True)
    two_seeds, two_seed_params = train_case("ordinary", "chunked", 2, mesh, inspect=True)
    params = jax.tree.map(lambda a: a[0], two_seed_params)  # seed 0 alone, for the one-seed cases
    report["train"] = {"fgsm_scan": fgsm, "ordinary_chunked_2_seeds": two_seeds}
    report["evaluate"] = {"scan_2_seeds": evaluate_case(model, two_seed_params, "scan", 2, mesh)}
    report["sweep"] = {"gaussian_chunked": sweep_case(model, params, "gaussian", "chunked", 1, mesh)}
    if not quick:
        report["train"]["ordinary_chunked"], _ = train_case("ordinary", "chunked", 1, mesh)
        report["evaluate"]["chunked"] = evaluate_case(model, params, "chunked", 1, mesh)
        report["sweep"]["fgsm_scan_2_seeds"] = sweep_case(model, two_seed_params, "fgsm", "scan", 2, mesh)
    return report


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), quick="--quick" in sys.argv[2:])))
