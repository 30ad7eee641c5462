"""advjax's AutoAttack stages against the reference (fra31/auto-attack, PyTorch), same model and images. Prints JSON.

    python bench/autoattack_reference.py --workdir=RUN --eps=0.1 [--num_examples=1000] [--version=standard|plus]
        [--reference_dir=/work/autoattack] [--attacks=apgd-ce,apgd-t,fab-t,square] [--reference_whole]
    python bench/autoattack_reference.py --workdir=RUN --eps=0.1 --version=rand --noise_sigma=0.5

RUN is a finished advjax run (`advjax.restore`); the images are the first
`num_examples` test images of its data (`advjax.data.load_mnist(config.data)`,
so set ADVJAX_DATA_DIR as for training). The reference is not part of this
repository: check it out anywhere and pass its directory, e.g.

    git --git-dir=<fetched bare repo> --work-tree=/work/autoattack checkout HEAD -- .
    pip install torch

1. The restored Flax params are copied into the same network in PyTorch
   (Dense kernels [in, out] -> Linear weights [out, in], conv kernels HWIO ->
   OIHW, NCHW input permuted to NHWC before flattening, as Flax flattens). The
   two models' logits on the images must agree to 1e-4, or the script prints
   the port's JSON and exits 1.
2. advjax runs `advjax.autoattack(logits_fn, images, labels, eps=eps, key=key,
   version=version, attacks_to_run=stages)` as a user calls it: each stage on the examples still
   robust (compacted), one compiled fold per attack family. It is called twice,
   with a persistent compilation cache in a fresh temporary directory: the first
   call compiles everything (cold), the second finds it all in the cache (warm).
3. The reference runs the same stages as `AutoAttack(model, norm='Linf',
   eps=eps, version=version, seed=0)`, one stage per `run_standard_evaluation`
   call (its `attacks_to_run` set to that stage) on the examples still robust:
   the cascade one standard call runs, with each stage's robust accuracy and
   time. `--reference_whole` also times one call over all the stages.
`difference_points` is advjax's robust accuracy minus the reference's, in points.

With `--version=rand` the model on both sides is randomised: the run's
network behind Gaussian noise of std `--noise_sigma` on its input (clipped to
[0, 1] where the run's `train.noise_clip` clipped its training noise), drawn
by torch.randn on the reference's side and from the key on advjax's. The two
sides draw different noise, so their robust accuracies agree only up to the
sampling error of one draw per verdict; and each reference call draws again at
the clean images (its clean check, then `perturb`'s), leaving unattacked the
examples a draw gets wrong, so the stage-by-stage figures count more of them
robust than one call does (`--reference_whole`). `bench/eot_reference.py`
compares the two attacks' strength itself.
"""

import contextlib
import datetime
import json
import os
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from advjax.auto_attack import VERSION_ATTACKS  # noqa: E402
from bench.common import import_reference, machine, randomised, torch_model  # noqa: E402

PORT_TOLERANCE = 1e-4

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished advjax run (advjax.restore).", required=True)
_EPS = flags.DEFINE_float("eps", 0.3, "L-inf radius, on images in [0, 1].")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 1000, "The first N test images.")
_REFERENCE_DIR = flags.DEFINE_string("reference_dir", "/work/autoattack", "A checkout of fra31/auto-attack.")
_VERSION = flags.DEFINE_enum("version", "standard", list(VERSION_ATTACKS), "AutoAttack's version, on both sides.")
_ATTACKS = flags.DEFINE_list("attacks", [], "Some of the version's stages, run in its order (empty: all of them).")
_BATCH = flags.DEFINE_integer("reference_batch_size", 1000, "The reference's batch size (bs).")
_SEED = flags.DEFINE_integer("seed", 0, "advjax's key and the reference's seed.")
_WHOLE = flags.DEFINE_bool("reference_whole", False, "Also time one reference call over all the stages.")
_THREADS = flags.DEFINE_integer("torch_threads", 2, "torch.set_num_threads.")
_NOISE = flags.DEFINE_float("noise_sigma", 0.0, "For --version=rand: the std of Gaussian noise on the model's input.")


# ----------------------------------------------------------------------------- advjax's side


def run_advjax(params, apply_fn, images, labels, eps: float, stages, noise_clip: bool) -> dict:
    """`advjax.autoattack` as a user calls it (compaction, the backend's loop form), twice: the first call
    compiles (a cold persistent cache), the second finds every executable in the cache."""
    import jax
    import jax.numpy as jnp

    import advjax
    from advjax import noise

    logits_fn = lambda x: apply_fn(params, x)
    if _VERSION.value == "rand":
        logits_fn = lambda x, key: apply_fn(params, noise.gaussian(key, x, _NOISE.value, clip=noise_clip))
    x, y = jnp.asarray(images), jnp.asarray(labels)
    calls = []
    for call in ("cold", "warm"):
        start = time.perf_counter()
        result = advjax.autoattack(
            logits_fn,
            x,
            y,
            eps=eps,
            key=jax.random.key(_SEED.value),
            version=_VERSION.value,
            attacks_to_run=stages,
            log=lambda line, call=call: print(f"advjax ({call} cache) {line}", file=sys.stderr, flush=True),
        )
        calls.append((time.perf_counter() - start, result))
    (cold, _), (warm, result) = calls
    return {
        "clean_accuracy": float(result.robust["clean"].mean()),
        "stages": [
            {
                "attack": stage,
                "robust_accuracy": float(result.robust[stage].mean()),
                "seconds_cold_cache": calls[0][1].seconds[stage],
                "seconds_warm_cache": result.seconds[stage],
            }
            for stage in stages
        ],
        "robust_accuracy": float(result.robust[stages[-1]].mean()),
        "total_seconds_cold_cache": cold,
        "total_seconds_warm_cache": warm,
        "max_linf_perturbation": float(jnp.max(jnp.abs(result.adversarial - x))),
        "flags": result.flags,
    }


