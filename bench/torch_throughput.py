"""The paper's MNIST models on CPU: advjax's compiled training epoch against PyTorch eager, and where the CNN's
time goes pass by pass. Prints JSON.

    python bench/torch_throughput.py [--models=bp,cnn] [--modes=ordinary,fgsm] [--steps=0] [--batch_size=128]
        [--torch_threads=2] [--torch_omp_wait_policy=passive] [--repeats=2] [--profile] [--profile_reps=30]
        [--output=FILE]

The networks are advjax/models.py's: BP (784-256-256-10) and the CNN (conv5x5x32-pool-conv5x5x64-pool-dense1024-
dropout 0.4-dense10, SAME padding, 2x2 max-pool), ReLU, Glorot-uniform kernels, zero biases. The data are
synthetic: uint8 images [N, 28, 28, 1] uniform in 0..255 and labels uniform in 0..9, N = steps x batch
(throughput does not depend on pixel values). `--steps=0` means 40 steps for the CNN and 400 for BP; any other
N means N for the CNN and 10 N for BP. The modes are configs/default.py's `experiment(model, mode)`:
ordinary (cross-entropy on the clean batch) and fgsm (alpha J(x) + (1 - alpha) J(x_adv), alpha 0.5,
x_adv = clip(x + eps sign(grad_x J), 0, 1) held fixed, eps = train.eps = 0.1); Adam at 2e-3, cosine decay.

Each (implementation, model, mode) runs in a fresh Python process, advjax and PyTorch alternating, --repeats
times; each side's best examples/s is kept, and `ratio_advjax_over_torch` is advjax's over PyTorch's.

1. advjax: the epoch as advjax trains it: `models.build_model`, `objectives.make_objective`,
   `train.make_epoch_fn` in its default loop form on CPU (one fori_loop for BP, chunks of 8 unrolled steps
   for the CNN), the data uint8 on the device, the persistent compilation cache off. The first call compiles
   (compile seconds from runtime.CompileMeter); the second, timed, is the steady state.
2. torch: the same network (bench/common.torch_model, dropout 0.4 before the CNN's last layer) and loss in
   eager mode, `torch.set_num_threads(--torch_threads)`, Adam at 2e-3 with cosine decay. Per step: a shuffled
   batch from the uint8 tensor, converted to float / 255; for the CNN's fgsm, the input gradient in eval mode
   (`model.eval()`, no dropout; `autograd.grad` to x alone), then `model.train()` and the clean and adversarial
   passes, each with its own dropout mask. 3 warm-up steps, then every step is timed; `loss.item()` per step.
   OMP_WAIT_POLICY is set to --torch_omp_wait_policy (passive) before torch loads: with OpenMP's default
   spin-waiting, a 2-core machine shared with another job ran every small parallel op a scheduler slice late
   (a BP step 250 ms instead of 3 ms); `default` leaves it unset, as a user's shell would.

Where they differ: advjax compiles the epoch (XLA fuses and reorders; the CNN's clean pass may reuse the attack's
forward up to the dropout), PyTorch runs op by op. For BP (no dropout) both take the FGSM input gradient from the
clean training pass (advjax's objectives.shared_pass_fgsm; bench/torch_bp_adv.py does the same), so neither runs
a separate attack pass. The initial weights are other draws of the same distribution.

The profile (`--profile`, CNN only; each side in its own process) times, on one batch of 128 float images with the
same Glorot weights on both sides, the median of --profile_reps calls of (a) the forward pass (eval mode; torch
under no_grad), (b) the input gradient of the mean cross-entropy (FGSM's backward to x, eval mode), (c) a training
pass's forward and backward with the parameter gradients (train mode, dropout on, no optimizer). advjax's are
jitted functions (block_until_ready), PyTorch's eager. The FLOPs of each are XLA's cost analysis, the same work for
both; `logits_max_abs_diff` checks that the two networks compute the same function.
"""

import importlib.metadata
import json
import os
import sys
import time

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import answer_as_worker, machine, measure_in_fresh_process, torch_model, two_epochs  # noqa: E402

