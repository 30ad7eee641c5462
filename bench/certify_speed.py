"""Randomized smoothing's sampling: advjax's compiled fold against per-image, per-batch Python loops. Prints JSON.

    python bench/certify_speed.py [--model=bp] [--num_images=100] [--n=10000] [--n0=100]
        [--batch=50] [--chunk_size=50] [--loop_batch=1000] [--torch_threads=2] [--workdir=RUN]

Each method runs CERTIFY's sampling (n0 selection and n estimation samples per
image at sigma) on the first `num_images` test images, through the clipping
base classifier of advjax/certify_report.py:

1. **advjax**: `certify_report.certify_images`, `batch` images per compiled
   `lax.scan` over chunks of `chunk_size` samples per image (only counts leave
   the device). Called twice: cold (compiling) and warm.
2. **jax_loop**: (compiled before it is timed) the plain loop of Cohen et al.'s `certify.py`, one image at a
   time and `loop_batch` samples per call of a jitted forward pass, the votes
   counted on the host. It draws the same noise as advjax (sample s of image i
   from fold_in(fold_in(key, i), s)), so its counts must equal advjax's: the
   script checks that and exits 1 otherwise.
3. **torch_loop**: Cohen et al.'s `Smooth._sample_noise` in PyTorch eager
   (`torch.randn_like` noise, `loop_batch` samples per forward pass), on the same
   weights copied into PyTorch (bench/autoattack_reference.py's port), with the
   input clamped to [0, 1] as advjax's base classifier does.

The model is the `--workdir` run's restored params, or else a freshly initialised
network of `--model` (the forward passes cost the same). Set ADVJAX_DATA_DIR as
for training.
"""

