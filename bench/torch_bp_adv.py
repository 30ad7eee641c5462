"""PyTorch eager baseline for `python launch.py --config=configs/bp_adv.py` as a whole process. Prints JSON.

    ADVJAX_DATA_DIR=/path/to/mnist python bench/torch_bp_adv.py [--threads=2] [--seed=0]

The same work as advjax's run, written the plain PyTorch way (data as float32 tensors on the CPU, one Python
step per batch), for bench/startup.py's whole-process timing. It mirrors:

- data: MNIST's IDX files (raw or gzip) from $ADVJAX_DATA_DIR, the 60,000 training images split 50,000 /
  10,000 by advjax's seeded permutation (data.split_train_validation: the same split, image for image);
- model: BP, 784-256-256-10 with ReLU, Glorot-uniform kernels and zero biases (model.init = glorot_uniform);
- training: 5 epochs of batch 128 over a fresh shuffle each epoch, the last partial batch dropped; Adam at
  2e-3 with cosine decay to 0 over all steps; the loss alpha*J(x) + (1-alpha)*J(x_adv), alpha 0.5,
  x_adv = clip(x + 0.1*sign(grad_x J), 0, 1) held fixed, the clean pass giving both the input gradient
  and the clean term's parameter gradient (as advjax's shared_pass_fgsm);
- after each epoch: clean accuracy on all 10,000 validation images, and the overfitting check on the last
  500: FGSM and PGD-10 at train.eps (one uniform random start clipped to [0, 1], steps of 2.5 eps / 10);
- the final evaluation, in batches of 500, on the first 5000 train, first 5000 validation and all 10,000
  test images: clean, FGSM at eval.eps 0.1, Gaussian at eval.sigma 0.3 and Gaussian matched per image to
  FGSM's perturbation (mean and std), each clipped to [0, 1], and the mean per-image statistics (mean, std,
  L-inf, L2) of each perturbation after clipping.

It differs in: the random numbers (PyTorch's generators, so the initial weights, shuffles and noise are
other draws of the same distributions, and the accuracies agree to within a run-to-run spread, not
exactly); no checkpoints, metrics.jsonl, summary.json or report are written, and no config is parsed or
validated; no compilation (eager).
"""

import time

_START = time.perf_counter()

import gzip  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from absl import app, flags  # noqa: E402
from torch import nn  # noqa: E402

_IMPORTED = time.perf_counter()

_THREADS = flags.DEFINE_integer("threads", 2, "torch.set_num_threads.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of PyTorch's generators (initialisation, shuffles, noise).")
_DATA_DIR = flags.DEFINE_string("data_dir", os.environ.get("ADVJAX_DATA_DIR", ""), "MNIST's IDX files.")

# configs/bp_adv.py: default.experiment("bp", "fgsm").
EPOCHS, BATCH, LEARNING_RATE, ALPHA, TRAIN_EPS = 5, 128, 2e-3, 0.5, 0.1
EVAL_BATCH, EVAL_EPS, EVAL_SIGMA = 500, 0.1, 0.3
NUM_VALIDATION, SPLIT_SEED = 10_000, 0
CHECK_EXAMPLES, CHECK_STEPS = 500, 10
EVAL_SIZES = {"train": 5_000, "validation": 5_000, "test": 10_000}


def read_idx(name: str) -> np.ndarray:
    path = os.path.join(_DATA_DIR.value, name)
    path = path if os.path.isfile(path) else path + ".gz"
    with open(path, "rb") as f:
        raw = f.read()
    raw = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    ndim = raw[3]
    shape = np.frombuffer(raw, ">u4", ndim, 4).astype(int)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    as_tensors = lambda x, y: (
        torch.from_numpy(x.reshape(len(x), -1).astype(np.float32) / 255.0),
        torch.from_numpy(y.astype(np.int64)),
    )
    images, labels = read_idx("train-images-idx3-ubyte"), read_idx("train-labels-idx1-ubyte")
    permutation = np.random.Generator(np.random.PCG64(SPLIT_SEED)).permutation(len(labels))
    train, validation = permutation[NUM_VALIDATION:], permutation[:NUM_VALIDATION]
    return {
        "train": as_tensors(images[train], labels[train]),
        "validation": as_tensors(images[validation], labels[validation]),
        "test": as_tensors(read_idx("t10k-images-idx3-ubyte"), read_idx("t10k-labels-idx1-ubyte")),
    }


def bp() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    for layer in model[::2]:
        nn.init.xavier_uniform_(layer.weight)
        nn.init.zeros_(layer.bias)
    return model


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_()
    return torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)[0]


def fgsm(model, x, y, eps):
    return (x + eps * input_gradient(model, x, y).sign()).clamp(0, 1)


def pgd(model, x, y, eps, steps, generator):
    step_size = 2.5 * eps / steps
    adversarial = (x + eps * (2 * torch.rand(x.shape, generator=generator) - 1)).clamp(0, 1)
    for _ in range(steps):
        stepped = adversarial + step_size * input_gradient(model, adversarial, y).sign()
        adversarial = torch.minimum(torch.maximum(stepped, x - eps), x + eps).clamp(0, 1)
    return adversarial


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return sum(
            int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(EVAL_BATCH), y.split(EVAL_BATCH))
        ) / len(y)


