"""The paper reproduced: train its six models, then write report.md with Tables 1-5 and the figures.

Each run lives in `workdir/<name>/` as an ordinary experiment workdir. A run
whose summary.json was written with the same config is reused, so a paper run
that is interrupted and started again only trains what is missing.
"""

import json
import os
from typing import Callable

import jax
import ml_collections
import numpy as np
from absl import logging

from advjax import attacks, checkpoint, data, experiment, report, validation

# The paper's numbers (Tables 1-5). "Gaussian" in Tables 2-3 is noise with the
# mean and std of the FGSM perturbation: our matched_gaussian.
PAPER = {
    "table1": {"bp": {"train": 0.946, "validation": 0.918}, "cnn": {"train": 0.986, "validation": 0.981}},
    "table2": {"fgsm": {"train": 0.1868, "validation": 0.1728}, "matched_gaussian": {"train": 0.563, "validation": 0.565}},
    "table3": {"fgsm": {"train": 0.295, "validation": 0.299}, "matched_gaussian": {"train": 0.365, "validation": 0.370}},
    "table4": {
        "bp": {"train": 0.1868, "validation": 0.1728},
        "bp_adv": {"train": 0.603, "validation": 0.606},
        "cnn": {"train": 0.295, "validation": 0.299},
        "cnn_adv": {"train": 0.339, "validation": 0.337},
    },
    "table5": {
        "bp": {"fgsm": (0.1728, 0.606), "gaussian": (0.565, 0.507), "sigma": 0.3},
        "cnn": {"fgsm": (0.299, 0.337), "gaussian": (0.365, 0.469), "sigma": 0.8},
    },
}
SPLITS = ("train", "validation")


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