import json
import os
import sys
import time

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_MODEL = flags.DEFINE_enum("model", "bp", ["bp", "cnn", "small_cnn"], "The network, when no --workdir is given.")
_WORKDIR = flags.DEFINE_string("workdir", None, "A finished advjax run to restore instead.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 100, "The first N test images.")
_N = flags.DEFINE_integer("n", 10_000, "Estimation samples per image.")
_N0 = flags.DEFINE_integer("n0", 100, "Selection samples per image.")
_SIGMA = flags.DEFINE_float("sigma", 0.5, "The noise's std.")
_BATCH = flags.DEFINE_integer("batch", 50, "advjax: images per sampling pass (config.certify.batch).")
_CHUNK = flags.DEFINE_integer("chunk_size", 50, "advjax: samples per image per forward pass.")
_LOOP_BATCH = flags.DEFINE_integer("loop_batch", 1000, "The loops: samples per forward pass (Cohen et al.'s 1000).")
_THREADS = flags.DEFINE_integer("torch_threads", 2, "torch.set_num_threads.")
_SKIP_TORCH = flags.DEFINE_bool("skip_torch", False, "Leave out the PyTorch loop.")


def model_and_params():
    """(model name, apply_fn in eval mode, params): restored from --workdir, or freshly initialised."""
    import jax

    import advjax
    from advjax import models, train
    from configs import default

    if _WORKDIR.value:
        config, params, apply_fn, _ = advjax.restore(_WORKDIR.value)
        return config.model.name, apply_fn, params
    config = default.get_config().model
    config.name = _MODEL.value
    model = models.build_model(config)
    return _MODEL.value, models.eval_apply(model.apply), train.init_params(jax.random.key(0), model)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def advjax_counts(logits_fn, images, key, num_samples: int) -> np.ndarray:
    """advjax's fold over `batch`-image passes: counts [N, C] as certify_report batches and keys them."""
    from advjax import certify_report, smoothing

    parts = []
    for b, start in enumerate(range(0, images.shape[0], _BATCH.value)):
        batch = certify_report._padded(images[start : start + _BATCH.value], _BATCH.value)
        counts = smoothing.class_counts(
            logits_fn,
            batch,
            certify_report.batch_key(key, b),
            sigma=_SIGMA.value,
            num_samples=num_samples,
            chunk_size=min(_CHUNK.value, num_samples),
        )
        parts.append(np.asarray(counts)[: min(_BATCH.value, images.shape[0] - start)])
    return np.concatenate(parts)


def jax_loop_counts(logits_fn, images, key, num_samples: int) -> np.ndarray:
    """One image at a time, `loop_batch` samples per jitted forward pass, votes counted on the host."""
    import jax
    import jax.numpy as jnp

    from advjax import certify_report, smoothing

    @jax.jit
    def votes(image, image_key, sample_ids):
        noise = smoothing._noise(image_key[None], sample_ids, image.shape, _SIGMA.value, image.dtype)[0]
        return jnp.argmax(logits_fn(image[None] + noise), axis=-1)

    counts = None
    for i in range(images.shape[0]):
        b, within = divmod(i, _BATCH.value)
        image_key = jax.random.fold_in(certify_report.batch_key(key, b), within)  # advjax's key for this image
        image_counts = None
        for start in range(0, num_samples, _LOOP_BATCH.value):
            ids = jnp.arange(start, min(start + _LOOP_BATCH.value, num_samples))
            predicted = np.asarray(votes(images[i], image_key, ids))
            found = np.bincount(predicted, minlength=10)
            image_counts = found if image_counts is None else image_counts + found
        counts = image_counts[None] if counts is None else np.concatenate([counts, image_counts[None]])
    return counts


def torch_loop_counts(torch_model, images: np.ndarray, num_samples: int) -> np.ndarray:
    """Cohen et al.'s _sample_noise: per image, batches of `loop_batch` copies plus randn_like noise."""
    import torch

    counts = np.zeros((images.shape[0], 10), np.int64)
    with torch.no_grad():
        for i, image in enumerate(torch.from_numpy(images).permute(0, 3, 1, 2)):
            remaining = num_samples
            while remaining > 0:
                size = min(_LOOP_BATCH.value, remaining)
                remaining -= size
                batch = image.repeat((size, 1, 1, 1))
                noisy = (batch + torch.randn_like(batch) * _SIGMA.value).clamp(0, 1)
                counts[i] += np.bincount(torch_model(noisy).argmax(1).numpy(), minlength=10)
    return counts


def main(argv):
    del argv
    import jax

    from advjax import certify_report, data
    from bench.common import machine, torch_model
    from configs import default

    name, apply_fn, params = model_and_params()
    mnist = data.load_mnist(default.get_config().data)
    images, _ = certify_report.examples(mnist.test, _NUM_IMAGES.value)
    logits_fn = certify_report.base_classifier(apply_fn, params)
    key = jax.random.key(0)
    samples = images.shape[0] * (_N0.value + _N.value)
    result = {"machine": machine(), "jax": jax.__version__, "backend": jax.default_backend(), "model": name}
    result |= {"num_images": int(images.shape[0]), "n0": _N0.value, "n": _N.value, "sigma": _SIGMA.value}
    result |= {"batch": _BATCH.value, "chunk_size": _CHUNK.value, "loop_batch": _LOOP_BATCH.value, "samples": samples}

    def both(counts_fn):
        return [counts_fn(logits_fn, images, key, m) for m in (_N0.value, _N.value)]

    ours, cold = timed(lambda: both(advjax_counts))
    ours, warm = timed(lambda: both(advjax_counts))
    [jax_loop_counts(logits_fn, images[:1], key, m) for m in (_N0.value, _N.value)]  # its compilations, untimed
    loop, loop_seconds = timed(lambda: both(jax_loop_counts))
    result["seconds"] = {"advjax_cold": cold, "advjax_warm": warm, "jax_loop": loop_seconds}
    result["counts_equal"] = all(np.array_equal(a, b) for a, b in zip(ours, loop))
    if not _SKIP_TORCH.value:
        import torch

        torch.set_num_threads(_THREADS.value)
        torch.manual_seed(0)
        port = torch_model(name, jax.device_get(params))
        host = np.asarray(images)
        torch_counts, torch_seconds = timed(lambda: [torch_loop_counts(port, host, m) for m in (_N0.value, _N.value)])
        result["torch"] = torch.__version__
        result["seconds"]["torch_loop"] = torch_seconds
        # Different noise, so the counts differ; the top class's share should not, by more than sampling error.
        result["top_share"] = {
            "advjax": float(ours[1].max(axis=1).mean() / _N.value),
            "torch_loop": float(torch_counts[1].max(axis=1).mean() / _N.value),
        }
    result["samples_per_second"] = {k: samples / v for k, v in result["seconds"].items()}
    result["speedup_over"] = {
        k: v / warm for k, v in result["seconds"].items() if k not in ("advjax_cold", "advjax_warm")
    }
    print(json.dumps(result, indent=1))
    if not result["counts_equal"]:
        sys.exit("advjax's counts differ from the JAX loop's on the same noise")


if __name__ == "__main__":
    app.run(main)
