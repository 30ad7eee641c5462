"""Training and sweep throughput, each against a baseline measured in the same run. Prints JSON.

    python bench/throughput.py [--models=bp,cnn] [--modes=ordinary,fgsm] [--examples=N]
                               [--sweep_images=5000 --sweep_points=21]

Every measurement runs in its own fresh Python process, so each one's compile
time, peak memory and XLA settings are its own, and the baseline runs exactly
as a user would run it. Per workload, in this order:
1. ours, with an empty persistent compilation cache (cold compile);
2. the baseline: the flax-example way (bench/flax_example.py);
3. ours again, on the cache the first run filled (warm compile);
4. the baseline again.
Throughput is steady state (the best epoch after the first, best of both runs) and first
epoch (compilation included). FLOPs per example come from XLA's cost analysis
of one training step; `peak_matmul_gflops` is a large float32 matmul on the
same device, the ceiling any dense model can approach.
Synthetic data: throughput does not depend on pixel values.
The script runs unchanged on CPU and GPU.
"""

import json
import os
import resource
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import answer_as_worker, run_in_fresh_process  # noqa: E402

_MODELS = flags.DEFINE_list("models", ["bp", "cnn"], "Models to measure.")
_MODES = flags.DEFINE_list("modes", ["ordinary", "fgsm"], "Training modes to measure.")
_EXAMPLES = flags.DEFINE_integer(
    "examples", 0, "Examples per epoch (0: 51,200 for BP; 2,560 for the CNN on CPU, 25,600 elsewhere)."
)
_EPOCHS = flags.DEFINE_integer(
    "epochs", 4, "Epochs per measurement: the first compiles, the best of the rest is steady state."
)
_BATCH = flags.DEFINE_integer("batch_size", 128, "Batch size.")
_SWEEP_IMAGES = flags.DEFINE_integer("sweep_images", 5000, "Images in the sigma sweep.")
_SWEEP_POINTS = flags.DEFINE_integer("sweep_points", 21, "Grid points in the sigma sweep.")
_PROFILE = flags.DEFINE_list(
    "profile", ["cnn_fgsm"], "Workloads (model_mode) whose training step is profiled op by op."
)
_OUTPUT = flags.DEFINE_string(
    "output",
    None,
    "Also write the JSON here, rewritten after every workload, so a run cut short keeps what it measured.",
)
_WORKER = flags.DEFINE_string("worker", None, "Internal: run one measurement (a JSON spec) and print its JSON.")


# ----------------------------------------------------------------------------- workers (one per process)


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int32)


