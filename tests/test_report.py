"""Tests for advjax.report: the tables launch.py prints."""

from advjax import report


def test_accuracy_table_orders_splits_and_formats_cells():
    table = report.accuracy_table({"test": {"clean": 0.98765, "fgsm": 0.1}, "train": {"clean": 0.5, "fgsm": 0.25}})
    lines = table.splitlines()
    assert lines[0] == "| split | clean | fgsm |"
    assert lines[2] == "| train | 0.5000 | 0.2500 |"
    assert lines[3] == "| test | 0.9877 | 0.1000 |"


def test_stats_table_has_a_row_per_split_and_perturbation():
    stats = {"mean": 0.01, "std": 0.05, "linf": 0.1, "l2": 2.0}
    table = report.stats_table({"train": {"fgsm": stats, "gaussian": stats}, "test": {"fgsm": stats}})
    assert len(table.splitlines()) == 2 + 3
    assert "| test | fgsm | +0.0100 | 0.0500 | 0.1000 | 2.000 |" in table


def test_accuracy_table_names_each_splits_image_count():
    table = report.accuracy_table({"train": {"clean": 0.5}, "test": {"clean": 0.25}}, {"train": 5000, "test": 10000})
    assert table.splitlines()[0] == "| split | images | clean |"
    assert "| train | 5000 | 0.5000 |" in table and "| test | 10000 | 0.2500 |" in table


def test_robustness_table_has_each_attack_and_the_worst_case_with_image_counts():
    def attack(steps, restarts, accuracy):
        return {"norm": "linf", "eps": [0.1, 0.3], "accuracy": accuracy, "num_steps": steps}, restarts

    attacks = {}
    for name, (fields, restarts) in {"fgsm": attack(1, 1, [0.9, 0.5]), "pgd": attack(50, 10, [0.8, 0.4])}.items():
        attacks[name] = {**fields, "num_restarts": restarts, "num_examples": 1000}
    worst = {"linf": {"eps": [0.1, 0.3], "accuracy": [0.8, 0.375], "over": ["clean", "fgsm", "pgd"]}}
    lines = report.robustness_table({"num_examples": 1000, "attacks": attacks, "worst_case": worst}).splitlines()
    assert lines[2] == "| fgsm | linf | 1000 | 0.9000 @ 0.1, 0.5000 @ 0.3 |"
    assert lines[3] == "| pgd-50 x 10 | linf | 1000 | 0.8000 @ 0.1, 0.4000 @ 0.3 |"
    assert lines[4] == "| worst case over clean, fgsm, pgd | linf | 1000 | 0.8000 @ 0.1, 0.3750 @ 0.3 |"
