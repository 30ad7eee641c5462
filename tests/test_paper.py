"""configs/paper.py end to end on synthetic data: all tables and figures, and reuse on restart."""

import json

import pytest

from advjax import paper, workdir
from configs import paper as paper_config
from tests.helpers import synthetic_config


def tiny_paper_config(data_dir):
    config = paper_config.get_config()
    config.data = synthetic_config(data_dir).data
    config.report.table_eps = (0.1, 0.3)
    for name in config.runs:
        run = config.runs[name]
        shrunk = synthetic_config(data_dir, run.model.name, run.train.mode)
        shrunk.train.batch_size = 250
        shrunk.train.chunk_size = 2
        shrunk.eval.sigma_grid = (0.0, 0.5, 1.0)
        shrunk.eval.eps_grid = (0.0, 0.1, 0.2)
        shrunk.eval.sigma = run.eval.sigma
        if run.certify.enabled:  # the noise-trained runs, certified at their training sigma on a tiny budget
            shrunk.certify = run.certify
            c = shrunk.certify
            c.n0, c.n, c.chunk_size, c.num_examples, c.batch = 10, 40, 20, 8, 8
        config.runs[name] = shrunk
    return config


@pytest.mark.slow
@pytest.mark.usefixtures("quick_compile")  # six tiny runs: XLA's full passes cost more than they save
def test_paper_writes_all_tables_and_figures_and_reuses_finished_runs(tmp_path, synthetic_mnist_dir):
    config = tiny_paper_config(synthetic_mnist_dir)
    messages = []
    result = paper.run(config, str(tmp_path), log=messages.append)

    text = (tmp_path / "report.md").read_text()
    for heading in ("Table 1.", "Table 2.", "Table 3.", "Table 4.", "Table 5.", "## Settings", "where not"):
        assert heading in text
    assert "### eps = 0.1" in text and "### eps = 0.3" in text
    assert text.startswith("# Fooling neural networks by adding noises: reproduced with advjax on MNIST\n")
    assert "## Beyond the paper: certified L2 robustness" in text and "| BP, noise-trained | 0.3 | 8, 40 |" in text
    assert (tmp_path / "certified_l2.csv").read_text().startswith(',σ,"images, n",r = 0,')
    figures = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert figures == sorted(
        [
            "fig1_digits.png",
            "fig3_gaussian_noise.png",
            "fig4_fgsm.png",
            "fig6_noise_bp_vs_cnn.png",
            "fig7_noise_cnn_ord_vs_adv.png",
            "fig8_noise_bp_ord_vs_adv.png",
            "fig_eps_all_models.png",
            "fig_certified_l2.png",
        ]
    )
    for name in figures:
        assert f"figures/{name}" in text
        assert (tmp_path / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["best_matching_eps"] in ("0.1", "0.3")
    assert set(results["runs"]) == set(paper_config.RUNS)
    assert (tmp_path / "table1_clean.csv").read_text().startswith(",BP (ours),BP (paper)")
    bp_val = result["summaries"]["bp"]["accuracy"]["validation"]["clean"]
    assert f"{bp_val:.3f}" in text

    again = []
    paper.run(config, str(tmp_path), log=again.append)
    assert sum("reusing" in m for m in again) == 6
    assert not any("training" in m for m in again)


@pytest.mark.slow
def test_a_changed_run_config_is_retrained_not_reused(tmp_path, synthetic_mnist_dir):
    config = tiny_paper_config(synthetic_mnist_dir)
    run = paper.run_configs(config)["bp"]
    from advjax import experiment

    experiment.train_and_evaluate(run, str(tmp_path / "bp"), log=lambda m: None)
    assert workdir.read_finished_summary(str(tmp_path / "bp"), run) is not None
    run.train.epochs = 2
    assert workdir.read_finished_summary(str(tmp_path / "bp"), run) is None


def test_every_run_is_validated_before_any_trains(tmp_path, synthetic_mnist_dir):
    config = tiny_paper_config(synthetic_mnist_dir)
    config.runs.cnn_gauss.train.sigma = -1.0
    from advjax import validation

    with pytest.raises(validation.ConfigError, match="train.sigma"):
        paper.run(config, str(tmp_path), log=lambda m: None)
    assert not (tmp_path / "bp" / "summary.json").exists()
