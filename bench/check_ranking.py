"""How well the per-epoch overfitting check ranks epochs: PGD or APGD-CE, beside a strong reference. Prints JSON.

    python bench/check_ranking.py --workdir=RUN [--num_examples=500] [--checks=pgd:10,apgd_ce:25,apgd_ce:50]

RUN is a finished advjax run that kept every epoch's checkpoint
(`--config.train.checkpoints_to_keep` at least `train.epochs`). For each epoch
the script restores its params (`advjax.restore(RUN, epoch=e)`) and measures,
on the held-out images the check uses (`overfitting.held_out_set`: the last
`num_examples` validation images):

- each check in `--checks` (`overfitting.make_check`, the function training
  calls each epoch), as `attack:steps`;
- the reference: AutoAttack's APGD-CE then APGD-T (`advjax.autoattack` with
  `attacks_to_run=("apgd-ce", "apgd-t")`, 100 steps, the cascade's first two
  stages), or the whole standard cascade with `--full_autoattack`.

It reports, per check, the Spearman rank correlation of its accuracies with the
reference's over the epochs, the epoch it would keep (`overfitting.best_epochs`:
the latest of the highest), the reference's accuracy at that epoch, and the
reference's best; and how far each check's accuracy sits above the reference's.
"""

import datetime
import json
import os
import platform
import sys
import time

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished run with every epoch's checkpoint.", required=True)
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 500, "The last N validation images, as the check takes them.")
_CHECKS = flags.DEFINE_list("checks", ["pgd:10", "apgd_ce:25", "apgd_ce:50"], "Checks as attack:steps.")
_FULL = flags.DEFINE_bool("full_autoattack", False, "The reference is the whole standard cascade.")
_SEED = flags.DEFINE_integer("seed", 0, "The checks' and the reference's key.")


def spearman(a, b) -> float:
    """Spearman's rank correlation (average ranks for ties), from scipy."""
    from scipy import stats

    return float(stats.spearmanr(a, b).statistic)


def main(argv):
    del argv
    import jax

    import advjax
    from advjax import data, overfitting

    checks = [(name, int(steps)) for name, steps in (c.split(":") for c in _CHECKS.value)]
    config, *_ = advjax.restore(_WORKDIR.value)
    epochs = list(range(1, config.train.epochs + 1))
    mnist = data.load_mnist(config.data)
    held_out = overfitting.held_out_set(mnist.validation, _NUM_EXAMPLES.value, _NUM_EXAMPLES.value)
    n = min(_NUM_EXAMPLES.value, len(mnist.validation.labels))
    images = data.to_float_images(jax.numpy.asarray(mnist.validation.images[-n:]))
    labels = jax.numpy.asarray(mnist.validation.labels[-n:])
    stages = ("apgd-ce", "apgd-t", "fab-t", "square") if _FULL.value else ("apgd-ce", "apgd-t")
    key = jax.random.key(_SEED.value)
    rows, start = [], time.perf_counter()
    for epoch in epochs:
        _, params, apply_fn, _ = advjax.restore(_WORKDIR.value, epoch=epoch)
        row = {"epoch": epoch}
        for name, steps in checks:
            check = overfitting.make_check(apply_fn, config.train.eps, steps, attack=name)
            row[f"{name}:{steps}"] = float(check(params, held_out, key)[name])
        result = advjax.autoattack(
            lambda x, p=params, f=apply_fn: f(p, x),
            images,
            labels,
            eps=config.train.eps,
            key=key,
            attacks_to_run=stages,
        )
        row["reference"] = float(result.robust[stages[-1]].mean())
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    reference = np.array([r["reference"] for r in rows])
    summary = {}
    for name, steps in checks:
        label = f"{name}:{steps}"
        values = np.array([r[label] for r in rows])
        kept = int(len(values) - np.argmax(values[::-1]))  # overfitting.best_epochs' rule: the latest of the highest
        summary[label] = {
            "spearman_with_reference": spearman(values, reference),
            "kept_epoch": kept,
            "reference_at_kept_epoch": float(reference[kept - 1]),
            "mean_points_above_reference": float(100 * np.mean(values - reference)),
        }
    output = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "workdir": os.path.abspath(_WORKDIR.value),
        "model": config.model.name,
        "eps": config.train.eps,
        "num_examples": n,
        "reference": "AutoAttack standard" if _FULL.value else "AutoAttack's APGD-CE then APGD-T (100 steps)",
        "reference_best_epoch": int(len(reference) - np.argmax(reference[::-1])),
        "reference_best": float(reference.max()),
        "epochs": rows,
        "checks": summary,
        "seconds": time.perf_counter() - start,
    }
    print(json.dumps(output, indent=2))


if __name__ == "__main__":
    app.run(main)
