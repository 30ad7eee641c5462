"""advjax's EoT APGD (AutoAttack's rand version) against the reference's, on one randomised model. Prints JSON.

    python bench/eot_reference.py --workdir=RUN --eps=0.1 --noise_sigma=1.0 [--num_examples=1000] [--loss=ce]
        [--draws=200] [--reference_dir=/work/autoattack]

The model is the run's network behind Gaussian noise of std `noise_sigma` on
its input (clipped where the run's training clipped its noise), as in
`bench/autoattack_reference.py --version=rand`. One attack run on each side
on the same images: `advjax.eot.make_apgd_eot` (100 steps, 20 draws per
gradient) and the reference's `APGDAttack(..., eot_iter=20).attack_single_run`
(fra31/auto-attack). The two draw different noise, so single verdicts cannot
be compared example by example; what can be is the strength of the points
each returns:

- `expected_accuracy`: the accuracy at each side's points (its fooling point
  where one was found, the clean image elsewhere), averaged over `draws` fresh
  draws of the same JAX model, so both sides are judged by the same noise;
- `one_draw_cascade`: the robust accuracy as advjax's cascade counts it (a
  clean draw, then one draw at the returned point for every example still
  correct), and as the reference's `run_standard_evaluation` with `perturb`
  counts it (`perturb` draws once more at the clean image and leaves examples
  that draw wrong unattacked, so the final draw judges the clean image there),
  both from the same three draws.
"""

import datetime
import json
import os
import sys
import time

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import import_reference, machine, randomised, torch_model  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished advjax run (advjax.restore).", required=True)
_EPS = flags.DEFINE_float("eps", 0.1, "L-inf radius, on images in [0, 1].")
_SIGMA = flags.DEFINE_float("noise_sigma", 1.0, "The std of the Gaussian noise on the model's input.")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 1000, "The first N test images.")
_LOSS = flags.DEFINE_enum("loss", "ce", ["ce", "dlr"], "APGD's loss.")
_DRAWS = flags.DEFINE_integer("draws", 200, "Fresh draws per point for the expected accuracy.")
_REFERENCE_DIR = flags.DEFINE_string("reference_dir", "/work/autoattack", "A checkout of fra31/auto-attack.")
_THREADS = flags.DEFINE_integer("torch_threads", 2, "torch.set_num_threads.")


def main(argv):
    del argv
    if not _SIGMA.value > 0:
        sys.exit(f"--noise_sigma={_SIGMA.value} must be positive: the model must be randomised")
    import_reference(_REFERENCE_DIR.value)
    import jax
    import jax.numpy as jnp
    import torch
    from autoattack.autopgd_base import APGDAttack

    import advjax
    from advjax import data, eot, iterative, noise

    torch.set_num_threads(_THREADS.value)
    config, params, apply_fn, epochs = advjax.restore(_WORKDIR.value)
    if config.num_seeds > 1:
        params = jax.tree_util.tree_map(lambda p: p[0], params)
    clip = bool(config.train.get("noise_clip", False))
    test = data.load_mnist(config.data).test
    images = test.images[: _NUM_EXAMPLES.value].astype(np.float32) / 255.0
    labels = np.asarray(test.labels[: _NUM_EXAMPLES.value], np.int32)
    sigma = _SIGMA.value
    keyed = lambda x, key: apply_fn(params, noise.gaussian(key, x, sigma, clip=clip))
    correct = jax.jit(lambda x, key: jnp.argmax(keyed(x, key), -1) == labels)
    draw = lambda x, key: np.asarray(correct(jnp.asarray(x), key))

    attack = eot.make_apgd_eot(keyed, _EPS.value, loss=_LOSS.value)
    arguments = (jnp.asarray(images), jnp.asarray(labels), jax.random.key(0))
    start = time.perf_counter()
    run = jax.jit(lambda x, y, k: iterative.run_steps(attack, attack.init(x, y, k))).lower(*arguments).compile()
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    state = jax.block_until_ready(run(*arguments))
    ours_seconds = time.perf_counter() - start
    ours = np.where(np.asarray(state.attack.fooled)[:, None, None, None], state.attack.fooling_point, images)

    reference = APGDAttack(
        randomised(torch_model(config.model.name, jax.device_get(params)), sigma, clip),
        n_restarts=1, n_iter=100, eps=_EPS.value, norm="Linf", eot_iter=20, rho=0.75, loss=_LOSS.value, seed=0,
        device="cpu",
    )  # fmt: skip
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    reference.init_hyperparam(x)
    start = time.perf_counter()
    _, still_correct, _, adversarial = reference.attack_single_run(x, torch.from_numpy(labels.astype(np.int64)))
    reference_seconds = time.perf_counter() - start
    theirs = adversarial.detach().numpy().transpose(0, 2, 3, 1)
    theirs = np.where((still_correct == 0).numpy()[:, None, None, None], theirs, images)

    base = jax.random.key(12345)
    keys = [jax.random.fold_in(base, i) for i in range(_DRAWS.value + 3)]
    clean, recheck = draw(images, keys[-3]), draw(images, keys[-2])  # keys[-1] draws the verdicts

    def summary(points, fooled_at_some_step, seconds):
        expected = np.mean([draw(points, k) for k in keys[: _DRAWS.value]], axis=0)
        attacked = np.where(recheck[:, None, None, None], points, images)
        return {
            "fooled_at_some_step": float(np.mean(fooled_at_some_step)),
            "expected_accuracy": float(expected.mean()),
            "one_draw_cascade": {
                "every_example_attacked": float(np.mean(clean & draw(points, keys[-1]))),
                "unattacked_where_a_clean_redraw_errs": float(np.mean(clean & draw(attacked, keys[-1]))),
            },
            "seconds": seconds,
        }

    print(
        json.dumps(
            {
                "machine": machine(),
                "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "jax": jax.__version__,
                "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(),
                "workdir": os.path.abspath(_WORKDIR.value),
                "model": config.model.name,
                "epoch": epochs[0],
                "eps": _EPS.value,
                "noise_sigma": sigma,
                "noise_clip": clip,
                "loss": _LOSS.value,
                "num_examples": len(labels),
                "draws": _DRAWS.value,
                "clean_expected_accuracy": float(np.mean([draw(images, k) for k in keys[: _DRAWS.value]])),
                "clean_one_draw": float(clean.mean()),
                "advjax": {
                    **summary(ours, np.asarray(state.attack.fooled), ours_seconds),
                    "compile_seconds": compile_seconds,
                },
                "reference": summary(theirs, (still_correct == 0).numpy(), reference_seconds),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    app.run(main)
