"""The paper reproduced: train its six models, then write report.md with Tables 1-5 and the figures.

Each run lives in `workdir/<name>/` as an ordinary experiment workdir. A run
whose summary.json was written with the same config is reused, so a paper run
that is interrupted and started again only trains what is missing.
"""

import contextlib
import os
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from absl import logging

from advjax import attacks, checkpoint, data, experiment, files, noise, paper_tables, report, seeds, validation, workdir


def is_paper_config(config: ml_collections.ConfigDict) -> bool:
    return "runs" in config


def run_configs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """Each run's config with the shared fields (seed, num_seeds, data, table eps) applied."""
    runs = {}
    for name in config.runs:
        run = ml_collections.ConfigDict(config.runs[name].to_dict())
        run.seed, run.num_seeds = config.seed, config.num_seeds
        run.data = ml_collections.ConfigDict(config.data.to_dict())
        # Tables 2-3 by eps concern the ordinarily trained models only.
        run.eval.table_eps = tuple(config.report.table_eps) if run.train.mode == "ordinary" else ()
        runs[name] = run
    return runs


def validate(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """Every run's config, each checked before the first one trains."""
    runs = run_configs(config)
    for run in runs.values():
        validation.validate(run)
    return runs


def train_all(
    config: ml_collections.ConfigDict, paper_dir: str, log: Callable[[str], None], overwrite: bool = False
) -> dict[str, dict]:
    """Each run's summary: reused when finished with the same config, else trained (or resumed).

    `overwrite` retrains every run from scratch, discarding what its workdir holds.
    """
    runs = validate(config)
    # A finished run is reused only if it was trained on the data there is now.
    identity = data.load(config.data)[1]
    summaries = {}
    for i, (name, run) in enumerate(runs.items(), 1):
        run_dir = os.path.join(paper_dir, name)
        summaries[name] = None if overwrite else workdir.read_finished_summary(run_dir, run, identity)
        if summaries[name] is not None:
            log(f"[{i}/{len(runs)}] {name}: reusing the finished run in {run_dir}")
            continue
        log(
            f"[{i}/{len(runs)}] {name}: training {run.model.name} ({run.train.mode}) for {run.train.epochs} epochs, "
            f"{run.num_seeds} seed(s)"
        )
        summaries[name] = experiment.train_and_evaluate(run, run_dir, log=log, overwrite=overwrite)
    return summaries


# Figures --------------------------------------------------------------------


def sample_figures(config: ml_collections.ConfigDict, paper_dir: str, figures: str) -> None:
    """Figures 1, 3 and 4, which need images and the trained BP net."""
    mnist = data.load_mnist(config.data)
    images, labels = mnist.train.images[:24], mnist.train.labels[:24]
    report.plot_digits(images, labels, os.path.join(figures, "fig1_digits.png"))

    digit = mnist.validation.images[:1].astype(np.float32) / 255.0
    sigmas = config.report.figure_sigmas
    noisy = [np.asarray(noise.gaussian(jax.random.key(0), digit, s))[0] for s in sigmas]
    report.plot_noise_ladder(noisy, sigmas, os.path.join(figures, "fig3_gaussian_noise.png"))

    restored = checkpoint.restore(os.path.join(paper_dir, "bp"))
    params = seeds.select_seed(restored.params, 0, restored.config.num_seeds)
    logits_fn = lambda x: restored.apply_fn(params, x)
    eps = restored.config.eval.eps
    # The first validation image that FGSM flips, so the figure shows an attack that worked.
    x = mnist.validation.images[:200].astype(np.float32) / 255.0
    y = mnist.validation.labels[:200]
    adversarial = attacks.fgsm(logits_fn, x, y, eps)
    p_clean, p_adv = jax.nn.softmax(logits_fn(x)), jax.nn.softmax(logits_fn(adversarial))
    flipped = np.flatnonzero((np.argmax(p_clean, -1) == y) & (np.argmax(p_adv, -1) != y))
    i = int(flipped[0]) if len(flipped) else 0
    before = (int(np.argmax(p_clean[i])), float(np.max(p_clean[i])))
    after = (int(np.argmax(p_adv[i])), float(np.max(p_adv[i])))
    report.plot_fgsm_example(
        x[i], np.asarray(adversarial[i]), eps, before, after, os.path.join(figures, "fig4_fgsm.png")
    )


def _curve(summary: dict, sweep: str) -> tuple[list, list]:
    return summary["sweeps"][sweep]["accuracy"], summary["sweeps"][sweep]["accuracy_std"]


def curve_figures(s: dict, figures: str) -> dict[str, str]:
    """Figures 6-8 (accuracy against sigma) and accuracy against eps; returns {name: caption}."""
    sigma_grid, eps_grid = s["bp"]["sweeps"]["gaussian"]["grid"], s["bp"]["sweeps"]["fgsm"]["grid"]
    split = f"{paper_tables.dataset_title(s)}, {s['bp']['sweeps']['split']}"
    plots = {
        "fig6_noise_bp_vs_cnn.png": (
            sigma_grid,
            {
                "BP": _curve(s["bp"], "gaussian"),
                "CNN": _curve(s["cnn"], "gaussian"),
                "BP, noise-trained": _curve(s["bp_gauss"], "gaussian"),
                "CNN, noise-trained": _curve(s["cnn_gauss"], "gaussian"),
            },
            "Gaussian noise std σ (before clipping)",
            "Figure 6. Gaussian noise: BP and CNN",
        ),
        "fig7_noise_cnn_ord_vs_adv.png": (
            sigma_grid,
            {"CNN, ordinary": _curve(s["cnn"], "gaussian"), "CNN, FGSM-adversarial": _curve(s["cnn_adv"], "gaussian")},
            "Gaussian noise std σ (before clipping)",
            "Figure 7. CNN under Gaussian noise,\nbefore and after adversarial training",
        ),
        "fig8_noise_bp_ord_vs_adv.png": (
            sigma_grid,
            {"BP, ordinary": _curve(s["bp"], "gaussian"), "BP, FGSM-adversarial": _curve(s["bp_adv"], "gaussian")},
            "Gaussian noise std σ (before clipping)",
            "Figure 8. BP under Gaussian noise,\nbefore and after adversarial training",
        ),
        "fig_eps_all_models.png": (
            eps_grid,
            {name: _curve(summary, "fgsm") for name, summary in s.items()},
            "FGSM eps (L-inf, pixels in [0, 1])",
            "Accuracy against FGSM eps, all six models",
        ),
    }
    captions = {}
    for filename, (grid, curves, xlabel, title) in plots.items():
        report.plot_curves(grid, curves, xlabel, f"{title}\n({split} subset)", os.path.join(figures, filename))
        captions[filename] = title.replace("\n", " ")
    return captions


def certified_figure(s: dict, figures: str) -> dict[str, str]:
    """Certified accuracy against L2 radius, the noise-trained BP and CNN (when certified); returns {name: caption}."""
    certified = {name: s[name]["certification"] for name in paper_tables.NOISE_TRAINED if s[name].get("certification")}
    if not certified:
        return {}
    curves, limits = {}, {}
    for name, certification in certified.items():
        sigma, entry = next(iter(certification["by_sigma"].items()))
        curve = entry["certified_accuracy"]
        label = f"{paper_tables.NOISE_TRAINED[name]}, noise-trained, σ = {float(sigma):g}"
        curves[label] = (curve["accuracy"], curve["accuracy_std"])
        limits[label] = report.largest_certifiable_radius(sigma, certification)
    first, dataset = next(iter(certified.values())), paper_tables.dataset_title(s)
    title = "Certified L2 accuracy, noise-trained models"
    filename = "fig_certified_l2.png"
    report.plot_curves(
        first["radii"],
        curves,
        "L2 radius",
        f"{title}\n({first['num_examples']} {dataset} {first['split']} images, n = {first['n']:,})",
        os.path.join(figures, filename),
        limits=(limits, "largest radius n can certify"),
    )
    return {filename: title}


def write_report(config: ml_collections.ConfigDict, summaries: dict, paper_dir: str, log: Callable[[str], None]) -> str:
    """report.md with its figures, one CSV per table and results.json; returns the report's path."""
    figures = os.path.join(paper_dir, "figures")
    os.makedirs(figures, exist_ok=True)
    log("report: figures")
    sample_figures(config, paper_dir, figures)
    captions = curve_figures(summaries, figures) | certified_figure(summaries, figures)
    best_eps, distance = paper_tables.best_matching_eps(summaries)
    tables = paper_tables.all_tables(summaries)
    for name, (header, rows) in tables.items():
        files.write_text(os.path.join(paper_dir, f"{name}.csv"), report.csv_text(header, rows))
    sections = paper_tables.report_sections(summaries, tables, captions, best_eps, distance)
    path = os.path.join(paper_dir, "report.md")
    files.write_text(path, "\n\n".join(sections) + "\n")
    files.write_json(
        os.path.join(paper_dir, "results.json"),
        {
            "paper": paper_tables.PAPER,
            "best_matching_eps": best_eps,
            "eps_distance": distance,
            "runs": {name: {k: v for k, v in s.items() if k != "epochs"} for name, s in summaries.items()},
        },
    )
    return path


def run(
    config: ml_collections.ConfigDict,
    paper_dir: str,
    log: Callable[[str], None] = logging.info,
    overwrite: bool = False,
    lock: bool = True,
) -> dict:
    """Trains (or reuses) all six runs and writes the report; returns {"report": path, "summaries": ...}.

    `paper_dir` is locked for the whole of it (`lock=False`: the caller holds the lock), and each run's own workdir too.
    """
    validate(config)
    workdir.prepare(paper_dir)
    with workdir.locked(paper_dir) if lock else contextlib.nullcontext():
        summaries = train_all(config, paper_dir, log, overwrite)
        path = write_report(config, summaries, paper_dir, log)
    log(f"report: {path}")
    return {"report": path, "summaries": summaries}
