"""PreAct ResNet-18 training on CIFAR-shaped data: advjax's compiled epoch against PyTorch eager. Prints JSON.

    python bench/resnet_throughput.py [--steps=20] [--batch_size=128] [--modes=ordinary,fast]
        [--impls=advjax,torch] [--torch_threads=2] [--torch_device=cpu] [--output=FILE]

The network is Wong et al.'s (2020) CIFAR-10 PreAct ResNet-18 with BatchNorm
(github.com/locuslab/fast_adversarial, CIFAR10/preact_resnet.py); the data are
synthetic uint8 images [N, 32, 32, 3] with labels in 0..9, N = steps x batch
(throughput does not depend on pixel values). Two modes:

- **ordinary**: one SGD step on the clean, augmented batch;
- **fast**: Wong et al.'s FGSM training from a random start at eps 8/255 with a
  step of 10/255 (their `train_fgsm.py`): the training step on x + delta.

Each (implementation, mode) runs in a fresh Python process, so its compile
time and peak memory (RSS) are its own; the processes alternate (advjax,
PyTorch, advjax, PyTorch) so that drift in the machine's speed hits both alike.

1. **advjax**: the epoch `fit.py` runs: `configs/cifar10_fast.py` (mode
   `ordinary` or its own `fast`), `models.build_model`, `objectives.make_objective`
   and `train.make_epoch_fn` over `steps` steps, the data on the device as
   uint8, the persistent compilation cache off. The epoch is called twice: the
   first call compiles (its compile seconds come from advjax.runtime.CompileMeter),
   the second is the steady state that examples/s is computed from.
2. **torch**: the same network written in PyTorch below, eager, in train mode,
   `torch.set_num_threads(--torch_threads)`, SGD (momentum 0.9, weight decay
   5e-4) with their cyclic learning rate (`CyclicLR`, 0 to 0.2 over 15 epochs).
   Per step: a shuffled batch taken from the uint8 tensor, their augmentation
   (4-pixel zero padding, random 32x32 crop, horizontal flip; done per batch here,
   where their DataLoader does it per image in 2 worker processes), their
   normalisation by CIFAR-10's mean and std, and the step of `train_fgsm.py`
   without apex: delta uniform in [-eps, eps] per channel, clamped to the image
   range, one signed-gradient step of alpha (the model in train mode, as theirs),
   clamped to the eps ball and the image range, then the SGD step on x + delta.
   Every step is timed; the first is its warm-up, examples/s comes from the rest.
   Their `loss.item()` and accuracy sums per step are kept (one host sync per step).

The fast steps differ as the two codes do: advjax crafts the attack in eval mode
(BatchNorm on its running statistics, only the input gradient), Wong et al. in
train mode, and their first backward pass also computes the parameter gradients
that `opt.zero_grad()` then discards. Both are float32; their published times
used apex's mixed precision.

`ratio_advjax_over_torch` is advjax's examples/s over PyTorch's, per mode. `epoch_estimate` turns
each measured rate into seconds for one 50,000-image epoch and for the
15-epoch recipe (training steps only: no evaluation, no early-stopping check).
`wong_published` is what their README publishes for the recipe, quoted with its source.

On a GPU the script runs as is: JAX uses the default backend (JAX_PLATFORMS
picks another) and `--torch_device=cuda` moves the PyTorch side (a CUDA build of
torch is needed; without one, `--impls=advjax`). `machine` records both backends.
There `--steps=390` times a whole epoch of CIFAR-10's size (390 x 128 = 49,920 images),
one `fori_loop` for advjax; on a 2-core CPU the default 20 steps take about half an hour.
"""

import json
import os
import resource
import sys
import time

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import answer_as_worker, measure_in_fresh_process, two_epochs  # noqa: E402

_STEPS = flags.DEFINE_integer("steps", 20, "Training steps per measured call (and per compile call for advjax).")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Batch size (Wong et al.'s 128).")
_MODES = flags.DEFINE_list("modes", ["ordinary", "fast"], "ordinary and/or fast (FGSM from a random start).")
_IMPLS = flags.DEFINE_list("impls", ["advjax", "torch"], "Implementations to measure.")
_THREADS = flags.DEFINE_integer("torch_threads", 2, "torch.set_num_threads.")
_TORCH_DEVICE = flags.DEFINE_string("torch_device", "cpu", "The PyTorch side's device: cpu or cuda.")
_OUTPUT = flags.DEFINE_string("output", None, "Also write the JSON here, rewritten after every measurement.")
_WORKER = flags.DEFINE_string("worker", None, "Internal: run one measurement (a JSON spec) and print its JSON.")

MODES = ("ordinary", "fast")
EPS, ALPHA = 8 / 255, 10 / 255  # Wong et al.'s CIFAR-10 --epsilon 8 and --alpha 10, in pixels of [0, 1]
RECIPE_EPOCHS, TRAIN_IMAGES = 15, 50_000
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)  # their utils.py