def _peak_memory_bytes() -> dict:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    out = {"host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if "peak_bytes_in_use" in stats:
        out["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
    return out


def _flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    return float((analysis or {}).get("flops", float("nan")))


def _epoch_times(run_epoch, epochs: int) -> tuple[float, float]:
    times = []
    for epoch in range(epochs):
        start = time.perf_counter()
        run_epoch(epoch)
        times.append(time.perf_counter() - start)
    return times[0], min(times[1:])


def train_worker(spec: dict) -> dict:
    import jax

    from advjax import models, objectives, runtime, train
    from configs import default

    cache = runtime.enable_compilation_cache(spec.get("cache_dir") or "none")
    meter = runtime.CompileMeter().install()
    config = default.experiment(spec["model"], spec["mode"])
    config.train.batch_size = batch = spec["batch_size"]
    model = models.build_model(config.model)
    images, labels = synthetic(spec["examples"])
    n = len(labels)
    steps = n // batch

    if spec["impl"] == "ours":
        objective = objectives.make_objective(
            model.apply, config.train, deterministic=models.is_deterministic(config.model)
        )
        epoch_fn = train.make_epoch_fn(
            objective,
            n,
            batch,
            form=config.train.loop,
            chunk_size=config.train.chunk_size,
            convolutional=models.has_convolutions(config.model),
        )
        state = train.create_train_state(jax.random.key(0), model, config.train, steps)
        device_images, device_labels = jax.device_put(images), jax.device_put(labels)
        box = {"state": state}

        def run_epoch(e):
            perm = train.epoch_permutation(jax.random.key(1), e, n)
            box["state"], totals = epoch_fn(
                box["state"], train.EpochTotals.zeros(), device_images, device_labels, perm, jax.random.key(2)
            )
            box["loss"] = float(jax.device_get(totals.loss)) / steps

        step = jax.jit(lambda s, x, y, r: train.train_step(s, objective, x, y, r))
        flops_fn = lambda: _flops(
            step.lower(box["state"], images[:batch] / 255.0, labels[:batch], jax.random.key(0)).compile()
        )
    else:
        sys.path.insert(0, os.path.join(ROOT, "bench"))
        import flax_example

        host_images = images.astype(np.float32) / 255.0  # the flax example normalises once, on the host
        apply_model = flax_example.make_apply_model(
            spec["mode"], config.train.eps, config.train.alpha, config.train.sigma
        )
        state = train.create_train_state(jax.random.key(0), model, config.train, steps)
        box = {"state": state}

        def run_epoch(e):
            box["state"], box["loss"], _ = flax_example.train_epoch(
                apply_model, box["state"], host_images, labels, batch, jax.random.key(e)
            )

        def flops_fn():
            x, y, r = host_images[:batch], labels[:batch], jax.random.key(0)
            grads = apply_model(box["state"], x, y, r)[0]
            return _flops(apply_model.lower(box["state"], x, y, r).compile()) + _flops(
                flax_example.update_model.lower(box["state"], grads).compile()
            )

    first, steady = _epoch_times(run_epoch, spec["epochs"])
    compile_stats = meter.summary()
    examples = steps * batch
    out = {
        "first_epoch_s": first,
        "steady_epoch_s": steady,
        "examples_per_s": examples / steady,
        "first_epoch_examples_per_s": examples / first,
        "compile": compile_stats,
        "compile_cache": "warm" if cache and compile_stats["cache_hits"] else ("cold" if cache else "off"),
        "final_loss": box["loss"],
        **_peak_memory_bytes(),
    }
    out["flops_per_example"] = flops_fn() / batch
    out["achieved_gflops"] = out["flops_per_example"] * out["examples_per_s"] / 1e9
    return out


def sweep_worker(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp

    from advjax import eval_fold, evaluate, models, runtime, train
    from configs import default

    runtime.enable_compilation_cache("none")
    meter = runtime.CompileMeter().install()
    config = default.experiment(spec["model"], "ordinary")
    model = models.build_model(config.model)
    params = train.init_params(jax.random.key(0), model)
    images, labels = synthetic(spec["images"], seed=1)
    grid = np.linspace(0.0, 1.0, spec["points"])
    b = config.eval.batch_size
    if spec["impl"] == "ours":
        eval_set = eval_fold.make_eval_set(images, labels, len(labels), b)
        sweep = evaluate.make_sweep(
            models.eval_apply(model.apply), "gaussian", form=config.eval.loop, chunk_size=config.eval.chunk_size
        )
        run = lambda key, g: sweep(params, eval_set, jax.random.key(key), g)
    else:
        # A Python loop over sigmas, each a jitted accuracy call over host batches.
        @jax.jit
        def correct(p, x, y, k, s):
            noisy = jnp.clip(x + s * jax.random.normal(k, x.shape), 0, 1)
            return jnp.sum(jnp.argmax(model.apply({"params": p}, noisy), -1) == y)

        host_images = images.astype(np.float32) / 255.0

        def run(key, g):
            counts = [
                correct(params, host_images[i : i + b], labels[i : i + b], jax.random.key(key + i), s)
                for s in g
                for i in range(0, len(labels), b)
            ]
            return np.asarray(jax.device_get(counts))

    start = time.perf_counter()
    run(0, grid)
    first = time.perf_counter() - start
    start = time.perf_counter()
    run(1, grid + 0.01)  # a new grid of the same length: no recompilation
    steady = time.perf_counter() - start
    work = len(labels) * len(grid)
    return {
        "first_s": first,
        "steady_s": steady,
        "image_points_per_s": work / steady,
        "compile": meter.summary(),
        **_peak_memory_bytes(),
    }


def matmul_worker(spec: dict) -> dict:
    """The device's float32 matmul rate on a large square product: a ceiling for dense layers."""
    import jax
    import jax.numpy as jnp

    n = spec["n"]
    a = jnp.ones((n, n), jnp.float32) / n
    product = jax.jit(lambda x: x @ x)
    product(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(spec["reps"]):
        out = product(a)
    out.block_until_ready()
    seconds = (time.perf_counter() - start) / spec["reps"]
    return {"n": n, "gflops": 2 * n**3 / seconds / 1e9}


def profile_worker(spec: dict) -> dict:
    """Where one training step's time goes: XLA ops by total time, from a jax.profiler trace.

    Each op is named by the JAX operation it came from (the HLO metadata), so
    'Conv_1/conv_general_dilated under transpose(jvp(...))' reads as the
    second convolution's gradient.
    """
    import collections
    import glob
    import gzip
    import re

    import jax

    from advjax import models, objectives, train
    from configs import default

    config = default.experiment(spec["model"], spec["mode"])
    model = models.build_model(config.model)
    objective = objectives.make_objective(
        model.apply, config.train, deterministic=models.is_deterministic(config.model)
    )
    step = jax.jit(lambda s, x, y, r: train.train_step(s, objective, x, y, r))
    state = train.create_train_state(jax.random.key(0), model, config.train, 10)
    images, labels = synthetic(spec["batch_size"])
    x, y = images.astype(np.float32) / 255.0, labels
    state, metrics = step(state, x, y, jax.random.key(0))
    jax.block_until_ready(metrics)
    steps = spec["steps"]
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        start = time.perf_counter()
        for i in range(steps):
            state, metrics = step(state, x, y, jax.random.key(i))
        jax.block_until_ready(metrics)
        seconds = (time.perf_counter() - start) / steps
        jax.profiler.stop_trace()
        with gzip.open(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)[0]) as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    hlo = step.lower(state, x, y, jax.random.key(0)).compile().as_text()
    origin = {m.group(1): m.group(2) for m in re.finditer(r"%([\w.\-]+) = .*?op_name=\"([^\"]+)\"", hlo)}
    totals = collections.Counter()
    for event in events:
        # On GPU a library kernel (cuDNN, cuBLAS) is named by the kernel; its HLO op is in the args.
        name = (event.get("args") or {}).get("hlo_op", event.get("name"))
        if event.get("ph") == "X" and name in origin:
            totals[name] += event.get("dur", 0) / 1e6 / steps
    accounted = sum(totals.values())
    return {
        "step_s": seconds,
        "ops_s": accounted,
        "top_ops": [
            {
                "op": name,
                "from": origin[name].removeprefix("jit(<lambda>)/"),
                "ms": 1e3 * t,
                "share_of_step": t / seconds,
            }
            for name, t in totals.most_common(spec["top"])
        ],
    }


WORKERS = {"train": train_worker, "sweep": sweep_worker, "matmul": matmul_worker, "profile": profile_worker}


# ----------------------------------------------------------------------------- the driver


def run_worker(spec: dict) -> dict:
    """Runs one measurement in a fresh process and returns its JSON."""
    out, stderr = run_in_fresh_process(__file__, spec, ROOT)
    if out is None:
        raise RuntimeError(f"benchmark worker {spec} failed:\n{stderr[-3000:]}")
    return out


def machine() -> dict:
    import jax

    return {
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "device_count": jax.device_count(),
        "host_cpus": os.cpu_count(),
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def save_partial(results: dict) -> None:
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as f:
            json.dump(results, f, indent=2)


def main(argv):
    del argv
    if _WORKER.value:
        return answer_as_worker(_WORKER.value, WORKERS, "kind")
    info = machine()
    on_cpu = info["backend"] == "cpu"
    results = {"machine": info, "training": {}, "sweep": {}}
    results["peak_matmul"] = run_worker({"kind": "matmul", "n": 2048 if on_cpu else 8192, "reps": 5 if on_cpu else 50})
    log(f"float32 matmul peak: {results['peak_matmul']['gflops']:.0f} GFLOP/s")
    for name in _MODELS.value:
        n = _EXAMPLES.value or (51_200 if name == "bp" else (2_560 if on_cpu else 25_600))
        for mode in _MODES.value:
            spec = {
                "kind": "train",
                "model": name,
                "mode": mode,
                "examples": n,
                "batch_size": _BATCH.value,
                "epochs": _EPOCHS.value,
            }
            with tempfile.TemporaryDirectory() as cache_dir:
                # Alternated, two of each, so that drift in the machine's speed hits both sides alike.
                ours = run_worker({**spec, "impl": "ours", "cache_dir": cache_dir})
                base = run_worker({**spec, "impl": "baseline"})
                warm = run_worker({**spec, "impl": "ours", "cache_dir": cache_dir})
                base2 = run_worker({**spec, "impl": "baseline"})
            best_ours = max(ours["examples_per_s"], warm["examples_per_s"])
            best_base = max(base["examples_per_s"], base2["examples_per_s"])
            results["training"][f"{name}_{mode}"] = {
                "examples_per_epoch": n,
                "ours": ours,
                "ours_warm_cache": warm,
                "baseline": base,
                "baseline_again": base2,
                "best_examples_per_s": {"ours": best_ours, "baseline": best_base},
                "speedup": best_ours / best_base,
                "first_epoch_speedup": base["first_epoch_s"] / ours["first_epoch_s"],
                "fraction_of_matmul_peak": ours["flops_per_example"]
                * best_ours
                / 1e9
                / results["peak_matmul"]["gflops"],
                "compile_seconds": {
                    "cold": ours["compile"]["trace_seconds"] + ours["compile"]["backend_seconds"],
                    "warm": warm["compile"]["trace_seconds"] + warm["compile"]["backend_seconds"],
                    "warm_backend_only": warm["compile"]["backend_seconds"],
                    "warm_cache_hits": warm["compile"]["cache_hits"],
                },
            }
            r = results["training"][f"{name}_{mode}"]
            save_partial(results)
            log(
                f"{name} {mode}: ours {best_ours:.0f} ex/s, baseline {best_base:.0f} ex/s "
                f"({r['speedup']:.2f}x); compile cold {r['compile_seconds']['cold']:.1f}s, "
                f"warm {r['compile_seconds']['warm']:.1f}s"
            )
        sweep_spec = {"kind": "sweep", "model": name, "images": _SWEEP_IMAGES.value, "points": _SWEEP_POINTS.value}
        ours = run_worker({**sweep_spec, "impl": "ours"})
        base = run_worker({**sweep_spec, "impl": "baseline"})
        results["sweep"][name] = {
            "grid_points": _SWEEP_POINTS.value,
            "images": _SWEEP_IMAGES.value,
            "ours": ours,
            "baseline": base,
            "speedup": base["steady_s"] / ours["steady_s"],
        }
        save_partial(results)
        log(f"{name} sweep: ours {ours['steady_s']:.2f}s, baseline {base['steady_s']:.2f}s")
    results["profile"] = {}
    for workload in _PROFILE.value:
        name, mode = workload.split("_", 1)
        results["profile"][workload] = profile = run_worker(
            {"kind": "profile", "model": name, "mode": mode, "batch_size": _BATCH.value, "steps": 5, "top": 12}
        )
        save_partial(results)
        top = profile["top_ops"][0]["from"] if profile["top_ops"] else "none matched the trace"
        log(f"{workload} step {profile['step_s'] * 1e3:.0f} ms; top op {top}")
    save_partial(results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    app.run(main)