_MODELS = flags.DEFINE_list("models", ["bp", "cnn"], "bp and/or cnn.")
_MODES = flags.DEFINE_list("modes", ["ordinary", "fgsm"], "ordinary and/or fgsm.")
_STEPS = flags.DEFINE_integer("steps", 0, "Steps per timed call: 0 is 40 for the CNN, 400 for BP; N is N and 10 N.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Batch size.")
_THREADS = flags.DEFINE_integer("torch_threads", 2, "torch.set_num_threads.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Fresh processes per side and workload; the best is kept.")
_OMP = flags.DEFINE_string("torch_omp_wait_policy", "passive", "OMP_WAIT_POLICY for torch; default: leave unset.")
_PROFILE = flags.DEFINE_bool("profile", True, "Time the CNN's passes on both sides.")
_PROFILE_REPS = flags.DEFINE_integer("profile_reps", 30, "Timed calls per pass in the profile (the median is kept).")
_OUTPUT = flags.DEFINE_string("output", None, "Also write the JSON here, rewritten after every measurement.")
_WORKER = flags.DEFINE_string("worker", None, "Internal: run one measurement (a JSON spec) and print its JSON.")

WARMUP_STEPS, ALPHA, EPOCHS = 3, 0.5, 5  # configs/default.py: train.alpha, train.epochs (the cosine's length)
SHAPES = {  # the Flax params' names and kernel shapes (advjax/models.py)
    "bp": {"Dense_0": (784, 256), "Dense_1": (256, 256), "Dense_2": (256, 10)},
    "cnn": {"Conv_0": (5, 5, 1, 32), "Conv_1": (5, 5, 32, 64), "Dense_0": (3136, 1024), "Dense_1": (1024, 10)},
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int32)


def glorot_params(name: str, seed: int = 0) -> dict:
    """Glorot-uniform kernels and zero biases in numpy, named and shaped as the Flax model's params."""
    rng, params = np.random.default_rng(seed), {}
    for layer, shape in SHAPES[name].items():
        receptive = int(np.prod(shape[:-2]))
        limit = np.sqrt(6.0 / (receptive * (shape[-2] + shape[-1])))
        kernel = rng.uniform(-limit, limit, shape).astype(np.float32)
        params[layer] = {"kernel": kernel, "bias": np.zeros(shape[-1], np.float32)}
    return params


def median_s(fn, reps: int) -> float:
    fn(), fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


# ----------------------------------------------------------------------------- advjax


def advjax_train(spec: dict) -> dict:
    import jax

    from advjax import loops, models, objectives, runtime, train
    from configs import default

    runtime.enable_compilation_cache("none")
    meter = runtime.CompileMeter().install()
    config = default.experiment(spec["model"], spec["mode"])
    config.train.batch_size = batch = spec["batch_size"]
    steps = spec["steps"]
    n = steps * batch
    images, labels = synthetic(n)
    model = models.build_model(config.model)
    convolutional = models.has_convolutions(config.model)
    objective = objectives.make_objective(
        model.apply, config.train, deterministic=models.is_deterministic(config.model), steps_per_epoch=steps
    )
    epoch_fn = train.make_epoch_fn(
        objective, n, batch, form=config.train.loop, chunk_size=config.train.chunk_size, convolutional=convolutional
    )
    state = train.create_states(jax.random.key(0), model, config.train, steps, 1)
    timed = two_epochs(epoch_fn, state, images, labels, steps, meter)
    first, compile_stats, steady = timed["first_call_s"], timed["compile"], timed["steady_call_s"]
    return {
        "loop_form": loops.resolve_form(config.train.loop, cpu_form="chunked" if convolutional else "scan"),
        "first_call_s": first,
        "compile_s": compile_stats["trace_seconds"] + compile_stats["backend_seconds"],
        "steady_step_ms": 1e3 * steady / steps,
        "examples_per_s": n / steady,
        "mean_loss_second_call": timed["mean_loss_second_call"],
    }


def advjax_profile(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp

    from advjax import losses, models, train
    from configs import default

    model = models.build_model(default.experiment("cnn", "ordinary").model)
    params = jax.tree.map(jnp.asarray, glorot_params("cnn"))
    init = train.init_params(jax.random.key(0), model)
    assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, params), "the CNN's params changed shape"
    images, labels = synthetic(spec["batch_size"], seed=1)
    x, y, key = jnp.asarray(images, jnp.float32) / 255.0, jnp.asarray(labels), jax.random.key(0)
    loss = lambda p, x, y, train_mode, k: jnp.mean(
        losses.cross_entropy(model.apply({"params": p}, x, train=train_mode, rngs={"dropout": k}), y)
    )
    passes = {
        "forward": jax.jit(lambda p, x, y, k: model.apply({"params": p}, x, train=False)),
        "input_gradient": jax.jit(jax.grad(lambda p, x, y, k: loss(p, x, y, False, k), argnums=1)),
        "train_forward_backward": jax.jit(jax.value_and_grad(lambda p, x, y, k: loss(p, x, y, True, k))),
    }
    out = {}
    for name, fn in passes.items():
        analysis = fn.lower(params, x, y, key).compile().cost_analysis()
        analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
        seconds = median_s(lambda fn=fn: jax.block_until_ready(fn(params, x, y, key)), spec["reps"])
        out[name] = {"ms": 1e3 * seconds, "gflop": float(analysis.get("flops", float("nan"))) / 1e9}
    out["logits_first_8"] = np.asarray(passes["forward"](params, x, y, key))[:8].tolist()
    return out