def _saved_summary(workdir: str, config: ml_collections.ConfigDict) -> dict | None:
    path = os.path.join(workdir, experiment.SUMMARY_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            summary = json.load(f)
        same = json.dumps(summary["config"], sort_keys=True) == json.dumps(checkpoint.config_as_json(config), sort_keys=True)
    except (OSError, ValueError, KeyError, TypeError):  # unreadable: not trusted, the run is resumed or redone instead
        return None
    return summary if same else None


def train_all(
    config: ml_collections.ConfigDict, workdir: str, log: Callable[[str], None], overwrite: bool = False
) -> dict[str, dict]:
    """Each run's summary: reused when finished with the same config, else trained (or resumed).

    `overwrite` retrains every run from scratch, discarding what its workdir holds.
    """
    runs = run_configs(config)
    for run in runs.values():
        validation.validate(run)  # every run is checked before the first one trains
    summaries = {}
    for i, (name, run) in enumerate(runs.items(), 1):
        run_dir = os.path.join(workdir, name)
        summaries[name] = None if overwrite else _saved_summary(run_dir, run)
        if summaries[name] is not None:
            log(f"[{i}/{len(runs)}] {name}: reusing the finished run in {run_dir}")
            continue
        log(f"[{i}/{len(runs)}] {name}: training {run.model.name} ({run.train.mode}) for {run.train.epochs} epochs, {run.num_seeds} seed(s)")
        summaries[name] = experiment.train_and_evaluate(run, run_dir, log=log, overwrite=overwrite)
    return summaries


# Tables ---------------------------------------------------------------------


def _fmt(summary: dict, split: str, perturbation: str, by_eps: str | None = None) -> str:
    """mean, with ± std over seeds where there are several."""
    node = summary["by_eps"][by_eps] if by_eps else summary
    results = node[split] if by_eps else {"accuracy": summary["accuracy"][split], "accuracy_std": summary["accuracy_std"][split]}
    mean, std = results["accuracy"][perturbation], results["accuracy_std"][perturbation]
    return f"{mean:.3f} ± {std:.3f}" if summary["num_seeds"] > 1 else f"{mean:.3f}"


def table1(s: dict) -> tuple[list, list]:
    header = ["", "BP (ours)", "BP (paper)", "CNN (ours)", "CNN (paper)"]
    rows = [
        [split.upper(), _fmt(s["bp"], split, "clean"), PAPER["table1"]["bp"][split], _fmt(s["cnn"], split, "clean"), PAPER["table1"]["cnn"][split]]
        for split in SPLITS
    ]
    return header, rows


def noise_table(summary: dict, paper: dict, by_eps: str | None = None) -> tuple[list, list]:
    """Tables 2 and 3: FGSM against Gaussian noise of the same mean and std."""
    header = ["", "FGSM (ours)", "FGSM (paper)", "Gaussian, matched (ours)", "Gaussian (paper)"]
    rows = [
        [split.upper(), _fmt(summary, split, "fgsm", by_eps), paper["fgsm"][split],
         _fmt(summary, split, "matched_gaussian", by_eps), paper["matched_gaussian"][split]]
        for split in SPLITS
    ]
    return header, rows


def table4(s: dict) -> tuple[list, list]:
    names = ("bp", "bp_adv", "cnn", "cnn_adv")
    labels = {"bp": "ORD_bp", "bp_adv": "ADV_bp", "cnn": "ORD_cnn", "cnn_adv": "ADV_cnn"}
    header = [""] + [f"{labels[n]} {who}" for n in names for who in ("(ours)", "(paper)")]
    rows = [[split.upper()] + [v for n in names for v in (_fmt(s[n], split, "fgsm"), PAPER["table4"][n][split])] for split in SPLITS]
    return header, rows


def table5(s: dict) -> tuple[list, list]:
    header = ["", "FGSM, ORD → ADV (ours)", "FGSM (paper)", "Gaussian, ORD → ADV (ours)", "Gaussian (paper)"]
    rows = []
    for model in ("bp", "cnn"):
        paper = PAPER["table5"][model]
        ordinary, adversarial = s[model], s[f"{model}_adv"]
        sigma = ordinary["config"]["eval"]["sigma"]
        rows.append([
            model.upper(),
            f"{_fmt(ordinary, 'validation', 'fgsm')} → {_fmt(adversarial, 'validation', 'fgsm')}",
            f"{paper['fgsm'][0]} → {paper['fgsm'][1]}",
            f"{_fmt(ordinary, 'validation', 'gaussian')} → {_fmt(adversarial, 'validation', 'gaussian')} (σ = {sigma:g})",
            f"{paper['gaussian'][0]} → {paper['gaussian'][1]} (σ = {paper['sigma']:g})",
        ])
    return header, rows


def best_matching_eps(s: dict) -> tuple[str, dict[str, float]]:
    """The eps whose FGSM validation accuracy is closest to the paper's, over BP and CNN (Tables 2-3)."""
    paper = {"bp": PAPER["table2"]["fgsm"]["validation"], "cnn": PAPER["table3"]["fgsm"]["validation"]}
    distance = {
        eps: sum(abs(s[m]["by_eps"][eps]["validation"]["accuracy"]["fgsm"] - paper[m]) for m in paper)
        for eps in s["bp"]["by_eps"]
    }
    return min(distance, key=distance.get), distance


# Figures --------------------------------------------------------------------


def _first_seed(params, num_seeds: int):
    return params if num_seeds == 1 else jax.tree.map(lambda p: p[0], params)


def sample_figures(config: ml_collections.ConfigDict, workdir: str, figures: str) -> None:
    """Figures 1, 3 and 4, which need images and the trained BP net."""
    mnist = data.load_mnist(config.data)
    images, labels = mnist.train.images[:24], mnist.train.labels[:24]
    report.plot_digits(images, labels, os.path.join(figures, "fig1_digits.png"))

    digit = mnist.validation.images[:1].astype(np.float32) / 255.0
    sigmas = config.report.figure_sigmas
    noisy = [np.asarray(attacks.gaussian(jax.random.key(0), digit, s))[0] for s in sigmas]
    report.plot_noise_ladder(noisy, sigmas, os.path.join(figures, "fig3_gaussian_noise.png"))

    restored = checkpoint.restore(os.path.join(workdir, "bp"))
    params = _first_seed(restored.params, restored.config.num_seeds)
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
    report.plot_fgsm_example(x[i], np.asarray(adversarial[i]), eps, before, after, os.path.join(figures, "fig4_fgsm.png"))


def _curve(summary: dict, sweep: str) -> tuple[list, list]:
    return summary["sweeps"][sweep]["accuracy"], summary["sweeps"][sweep]["accuracy_std"]


def curve_figures(s: dict, figures: str) -> dict[str, str]:
    """Figures 6-8 (accuracy against sigma) and accuracy against eps; returns {name: caption}."""
    sigma_grid, eps_grid = s["bp"]["sweeps"]["gaussian"]["grid"], s["bp"]["sweeps"]["fgsm"]["grid"]
    split = s["bp"]["sweeps"]["split"]
    plots = {
        "fig6_noise_bp_vs_cnn.png": (
            sigma_grid, {"BP": _curve(s["bp"], "gaussian"), "CNN": _curve(s["cnn"], "gaussian"),
                         "BP, noise-trained": _curve(s["bp_gauss"], "gaussian"), "CNN, noise-trained": _curve(s["cnn_gauss"], "gaussian")},
            "Gaussian noise std σ (before clipping)", "Figure 6. Gaussian noise: BP and CNN",
        ),
        "fig7_noise_cnn_ord_vs_adv.png": (
            sigma_grid, {"CNN, ordinary": _curve(s["cnn"], "gaussian"), "CNN, FGSM-adversarial": _curve(s["cnn_adv"], "gaussian")},
            "Gaussian noise std σ (before clipping)", "Figure 7. CNN under Gaussian noise,\nbefore and after adversarial training",
        ),
        "fig8_noise_bp_ord_vs_adv.png": (
            sigma_grid, {"BP, ordinary": _curve(s["bp"], "gaussian"), "BP, FGSM-adversarial": _curve(s["bp_adv"], "gaussian")},
            "Gaussian noise std σ (before clipping)", "Figure 8. BP under Gaussian noise,\nbefore and after adversarial training",
        ),
        "fig_eps_all_models.png": (
            eps_grid, {name: _curve(summary, "fgsm") for name, summary in s.items()},
            "FGSM eps (L-inf, pixels in [0, 1])", "Accuracy against FGSM eps, all six models",
        ),
    }
    captions = {}
    for filename, (grid, curves, xlabel, title) in plots.items():
        report.plot_curves(grid, curves, xlabel, f"{title}\n({split} subset)", os.path.join(figures, filename))
        captions[filename] = title.replace("\n", " ")
    return captions


# The report -----------------------------------------------------------------


def settings_text(s: dict) -> str:
    lines = []
    for name, summary in s.items():
        c = summary["config"]
        t, e = c["train"], c["eval"]
        training = {"ordinary": "ordinary", "fgsm": f"FGSM-adversarial (eps {t['eps']}, alpha {t['alpha']})", "gaussian": f"Gaussian noise (σ {t['sigma']})"}[t["mode"]]
        lines.append(
            f"| {name} | {c['model']['name']} ({c['model']['init']} init) | {training} | {t['epochs']} | {t['batch_size']} | "
            f"Adam {t['learning_rate']} ({t['schedule']}) | {e['eps']} | {e['sigma']} | {summary['num_seeds']} (from seed {c['seed']}) |"
        )
    header = "| run | model | training | epochs | batch | optimizer | eval eps | eval σ | seeds |\n|---|---|---|---|---|---|---|---|---|"
    sizes = s["bp"]["eval_sizes"]
    return (
        header + "\n" + "\n".join(lines) + "\n\n"
        f"Evaluation: {sizes['train']} training images, {sizes['validation']} validation images and {sizes['test']} test images "
        f"(50,000 / 10,000 random split of the 60,000, split seed {s['bp']['config']['data']['split_seed']}). "
        f"FGSM uses the {s['bp']['attack_labels']} labels. Gaussian σ is the std before clipping to [0, 1]; "
        "the matched Gaussian has, per image, the mean and std of that image's FGSM perturbation after clipping. "
        f"Curves: {sizes[s['bp']['sweeps']['split']]} {s['bp']['sweeps']['split']} images; the same noise draw at every σ."
    )


def _per_model_best_eps(s: dict) -> dict[str, str]:
    paper = {"bp": PAPER["table2"]["fgsm"]["validation"], "cnn": PAPER["table3"]["fgsm"]["validation"]}
    return {
        m: min(s[m]["by_eps"], key=lambda e: abs(s[m]["by_eps"][e]["validation"]["accuracy"]["fgsm"] - paper[m]))
        for m in paper
    }


def _compare(ours: float, theirs: float) -> str:
    """'agrees' within 0.05 accuracy, else which side is higher."""
    if abs(ours - theirs) <= 0.05:
        return "agrees with"
    return "is higher than" if ours > theirs else "is lower than"


def discussion(s: dict, best_eps: str) -> str:
    """Where our numbers agree with the paper's and where not, each claim computed from the numbers."""
    acc = lambda n, p: s[n]["accuracy"]["validation"][p]
    change = lambda before, after: "improves" if after > before + 0.005 else ("worsens" if after < before - 0.005 else "leaves unchanged")
    paper_change = lambda before, after: "improved" if after > before + 0.005 else "worsened"
    eps, per_model = s["bp"]["config"]["eval"]["eps"], _per_model_best_eps(s)
    t5 = PAPER["table5"]
    lines = [
        f"- **Clean accuracy (Table 1).** Our BP reaches {acc('bp', 'clean'):.3f} and our CNN {acc('cnn', 'clean'):.3f} on the validation subset; the paper reports 0.918 and 0.981. Ours {_compare(acc('bp', 'clean'), 0.918)} the paper's BP and {_compare(acc('cnn', 'clean'), 0.981)} its CNN.",
        f"- **FGSM against matched Gaussian noise (Tables 2-3, eps = {eps}).** BP: FGSM leaves {acc('bp', 'fgsm'):.3f} (paper 0.173) and matched noise {acc('bp', 'matched_gaussian'):.3f} (paper 0.565). "
        f"CNN: FGSM leaves {acc('cnn', 'fgsm'):.3f} (paper 0.299), matched noise {acc('cnn', 'matched_gaussian'):.3f} (paper 0.370). "
        + ("As in the paper, FGSM hurts far more than noise of the same mean and std: the gradient's sign, not the perturbation's size, fools the models. "
           if acc("bp", "fgsm") < acc("bp", "matched_gaussian") - 0.2 else "Unlike the paper, FGSM does not hurt much more than matched noise. ")
        + (f"Our matched noise costs BP {'less' if acc('bp', 'matched_gaussian') > 0.565 else 'more'} accuracy than the paper's. "
           "We cannot tell how the paper drew its noise; the paper itself says that its CNN's noise std was much larger than its BP's."),
        f"- **Which eps.** The paper never states eps. Taking both models together, eps = {best_eps} of {', '.join(s['bp']['by_eps'])} comes closest to the paper's FGSM validation accuracies. "
        f"Taken one at a time, BP matches best at eps = {per_model['bp']} and the CNN at eps = {per_model['cnn']}. "
        + ("No single eps fits both models, because our CNN is much more robust to FGSM than our BP." if per_model["bp"] != per_model["cnn"] else "One eps fits both models."),
        f"- **Adversarial training against FGSM (Tables 4-5).** It {change(acc('bp', 'fgsm'), acc('bp_adv', 'fgsm'))} BP's FGSM accuracy ({acc('bp', 'fgsm'):.3f} → {acc('bp_adv', 'fgsm'):.3f}; paper 0.173 → 0.606) and {change(acc('cnn', 'fgsm'), acc('cnn_adv', 'fgsm'))} the CNN's ({acc('cnn', 'fgsm'):.3f} → {acc('cnn_adv', 'fgsm'):.3f}; paper 0.299 → 0.337). "
        "These FGSM numbers use the true labels at the training eps. That can overstate robustness (label leaking), and one-step attacks say nothing about multi-step ones.",
        f"- **Adversarial training against Gaussian noise (Table 5, Figures 7-8).** It {change(acc('bp', 'gaussian'), acc('bp_adv', 'gaussian'))} BP's accuracy ({acc('bp', 'gaussian'):.3f} → {acc('bp_adv', 'gaussian'):.3f} at σ = {s['bp']['config']['eval']['sigma']}). "
        f"The paper says it {paper_change(*t5['bp']['gaussian'])} ({t5['bp']['gaussian'][0]} → {t5['bp']['gaussian'][1]}). "
        f"It {change(acc('cnn', 'gaussian'), acc('cnn_adv', 'gaussian'))} the CNN's ({acc('cnn', 'gaussian'):.3f} → {acc('cnn_adv', 'gaussian'):.3f} at σ = {s['cnn']['config']['eval']['sigma']}); "
        f"the paper says it {paper_change(*t5['cnn']['gaussian'])} ({t5['cnn']['gaussian'][0]} → {t5['cnn']['gaussian'][1]}).",
        "- **Caveats.** The paper does not give eps, the batch size, the learning rate, the initializer, or whether its noise std is taken before or after clipping. "
        "We list each of ours under Settings. Noise-robustness curves depend strongly on the initializer (`model.init`), and the paper's Tables 2-5 rest on one seed of unknown variance. Run with `num_seeds` > 1 to see ours.",
    ]
    return "\n".join(lines)


def write_report(config: ml_collections.ConfigDict, summaries: dict, workdir: str, log: Callable[[str], None]) -> str:
    figures = os.path.join(workdir, "figures")
    os.makedirs(figures, exist_ok=True)
    log("report: figures")
    sample_figures(config, workdir, figures)
    captions = curve_figures(summaries, figures)
    best_eps, distance = best_matching_eps(summaries)

    tables = {
        "table1_clean": table1(summaries),
        "table2_bp_noise": noise_table(summaries["bp"], PAPER["table2"]),
        "table3_cnn_noise": noise_table(summaries["cnn"], PAPER["table3"]),
        "table4_adversarial_training": table4(summaries),
        "table5_summary": table5(summaries),
    }
    by_eps = {}
    for eps in summaries["bp"]["by_eps"]:
        by_eps[f"table2_bp_noise_eps{eps}"] = noise_table(summaries["bp"], PAPER["table2"], eps)
        by_eps[f"table3_cnn_noise_eps{eps}"] = noise_table(summaries["cnn"], PAPER["table3"], eps)
    for name, (header, rows) in {**tables, **by_eps}.items():
        report.write_text(os.path.join(workdir, f"{name}.csv"), report.csv_text(header, rows))

    eps = summaries["bp"]["config"]["eval"]["eps"]
    md = lambda key: report.markdown_table(*{**tables, **by_eps}[key])
    sections = [
        "# Fooling neural networks by adding noises: reproduced with advjax",
        "Each of our numbers stands beside the paper's. Accuracies are on the evaluation subsets listed under Settings; with several seeds they read mean ± std.",
        "## Table 1. Accuracy with ordinary training\n\n" + md("table1_clean"),
        f"## Table 2. BP after adding noise (FGSM eps = {eps})\n\n" + md("table2_bp_noise"),
        f"## Table 3. CNN after adding noise (FGSM eps = {eps})\n\n" + md("table3_cnn_noise"),
        f"## Table 4. FGSM accuracy after ordinary and adversarial training (eps = {eps})\n\n" + md("table4_adversarial_training"),
        "## Table 5. Adversarial training, validation accuracy\n\n" + md("table5_summary"),
        "## Tables 2 and 3 for each eps\n\nThe paper does not state its eps. "
        + f"eps = **{best_eps}** comes closest to its FGSM validation accuracies (summed absolute gap: "
        + ", ".join(f"{e}: {d:.3f}" for e, d in distance.items()) + ").\n\n"
        + "\n\n".join(f"### eps = {e}\n\nBP:\n\n{md(f'table2_bp_noise_eps{e}')}\n\nCNN:\n\n{md(f'table3_cnn_noise_eps{e}')}" for e in summaries["bp"]["by_eps"]),
        "## Figures\n\n"
        + "![Figure 1](figures/fig1_digits.png)\n\n![Figure 3](figures/fig3_gaussian_noise.png)\n\n![Figure 4](figures/fig4_fgsm.png)\n\n"
        + "\n\n".join(f"![{caption}](figures/{name})" for name, caption in captions.items()),
        "## Settings\n\n" + settings_text(summaries),
        "## Where we agree with the paper, and where not\n\n" + discussion(summaries, best_eps),
        "## Files\n\n`results.json` holds every number here; the `*.csv` files hold the tables; `<run>/summary.json` holds each run's full results.",
    ]
    path = os.path.join(workdir, "report.md")
    report.write_text(path, "\n\n".join(sections) + "\n")
    report.write_json(os.path.join(workdir, "results.json"), {
        "paper": PAPER,
        "best_matching_eps": best_eps,
        "eps_distance": distance,
        "runs": {name: {k: v for k, v in s.items() if k != "epochs"} for name, s in summaries.items()},
    })
    return path


def run(
    config: ml_collections.ConfigDict, workdir: str, log: Callable[[str], None] = logging.info, overwrite: bool = False
) -> dict:
    """Trains (or reuses) all six runs and writes the report; returns {"report": path, "summaries": ...}."""
    experiment.prepare_workdir(workdir)
    summaries = train_all(config, workdir, log, overwrite)
    path = write_report(config, summaries, workdir, log)
    log(f"report: {path}")
    return {"report": path, "summaries": summaries}