def train_epoch(model, optimizer, schedule, x, y, generator) -> dict:
    permutation = torch.randperm(len(y), generator=generator)
    total_loss, correct, steps = 0.0, 0, len(y) // BATCH
    for step in range(steps):
        index = permutation[step * BATCH : (step + 1) * BATCH]
        xb, yb = x[index].requires_grad_(), y[index]
        optimizer.zero_grad(set_to_none=True)
        logits = model(xb)
        clean = F.cross_entropy(logits, yb)
        (ALPHA * clean).backward()  # the input gradient and the clean term's parameter gradient in one pass
        adversarial = (xb.detach() + TRAIN_EPS * xb.grad.sign()).clamp(0, 1)
        adversarial_loss = F.cross_entropy(model(adversarial), yb)
        ((1 - ALPHA) * adversarial_loss).backward()
        optimizer.step()
        schedule.step()
        total_loss += ALPHA * clean.item() + (1 - ALPHA) * adversarial_loss.item()
        correct += int((logits.argmax(1) == yb).sum())
    return {"train_loss": total_loss / steps, "train_accuracy": correct / (steps * BATCH)}


def per_image_stats(x: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    delta = perturbed - x
    return torch.stack(
        [delta.mean(1), delta.std(1, correction=0), delta.abs().amax(1), delta.square().sum(1).sqrt()], 1
    )


def evaluate(model, x, y, generator) -> dict:
    """Clean, FGSM, Gaussian and matched-Gaussian accuracy and perturbation statistics, batch by batch."""
    names = ("clean", "fgsm", "gaussian", "matched_gaussian")
    correct, stats = dict.fromkeys(names, 0), {name: torch.zeros(4) for name in names[1:]}
    for xb, yb in zip(x.split(EVAL_BATCH), y.split(EVAL_BATCH)):
        adversarial = fgsm(model, xb, yb, EVAL_EPS)
        delta = adversarial - xb
        mean, std = delta.mean(1, keepdim=True), delta.std(1, correction=0, keepdim=True)
        perturbed = {
            "clean": xb,
            "fgsm": adversarial,
            "gaussian": (xb + EVAL_SIGMA * torch.randn(xb.shape, generator=generator)).clamp(0, 1),
            "matched_gaussian": (xb + mean + std * torch.randn(xb.shape, generator=generator)).clamp(0, 1),
        }
        with torch.no_grad():
            logits = model(torch.cat([perturbed[name] for name in names])).split(len(yb))
        for name, out in zip(names, logits):
            correct[name] += int((out.argmax(1) == yb).sum())
            if name != "clean":
                stats[name] += per_image_stats(xb, perturbed[name]).sum(0)
    return {
        "accuracy": {name: c / len(y) for name, c in correct.items()},
        "perturbation_stats": {
            name: dict(zip(("mean", "std", "linf", "l2"), (s / len(y)).tolist())) for name, s in stats.items()
        },
    }


def main(argv):
    del argv
    if not _DATA_DIR.value:
        raise app.UsageError("set ADVJAX_DATA_DIR or --data_dir to MNIST's IDX files")
    torch.set_num_threads(_THREADS.value)
    generator = torch.Generator().manual_seed(_SEED.value)
    torch.manual_seed(_SEED.value)
    seconds = {"import": _IMPORTED - _START}
    start = time.perf_counter()
    data = load()
    seconds["data"] = time.perf_counter() - start

    start = time.perf_counter()
    model = bp()
    (x, y), (val_x, val_y) = data["train"], data["validation"]
    total_steps = EPOCHS * (len(y) // BATCH)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    cosine = lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
    held_out = val_x[-CHECK_EXAMPLES:], val_y[-CHECK_EXAMPLES:]
    epochs = []
    for epoch in range(1, EPOCHS + 1):
        record = {"epoch": epoch, **train_epoch(model, optimizer, schedule, x, y, generator)}
        record["validation_accuracy"] = accuracy(model, val_x, val_y)
        record["overfitting_check"] = {
            "fgsm": accuracy(model, fgsm(model, *held_out, TRAIN_EPS), held_out[1]),
            "pgd": accuracy(model, pgd(model, *held_out, TRAIN_EPS, CHECK_STEPS, generator), held_out[1]),
        }
        epochs.append(record)
    seconds["train"] = time.perf_counter() - start

    start = time.perf_counter()
    results = {split: evaluate(model, *(t[:n] for t in data[split]), generator) for split, n in EVAL_SIZES.items()}
    seconds["eval"] = time.perf_counter() - start
    seconds["total"] = time.perf_counter() - _START
    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "epochs": epochs,
                "accuracy": {split: r["accuracy"] for split, r in results.items()},
                "perturbation_stats": {split: r["perturbation_stats"] for split, r in results.items()},
                "seconds": seconds,
            }
        )
    )


if __name__ == "__main__":
    app.run(main)