WONG_PUBLISHED = {
    "source": "github.com/locuslab/fast_adversarial, README.md at commit 54f728755e71857b632882ba6d6cef22f56e2172"
    " (2020-06-30), the CIFAR10 table",
    "table_header": "|          | CIFAR10 Acc | CIFAR10 Adv Acc (eps=8/255) | Time (minutes) |",
    "table_row": "| FGSM     |      86.06% |                      46.06% |             12 |",
    "clean_accuracy": 0.8606,
    "adversarial_accuracy_eps_8_255": 0.4606,
    "train_minutes": 12,
    "readme_introduction": "capable of training a robust CIFAR10 classifier in 6 minutes",
    "not_in_the_readme": "the hardware (no GPU is named), the epoch count and the attack behind 'Adv Acc'. From their"
    " CIFAR10/train_fgsm.py defaults: 15 epochs, batch 128, apex amp O2 mixed precision, and the test accuracy under"
    " evaluate_pgd(test_loader, model_test, 50, 10): PGD-50 with 10 restarts, step 2/255.",
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int32)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------- advjax


def recipe_config(mode: str):
    """configs/cifar10_fast.py (Wong et al.'s recipe), or the same with train.mode=ordinary."""
    from configs import cifar10_fast

    config = cifar10_fast.get_config()
    if mode == "ordinary":
        config.train.mode = "ordinary"
    return config


RECORDED_TRAIN_FIELDS = (
    "mode",
    "optimizer",
    "learning_rate",
    "schedule",
    "momentum",
    "weight_decay",
    "augment",
    "eps",
    "fast_step_size",
    "fast_clip_start",
    "attack_unroll",
    "loop",
    "chunk_size",
)


def advjax_worker(spec: dict) -> dict:
    """advjax's epoch of `steps` steps, built as fit._build builds it, called twice (compile, steady)."""
    import jax

    from advjax import data, loops, models, objectives, runtime, train

    runtime.enable_compilation_cache("none")
    meter = runtime.CompileMeter().install()
    config = recipe_config(spec["mode"])
    config.train.batch_size = batch = spec["batch_size"]
    steps = spec["steps"]
    n = steps * batch
    images, labels = synthetic(n)
    model = models.build_model(config.model, data.DATASETS["cifar10"])
    convolutional = models.has_convolutions(config.model)
    objective = objectives.make_objective(
        model.apply, config.train, deterministic=models.is_deterministic(config.model), steps_per_epoch=steps
    )
    epoch_fn = train.make_epoch_fn(
        objective,
        n,
        batch,
        form=config.train.loop,
        chunk_size=config.train.chunk_size,
        convolutional=convolutional,
        augmentation=config.train.augment,
    )
    state = train.create_states(jax.random.key(0), model, config.train, steps, 1)
    timed = two_epochs(epoch_fn, state, images, labels, steps, meter)
    first, compile_stats, steady = timed["first_call_s"], timed["compile"], timed["steady_call_s"]
    return {
        "config": "configs/cifar10_fast.py" + ("" if spec["mode"] == "fast" else " with train.mode=ordinary"),
        "model": config.model.name,
        "train": {k: config.train[k] for k in RECORDED_TRAIN_FIELDS if k in config.train},
        "loop_form": loops.resolve_form(config.train.loop, cpu_form="chunked" if convolutional else "scan"),
        "first_call_s": first,
        "compile_s": compile_stats["trace_seconds"] + compile_stats["backend_seconds"],
        "compile": {k: compile_stats[k] for k in ("trace_seconds", "backend_seconds", "num_executables")},
        "steady_call_s": steady,
        "steady_step_s": steady / steps,
        "examples_per_s": n / steady,
        "mean_loss_second_call": timed["mean_loss_second_call"],
        "peak_rss_bytes": peak_rss_bytes(),
    }


