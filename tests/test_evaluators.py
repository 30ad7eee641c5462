"""Tests for advjax.evaluators: the summary's results, as the evaluators compute them."""

import json

import jax
import pytest

from advjax import data, evaluate, evaluators, models, runtime, seeds, train, workdir
from tests.helpers import run_experiment, synthetic_config, tiny_config

pytestmark = pytest.mark.usefixtures("quick_compile_module")


@pytest.mark.slow  # compiles a whole attack or run: in the full tier
def test_summary_holds_every_split_perturbation_sweep_and_eps_table(tmp_path, synthetic_mnist_dir):
    config = synthetic_config(synthetic_mnist_dir)
    config.train.epochs = 2
    config.eval.sigma_grid = (0.0, 0.5, 1.0)
    config.eval.eps_grid = (0.0, 0.2)
    config.eval.table_eps = (0.05, 0.3)
    summary = run_experiment(config, tmp_path)

    assert summary["accuracy"]["validation"]["clean"] > 0.5  # the synthetic digits are learnable
    assert [r["epoch"] for r in summary["epochs"]] == [1, 2]
    sweeps = summary["sweeps"]
    assert sweeps["split"] == "validation" and len(sweeps["gaussian"]["accuracy"]) == 3
    # sigma = 0 and eps = 0 leave the images unchanged: the sweep's first point is the clean accuracy.
    assert sweeps["gaussian"]["accuracy"][0] == summary["accuracy"]["validation"]["clean"]
    assert sweeps["fgsm"]["accuracy"][0] == summary["accuracy"]["validation"]["clean"]
    assert set(summary["by_eps"]) == {"0.05", "0.3"}
    strong, weak = (summary["by_eps"][e]["validation"]["accuracy"]["fgsm"] for e in ("0.3", "0.05"))
    assert strong <= weak
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["accuracy"] == summary["accuracy"]


def test_evaluate_trained_runs_each_split_on_its_own_key_and_the_sweep_on_the_configured_split(synthetic_mnist_dir):
    config = synthetic_config(synthetic_mnist_dir)
    config.eval.sigma_grid, config.eval.eps_grid, config.eval.table_eps = (0.0, 0.5, 1.0), (), ()
    mnist = data.load_mnist(config.data)
    model = models.build_model(config.model)
    params, apply_fn = train.init_params(jax.random.key(1), model), models.eval_apply(model.apply)

    results = evaluators.evaluate_trained(config, apply_fn, params, mnist)

    sets = evaluators.eval_sets(mnist, config.eval)
    assert results["eval_sizes"] == {"train": 200, "validation": 200, "test": 300}
    assert {split: s.num_examples for split, s in sets.items()} == results["eval_sizes"]
    # Split i is evaluated with fold_in(eval key, i), the eval key being the fourth of seeds.seed_keys.
    eval_rng = seeds.seed_keys(config.seed, 1)[3]
    keys = {split: jax.random.fold_in(eval_rng, i) for i, split in enumerate(evaluators.SPLITS)}
    c = config.eval
    full = evaluate.make_evaluator(
        apply_fn, use_predicted_labels=c.use_predicted_labels, form=c.loop, chunk_size=c.chunk_size
    )
    for split, eval_set in sets.items():
        expected = full(params, eval_set, keys[split], c.eps, c.sigma)
        assert results["accuracy"][split] == expected["accuracy"], split
        assert results["perturbation_stats"][split] == expected["perturbation_stats"], split
    # The Gaussian statistics depend on the key: another split's key would not give them.
    other = full(params, sets["train"], keys["test"], c.eps, c.sigma)
    assert other["perturbation_stats"]["gaussian"] != results["perturbation_stats"]["train"]["gaussian"]
    sweep = evaluate.make_sweep(apply_fn, "gaussian", form=c.loop, chunk_size=c.chunk_size, grid_chunk=c.grid_chunk)
    accuracy = sweep(params, sets["validation"], keys["validation"], c.sigma_grid)
    assert results["sweeps"] == {
        "split": "validation",
        "gaussian": {"grid": [0.0, 0.5, 1.0], **seeds.seed_summary(accuracy, 1)},
    }
    # No eps grid, no eps table, no robustness report: none is computed.
    assert "fgsm" not in results["sweeps"] and results["by_eps"] == {} and "robustness" not in results


