"""Train and evaluate one experiment.

    python launch.py --config=configs/bp_adv.py --workdir=/tmp/bp_adv [--config.train.epochs=2 ...]
"""

import logging as pylogging
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from advjax import data, experiment, paper, report, validation

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, summary and checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])

# Faults of the user's input: reported in one line, exit status 2, nothing trained.
USER_ERRORS = (validation.ConfigError, data.DataError, experiment.TrainingDiverged, OSError)


_PROJECT_DIR = os.path.dirname(os.path.abspath(__file__))


def _keep_only_own_info(record: pylogging.LogRecord) -> bool:
    """Orbax and JAX log every checkpoint step and backend probe at INFO: keep their warnings only."""
    return record.levelno >= pylogging.WARNING or os.path.abspath(record.pathname).startswith(_PROJECT_DIR)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_keep_only_own_info)
    logging.info("JAX %s, backend %s, devices %s", jax.__version__, jax.default_backend(), jax.devices())
    config, workdir = _CONFIG.value, _WORKDIR.value
    try:
        if paper.is_paper_config(config):
            result = paper.run(config, workdir)
        else:
            result = experiment.train_and_evaluate(config, workdir)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if paper.is_paper_config(config):
        print(f"\nWrote {result['report']} with Tables 1-5, figures and CSV/JSON results.")
        return
    print(f"\nAccuracy ({result['attack_labels']} labels for FGSM; eps={config.eval.eps}, sigma={config.eval.sigma}):")
    print(report.accuracy_table(result["accuracy"]))
    print("\nPerturbation statistics (after clipping, mean over images):")
    print(report.stats_table(result["perturbation_stats"]))
    print(f"\nWrote {workdir}/summary.json, metrics.jsonl and checkpoints/")


if __name__ == "__main__":
    app.run(main)
