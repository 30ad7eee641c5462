"""Tests for advjax.files: atomic writes, the umask's modes, and failures named by their file."""

import json
import os
import stat

import pytest

from advjax import files

# ----------------------------------------------------------------------------
# Atomic writes, modes and named failures.


def test_write_json_round_trips_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "summary.json"
    files.write_json(str(path), {"accuracy": {"test": {"clean": 0.99}}})
    assert json.loads(path.read_text()) == {"accuracy": {"test": {"clean": 0.99}}}
    assert os.listdir(tmp_path) == ["summary.json"]


def test_failed_write_keeps_the_old_file_intact(tmp_path):
    path = tmp_path / "summary.json"
    files.write_json(str(path), {"old": 1})
    with pytest.raises(TypeError):
        files.write_json(str(path), {"new": object()})  # not serializable: fails midway
    assert json.loads(path.read_text()) == {"old": 1}
    assert os.listdir(tmp_path) == ["summary.json"]


def test_write_jsonl_writes_one_object_per_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25}]
    files.write_jsonl(str(path), records)
    assert [json.loads(line) for line in path.read_text().splitlines()] == records


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_files_are_written_with_the_mode_the_umask_gives(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        files.write_json(str(tmp_path / "summary.json"), {})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "summary.json").stat().st_mode) == mode


def test_the_umask_is_read_without_being_changed():
    old = os.umask(0o027)
    try:
        assert files.file_mode_mask() == 0o027
        assert os.umask(0o027) == 0o027
    finally:
        os.umask(old)


def test_a_failed_write_names_the_file_in_one_line(tmp_path):
    path = tmp_path / "no_such_dir" / "summary.json"
    with pytest.raises(OSError) as info:
        files.write_json(str(path), {})
    assert str(info.value) == f"cannot write {path}: No such file or directory"


def test_an_os_error_is_found_anywhere_in_an_errors_chain_or_message():
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError as inner:
            raise RuntimeError("orbax: the save failed") from inner
    except RuntimeError as outer:
        assert files.os_error_reason(outer) == "No space left on device"
    assert files.os_error_reason(ValueError("tensorstore: [errno 28] while writing")) == "No space left on device"
    assert files.os_error_reason(ValueError("a shape mismatch")) is None