# ----------------------------------------------------------------------------- PyTorch


def torch_network(name: str):
    """bench/common.torch_model on Glorot weights, trainable, with the CNN's dropout before its last layer."""
    from torch import nn

    layers = list(torch_model(name, glorot_params(name)))
    if name == "cnn":
        layers.insert(len(layers) - 1, nn.Dropout(0.4))
    model = nn.Sequential(*layers).train()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def import_torch(spec: dict):
    """torch, with OMP_WAIT_POLICY set first (libgomp reads it once, when torch loads it) and the threads set."""
    if spec["omp_wait_policy"] != "default":
        os.environ["OMP_WAIT_POLICY"] = spec["omp_wait_policy"].upper()
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    return torch


def torch_train(spec: dict) -> dict:
    torch = import_torch(spec)
    import torch.nn.functional as F

    from configs import default

    config = default.experiment(spec["model"], spec["mode"])
    batch, steps, eps, fgsm = spec["batch_size"], spec["steps"], config.train.eps, spec["mode"] == "fgsm"
    images, labels = synthetic(steps * batch)
    all_x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
    all_y = torch.from_numpy(labels).long()
    model, dropout = torch_network(spec["model"]), spec["model"] == "cnn"
    opt = torch.optim.Adam(model.parameters(), lr=config.train.learning_rate)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS * steps)
    permutation = torch.randperm(len(all_y), generator=torch.Generator().manual_seed(1))
    totals = {"loss": 0.0, "correct": 0}

    def step(i: int) -> None:
        index = permutation[i * batch : (i + 1) * batch]
        x, y = all_x[index].float() / 255.0, all_y[index]
        opt.zero_grad(set_to_none=True)
        if not fgsm:
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
        elif dropout:  # the attack in eval mode, its gradient to x alone; then both passes in train mode
            grad = torch.autograd.grad(F.cross_entropy(model.eval()(x.requires_grad_()), y), x)[0]
            adversarial = (x.detach() + eps * grad.sign()).clamp(0, 1)
            logits = model.train()(x.detach())
            loss = ALPHA * F.cross_entropy(logits, y) + (1 - ALPHA) * F.cross_entropy(model(adversarial), y)
            loss.backward()
        else:  # no dropout: the clean pass gives the input gradient and the clean parameter gradient
            logits = model(x.requires_grad_())
            clean = F.cross_entropy(logits, y)
            (ALPHA * clean).backward()
            adversarial_loss = F.cross_entropy(model((x.detach() + eps * x.grad.sign()).clamp(0, 1)), y)
            ((1 - ALPHA) * adversarial_loss).backward()
            loss = ALPHA * clean + (1 - ALPHA) * adversarial_loss
        opt.step()
        scheduler.step()
        totals["loss"] += loss.item()
        totals["correct"] += int((logits.argmax(1) == y).sum())

    for i in range(WARMUP_STEPS):
        step(i % steps)
    times = []
    for i in range(steps):
        start = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - start)
    return {
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "warmup_steps": WARMUP_STEPS,
        "steady_step_ms": 1e3 * sum(times) / steps,
        "step_ms_min_max": [1e3 * min(times), 1e3 * max(times)],
        "examples_per_s": batch * steps / sum(times),
        "mean_loss": totals["loss"] / (steps + WARMUP_STEPS),
    }


def torch_profile(spec: dict) -> dict:
    torch = import_torch(spec)
    import torch.nn.functional as F

    model = torch_network("cnn")
    images, labels = synthetic(spec["batch_size"], seed=1)
    x, y = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0, torch.from_numpy(labels).long()

    def forward():
        with torch.no_grad():
            return model.eval()(x)

    def input_gradient():
        xa = x.detach().requires_grad_()
        return torch.autograd.grad(F.cross_entropy(model.eval()(xa), y), xa)[0]

    def train_forward_backward():
        model.train().zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    passes = {"forward": forward, "input_gradient": input_gradient, "train_forward_backward": train_forward_backward}
    out = {name: {"ms": 1e3 * median_s(fn, spec["reps"])} for name, fn in passes.items()}
    out["logits_first_8"] = forward()[:8].tolist()
    return out