# ----------------------------------------------------------------------------- the reference's side


def run_reference(autoattack, model, images_nchw, labels, eps: float, stages) -> dict:
    import torch

    x, y = torch.from_numpy(images_nchw), torch.from_numpy(labels.astype(np.int64))
    adversary = autoattack.AutoAttack(
        model, norm="Linf", eps=eps, version=_VERSION.value, seed=_SEED.value, verbose=False, device="cpu"
    )
    with torch.no_grad():
        robust = (model(x).argmax(1) == y).numpy()
    result = {"clean_accuracy": float(robust.mean()), "stages": []}
    max_perturbation = 0.0
    for stage in stages:
        indices = np.flatnonzero(robust)
        start = time.perf_counter()
        if len(indices):
            adversary.attacks_to_run = [stage]
            with contextlib.redirect_stdout(sys.stderr):  # the reference prints its checks' warnings
                adversarial = adversary.run_standard_evaluation(x[indices], y[indices], bs=_BATCH.value)
            with torch.no_grad():
                robust[indices] = (model(adversarial).argmax(1) == y[indices]).numpy()
            max_perturbation = max(max_perturbation, float((adversarial - x[indices]).abs().max()))
        seconds = time.perf_counter() - start
        print(f"reference {stage}: {seconds:.1f}s, robust {robust.mean():.3f}", file=sys.stderr, flush=True)
        result["stages"].append({"attack": stage, "robust_accuracy": float(robust.mean()), "seconds": seconds})
    result["robust_accuracy"] = float(robust.mean())
    result["total_seconds"] = sum(s["seconds"] for s in result["stages"])
    result["max_linf_perturbation"] = max_perturbation
    if _WHOLE.value:
        adversary.attacks_to_run = list(stages)
        start = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            adversarial = adversary.run_standard_evaluation(x, y, bs=_BATCH.value)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            accuracy = float((model(adversarial).argmax(1) == y).numpy().mean())
        result["whole_call"] = {"robust_accuracy": accuracy, "seconds": seconds}
    return result


# ----------------------------------------------------------------------------- main


def points(fraction: float) -> float:
    return round(100 * fraction, 6)


def main(argv):
    del argv
    every = VERSION_ATTACKS[_VERSION.value]
    stages = [s for s in every if s in _ATTACKS.value] if _ATTACKS.value else list(every)
    if _ATTACKS.value and len(stages) != len(_ATTACKS.value):
        sys.exit(f"--attacks={','.join(_ATTACKS.value)}: each must be one of {every}, named once")
    if (_VERSION.value == "rand") != (_NOISE.value > 0):
        sys.exit("--version=rand attacks a randomised model, and needs --noise_sigma > 0; other versions need none")
    autoattack = import_reference(_REFERENCE_DIR.value)
    import jax
    import torch

    import advjax
    from advjax import data

    torch.set_num_threads(_THREADS.value)
    cache = tempfile.mkdtemp(prefix="advjax-bench-cache-")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    config, params, apply_fn, epochs = advjax.restore(_WORKDIR.value)
    if config.num_seeds > 1:  # params lead with a seed axis: take seed 0's
        params = jax.tree_util.tree_map(lambda p: p[0], params)
    test = data.load_mnist(config.data).test
    n = _NUM_EXAMPLES.value
    images = test.images[:n].astype(np.float32) / 255.0  # as data.to_float_images
    labels = np.asarray(test.labels[:n], np.int32)
    images_nchw = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    model = torch_model(config.model.name, jax.device_get(params))

    with torch.no_grad():
        torch_logits = model(torch.from_numpy(images_nchw)).numpy()
    jax_logits = np.asarray(jax.jit(apply_fn)(params, images))
    port_difference = float(np.max(np.abs(torch_logits - jax_logits)))
    output = {
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "reference_dir": os.path.abspath(_REFERENCE_DIR.value),
        "workdir": os.path.abspath(_WORKDIR.value),
        "model": config.model.name,
        "epoch": epochs[0],
        "eps": _EPS.value,
        "num_examples": len(labels),
        "version": _VERSION.value,
        "attacks": stages,
        "port_max_logit_difference": port_difference,
        "port_predictions_differ": int(np.sum(torch_logits.argmax(1) != jax_logits.argmax(1))),
    }
    if not port_difference <= PORT_TOLERANCE:
        output["error"] = f"the PyTorch port's logits differ from advjax's by {port_difference:.3g} > {PORT_TOLERANCE}"
        print(json.dumps(output, indent=2))
        sys.exit(1)

    noise_clip = bool(config.train.get("noise_clip", False))
    output.update(noise_sigma=_NOISE.value, noise_clip=noise_clip)
    ours = run_advjax(params, apply_fn, images, labels, _EPS.value, stages, noise_clip)
    if _NOISE.value > 0:
        model = randomised(model, _NOISE.value, noise_clip)
    reference = run_reference(autoattack, model, images_nchw, labels, _EPS.value, stages)
    by_stage = {s["attack"]: s for s in reference["stages"]}
    for stage in ours["stages"]:
        if "skipped" not in stage:
            stage["difference_points"] = points(stage["robust_accuracy"] - by_stage[stage["attack"]]["robust_accuracy"])
    difference = points(ours["robust_accuracy"] - reference["robust_accuracy"])
    output.update(
        advjax=ours,
        reference=reference,
        difference_points=difference,
        within_half_a_point=abs(difference) <= 0.5,
    )
    print(json.dumps(output, indent=2))


if __name__ == "__main__":
    app.run(main)
