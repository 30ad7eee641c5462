"""Tests for advjax.paper_tables: the paper's tables beside ours, and the eps that matches it best."""

import pytest

from advjax import paper_tables

PAPER = paper_tables.PAPER


def summary(clean, fgsm, matched, gaussian, *, sigma=0.3, num_seeds=1, std=0.0, by_eps=None) -> dict:
    """A summary.json with the same accuracies on both splits; `by_eps` maps eps -> validation FGSM accuracy."""
    accuracy = {"clean": clean, "fgsm": fgsm, "matched_gaussian": matched, "gaussian": gaussian}
    cell = lambda a: {
        split: {
            "accuracy": {"fgsm": a, "matched_gaussian": matched},
            "accuracy_std": {"fgsm": std, "matched_gaussian": std},
        }
        for split in ("train", "validation")
    }
    return {
        "num_seeds": num_seeds,
        "accuracy": {split: dict(accuracy) for split in ("train", "validation")},
        "accuracy_std": {split: {p: std for p in accuracy} for split in ("train", "validation")},
        "by_eps": {eps: cell(a) for eps, a in (by_eps or {}).items()},
        "config": {"eval": {"eps": 0.1, "sigma": sigma}},
    }


def test_table1_sets_our_clean_accuracy_beside_the_papers():
    header, rows = paper_tables.table1({"bp": summary(0.9512, 0.2, 0.5, 0.6), "cnn": summary(0.9876, 0.3, 0.4, 0.5)})
    assert header == ["", "BP (ours)", "BP (paper)", "CNN (ours)", "CNN (paper)"]
    assert rows == [
        ["TRAIN", "0.951", PAPER["table1"]["bp"]["train"], "0.988", PAPER["table1"]["cnn"]["train"]],
        ["VALIDATION", "0.951", PAPER["table1"]["bp"]["validation"], "0.988", PAPER["table1"]["cnn"]["validation"]],
    ]


def test_a_cell_of_several_seeds_reads_mean_plus_minus_std():
    several = summary(0.9512, 0.2, 0.5, 0.6, num_seeds=3, std=0.0041)
    _, rows = paper_tables.table1({"bp": several, "cnn": summary(0.98, 0.3, 0.4, 0.5)})
    assert rows[0][1] == "0.951 ± 0.004" and rows[0][3] == "0.980"


def test_noise_tables_read_the_by_eps_results_at_an_eps():
    bp = summary(0.95, 0.2, 0.5, 0.6, by_eps={"0.1": 0.61, "0.3": 0.05})
    header, rows = paper_tables.noise_table(bp, PAPER["table2"], "0.3")
    assert header[1:3] == ["FGSM (ours)", "FGSM (paper)"]
    assert rows[1] == ["VALIDATION", "0.050", PAPER["table2"]["fgsm"]["validation"], "0.500", 0.565]
    _, at_eval_eps = paper_tables.noise_table(bp, PAPER["table2"])
    assert at_eval_eps[1][1] == "0.200"  # without an eps: the summary's own FGSM accuracy


def test_best_matching_eps_minimises_the_gap_summed_over_bp_and_cnn():
    # Paper: BP 0.1728, CNN 0.299 (FGSM, validation). BP alone would pick 0.2, the CNN alone 0.3.
    summaries = {
        "bp": summary(0.95, 0.2, 0.5, 0.6, by_eps={"0.1": 0.60, "0.2": 0.20, "0.3": 0.05}),
        "cnn": summary(0.98, 0.3, 0.4, 0.5, by_eps={"0.1": 0.90, "0.2": 0.50, "0.3": 0.32}),
    }
    best, distance = paper_tables.best_matching_eps(summaries)
    assert best == "0.3"
    assert distance == pytest.approx({"0.1": 0.4272 + 0.601, "0.2": 0.0272 + 0.201, "0.3": 0.1228 + 0.021})


