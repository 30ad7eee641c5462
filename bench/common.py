"""What the benchmarks share: the machine, measurements in fresh processes, advjax's networks in PyTorch."""

import contextlib
import os
import platform
import sys
import time

import numpy as np


def machine() -> dict:
    cpu = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {"cpu_count": os.cpu_count(), "cpu": cpu, "platform": platform.platform(), "python": sys.version.split()[0]}


def torch_model(name: str, params: dict):
    """The restored network as a torch.nn.Sequential on NCHW images: bp, small_cnn or cnn (models.py)."""
    import torch
    from torch import nn

    tensor = lambda a: torch.from_numpy(np.array(a, np.float32))

    class FlattenNHWC(nn.Module):  # Flax flattens [B, H, W, C]: permute first so the Dense rows line up
        def forward(self, x):
            return x.permute(0, 2, 3, 1).flatten(1)

    def linear(p):
        layer = nn.Linear(*p["kernel"].shape)
        layer.weight.data, layer.bias.data = tensor(p["kernel"]).T.contiguous(), tensor(p["bias"])
        return layer

    def conv(p, stride, padding):
        height, width, inputs, outputs = p["kernel"].shape
        layer = nn.Conv2d(inputs, outputs, (height, width), stride=stride, padding=padding)
        layer.weight.data, layer.bias.data = tensor(p["kernel"]).permute(3, 2, 0, 1).contiguous(), tensor(p["bias"])
        return layer

    dense = [params[f"Dense_{i}"] for i in range(sum(k.startswith("Dense_") for k in params))]
    head = [m for p in dense[:-1] for m in (linear(p), nn.ReLU())] + [linear(dense[-1])]
    if name == "bp":
        body = []
    elif name == "small_cnn":  # 4x4 stride 2, PyTorch's padding 1
        body = [conv(params["Conv_0"], 2, 1), nn.ReLU(), conv(params["Conv_1"], 2, 1), nn.ReLU()]
    elif name == "cnn":  # 5x5 SAME, 2x2 max-pool; dropout is off in eval mode
        body = [m for c in ("Conv_0", "Conv_1") for m in (conv(params[c], 1, 2), nn.ReLU(), nn.MaxPool2d(2))]
    else:
        sys.exit(f"no PyTorch port of model {name!r}")
    model = nn.Sequential(*body, FlattenNHWC(), *head).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def run_in_fresh_process(script: str, spec: dict, cwd: str) -> tuple[dict | None, str]:
    """Runs `script --worker=<spec as JSON>` in a new Python process, so that its compilation and peak memory are
    its own; (the JSON its last stdout line holds, or None if it failed; its stderr)."""
    import json
    import subprocess

    result = subprocess.run(
        [sys.executable, os.path.abspath(script), f"--worker={json.dumps(spec)}"],
        capture_output=True,
        text=True,
        cwd=cwd,
    )
    if result.returncode != 0:
        return None, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def answer_as_worker(spec_json: str, workers: dict, key: str) -> None:
    """The worker side of `run_in_fresh_process`: runs workers[spec[key]] on the rest of the spec, prints its JSON."""
    import json

    spec = json.loads(spec_json)
    print(json.dumps(workers[spec.pop(key)](spec)))


def two_epochs(epoch_fn, state, images, labels, steps: int, meter) -> dict:
    """Calls a `train.make_epoch_fn` epoch twice on device data: the first call compiles (its statistics from
    `meter`, a runtime.CompileMeter), the second is the steady state.
    Returns first_call_s, compile (meter.summary() after the first), steady_call_s and mean_loss_second_call."""
    import jax

    from advjax import train

    n, box = len(labels), {"state": state}
    device_images, device_labels = jax.device_put((images, labels))

    def call(epoch: int) -> float:
        start = time.perf_counter()
        permutation = train.epoch_permutation(jax.random.key(1), epoch, n)
        box["state"], totals = epoch_fn(
            box["state"], train.EpochTotals.zeros(), device_images, device_labels, permutation, jax.random.key(2)
        )
        jax.block_until_ready((box["state"], totals))
        box["loss"] = float(jax.device_get(totals.loss)) / steps
        return time.perf_counter() - start

    first = call(1)
    compile_stats = meter.summary()
    steady = call(2)
    return {
        "first_call_s": first,
        "compile": compile_stats,
        "steady_call_s": steady,
        "mean_loss_second_call": box["loss"],
    }


def measure_in_fresh_process(script: str, spec: dict, cwd: str, log) -> dict:
    """One measurement in a fresh process (run_in_fresh_process): its JSON and process_wall_s, or {"error": ...}
    if it failed, after `log`ging the tail of its stderr."""
    start = time.perf_counter()
    out, stderr = run_in_fresh_process(script, spec, cwd)
    if out is None:
        log(f"worker {spec} failed:\n{stderr[-3000:]}")
        return {"error": stderr.strip().splitlines()[-1] if stderr.strip() else "the worker failed"}
    return out | {"process_wall_s": time.perf_counter() - start}


def import_reference(path: str):
    if not os.path.isfile(os.path.join(path, "autoattack", "autoattack.py")):
        sys.exit(f"no AutoAttack checkout at --reference_dir={path} (expected {path}/autoattack/autoattack.py)")
    sys.path.insert(0, path)
    import autoattack

    return autoattack


def randomised(model, sigma: float, clip: bool):
    """The PyTorch model behind Gaussian input noise drawn by torch.randn at every call, clipped to [0, 1] when
    `clip`: advjax.noise.gaussian's noise, for the reference's side."""
    import torch

    class NoisyInput(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            noisy = x + sigma * torch.randn_like(x)
            return self.model(noisy.clamp(0.0, 1.0) if clip else noisy)

    return NoisyInput().eval()
