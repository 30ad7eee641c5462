"""Results for people: Markdown and CSV tables, and figures (written atomically, advjax.workdir)."""

import os
from collections.abc import Sequence
from typing import Any

from advjax import smoothing
from advjax.files import write_bytes

SPLITS = ("train", "validation", "test")


def accuracy_table(accuracy: dict[str, dict[str, float]], sizes: dict[str, int] | None = None) -> str:
    """Markdown table: one row per split, one column per perturbation; with `sizes`, each split's image count.

    >>> print(accuracy_table(summary["accuracy"], summary["eval_sizes"]))
    """
    splits = [s for s in SPLITS if s in accuracy] + [s for s in accuracy if s not in SPLITS]
    columns = list(next(iter(accuracy.values())))
    counted = sizes is not None
    lines = [
        "| split | " + ("images | " if counted else "") + " | ".join(columns) + " |",
        "|---|" + ("---:|" if counted else "") + "---:|" * len(columns),
    ]
    for split in splits:
        count = f"{sizes[split]} | " if counted else ""
        lines.append(f"| {split} | {count}" + " | ".join(f"{accuracy[split][c]:.4f}" for c in columns) + " |")
    return "\n".join(lines)


def _attack_name(name: str, attack: dict) -> str:
    if attack["num_steps"] <= 1 and attack["num_restarts"] <= 1:
        return name
    return f"{name}-{attack['num_steps']} x {attack['num_restarts']}"


def _autoattack_rows(autoattack: dict) -> list[tuple]:
    """One row per AutoAttack stage: the robust accuracy after it and every stage before it (cumulative)."""
    budget = f"{autoattack['version']}, {autoattack['num_steps']} steps, {autoattack['num_queries']} queries"
    stages = list(autoattack["stages"])
    names = [f"autoattack ({budget}): {stages[0]}"] + [f"autoattack: {stages[0]} to {stage}" for stage in stages[1:]]
    return [
        (
            name,
            autoattack["norm"],
            autoattack["num_examples"],
            autoattack["eps"],
            autoattack["stages"][stage]["accuracy"],
        )
        for name, stage in zip(names, stages)
    ]


def autoattack_flags(autoattack: dict) -> str:
    """AutoAttack's flags, one line each naming seed and eps (empty when none).

    >>> print(autoattack_flags(summary["robustness"]["autoattack"]))
    """
    return "\n".join(
        f"AutoAttack flag (seed {f['seed']}, eps {', '.join(f'{e:g}' for e in f['eps'])}): {f['flag']}"
        for f in autoattack["flags"]
    )


def robustness_table(robustness: dict) -> str:
    """Markdown table of the robustness report: accuracy per attack and eps, AutoAttack's cumulative stages,
    then the worst case per norm, each row with its image count; AutoAttack's flags follow the table.

    >>> print(robustness_table(summary["robustness"]))
    """
    rows, count = [], robustness["num_examples"]
    for name, attack in robustness["attacks"].items():
        rows.append(
            (_attack_name(name, attack), attack["norm"], attack["num_examples"], attack["eps"], attack["accuracy"])
        )
    if "autoattack" in robustness:
        rows += _autoattack_rows(robustness["autoattack"])
    for norm, worst in robustness["worst_case"].items():
        rows.append((f"worst case over {', '.join(worst['over'])}", norm, count, worst["eps"], worst["accuracy"]))
    lines = ["| attack | norm | images | accuracy at eps |", "|---|---|---:|---|"]
    for name, norm, images, grid, accuracy in rows:
        cells = ", ".join(f"{a:.4f} @ {e:g}" for e, a in zip(grid, accuracy))
        lines.append(f"| {name} | {norm} | {images} | {cells} |")
    flags = autoattack_flags(robustness["autoattack"]) if "autoattack" in robustness else ""
    return "\n".join(lines) + (f"\n\n{flags}" if flags else "")


def certification_table(certification: dict) -> str:
    """Markdown table of randomized smoothing's certificates: per sigma, its image count, the certified accuracy
    at each L2 radius, the average certified radius (ACR) and the share of images abstained on (means over seeds).

    >>> print(certification_table(summary["certification"]))
    """
    radii, count = certification["radii"], certification["num_examples"]
    header = ["sigma", "images", *(f"r = {r:g}" for r in radii), "ACR", "abstained"]
    rows = [
        [f"{float(sigma):g}", count, *(f"{a:.4f}" for a in entry["certified_accuracy"]["accuracy"])]
        + [f"{entry['acr']:.3f}", f"{entry['abstention_rate']:.4f}"]
        for sigma, entry in certification["by_sigma"].items()
    ]
    return markdown_table(header, rows)