def test_table5_reads_ordinary_then_adversarial_at_each_models_sigma():
    summaries = {
        "bp": summary(0.95, 0.17, 0.5, 0.55, sigma=0.3),
        "bp_adv": summary(0.95, 0.61, 0.5, 0.45),
        "cnn": summary(0.98, 0.30, 0.4, 0.36, sigma=0.8),
        "cnn_adv": summary(0.98, 0.34, 0.4, 0.47),
    }
    header, rows = paper_tables.table5(summaries)
    assert len(header) == 5 and [row[0] for row in rows] == ["BP", "CNN"]
    assert rows[0][1] == "0.170 → 0.610" and rows[0][3] == "0.550 → 0.450 (σ = 0.3)"
    assert rows[1][1] == "0.300 → 0.340" and rows[1][3] == "0.360 → 0.470 (σ = 0.8)"
    assert rows[1][2] == "0.299 → 0.337" and rows[1][4] == "0.365 → 0.469 (σ = 0.8)"


def certification(accuracy, acr, abstained, *, num_seeds=1, std=0.0, sigma="0.3", n=1000):
    """summary.json's "certification" at one sigma, radii 0, 0.25, 0.5."""
    return {
        "split": "test",
        "num_examples": 500,
        "n0": 100,
        "n": n,
        "alpha": 0.001,
        "radii": [0.0, 0.25, 0.5],
        "by_sigma": {
            sigma: {
                "certified_accuracy": {"accuracy": accuracy, "accuracy_std": [std] * len(accuracy)},
                "acr": acr,
                "acr_std": std,
                "abstention_rate": abstained,
                "abstention_rate_std": std,
            }
        },
    }


def test_the_certified_table_sets_each_noise_trained_models_certificates_beside_its_empirical_noise_accuracy():
    bp, cnn = summary(0.95, 0.2, 0.5, 0.91, sigma=0.3), summary(0.99, 0.8, 0.9, 0.985, sigma=0.3)
    bp["certification"] = certification([0.9, 0.7, 0.3], 0.41, 0.02)
    cnn["certification"] = certification([0.98, 0.9, 0.6], 0.52, 0.01)
    header, rows = paper_tables.certified_table({"bp_gauss": bp, "cnn_gauss": cnn})
    assert header[:5] == ["", "σ", "images, n", "r = 0", "r = 0.25"] and header[-3:-1] == ["ACR", "abstained"]
    assert rows[0] == [
        "BP, noise-trained",
        "0.3",
        "500, 1,000",
        "0.900",
        "0.700",
        "0.300",
        "0.410",
        "0.020",
        "0.910 (σ = 0.3)",
    ]
    assert rows[1][0] == "CNN, noise-trained" and rows[1][3:6] == ["0.980", "0.900", "0.600"]
    text = paper_tables.certified_text({"bp_gauss": bp, "cnn_gauss": cnn})
    assert "n = 1,000" in text and "BP 0.74, CNN 0.74" in text  # 0.3 * Phi^-1(0.001^(1/1000))


def test_the_certified_table_reads_mean_plus_minus_std_over_seeds_and_is_absent_without_certificates():
    bp = summary(0.95, 0.2, 0.5, 0.91, num_seeds=2, std=0.01)
    assert paper_tables.certified_table({"bp_gauss": bp, "cnn_gauss": summary(0.99, 0.8, 0.9, 0.98)}) is None
    bp["certification"] = certification([0.9, 0.7, 0.3], 0.41, 0.02, num_seeds=2, std=0.01)
    _, rows = paper_tables.certified_table({"bp_gauss": bp, "cnn_gauss": summary(0.99, 0.8, 0.9, 0.98)})
    assert len(rows) == 1 and rows[0][3] == "0.900 ± 0.010" and rows[0][-1] == "0.910 ± 0.010 (σ = 0.3)"


@pytest.mark.parametrize(
    "name, title", [("mnist", "MNIST"), ("fashion_mnist", "Fashion-MNIST"), ("cifar10", "CIFAR-10"), ("svhn", "svhn")]
)
def test_the_report_names_the_dataset_its_runs_recorded(name, title):
    bp = summary(0.9, 0.2, 0.5, 0.6)
    bp["data"] = {"name": name}
    assert paper_tables.dataset_title({"bp": bp}) == title
    assert paper_tables.dataset_title({"bp": summary(0.9, 0.2, 0.5, 0.6)}) == "MNIST"  # a summary before data.name