WORKERS = {
    "advjax": advjax_train,
    "torch": torch_train,
    "advjax_profile": advjax_profile,
    "torch_profile": torch_profile,
}


# ----------------------------------------------------------------------------- the driver


def run_worker(spec: dict) -> dict:
    return measure_in_fresh_process(__file__, spec, ROOT, log)


def profile() -> dict:
    spec = {"batch_size": _BATCH.value, "reps": _PROFILE_REPS.value} | torch_spec()
    sides = {side: run_worker({"impl": f"{side}_profile", **spec}) for side in ("advjax", "torch")}
    if any("error" in out for out in sides.values()):
        return sides
    mine, theirs = sides["advjax"], sides["torch"]
    out = {"batch_size": _BATCH.value, "reps": _PROFILE_REPS.value, "passes": {}}
    for name in ("forward", "input_gradient", "train_forward_backward"):
        ms, gflop = (mine[name]["ms"], theirs[name]["ms"]), mine[name]["gflop"]
        out["passes"][name] = {"advjax_ms": ms[0], "torch_ms": ms[1], "torch_ms_over_advjax_ms": ms[1] / ms[0]}
        out["passes"][name] |= {"gflop": gflop, "advjax_gflop_per_s": 1e3 * gflop / ms[0]}
        out["passes"][name]["torch_gflop_per_s"] = 1e3 * gflop / ms[1]
    # FGSM's step, pass by pass: the attack's input gradient and two training passes (no optimizer)
    out["fgsm_step_from_passes_ms"] = {
        side: out["passes"]["input_gradient"][f"{side}_ms"] + 2 * out["passes"]["train_forward_backward"][f"{side}_ms"]
        for side in ("advjax", "torch")
    }
    diff = np.abs(np.asarray(mine["logits_first_8"]) - np.asarray(theirs["logits_first_8"]))
    return out | {"logits_max_abs_diff": float(diff.max())}


def torch_spec() -> dict:
    return {"threads": _THREADS.value, "omp_wait_policy": _OMP.value}


def save(results: dict) -> str:
    text = json.dumps(results, indent=2)
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as f:
            f.write(text)
    return text


def main(argv):
    del argv
    if _WORKER.value:
        return answer_as_worker(_WORKER.value, WORKERS, "impl")
    versions = {name: importlib.metadata.version(name) for name in ("jax", "jaxlib", "torch")}
    results = {
        "machine": machine() | versions | {"torch_threads": _THREADS.value, "torch_omp_wait_policy": _OMP.value},
        "load_average_before": list(os.getloadavg()),
        "setup": {"data": "synthetic uint8 [N, 28, 28, 1], labels 0..9, N = steps x batch", "batch_size": _BATCH.value}
        | {"repeats": _REPEATS.value, "torch_warmup_steps": WARMUP_STEPS},
        "training": {},
        "ratio_advjax_over_torch": {},
    }
    for name in _MODELS.value:
        steps = (_STEPS.value or 40) * (10 if name == "bp" else 1)
        for mode in _MODES.value:
            key, runs = f"{name}_{mode}", {"advjax": [], "torch": []}
            for repeat in range(_REPEATS.value):
                for impl in ("advjax", "torch"):
                    spec = {"impl": impl, "model": name, "mode": mode, "steps": steps, "batch_size": _BATCH.value}
                    out = run_worker(spec | (torch_spec() if impl == "torch" else {}))
                    runs[impl].append(out)
                    log(f"{key} {impl} #{repeat + 1}: {out.get('examples_per_s', float('nan')):.0f} examples/s")
            entry = {"steps": steps, "examples_per_call": steps * _BATCH.value}
            for impl, outs in runs.items():
                good = [o for o in outs if "examples_per_s" in o]
                entry[impl] = {"examples_per_s_runs": [o.get("examples_per_s") for o in outs]}
                entry[impl]["best"] = max(good, key=lambda o: o["examples_per_s"]) if good else outs[-1]
            rates = [entry[impl]["best"].get("examples_per_s") for impl in ("advjax", "torch")]
            if None not in rates:
                results["ratio_advjax_over_torch"][key] = entry["ratio_advjax_over_torch"] = rates[0] / rates[1]
            results["training"][key] = entry
            save(results)
    if _PROFILE.value:
        log("profiling the CNN's passes ...")
        results["profile_cnn"] = profile()
    results["load_average_after"] = list(os.getloadavg())
    print(save(results))


if __name__ == "__main__":
    app.run(main)