def stats_table(perturbation_stats: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown table of the mean per-image perturbation statistics, after clipping."""
    lines = ["| split | perturbation | mean | std | L-inf | L2 |", "|---|---|---:|---:|---:|---:|"]
    for split, by_perturbation in perturbation_stats.items():
        for name, s in by_perturbation.items():
            lines.append(f"| {split} | {name} | {s['mean']:+.4f} | {s['std']:.4f} | {s['linf']:.4f} | {s['l2']:.3f} |")
    return "\n".join(lines)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    quote = lambda c: f'"{c}"' if any(ch in str(c) for ch in ',"\n') else str(c)
    return "\n".join(",".join(quote(c) for c in row) for row in [header, *rows]) + "\n"


# Figures. Matplotlib is imported inside each function so that the library and
# the tests that never plot do not pay for it, and so a headless machine needs
# no display (the Agg backend is selected explicitly).


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    import io

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=120, format=os.path.splitext(path)[1][1:] or "png")
    _pyplot().close(fig)
    write_bytes(path, buffer.getvalue())


def plot_digits(images, labels, path: str, columns: int = 8) -> None:
    """Figure 1: a grid of sample digits with their labels."""
    plt = _pyplot()
    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.1, rows * 1.25))
    for ax, image, label in zip(axes.flat, images, labels):
        ax.imshow(image.squeeze(), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"label {label}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("Figure 1. MNIST digits (training split)")
    _save(fig, path)


def plot_noise_ladder(noisy_images, sigmas: Sequence[float], path: str) -> None:
    """Figure 3: one digit under Gaussian noise of increasing std (before clipping)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(sigmas), figsize=(1.6 * len(sigmas), 2.0))
    for ax, image, sigma in zip(axes, noisy_images, sigmas):
        ax.imshow(image.squeeze(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"σ = {sigma:g}", fontsize=9)
        ax.axis("off")
    fig.suptitle("Figure 3. Gaussian noise of increasing std, clipped to [0, 1]")
    _save(fig, path)


def plot_fgsm_example(
    original, adversarial, eps: float, before: tuple[int, float], after: tuple[int, float], path: str
) -> None:
    """Figure 4: original + eps * sign(gradient) = adversarial, with predictions and confidences."""
    plt = _pyplot()
    perturbation = adversarial - original
    fig, axes = plt.subplots(1, 3, figsize=(7.5, 3.0))
    panels = [
        (original, f"original\npredicted {before[0]} ({before[1]:.1%})", dict(cmap="gray", vmin=0, vmax=1)),
        (perturbation, f"+ perturbation\n(eps = {eps:g}, after clipping)", dict(cmap="seismic", vmin=-eps, vmax=eps)),
        (adversarial, f"= adversarial\npredicted {after[0]} ({after[1]:.1%})", dict(cmap="gray", vmin=0, vmax=1)),
    ]
    for ax, (image, title, style) in zip(axes, panels):
        ax.imshow(image.squeeze(), **style)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle("Figure 4. Fast gradient sign method on the BP net")
    _save(fig, path)


def plot_curves(
    grid: Sequence[float],
    curves: dict[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    title: str,
    path: str,
    limits: tuple[dict[str, float], str] | None = None,
) -> None:
    """Accuracy against perturbation strength; a band of ±1 std over seeds where there are several. `limits`:
    per curve, an x past which it cannot rise, drawn dotted in its colour where it falls within the grid, and the
    legend's label for the dotted lines."""
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    drawn_limit = False
    for label, (mean, std) in curves.items():
        mean, std = np.asarray(mean), np.asarray(std)
        (line,) = ax.plot(grid, mean, marker="o", markersize=3, label=label)
        if np.any(std > 0):
            ax.fill_between(grid, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        if limits is not None and min(grid) <= limits[0][label] <= max(grid):
            ax.axvline(limits[0][label], color=line.get_color(), linestyle=":", linewidth=1.2)
            drawn_limit = True
    if drawn_limit:  # what the dotted lines are, as a legend entry: the legend finds a place clear of the curves
        ax.plot([], [], color="gray", linestyle=":", linewidth=1.2, label=limits[1])
    if any(np.any(np.asarray(std) > 0) for _, std in curves.values()):
        ax.text(0.99, 0.01, "bands: ±1 std over seeds", transform=ax.transAxes, ha="right", va="bottom", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    _save(fig, path)


def largest_certifiable_radius(sigma: float | str, certification: dict) -> float:
    """The largest radius a summary's "certification" can hold at `sigma`, whatever the model: its n and alpha's
    cap (smoothing.largest_radius), past which a certified-accuracy curve is 0.

    >>> largest_certifiable_radius(0.5, summary["certification"])  # 1.60 at n = 10,000, alpha = 0.001
    """
    return smoothing.largest_radius(float(sigma), certification["n"], certification["alpha"])


def plot_certification(certification: dict, path: str) -> None:
    """Certified accuracy against L2 radius, one curve per sigma (summary.json's "certification"), each with a
    dotted line at the largest radius its n samples can certify (`largest_certifiable_radius`).

    >>> plot_certification(summary["certification"], "runs/cnn_smooth/certification.png")
    """
    curves, limits = {}, {}
    for sigma, entry in certification["by_sigma"].items():
        label = f"σ = {float(sigma):g}"
        curves[label] = (entry["certified_accuracy"]["accuracy"], entry["certified_accuracy"]["accuracy_std"])
        limits[label] = largest_certifiable_radius(sigma, certification)
    title = f"Certified accuracy, {certification['num_examples']} {certification['split']} images"
    note = f"largest radius at n = {certification['n']:,}"
    plot_curves(certification["radii"], curves, "L2 radius", title, path, limits=(limits, note))
