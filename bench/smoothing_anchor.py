"""The published MNIST certificates, read on the images and at the sample count of advjax's CPU table. Prints JSON.

    python bench/smoothing_anchor.py --log=LOG --sigma=1.0 [--first=500] [--n=10000] [--draws=20]

LOG is one of the certification logs published with Jeong & Shin (2020), in the
repository jh-jeong/smoothing-consistency under data/certify/mnist/ (for instance
`cohen/noise_1.00_5510`, Cohen et al.'s LeNet, or
`consistency/cohen/num_2/lbd_5.0/eta_0.5/noise_1.00_0`): tab-separated idx,
label, predict, radius and correct for all 10,000 test images, certified with
n = 100,000 (`--log_n`) estimation samples at alpha = 0.001.

advjax's CPU table certifies only the first 500 test images at n = 10,000, so
its rows and the logs' all-image figures differ in two ways besides the model.
The script reports the log:

- as published: all images, and the first `--first` by idx;
- re-estimated at `--n` samples: each certified image's count of its class is
  recovered from its radius (the count out of `--log_n` whose Clopper-Pearson
  bound gives the radius, `advjax.smoothing.lower_confidence_bound`), its
  probability set to count / log_n, and `--draws` fresh binomial counts of `--n`
  samples certify it again. The class is the logged one (CERTIFY's selection
  with n0 = 100 samples is unchanged); an abstention stays one. The mean and
  standard deviation over the draws are reported.

The logs round radii to three significant digits, which moves a recovered
count by up to about 0.1% of log_n (86 of 100,000 at a radius of 1.26 with
sigma 1.0): about one count at n = 10,000.
"""

import argparse
import json

import numpy as np
from scipy import stats

from advjax import smoothing
from configs import default

RADII = np.array(default.get_config().certify.radii)  # the radii of advjax's certification table


def read_log(path: str) -> dict[str, np.ndarray]:
    """The log's columns: idx, label, predict (-1 abstains), radius and correct."""
    with open(path) as f:
        header = f.readline().split()
        rows = [line.split("\t") for line in f if line.strip()]
    if header[:5] != ["idx", "label", "predict", "radius", "correct"]:
        raise ValueError(f"{path} is not a certification log: its header is {header}")
    columns = {name: np.array([row[i] for row in rows]) for i, name in enumerate(header[:5])}
    return {name: values.astype(float if name == "radius" else int) for name, values in columns.items()}


def recovered_counts(radius: np.ndarray, sigma: float, n: int, alpha: float) -> np.ndarray:
    """For each radius, the count out of n whose lower confidence bound gives it (nearest on the Phi scale)."""
    candidates = np.arange(n // 2, n + 1)
    bounds = stats.norm.ppf(smoothing.lower_confidence_bound(candidates, n, alpha))
    target = radius / sigma
    above = np.clip(np.searchsorted(bounds, target), 1, len(candidates) - 1)
    nearer_below = np.abs(bounds[above - 1] - target) < np.abs(bounds[above] - target)
    return candidates[above - nearer_below]


def scores(prediction: np.ndarray, radius: np.ndarray, labels: np.ndarray) -> dict:
    certificate = smoothing.Certificate(prediction, np.where(prediction >= 0, radius, 0.0), np.zeros_like(radius))
    return {
        "certified_accuracy": smoothing.certified_accuracy(certificate, labels, RADII).round(4).tolist(),
        "acr": round(smoothing.average_certified_radius(certificate, labels), 4),
        "abstained": round(float((prediction < 0).mean()), 4),
    }


def reestimated(log: dict, keep: np.ndarray, args: argparse.Namespace) -> dict:
    """Scores of the kept images certified again with args.n samples, mean and std over args.draws."""
    prediction, labels = log["predict"][keep], log["label"][keep]
    probability = recovered_counts(log["radius"][keep], args.sigma, args.log_n, args.alpha) / args.log_n
    rng = np.random.default_rng(args.seed)
    draws = []
    # CERTIFY's statistics on two columns: the logged class (column 0, always selected) and the rest.
    selection = np.tile([1, 0], (len(prediction), 1))
    for _ in range(args.draws):
        counts = rng.binomial(args.n, probability)
        estimation = np.stack([counts, args.n - counts], axis=1)
        cert = smoothing.certificate_from_counts(selection, estimation, sigma=args.sigma, n=args.n, alpha=args.alpha)
        certified = (prediction >= 0) & (cert.prediction == 0)
        draws.append(scores(np.where(certified, prediction, smoothing.ABSTAIN), cert.radius, labels))
    mean = lambda name: np.mean([d[name] for d in draws], axis=0).round(4).tolist()
    std = lambda name: np.std([d[name] for d in draws], axis=0).round(4).tolist()
    return {name: mean(name) for name in draws[0]} | {f"{name}_std": std(name) for name in draws[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--log", required=True)
    parser.add_argument("--sigma", type=float, required=True)
    parser.add_argument("--first", type=int, default=500, help="the first images by idx, as advjax's table")
    parser.add_argument("--n", type=int, default=10_000, help="estimation samples to re-estimate at")
    parser.add_argument("--log_n", type=int, default=100_000, help="the log's estimation samples")
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.sigma <= 0 or args.first < 1 or args.n < 1 or args.draws < 1:
        parser.error("--sigma, --first, --n and --draws must be positive")
    log = read_log(args.log)
    subsets = {"all": np.ones_like(log["idx"], bool), f"first_{args.first}": log["idx"] < args.first}
    result = {"log": args.log, "sigma": args.sigma, "alpha": args.alpha, "radii": RADII.tolist()}
    for name, keep in subsets.items():
        result[name] = {
            "images": int(keep.sum()),
            f"n_{args.log_n}": scores(log["predict"][keep], log["radius"][keep], log["label"][keep]),
            f"n_{args.n}": reestimated(log, keep, args),
        }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
