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