# ----------------------------------------------------------------------------- PyTorch


def torch_preact_resnet18():
    """Wong et al.'s PreActResNet18 (CIFAR10/preact_resnet.py), the PreActBlock version."""
    import torch.nn.functional as F
    from torch import nn

    class PreActBlock(nn.Module):
        def __init__(self, in_planes, planes, stride=1):
            super().__init__()
            self.bn1 = nn.BatchNorm2d(in_planes)
            self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
            if stride != 1 or in_planes != planes:
                self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False))

        def forward(self, x):
            out = F.relu(self.bn1(x))
            shortcut = self.shortcut(x) if hasattr(self, "shortcut") else x
            out = self.conv1(out)
            out = self.conv2(F.relu(self.bn2(out)))
            return out + shortcut

    class PreActResNet18(nn.Module):
        def __init__(self, num_classes=10):
            super().__init__()
            self.in_planes = 64
            self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.layer1 = self._make_layer(64, 2, 1)
            self.layer2 = self._make_layer(128, 2, 2)
            self.layer3 = self._make_layer(256, 2, 2)
            self.layer4 = self._make_layer(512, 2, 2)
            self.bn = nn.BatchNorm2d(512)
            self.linear = nn.Linear(512, num_classes)

        def _make_layer(self, planes, num_blocks, stride):
            layers = []
            for s in [stride] + [1] * (num_blocks - 1):
                layers.append(PreActBlock(self.in_planes, planes, s))
                self.in_planes = planes
            return nn.Sequential(*layers)

        def forward(self, x):
            out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
            out = F.avg_pool2d(F.relu(self.bn(out)), 4)
            return self.linear(out.view(out.size(0), -1))

    return PreActResNet18()


