"""Train and evaluate one experiment.

python launch.py --config=configs/bp_adv.py --workdir=/tmp/bp_adv [--config.train.epochs=2 ...]
"""

import logging as pylogging
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from advjax import data, experiment, fit, paper, report, runtime, sharding, validation, workdir

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, summary and checkpoints.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite",
    False,
    "Discard what --workdir holds and train afresh. Without it, a workdir of the same config is resumed "
    "and one of a different config is refused.",
)
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache",
    runtime.default_compilation_cache_dir(),
    "JAX's persistent compilation cache: a second run of a config loads its executables instead of "
    "compiling them. 'none' turns it off.",
)
# Several hosts (README, "Scaling"): jax.distributed joins the processes into one mesh.
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Join a cluster JAX detects itself (Slurm, Open MPI, Cloud TPU, Kubernetes)."
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (or $JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the cluster.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 to num_processes - 1.")
flags.mark_flags_as_required(["config", "workdir"])

# Faults of the user's input: reported in one line, exit status 2, nothing trained.
USER_ERRORS = (validation.ConfigError, data.DataError, fit.TrainingDiverged, workdir.WorkdirError, OSError)


_PROJECT_DIR = os.path.dirname(os.path.abspath(__file__))


def _keep_only_own_info(record: pylogging.LogRecord) -> bool:
    """Orbax and JAX log every checkpoint step and backend probe at INFO: keep their warnings only."""
    return record.levelno >= pylogging.WARNING or os.path.abspath(record.pathname).startswith(_PROJECT_DIR)


def _refuse(message: str) -> None:
    """Reports a fault of the user's input as one line, exit status 2."""
    print("error: " + " ".join(message.split()), file=sys.stderr)
    sys.exit(2)


def _without_traceback(message: str) -> str:
    """config_flags wraps a config file's own error in its traceback: keep the error's last line."""
    if "Traceback (most recent call last)" not in message:
        return message
    return f"{message.split(':', 1)[0]}: {message.strip().splitlines()[-1]}"


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad flag reported as one `error:` line (exit 2), not a usage dump or a traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:  # a value of the wrong type, a missing required flag, an unreadable config file
        _refuse(_without_traceback(str(e)))
    except (AttributeError, KeyError) as e:  # config_flags, for a --config.<field> the config does not have
        detail = str(e).replace("\\n", " ").replace("\\", "").replace("'", "")
        _refuse(f"a --config override names a field the config does not have: {detail}")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_keep_only_own_info)
    # Orbax reads a damaged checkpoint in asyncio tasks whose errors asyncio logs
    # again, kilobytes each, when they are collected; our one error line says it.
    pylogging.getLogger("asyncio").setLevel(pylogging.CRITICAL)
    # Before anything touches a device: after it, jax.devices() lists every host's devices.
    sharding.initialize_distributed(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, auto_detect=_DISTRIBUTED.value
    )
    cache = runtime.enable_compilation_cache(_COMPILATION_CACHE.value)
    compile_meter = runtime.CompileMeter().install()
    logging.info("JAX %s, backend %s, devices %s", jax.__version__, jax.default_backend(), jax.devices())
    logging.info("compilation cache: %s", cache or "off")
    config, run_dir = _CONFIG.value, _WORKDIR.value
    try:
        if paper.is_paper_config(config):
            result = paper.run(config, run_dir, overwrite=_OVERWRITE.value)
        else:
            result = experiment.train_and_evaluate(config, run_dir, overwrite=_OVERWRITE.value)
    except USER_ERRORS as e:
        _refuse(str(e))
    compiled = compile_meter.summary()
    cache_use = (
        f"{compiled['cache_hits']} executables from the cache, {compiled['cache_misses']} compiled"
        if cache
        else "cache off"
    )
    logging.info(
        "compilation: %.1fs tracing and lowering, %.1fs in XLA (%s)",
        compiled["trace_seconds"],
        compiled["backend_seconds"],
        cache_use,
    )
    if not paper.is_paper_config(config):
        workdir.add_timing(run_dir, "compilation", compiled)
    if paper.is_paper_config(config):
        print(f"\nWrote {result['report']} with Tables 1-5, figures and CSV/JSON results.")
        return
    print(f"\nAccuracy ({result['attack_labels']} labels for FGSM; eps={config.eval.eps}, sigma={config.eval.sigma}):")
    print(report.accuracy_table(result["accuracy"]))
    print("\nPerturbation statistics (after clipping, mean over images):")
    print(report.stats_table(result["perturbation_stats"]))
    print(f"\nWrote {run_dir}/summary.json, metrics.jsonl, timings.json and checkpoints/")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
