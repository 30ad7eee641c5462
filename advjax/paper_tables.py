"""The paper's Tables 1-5 beside ours, the eps that matches it best, the settings and the discussion."""

from advjax import report, smoothing

# The paper's numbers (Tables 1-5). "Gaussian" in Tables 2-3 is noise with the
# mean and std of the FGSM perturbation: our matched_gaussian.
PAPER = {
    "table1": {"bp": {"train": 0.946, "validation": 0.918}, "cnn": {"train": 0.986, "validation": 0.981}},
    "table2": {
        "fgsm": {"train": 0.1868, "validation": 0.1728},
        "matched_gaussian": {"train": 0.563, "validation": 0.565},
    },
    "table3": {
        "fgsm": {"train": 0.295, "validation": 0.299},
        "matched_gaussian": {"train": 0.365, "validation": 0.370},
    },
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


def _fmt(summary: dict, split: str, perturbation: str, by_eps: str | None = None) -> str:
    """mean, with ± std over seeds where there are several."""
    node = summary["by_eps"][by_eps] if by_eps else summary
    results = (
        node[split]
        if by_eps
        else {"accuracy": summary["accuracy"][split], "accuracy_std": summary["accuracy_std"][split]}
    )
    mean, std = results["accuracy"][perturbation], results["accuracy_std"][perturbation]
    return f"{mean:.3f} ± {std:.3f}" if summary["num_seeds"] > 1 else f"{mean:.3f}"


def table1(s: dict) -> tuple[list, list]:
    header = ["", "BP (ours)", "BP (paper)", "CNN (ours)", "CNN (paper)"]
    rows = [
        [
            split.upper(),
            _fmt(s["bp"], split, "clean"),
            PAPER["table1"]["bp"][split],
            _fmt(s["cnn"], split, "clean"),
            PAPER["table1"]["cnn"][split],
        ]
        for split in SPLITS
    ]
    return header, rows


def noise_table(summary: dict, paper: dict, by_eps: str | None = None) -> tuple[list, list]:
    """Tables 2 and 3: FGSM against Gaussian noise of the same mean and std."""
    header = ["", "FGSM (ours)", "FGSM (paper)", "Gaussian, matched (ours)", "Gaussian (paper)"]
    rows = [
        [
            split.upper(),
            _fmt(summary, split, "fgsm", by_eps),
            paper["fgsm"][split],
            _fmt(summary, split, "matched_gaussian", by_eps),
            paper["matched_gaussian"][split],
        ]
        for split in SPLITS
    ]
    return header, rows


def table4(s: dict) -> tuple[list, list]:
    names = ("bp", "bp_adv", "cnn", "cnn_adv")
    labels = {"bp": "ORD_bp", "bp_adv": "ADV_bp", "cnn": "ORD_cnn", "cnn_adv": "ADV_cnn"}
    header = [""] + [f"{labels[n]} {who}" for n in names for who in ("(ours)", "(paper)")]
    rows = [
        [split.upper()] + [v for n in names for v in (_fmt(s[n], split, "fgsm"), PAPER["table4"][n][split])]
        for split in SPLITS
    ]
    return header, rows


def table5(s: dict) -> tuple[list, list]:
    header = ["", "FGSM, ORD → ADV (ours)", "FGSM (paper)", "Gaussian, ORD → ADV (ours)", "Gaussian (paper)"]
    rows = []
    for model in ("bp", "cnn"):
        paper = PAPER["table5"][model]
        ordinary, adversarial = s[model], s[f"{model}_adv"]
        sigma = ordinary["config"]["eval"]["sigma"]
        rows.append(
            [
                model.upper(),
                f"{_fmt(ordinary, 'validation', 'fgsm')} → {_fmt(adversarial, 'validation', 'fgsm')}",
                f"{paper['fgsm'][0]} → {paper['fgsm'][1]}",
                f"{_fmt(ordinary, 'validation', 'gaussian')} → {_fmt(adversarial, 'validation', 'gaussian')} (σ = "
                f"{sigma:g})",
                f"{paper['gaussian'][0]} → {paper['gaussian'][1]} (σ = {paper['sigma']:g})",
            ]
        )
    return header, rows


NOISE_TRAINED = {"bp_gauss": "BP", "cnn_gauss": "CNN"}
DATASET_TITLES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10"}


def dataset_title(s: dict) -> str:
    """The runs' dataset as the report names it, from the data identity each summary records."""
    name = s["bp"].get("data", {}).get("name", "mnist")
    return DATASET_TITLES.get(name, name)


def _certified(summary: dict) -> tuple[str, dict] | None:
    """The one sigma's entry of a run's certification (configs/paper.py certifies at the training sigma only)."""
    certification = summary.get("certification")
    return next(iter(certification["by_sigma"].items())) if certification else None


def _mean_std(mean: float, std: float, num_seeds: int, digits: int = 3) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if num_seeds > 1 else f"{mean:.{digits}f}"


def certified_table(s: dict) -> tuple[list, list] | None:
    """Beyond the paper: the noise-trained models' certified L2 accuracy at each radius, the ACR and the
    abstentions, beside their empirical accuracy under Gaussian noise (Table 5's column). None when not certified.
    """
    certified = {name: _certified(s[name]) for name in NOISE_TRAINED if name in s}
    certified = {name: entry for name, entry in certified.items() if entry is not None}
    if not certified:
        return None
    radii = next(iter(s[name]["certification"]["radii"] for name in certified))
    header = ["", "σ", "images, n", *(f"r = {r:g}" for r in radii), "ACR", "abstained", "Gaussian noise (empirical)"]
    rows = []
    for name, (sigma, entry) in certified.items():
        summary, k = s[name], s[name]["num_seeds"]
        c, curve = summary["certification"], entry["certified_accuracy"]
        rows.append(
            [
                f"{NOISE_TRAINED[name]}, noise-trained",
                f"{float(sigma):g}",
                f"{c['num_examples']}, {c['n']:,}",
                *(_mean_std(m, d, k) for m, d in zip(curve["accuracy"], curve["accuracy_std"])),
                _mean_std(entry["acr"], entry["acr_std"], k),
                _mean_std(entry["abstention_rate"], entry["abstention_rate_std"], k),
                f"{_fmt(summary, 'validation', 'gaussian')} (σ = {summary['config']['eval']['sigma']:g})",
            ]
        )
    return header, rows


def certified_text(s: dict) -> str:
    """The certified section's prose: the budget, the largest radius it can certify, the base classifier."""
    name = next(n for n in NOISE_TRAINED if n in s and s[n].get("certification"))
    c = s[name]["certification"]
    caps = ", ".join(
        f"{NOISE_TRAINED[n]} {smoothing.largest_radius(float(_certified(s[n])[0]), c['n'], c['alpha']):.2f}"
        for n in NOISE_TRAINED
        if n in s and s[n].get("certification")
    )
    return (
        "The paper measures Gaussian noise empirically. Randomized smoothing (Cohen et al., 2019) turns a "
        "noise-trained model into a classifier with a proof: the smoothed classifier's prediction cannot change "
        "within the certified L2 radius. Each noise-trained model is certified at its training σ on the first "
        f"{c['num_examples']} {c['split']} images, with n0 = {c['n0']} selection and n = {c['n']:,} estimation "
        f"samples at α = {c['alpha']} (the base classifier clips x + δ to [0, 1], as training does). With this n "
        f"no radius can exceed σ Φ⁻¹(α^(1/n)) ({caps}), so the table stops there; a larger "
        "`certify.n` certifies further. The last column is the empirical accuracy under Gaussian noise, on the "
        "validation subset."
    )


def best_matching_eps(s: dict) -> tuple[str, dict[str, float]]:
    """The eps whose FGSM validation accuracy is closest to the paper's, over BP and CNN (Tables 2-3)."""
    paper = {"bp": PAPER["table2"]["fgsm"]["validation"], "cnn": PAPER["table3"]["fgsm"]["validation"]}
    distance = {
        eps: sum(abs(s[m]["by_eps"][eps]["validation"]["accuracy"]["fgsm"] - paper[m]) for m in paper)
        for eps in s["bp"]["by_eps"]
    }
    return min(distance, key=distance.get), distance


def settings_text(s: dict) -> str:
    lines = []
    for name, summary in s.items():
        c = summary["config"]
        t, e = c["train"], c["eval"]
        training = {
            "ordinary": "ordinary",
            "fgsm": f"FGSM-adversarial (eps {t['eps']}, alpha {t['alpha']})",
            "gaussian": f"Gaussian noise (σ {t['sigma']})",
        }[t["mode"]]
        lines.append(
            f"| {name} | {c['model']['name']} ({c['model']['init']} init) | {training} | {t['epochs']} | "
            f"{t['batch_size']} | "
            f"Adam {t['learning_rate']} ({t['schedule']}) | {e['eps']} | {e['sigma']} | {summary['num_seeds']} (from "
            f"seed {c['seed']}) |"
        )
    header = (
        "| run | model | training | epochs | batch | optimizer | eval eps | eval σ | seeds |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    sizes = s["bp"]["eval_sizes"]
    return (
        header + "\n" + "\n".join(lines) + "\n\n"
        f"Evaluation: {sizes['train']} training images, {sizes['validation']} validation images and {sizes['test']} "
        "test images "
        f"(50,000 / 10,000 random split of the 60,000, split seed {s['bp']['config']['data']['split_seed']}). "
        f"FGSM uses the {s['bp']['attack_labels']} labels. Gaussian σ is the std before clipping to [0, 1]; "
        "the matched Gaussian has, per image, the mean and std of that image's FGSM perturbation after clipping. "
        f"Curves: {sizes[s['bp']['sweeps']['split']]} {s['bp']['sweeps']['split']} images; the same noise draw at "
        "every σ."
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
    change = lambda before, after: (
        "improves" if after > before + 0.005 else ("worsens" if after < before - 0.005 else "leaves unchanged")
    )
    paper_change = lambda before, after: "improved" if after > before + 0.005 else "worsened"
    eps, per_model = s["bp"]["config"]["eval"]["eps"], _per_model_best_eps(s)
    t5 = PAPER["table5"]
    lines = [
        f"- **Clean accuracy (Table 1).** Our BP reaches {acc('bp', 'clean'):.3f} and our CNN "
        f"{acc('cnn', 'clean'):.3f} on the validation subset; the paper reports 0.918 and 0.981. Ours "
        f"{_compare(acc('bp', 'clean'), 0.918)} the paper's BP and {_compare(acc('cnn', 'clean'), 0.981)} its CNN.",
        f"- **FGSM against matched Gaussian noise (Tables 2-3, eps = {eps}).** BP: FGSM leaves {acc('bp', 'fgsm'):.3f} "
        f"(paper 0.173) and matched noise {acc('bp', 'matched_gaussian'):.3f} (paper 0.565). "
        f"CNN: FGSM leaves {acc('cnn', 'fgsm'):.3f} (paper 0.299), matched noise {acc('cnn', 'matched_gaussian'):.3f} "
        "(paper 0.370). "
        + (
            "As in the paper, FGSM hurts far more than noise of the same mean and std: the gradient's sign, not the "
            "perturbation's size, fools the models. "
            if acc("bp", "fgsm") < acc("bp", "matched_gaussian") - 0.2
            else "Unlike the paper, FGSM does not hurt much more than matched noise. "
        )
        + (
            f"Our matched noise costs BP {'less' if acc('bp', 'matched_gaussian') > 0.565 else 'more'} accuracy than "
            "the paper's. "
            "We cannot tell how the paper drew its noise; the paper itself says that its CNN's noise std was much "
            "larger than its BP's."
        ),
        f"- **Which eps.** The paper never states eps. Taking both models together, eps = {best_eps} of "
        f"{', '.join(s['bp']['by_eps'])} comes closest to the paper's FGSM validation accuracies. "
        f"Taken one at a time, BP matches best at eps = {per_model['bp']} and the CNN at eps = {per_model['cnn']}. "
        + (
            "No single eps fits both models, because our CNN is much more robust to FGSM than our BP."
            if per_model["bp"] != per_model["cnn"]
            else "One eps fits both models."
        ),
        f"- **Adversarial training against FGSM (Tables 4-5).** It {change(acc('bp', 'fgsm'), acc('bp_adv', 'fgsm'))} "
        f"BP's FGSM accuracy ({acc('bp', 'fgsm'):.3f} → {acc('bp_adv', 'fgsm'):.3f}; paper 0.173 → 0.606) and "
        f"{change(acc('cnn', 'fgsm'), acc('cnn_adv', 'fgsm'))} the CNN's ({acc('cnn', 'fgsm'):.3f} → "
        f"{acc('cnn_adv', 'fgsm'):.3f}; paper 0.299 → 0.337). "
        "These FGSM numbers use the true labels at the training eps. That can overstate robustness (label leaking), "
        "and one-step attacks say nothing about multi-step ones.",
        "- **Adversarial training against Gaussian noise (Table 5, Figures 7-8).** It "
        f"{change(acc('bp', 'gaussian'), acc('bp_adv', 'gaussian'))} BP's accuracy ({acc('bp', 'gaussian'):.3f} → "
        f"{acc('bp_adv', 'gaussian'):.3f} at σ = {s['bp']['config']['eval']['sigma']}). "
        f"The paper says it {paper_change(*t5['bp']['gaussian'])} ({t5['bp']['gaussian'][0]} → "
        f"{t5['bp']['gaussian'][1]}). "
        f"It {change(acc('cnn', 'gaussian'), acc('cnn_adv', 'gaussian'))} the CNN's ({acc('cnn', 'gaussian'):.3f} → "
        f"{acc('cnn_adv', 'gaussian'):.3f} at σ = {s['cnn']['config']['eval']['sigma']}); "
        f"the paper says it {paper_change(*t5['cnn']['gaussian'])} ({t5['cnn']['gaussian'][0]} → "
        f"{t5['cnn']['gaussian'][1]}).",
        "- **Caveats.** The paper does not give eps, the batch size, the learning rate, the initializer, or whether "
        "its noise std is taken before or after clipping. "
        "We list each of ours under Settings. Noise-robustness curves depend strongly on the initializer "
        "(`model.init`), and the paper's Tables 2-5 rest on one seed of unknown variance. Run with `num_seeds` > 1 to "
        "see ours.",
    ]
    return "\n".join(lines)


def all_tables(summaries: dict) -> dict[str, tuple[list, list]]:
    """{name: (header, rows)}: Tables 1-5, then Tables 2 and 3 at each eps of the by-eps sweep."""
    tables = {
        "table1_clean": table1(summaries),
        "table2_bp_noise": noise_table(summaries["bp"], PAPER["table2"]),
        "table3_cnn_noise": noise_table(summaries["cnn"], PAPER["table3"]),
        "table4_adversarial_training": table4(summaries),
        "table5_summary": table5(summaries),
    }
    certified = certified_table(summaries)
    if certified is not None:
        tables["certified_l2"] = certified
    for eps in summaries["bp"]["by_eps"]:
        tables[f"table2_bp_noise_eps{eps}"] = noise_table(summaries["bp"], PAPER["table2"], eps)
        tables[f"table3_cnn_noise_eps{eps}"] = noise_table(summaries["cnn"], PAPER["table3"], eps)
    return tables


def report_sections(
    summaries: dict, tables: dict, captions: dict[str, str], best_eps: str, distance: dict[str, float]
) -> list[str]:
    """report.md, section by section."""
    eps = summaries["bp"]["config"]["eval"]["eps"]
    md = lambda key: report.markdown_table(*tables[key])
    title = dataset_title(summaries)
    other_data = (
        f" The paper's numbers are MNIST's and ours are {title}'s: each pair compares the datasets as much as "
        "the methods."
        if title != "MNIST"
        else ""
    )
    return [
        f"# Fooling neural networks by adding noises: reproduced with advjax on {title}",
        "Each of our numbers stands beside the paper's. Accuracies are on the evaluation subsets listed under "
        "Settings; with several seeds they read mean ± std." + other_data,
        "## Table 1. Accuracy with ordinary training\n\n" + md("table1_clean"),
        f"## Table 2. BP after adding noise (FGSM eps = {eps})\n\n" + md("table2_bp_noise"),
        f"## Table 3. CNN after adding noise (FGSM eps = {eps})\n\n" + md("table3_cnn_noise"),
        f"## Table 4. FGSM accuracy after ordinary and adversarial training (eps = {eps})\n\n"
        + md("table4_adversarial_training"),
        "## Table 5. Adversarial training, validation accuracy\n\n" + md("table5_summary"),
        "## Tables 2 and 3 for each eps\n\nThe paper does not state its eps. "
        + f"eps = **{best_eps}** comes closest to its FGSM validation accuracies (summed absolute gap: "
        + ", ".join(f"{e}: {d:.3f}" for e, d in distance.items())
        + ").\n\n"
        + "\n\n".join(
            f"### eps = {e}\n\nBP:\n\n{md(f'table2_bp_noise_eps{e}')}\n\nCNN:\n\n{md(f'table3_cnn_noise_eps{e}')}"
            for e in summaries["bp"]["by_eps"]
        ),
        *(
            [
                "## Beyond the paper: certified L2 robustness of the noise-trained models\n\n"
                + certified_text(summaries)
                + "\n\n"
                + md("certified_l2")
            ]
            if "certified_l2" in tables
            else []
        ),
        "## Figures\n\n"
        + "![Figure 1](figures/fig1_digits.png)\n\n![Figure 3](figures/fig3_gaussian_noise.png)\n\n![Figure "
        "4](figures/fig4_fgsm.png)\n\n"
        + "\n\n".join(f"![{caption}](figures/{name})" for name, caption in captions.items()),
        "## Settings\n\n" + settings_text(summaries),
        "## Where we agree with the paper, and where not\n\n" + discussion(summaries, best_eps),
        "## Files\n\n`results.json` holds every number here; the `*.csv` files hold the tables; `<run>/summary.json` "
        "holds each run's full results.",
    ]
