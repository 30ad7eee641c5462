"""Tests for advjax.workdir: atomic writes, config identity and differences, and whether a launch may continue
what a workdir holds (refuse, resume, re-evaluate, overwrite)."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from advjax import workdir
from tests.helpers import outputs, run_experiment, synthetic_config, tiny_config

pytestmark = pytest.mark.usefixtures("quick_compile_module")
REPO = pathlib.Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------
# Config identity.


def test_config_differences_name_changed_added_and_removed_fields():
    saved = {"seed": 0, "train": {"epochs": 3, "eps": 0.1}, "gone": 1}
    current = {"seed": 0, "train": {"epochs": 5, "eps": 0.1, "new": [1]}}
    assert workdir.config_differences(saved, current) == ["gone", "train.epochs", "train.new"]
    assert workdir.config_differences(saved, saved) == []
    assert "config.train.epochs: 3 there, 5 now" in workdir.describe_differences(saved, current)


def test_a_live_config_equals_its_saved_json(tmp_path):
    config = tiny_config()
    config.eval.sigma_grid = (0.0, 0.5)  # a tuple live, a list on disk
    workdir.save_config(str(tmp_path), config)
    assert workdir.config_differences(workdir.read_saved_config(str(tmp_path)), workdir.config_as_json(config)) == []


# ----------------------------------------------------------------------------
# Refuse, resume, re-evaluate or clear.


def test_check_resumes_the_same_training_config_and_refuses_another(tmp_path):
    config = tiny_config()
    workdir.save_config(str(tmp_path), config)
    workdir.write_metrics(str(tmp_path), [{"epoch": 1}])
    workdir.check(str(tmp_path), config, overwrite=False)  # the same config: resumed
    evaluated = tiny_config()
    evaluated.eval.sigma_grid, evaluated.robust.enabled, evaluated.num_devices = (0.0, 0.5), True, 1
    workdir.check(str(tmp_path), evaluated, overwrite=False)  # evaluation and devices only: re-evaluated
    other = tiny_config()
    other.train.epochs = 3
    with pytest.raises(workdir.WorkdirError, match=r"config\.train\.epochs: 1 there, 3 now.*--overwrite"):
        workdir.check(str(tmp_path), other, overwrite=False)
    workdir.check(str(tmp_path), other, overwrite=True)  # the caller clears the run


def test_check_refuses_outputs_without_a_config_and_accepts_a_config_alone(tmp_path):
    other = tiny_config()
    other.train.epochs = 3
    workdir.save_config(str(tmp_path), other)  # stopped before its first epoch ended: nothing to lose
    workdir.check(str(tmp_path), tiny_config(), overwrite=False)
    (tmp_path / "checkpoints").mkdir()  # an empty checkpoint directory holds nothing either
    workdir.check(str(tmp_path), tiny_config(), overwrite=False)
    os.remove(tmp_path / workdir.CONFIG_FILE)
    workdir.write_metrics(str(tmp_path), [{"epoch": 1}])
    with pytest.raises(workdir.WorkdirError, match="holds metrics.jsonl but no config.json"):
        workdir.check(str(tmp_path), tiny_config(), overwrite=False)


def test_clear_run_removes_every_output_and_the_config_and_nothing_else(tmp_path):
    config = tiny_config()
    workdir.save_config(str(tmp_path), config)
    workdir.write_metrics(str(tmp_path), [{"epoch": 1}])
    workdir.write_timings(str(tmp_path), [{"epoch": 1, "epoch_seconds": 1.0}])
    workdir.write_summary(str(tmp_path), {"config": workdir.config_as_json(config)})
    (tmp_path / "checkpoints" / "1").mkdir(parents=True)
    (tmp_path / "checkpoints" / "1" / "state").write_text("")
    (tmp_path / "notes.txt").write_text("mine")
    assert workdir.read_finished_summary(str(tmp_path), config) is not None
    workdir.clear_run(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]
    assert workdir.read_summary(str(tmp_path)) is None


@pytest.mark.slow
def test_a_workdir_of_another_config_is_refused_unless_overwritten(tmp_path, synthetic_mnist_dir):
    old = synthetic_config(synthetic_mnist_dir)
    old.train.epochs = 3
    run_experiment(old, tmp_path / "run")
    new = synthetic_config(synthetic_mnist_dir)
    new.train.epochs = 1

    with pytest.raises(workdir.WorkdirError, match=r"config\.train\.epochs: 3 there, 1 now.*--overwrite"):
        run_experiment(new, tmp_path / "run")
    summary = run_experiment(new, tmp_path / "run", overwrite=True)

    # Nothing of the old run is left to be trusted: its later checkpoints, records and timings are gone.
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]
    assert [r["epoch"] for r in summary["epochs"]] == [1]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1
    assert len(json.loads((tmp_path / "run" / "timings.json").read_text())["epochs"]) == 1
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["epochs"] == 1


@pytest.mark.slow
def test_overwrite_with_the_same_config_trains_afresh(tmp_path, synthetic_mnist_dir):
    config = synthetic_config(synthetic_mnist_dir)
    run_experiment(config, tmp_path)
    before = outputs(tmp_path)
    messages = []
    run_experiment(config, tmp_path, log=messages.append, overwrite=True)
    assert not any("resumed" in m for m in messages) and any(m.startswith("epoch 1/1") for m in messages)
    assert outputs(tmp_path) == before


@pytest.mark.slow  # two runs: one trains, the second only evaluates
def test_changing_only_evaluation_settings_keeps_the_trained_model(tmp_path, synthetic_mnist_dir):
    config = synthetic_config(synthetic_mnist_dir)
    first = run_experiment(config, tmp_path)
    config.eval.sigma_grid = (0.0, 0.5)
    messages = []
    second = run_experiment(config, tmp_path, log=messages.append)
    assert any("skipping training" in m for m in messages), messages
    assert second["epochs"] == first["epochs"] and second["accuracy"] == first["accuracy"]
    assert len(second["sweeps"]["gaussian"]["accuracy"]) == 2


# ----------------------------------------------------------------------------
# One writer per workdir, and a workdir or checkpoint directory that is a file.


def test_a_second_holder_of_the_lock_is_refused_at_once_naming_the_first(tmp_path):
    with workdir.locked(str(tmp_path)):
        holder = (tmp_path / workdir.LOCK_FILE).read_text()
        assert f"process {os.getpid()} on {socket.gethostname()}" in holder
        with pytest.raises(workdir.WorkdirError, match=f"is in use by process {os.getpid()} on "):
            with workdir.locked(str(tmp_path)):
                pass
    with workdir.locked(str(tmp_path)):  # released on leaving the block
        pass
    assert not (tmp_path / workdir.LOCK_FILE).exists()


@pytest.mark.slow  # a subprocess
def test_the_lock_dies_with_a_killed_process(tmp_path):
    holding = (
        "import sys, time; from advjax import workdir\n"
        f"with workdir.locked({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(600)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", holding], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert process.stdout.readline().strip() == "held"
        with pytest.raises(workdir.WorkdirError, match=f"in use by process {process.pid} "):
            with workdir.locked(str(tmp_path)):
                pass
    finally:
        process.kill()
        process.wait()
    with workdir.locked(str(tmp_path)):  # SIGKILL freed it: no stale PID file to clean up
        pass


def test_a_workdir_or_a_checkpoint_directory_that_is_a_file_is_named(tmp_path):
    (tmp_path / "run").write_text("keep me")
    with pytest.raises(workdir.WorkdirError, match="is a file, not a directory"):
        workdir.prepare(str(tmp_path / "run"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "checkpoints").write_text("keep me")
    with pytest.raises(workdir.WorkdirError, match="checkpoints is a file, not the checkpoint directory"):
        workdir.prepare(str(tmp_path / "other"))


def test_changing_how_many_checkpoints_are_kept_is_not_another_config(tmp_path):
    config = tiny_config()
    workdir.save_config(str(tmp_path), config)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    config.train.checkpoints_to_keep = 5
    workdir.check(str(tmp_path), config, overwrite=False)
    config.train.epochs += 1
    with pytest.raises(workdir.WorkdirError, match="config.train.epochs"):
        workdir.check(str(tmp_path), config, overwrite=False)


# ----------------------------------------------------------------------------
# The data in the run's identity.

IDENTITY = {"name": "mnist", "source": "idx", "location": "/data/a", "sha256": "a" * 64}
OTHER = {"name": "mnist", "source": "idx", "location": "/data/b", "sha256": "b" * 64}


def test_a_run_on_other_data_is_refused_naming_both_fingerprints(tmp_path):
    workdir.save_config(str(tmp_path), tiny_config(), IDENTITY)
    workdir.check_data(str(tmp_path), OTHER)  # a config.json alone: nothing trained on the old data
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    workdir.check_data(str(tmp_path), dict(IDENTITY, location="/moved"))  # the same content elsewhere
    with pytest.raises(
        workdir.WorkdirError, match=r"sha256 a{16}\.\.\. from /data/a; now sha256 b{16}\.\.\. from /data/b"
    ):
        workdir.check_data(str(tmp_path), OTHER)


def test_the_data_identity_is_kept_apart_from_the_config_fields(tmp_path):
    config = tiny_config()
    workdir.save_config(str(tmp_path), config, IDENTITY)
    assert workdir.read_saved_config(str(tmp_path)) == workdir.config_as_json(config)
    assert workdir.read_data_identity(str(tmp_path)) == IDENTITY
    assert workdir.config_as_json(workdir.load_config(str(tmp_path))) == workdir.config_as_json(config)


def test_a_finished_run_on_other_data_is_not_reused(tmp_path):
    config = tiny_config()
    workdir.write_summary(str(tmp_path), {"config": workdir.config_as_json(config), "data": IDENTITY})
    assert workdir.read_finished_summary(str(tmp_path), config, IDENTITY) is not None
    assert workdir.read_finished_summary(str(tmp_path), config, OTHER) is None


def test_a_run_written_before_the_check_attack_field_resumes_and_is_reused_as_pgd(tmp_path):
    """Runs written before train.overfitting_check_attack existed ran PGD: their saved configs read as "pgd"."""
    config = tiny_config()
    old = workdir.config_as_json(config)
    del old["train"]["overfitting_check_attack"]
    (tmp_path / workdir.CONFIG_FILE).write_text(json.dumps(old))
    workdir.write_metrics(str(tmp_path), [{"epoch": 1}])
    workdir.write_summary(str(tmp_path), {"config": old})
    workdir.check(str(tmp_path), config, overwrite=False)  # resumed, not refused as another config
    assert workdir.training_differences(old, config) == ""
    assert workdir.load_config(str(tmp_path)).train.overfitting_check_attack == "pgd"
    assert workdir.read_finished_summary(str(tmp_path), config) is not None
    apgd = tiny_config()
    apgd.train.overfitting_check_attack = "apgd_ce"  # its records would hold another attack: another run
    with pytest.raises(workdir.WorkdirError, match='overfitting_check_attack: "pgd" there, "apgd_ce" now'):
        workdir.check(str(tmp_path), apgd, overwrite=False)
    assert workdir.read_finished_summary(str(tmp_path), apgd) is None


def test_the_added_fields_hold_the_defaults_and_an_older_finished_run_is_reused_as_it_was(tmp_path):
    config = tiny_config()
    for path, value in workdir.ADDED_FIELDS.items():
        section, leaf = path.split(".")
        assert config[section][leaf] == value, path  # configs/default.py's value: they must not drift apart
    older = workdir.config_as_json(config)
    for path in workdir.ADDED_FIELDS:
        section, leaf = path.split(".")
        del older[section][leaf]
    workdir.write_summary(str(tmp_path), {"config": older})
    assert workdir.read_finished_summary(str(tmp_path), config) is not None
    config.robust.autoattack_steps = 50  # a budget an older run never had: its report must be rerun
    assert workdir.read_finished_summary(str(tmp_path), config) is None
