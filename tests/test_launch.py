"""launch.py end to end, as a user runs it, and its refusals of bad input."""

import gzip
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import advjax
from advjax import data

REPO = pathlib.Path(__file__).resolve().parents[1]
PERTURBATIONS = {"clean", "fgsm", "gaussian", "matched_gaussian"}
SHRINK = [
    "--config.train.epochs=2",
    "--config.train.max_examples=2048",
    "--config.eval.num_train=300",
    "--config.eval.num_validation=300",
    "--config.eval.num_test=500",
    "--config.eval.batch_size=100",
]


def launch(config: str, workdir, *overrides: str, data_dir=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if data_dir is not None:
        env["ADVJAX_DATA_DIR"] = str(data_dir)
    command = [sys.executable, "launch.py", f"--config=configs/{config}.py", f"--workdir={workdir}", *overrides]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def independent_fgsm_accuracy(apply_fn, params, images, labels, eps) -> float:
    """FGSM written from scratch, sharing no code with advjax.attacks."""

    def loss(x, y):
        logits = apply_fn(params, x)
        return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    x = jnp.asarray(images, jnp.float32) / 255.0
    y = jnp.asarray(labels)
    x_adv = jnp.clip(x + eps * jnp.sign(jax.grad(loss)(x, y)), 0.0, 1.0)
    return float(jnp.mean(jnp.argmax(apply_fn(params, x_adv), -1) == y))


def test_bp_adv_end_to_end_writes_everything_and_restores(tmp_path, mnist_dir):
    workdir = tmp_path / "run"
    result = launch("bp_adv", workdir, *SHRINK, data_dir=mnist_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epoch 2/2" in result.stderr
    assert "| validation |" in result.stdout

    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(np.isfinite(r["train_loss"]) and 0 <= r["validation_accuracy"] <= 1 for r in records)

    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["config"]["train"]["mode"] == "fgsm"
    assert set(summary["accuracy"]) == {"train", "validation", "test"}
    for split in ("train", "validation", "test"):
        assert set(summary["accuracy"][split]) == PERTURBATIONS
        assert set(summary["perturbation_stats"][split]) == PERTURBATIONS - {"clean"}
        assert summary["perturbation_stats"][split]["fgsm"]["linf"] == pytest.approx(0.1, abs=1e-6)
    assert any((workdir / "checkpoints").iterdir())

    restored = advjax.restore(str(workdir))
    mnist = data.load_mnist(restored.config.data)
    n = restored.config.eval.num_validation
    ours = independent_fgsm_accuracy(
        jax.jit(restored.apply_fn), restored.params, mnist.validation.images[:n], mnist.validation.labels[:n], 0.1
    )
    assert abs(ours - summary["accuracy"]["validation"]["fgsm"]) <= 0.005


def test_cnn_end_to_end_on_a_shrunk_config(tmp_path, mnist_dir):
    overrides = [
        "--config.train.epochs=1",
        "--config.train.max_examples=256",
        "--config.train.batch_size=32",
        "--config.eval.num_train=100",
        "--config.eval.num_validation=100",
        "--config.eval.num_test=100",
        "--config.eval.batch_size=50",
        "--config.data.num_validation=500",
    ]
    result = launch("cnn_adv", tmp_path / "run", *overrides, data_dir=mnist_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["model"]["name"] == "cnn"
    assert summary["eval_sizes"] == {"train": 100, "validation": 100, "test": 100}


@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.train.eps=-0.1", "config.train.eps=-0.1"),
        ("--config.eval.sigma=-1.0", "config.eval.sigma=-1.0"),
        ("--config.train.alpha=1.5", "config.train.alpha=1.5"),
        ("--config.model.name=resnet", "config.model.name='resnet'"),
    ],
)
def test_bad_config_value_stops_before_anything_is_written(tmp_path, override, message):
    workdir = tmp_path / "run"
    result = launch("bp_adv", workdir, override, data_dir=tmp_path / "unused")
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stderr.count("error:") == 1
    assert not workdir.exists()


def test_wrong_data_directory_is_named_and_nothing_is_trained(tmp_path):
    missing = tmp_path / "no_such_dir"
    result = launch("bp", tmp_path / "run", data_dir=missing)
    assert result.returncode == 2
    assert str(missing) in result.stderr and "does not exist" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_corrupt_data_file_is_named_and_nothing_is_trained(tmp_path, mnist_dir):
    corrupt = tmp_path / "mnist"
    shutil.copytree(mnist_dir, corrupt)
    target = next(corrupt.glob("t10k-labels-idx1-ubyte*"))
    payload = gzip.decompress(target.read_bytes()) if target.suffix == ".gz" else target.read_bytes()
    target.unlink()
    (corrupt / "t10k-labels-idx1-ubyte").write_bytes(payload[:5000])  # truncated
    result = launch("bp", tmp_path / "run", data_dir=corrupt)
    assert result.returncode == 2
    assert "t10k-labels-idx1-ubyte" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_workdir_that_cannot_be_created_is_refused(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = launch("bp", blocker / "run", data_dir=tmp_path)
    assert result.returncode == 2
    assert "not writable" in result.stderr