@pytest.mark.slow  # compiles a whole attack or run: in the full tier
def test_each_evaluator_writes_exactly_the_fields_it_owns(synthetic_mnist_dir):
    # `owns` is what a relaunch copies from the previous summary: it must be the whole of each part.
    config = synthetic_config(synthetic_mnist_dir)
    config.eval.sigma_grid, config.eval.table_eps = (0.0, 0.5), (0.1,)
    config.robust.enabled, config.robust.num_examples, config.robust.batch_size = True, 50, 50
    config.robust.eps_grid, config.robust.pgd_steps, config.robust.pgd_restarts = (0.1,), 2, 1
    config.certify.enabled, config.certify.num_examples, config.certify.batch = True, 8, 8
    config.certify.n0, config.certify.n, config.certify.chunk_size = 10, 20, 10
    mnist = data.load_mnist(config.data)
    model = models.build_model(config.model)
    params, apply_fn = train.init_params(jax.random.key(1), model), models.eval_apply(model.apply)
    results = evaluators.evaluate_trained(config, apply_fn, params, mnist)
    owned = [key for evaluator in evaluators.EVALUATORS for key in evaluator.owns]
    assert sorted(results) == sorted(owned)
    config.robust.enabled = config.certify.enabled = False  # not asked for: neither runs nor appears
    disabled = evaluators.evaluate_trained(config, apply_fn, params, mnist)
    assert sorted(disabled) == sorted(set(owned) - {"robustness", "certification"})


@pytest.mark.slow  # three runs
def test_a_relaunch_changing_only_robust_settings_reruns_only_the_robustness_report(
    tmp_path, synthetic_mnist_dir, monkeypatch
):
    config = synthetic_config(synthetic_mnist_dir)
    config.robust.enabled, config.robust.num_examples, config.robust.batch_size = True, 50, 50
    config.robust.eps_grid, config.robust.pgd_steps, config.robust.pgd_restarts = (0.1,), 2, 1
    first = run_experiment(config, tmp_path)
    ran = []
    spied = tuple(
        e._replace(run=lambda ctx, run=e.run: (ran.append(run.__name__), run(ctx))[1]) for e in evaluators.EVALUATORS
    )
    monkeypatch.setattr(evaluators, "EVALUATORS", spied)
    config.robust.eps_grid = (0.1, 0.2)
    messages = []
    second = run_experiment(config, tmp_path, log=messages.append)
    assert ran == ["robust"]
    assert second["accuracy"] == first["accuracy"] and second["sweeps"] == first["sweeps"]
    assert len(second["robustness"]["attacks"]["pgd"]["accuracy"]) == 2
    assert sum("reusing the" in m for m in messages) == 3
    # Evaluation settings changed: everything but the robustness report runs again.
    ran.clear()
    config.eval.eps = 0.2
    third = run_experiment(config, tmp_path)
    assert ran == ["splits", "sweeps", "by_eps"] and third["robustness"] == second["robustness"]


def test_an_older_summary_without_the_added_fields_keeps_its_robustness_report_reusable():
    config = tiny_config()
    config.robust.enabled = True
    older = workdir.config_as_json(config)
    for path in workdir.ADDED_FIELDS:
        section, leaf = path.split(".")
        del older[section][leaf]
    robust = next(e for e in evaluators.EVALUATORS if e.run is evaluators.robust)
    previous = {"config": older, "robustness": {}}
    assert evaluators.reusable(robust, config, previous)
    config.robust.autoattack_queries = 100
    assert not evaluators.reusable(robust, config, previous)


def test_evaluations_built_and_compiled_ahead_are_the_ones_evaluate_trained_runs(synthetic_mnist_dir):
    # experiment compiles them in a thread while training runs; afterwards only small slices compile.
    config = synthetic_config(synthetic_mnist_dir)
    config.eval.sigma_grid, config.eval.eps_grid, config.eval.table_eps = (0.0, 0.5), (0.1,), (0.1, 0.2)
    mnist = data.load_mnist(config.data)
    model = models.build_model(config.model)
    params, apply_fn = train.init_params(jax.random.key(1), model), models.eval_apply(model.apply)
    built = evaluators.build(config, apply_fn)
    meter = runtime.CompileMeter().install()
    try:
        built.compile_ahead(config, jax.eval_shape(lambda p: p, params), mnist)
        ahead = len(meter.executables)
        results = evaluators.evaluate_trained(config, apply_fn, params, mnist, built=built)
        later = [e["name"] for e in meter.executables[ahead:]]
    finally:
        meter.uninstall()
    assert ahead >= 4  # the splits' evaluator and the sweeps of three perturbations
    assert not [name for name in later if "chunk" in name or "fold)" in name], later
    assert results == evaluators.evaluate_trained(config, apply_fn, params, mnist)
