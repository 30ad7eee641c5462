"""Training and sweep throughput, each against a baseline measured in the same run. Prints JSON.

    python bench/throughput.py [--models=bp,cnn] [--modes=ordinary,fgsm] [--examples=N]

Ours: uint8 data resident on the device, one compiled fold per epoch
(advjax.loops: a fori_loop on accelerators, unrolled chunks on CPU).
Baseline: the flax-example way: the same model and the same jitted train step,
driven by a Python loop over host-side numpy batches, one transfer per batch.
Synthetic data, so nothing needs downloading; throughput does not depend on pixel values.
"""

import json
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from advjax import evaluate, models, train  # noqa: E402
from configs import default  # noqa: E402

_MODELS = flags.DEFINE_list("models", ["bp", "cnn"], "Models to measure.")
_MODES = flags.DEFINE_list("modes", ["ordinary", "fgsm"], "Training modes to measure.")
_EXAMPLES = flags.DEFINE_integer("examples", 0, "Examples per epoch (0: 12,800 for BP, 2,560 for the CNN on CPU).")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Batch size.")
_SWEEP_IMAGES = flags.DEFINE_integer("sweep_images", 5000, "Images in the sigma sweep.")
_SWEEP_POINTS = flags.DEFINE_integer("sweep_points", 21, "Grid points in the sigma sweep.")


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int32)


def timed(fn):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def peak_memory_bytes() -> int:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # host RSS on CPU


def measure_ours(config, model, images, labels) -> dict:
    n = len(labels)
    objective = train.make_objective(model.apply, config.train)
    epoch = train.make_epoch_fn(objective, n, config.train.batch_size, form=config.train.loop, chunk_size=config.train.chunk_size)
    state = train.create_train_state(jax.random.key(0), model, config.train, epoch.num_steps)
    images, labels = jax.device_put(images), jax.device_put(labels)
    rng = jax.random.key(1)
    box = {"state": state}

    def run(e):
        box["state"], totals = epoch(box["state"], train.EpochTotals.zeros(), images, labels, train.epoch_permutation(rng, e, n), rng)
        return totals

    first = timed(lambda: run(0))
    steady = min(timed(lambda: run(e)) for e in (1, 2))
    examples = epoch.num_steps * config.train.batch_size
    return {"first_epoch_s": first, "steady_epoch_s": steady, "compile_s_est": first - steady,
            "examples_per_s": examples / steady, "first_epoch_examples_per_s": examples / first}


def measure_baseline(config, model, images, labels) -> dict:
    objective = train.make_objective(model.apply, config.train)
    step = jax.jit(lambda s, x, y, r: train.train_step(s, objective, x, y, r))
    state = train.create_train_state(jax.random.key(0), model, config.train, len(labels) // config.train.batch_size)
    batch = config.train.batch_size
    num_steps = len(labels) // batch
    box = {"state": state}

    def run(e):
        order = np.random.default_rng(e).permutation(len(labels))
        for i in range(num_steps):
            index = order[i * batch : (i + 1) * batch]
            x = images[index].astype(np.float32) / 255.0  # host-side batch, as in flax's MNIST example
            box["state"], metrics = step(box["state"], x, labels[index], jax.random.fold_in(jax.random.key(1), i))
        return metrics

    first = timed(lambda: run(0))
    steady = min(timed(lambda: run(e)) for e in (1, 2))
    examples = num_steps * batch
    return {"first_epoch_s": first, "steady_epoch_s": steady, "compile_s_est": first - steady, "examples_per_s": examples / steady}


def measure_sweep(config, model, images, labels) -> dict:
    params = train.init_params(jax.random.key(0), model)
    eval_set = evaluate.make_eval_set(images, labels, len(labels), config.eval.batch_size)
    sweep = evaluate.make_sweep(model.apply, "gaussian", form=config.train.loop, chunk_size=config.eval.chunk_size)
    grid = np.linspace(0.0, 1.0, _SWEEP_POINTS.value)
    first = timed(lambda: sweep(params, eval_set, jax.random.key(0), grid))
    steady = timed(lambda: sweep(params, eval_set, jax.random.key(1), grid + 0.01))
    # Baseline: a Python loop over sigmas, each a jitted accuracy call over host batches.
    noisy_accuracy = jax.jit(lambda p, x, y, k, s: jnp.sum(jnp.argmax(model.apply({"params": p}, jnp.clip(x + s * jax.random.normal(k, x.shape), 0, 1)), -1) == y))
    b = config.eval.batch_size

    def baseline():
        out = []
        for s in grid:
            for i in range(0, len(labels), b):
                out.append(noisy_accuracy(params, images[i : i + b].astype(np.float32) / 255.0, labels[i : i + b], jax.random.key(i), s))
        return out

    baseline()  # compile
    base = timed(baseline)
    work = len(labels) * len(grid)
    return {"compile_s_est": first - steady, "steady_s": steady, "image_points_per_s": work / steady,
            "baseline_steady_s": base, "baseline_image_points_per_s": work / base, "speedup": base / steady}


def main(argv):
    del argv
    on_cpu = jax.default_backend() == "cpu"
    results = {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "training": {}, "sweep": {}}
    for name in _MODELS.value:
        n = _EXAMPLES.value or (12_800 if name == "bp" or not on_cpu else 2_560)
        images, labels = synthetic(n)
        for mode in _MODES.value:
            config = default.experiment(name, mode)
            config.train.batch_size = _BATCH.value
            model = models.build_model(config.model)
            ours = measure_ours(config, model, images, labels)
            base = measure_baseline(config, model, images, labels)
            results["training"][f"{name}_{mode}"] = {
                "examples_per_epoch": n, "ours": ours, "baseline": base,
                "speedup": ours["examples_per_s"] / base["examples_per_s"], "loop_form": config.train.loop,
            }
            print(f"{name} {mode}: ours {ours['examples_per_s']:.0f} ex/s, baseline {base['examples_per_s']:.0f} ex/s", file=sys.stderr)
        config = default.experiment(name, "ordinary")
        sweep_images, sweep_labels = synthetic(_SWEEP_IMAGES.value, seed=1)
        results["sweep"][name] = measure_sweep(config, models.build_model(config.model), sweep_images, sweep_labels)
    results["peak_memory_bytes"] = peak_memory_bytes()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    app.run(main)
