"""Atomic writes and the tables launch.py prints."""

import json
import os

import pytest

from advjax import report, workdir


def test_write_json_round_trips_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "summary.json"
    workdir.write_json(str(path), {"accuracy": {"test": {"clean": 0.99}}})
    assert json.loads(path.read_text()) == {"accuracy": {"test": {"clean": 0.99}}}
    assert os.listdir(tmp_path) == ["summary.json"]


def test_failed_write_keeps_the_old_file_intact(tmp_path):
    path = tmp_path / "summary.json"
    workdir.write_json(str(path), {"old": 1})
    with pytest.raises(TypeError):
        workdir.write_json(str(path), {"new": object()})  # not serializable: fails midway
    assert json.loads(path.read_text()) == {"old": 1}
    assert os.listdir(tmp_path) == ["summary.json"]


def test_write_jsonl_writes_one_object_per_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25}]
    workdir.write_jsonl(str(path), records)
    assert [json.loads(line) for line in path.read_text().splitlines()] == records


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