def torch_worker(spec: dict) -> dict:
    """train_fgsm.py's loop without apex (or, for ordinary, without the attack), every step timed."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    batch, steps = spec["batch_size"], spec["steps"]
    images, labels = synthetic(steps * batch)
    all_x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)  # uint8 NCHW
    all_y = torch.from_numpy(labels).long().to(device)

    model = torch_preact_resnet18().to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=5e-4)
    lr_steps = RECIPE_EPOCHS * -(-TRAIN_IMAGES // batch)  # their epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.CyclicLR(
        opt, base_lr=0.0, max_lr=0.2, step_size_up=lr_steps / 2, step_size_down=lr_steps / 2
    )
    mu = torch.tensor(CIFAR10_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(CIFAR10_STD, device=device).view(3, 1, 1)
    upper, lower = (1 - mu) / std, (0 - mu) / std
    epsilon, alpha = EPS / std, ALPHA / std
    clamp = lambda x, lo, hi: torch.max(torch.min(x, hi), lo)
    generator = torch.Generator(device="cpu").manual_seed(1)
    permutation = torch.randperm(len(all_y), generator=generator).to(device)
    rows = torch.arange(32, device=device)
    batch_index, channel_index = torch.arange(batch, device=device)[:, None, None, None], rows[:3, None, None]

    def augmented_batch(i):
        """RandomCrop(32, padding=4) and RandomHorizontalFlip, ToTensor, Normalize: for a whole batch."""
        index = permutation[i * batch : (i + 1) * batch]
        x = F.pad(all_x[index].float() / 255.0, (4, 4, 4, 4))
        top, left = (torch.randint(0, 9, (2, batch), generator=generator).to(device)).unbind(0)
        r = (top[:, None] + rows)[:, None, :, None]
        c = (left[:, None] + rows)[:, None, None, :]
        x = x[batch_index, channel_index, r, c]
        flip = (torch.rand(batch, generator=generator) < 0.5).to(device)[:, None, None, None]
        x = torch.where(flip, x.flip(3), x)
        return (x - mu) / std, all_y[index]

    totals = {"loss": 0.0, "correct": 0, "n": 0}

    def step(i):
        x, y = augmented_batch(i)
        if spec["mode"] == "fast":
            delta = torch.zeros_like(x)
            for j in range(3):
                delta[:, j, :, :].uniform_(-epsilon[j][0][0].item(), epsilon[j][0][0].item())
            delta.data = clamp(delta, lower - x, upper - x)
            delta.requires_grad = True
            loss = F.cross_entropy(model(x + delta), y)
            loss.backward()
            grad = delta.grad.detach()
            delta.data = clamp(delta + alpha * torch.sign(grad), -epsilon, epsilon)
            delta.data = clamp(delta, lower - x, upper - x)
            x = x + delta.detach()
        output = model(x)
        loss = F.cross_entropy(output, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        scheduler.step()
        totals["loss"] += loss.item() * y.size(0)
        totals["correct"] += (output.max(1)[1] == y).sum().item()
        totals["n"] += y.size(0)

    times = []
    for i in range(steps):
        start = time.perf_counter()
        step(i)
        sync()
        times.append(time.perf_counter() - start)
    steady = times[1:] or times
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "first_step_s": times[0],
        "all_steps_s": sum(times),
        "steady_step_s": sum(steady) / len(steady),
        "step_s_min_max": [min(steady), max(steady)],
        "examples_per_s": batch * len(steady) / sum(steady),
        "mean_loss": totals["loss"] / totals["n"],
        "peak_rss_bytes": peak_rss_bytes(),
    }


WORKERS = {"advjax": advjax_worker, "torch": torch_worker}


# ----------------------------------------------------------------------------- the driver


def run_worker(spec: dict) -> dict:
    return measure_in_fresh_process(__file__, spec, ROOT, log)


def machine_info() -> dict:
    import jax

    from bench.common import machine

    return machine() | {
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_device": str(jax.devices()[0].device_kind),
        "torch_device": _TORCH_DEVICE.value,
        "torch_threads": _THREADS.value,
        "load_average_at_start": list(os.getloadavg()),
    }


def estimate(examples_per_s: float) -> dict:
    epoch = TRAIN_IMAGES / examples_per_s
    return {"epoch_50k_s": epoch, "recipe_15_epochs_s": RECIPE_EPOCHS * epoch, "recipe_15_epochs_min": 15 * epoch / 60}


def main(argv):
    del argv
    if _WORKER.value:
        return answer_as_worker(_WORKER.value, WORKERS, "impl")
    for mode in _MODES.value:
        if mode not in MODES:
            sys.exit(f"--modes: {mode!r} is not one of {MODES}")
    results = {
        "machine": machine_info(),
        "setup": {
            "network": "PreAct ResNet-18 (Wong et al., CIFAR10/preact_resnet.py), BatchNorm",
            "data": "synthetic uint8 [N, 32, 32, 3], labels 0..9",
            "batch_size": _BATCH.value,
            "steps": _STEPS.value,
            "examples_per_call": _STEPS.value * _BATCH.value,
            "fast": {"eps": "8/255", "alpha": "10/255", "start": "uniform in [-eps, eps], clamped to the image"},
        },
        "advjax": {},
        "torch": {},
    }
    common = {"steps": _STEPS.value, "batch_size": _BATCH.value}
    for mode in _MODES.value:
        for impl in ("advjax", "torch"):
            if impl not in _IMPLS.value:
                continue
            spec = {"impl": impl, "mode": mode, **common}
            if impl == "torch":
                spec |= {"threads": _THREADS.value, "device": _TORCH_DEVICE.value}
            log(f"{impl} {mode}: {_STEPS.value} steps of batch {_BATCH.value} ...")
            results[impl][mode] = out = run_worker(spec)
            if "examples_per_s" in out:
                log(f"  {out['examples_per_s']:.1f} examples/s")
            if _OUTPUT.value:
                with open(_OUTPUT.value, "w") as f:
                    json.dump(results, f, indent=2)
    results["ratio_advjax_over_torch"] = {
        mode: results["advjax"][mode]["examples_per_s"] / results["torch"][mode]["examples_per_s"]
        for mode in _MODES.value
        if "examples_per_s" in results["advjax"].get(mode, {}) and "examples_per_s" in results["torch"].get(mode, {})
    }
    results["epoch_estimate"] = {
        impl: {mode: estimate(out["examples_per_s"]) for mode, out in results[impl].items() if "examples_per_s" in out}
        for impl in ("advjax", "torch")
    }
    results["epoch_estimate"]["note"] = (
        f"{TRAIN_IMAGES:,} images per epoch (Wong et al. train on all of CIFAR-10's training set;"
        f" configs/cifar10_fast.py holds out data.num_validation of them), {RECIPE_EPOCHS} epochs, training steps only"
    )
    results["wong_published"] = WONG_PUBLISHED
    text = json.dumps(results, indent=2)
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    app.run(main)
