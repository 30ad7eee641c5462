"""Train and evaluate one experiment.

python launch.py --config=configs/bp_adv.py --workdir=/tmp/bp_adv [--config.train.epochs=2 ...]

Every fault of the user's input or of the machine ends in one `error:` line and
exit status 2; SIGINT and SIGTERM in one line and 130 or 143 (README, "Reliability").
"""

import os
import signal
import sys
import threading


# Until a run starts there is nothing to stop cleanly: a signal during the imports ends the process in one line.
def _stop_before_the_run(signum: int, _frame) -> None:
    print("interrupted before the run started", file=sys.stderr)
    os._exit(128 + signum)


for _signal in (signal.SIGINT, signal.SIGTERM):
    signal.signal(_signal, _stop_before_the_run)

import logging as pylogging  # noqa: E402

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from advjax import (  # noqa: E402
    checkpoint,
    data,
    experiment,
    fit,
    paper,
    report,
    runtime,
    sharding,
    validation,
    workdir,
)

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
_JOIN_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout", 300, "Seconds to wait for every process to join the cluster before giving up."
)
flags.mark_flags_as_required(["config", "workdir"])

# Faults of the user's input: reported in one line, exit status 2, nothing trained.
USER_ERRORS = (
    validation.ConfigError,
    data.DataError,
    fit.TrainingDiverged,
    workdir.WorkdirError,
    sharding.DeviceError,
    OSError,
)


_PROJECT_DIR = os.path.dirname(os.path.abspath(__file__))


def _keep_only_own_info(record: pylogging.LogRecord) -> bool:
    """Orbax and JAX log every checkpoint step and backend probe at INFO: keep their warnings only. Orbax also
    logs a failed save's traceback from its thread; the failure reaches the run, which reports it in one line."""
    path = os.path.abspath(record.pathname)
    # A virtual environment inside the checkout (.venv) holds orbax too: its files are not the project's own.
    if path.startswith(_PROJECT_DIR + os.sep) and f"{os.sep}site-packages{os.sep}" not in path:
        return True
    return record.levelno >= pylogging.WARNING and not ("/orbax/" in record.pathname and record.exc_info)


def _refuse(message: str) -> None:
    """Reports a fault of the user's input as one line, exit status 2."""
    print("error: " + " ".join(message.split()), file=sys.stderr)
    runtime.exit_now(2)


def _checkpointed_epochs(run_dir: str) -> list[int]:
    if not os.path.isdir(checkpoint.checkpoint_dir(run_dir)):
        return []
    try:
        with checkpoint.open_manager(run_dir) as manager:
            return checkpoint.saved_epochs(manager)
    except Exception:  # a damaged directory: the message then says no epoch is checkpointed
        return []


def _interrupted_message(config, run_dir: str, signal_name: str) -> str:
    """Where the run stopped and what a relaunch does; for a paper run, that finished runs are reused."""
    if paper.is_paper_config(config):
        return (
            f"interrupted by {signal_name}; relaunch the same command to resume: finished runs are reused "
            "and the one in progress resumes after its last checkpointed epoch"
        )
    saved = _checkpointed_epochs(run_dir)
    last, epochs = (saved[-1] if saved else 0), config.train.epochs
    where = f"in epoch {last + 1} of {epochs}" if last < epochs else "after training, while evaluating"
    resume = f"resume after epoch {last}" if last else "start the run again (no epoch was checkpointed)"
    return f"interrupted by {signal_name} {where}; relaunch the same command to {resume}"


def _without_traceback(message: str) -> str:
    """config_flags wraps a config file's own error in its traceback: keep the error's last line."""
    if "Traceback (most recent call last)" not in message:
        return message
    return f"{message.split(':', 1)[0]}: {message.strip().splitlines()[-1]}"


def _config_file_argument(argv: list[str]) -> str | None:
    """The file of --config=FILE[:arg] (or --config FILE), None when absent."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1].split(":", 1)[0]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":", 1)[0]
    return None


def _check_config_file(path: str | None) -> None:
    """Names a missing or unreadable config file before config_flags does, in a traceback."""
    if path is None:
        return
    if os.path.isdir(path):
        _refuse(f"--config={path} is a directory; name a config file, such as configs/bp_adv.py")
    if not os.path.isfile(path):
        beside = os.path.join(_PROJECT_DIR, path)
        hint = f"; did you mean {beside}?" if not os.path.isabs(path) and os.path.isfile(beside) else ""
        _refuse(f"--config={path}: no such file (relative paths are read from {os.getcwd()}){hint}")


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad flag reported as one `error:` line (exit 2), not a usage dump or a traceback."""
    _check_config_file(_config_file_argument(argv))
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:  # a value of the wrong type, a missing required flag, an unreadable config file
        _refuse(_without_traceback(str(e)))
    except (AttributeError, KeyError) as e:  # config_flags, for a --config.<field> the config does not have
        detail = str(e).replace("\\n", " ").replace("\\", "").replace("'", "")
        if "get_config" in detail:
            _refuse(f"--config={_config_file_argument(argv)} defines no get_config(); see configs/default.py")
        _refuse(f"a --config override names a field the config does not have: {detail}")
    if len(rest) > 1:
        _refuse(f"unexpected arguments {rest[1:]}: every option is a flag, such as --config.train.epochs=2")
    return rest


def _missing_peer(timeout: int) -> str:
    """Who did not join: the coordinator for another process; some of the others for the coordinator itself."""
    address = _COORDINATOR.value or os.environ.get(sharding.COORDINATOR_ENV, "the address JAX detected")
    if _PROCESS_ID.value:
        return (
            f"process 0 (the coordinator at {address}) did not answer within {timeout} s; "
            "start it, or check --coordinator_address"
        )
    count = _NUM_PROCESSES.value
    others = f"processes 1..{count - 1}" if count else "the other processes"
    return (
        f"not all of {others} joined the coordinator at {address} within {timeout} s; "
        "start them, or check --num_processes"
    )


def _join_cluster() -> None:
    """jax.distributed's join, watched: JAX aborts in C++ with a stack dump when a peer is missing, so a
    watchdog says which first, in one line, and ends the process."""
    timeout = _JOIN_TIMEOUT.value
    if timeout < 1:
        _refuse(f"--distributed_timeout={timeout} must be at least 1 second")
    watchdog = threading.Timer(timeout, lambda: _refuse(_missing_peer(timeout)))
    watchdog.daemon = True
    watchdog.start()
    try:
        # JAX's own limit comes later, so that the watchdog speaks first.
        sharding.initialize_distributed(
            _COORDINATOR.value,
            _NUM_PROCESSES.value,
            _PROCESS_ID.value,
            auto_detect=_DISTRIBUTED.value,
            timeout_seconds=timeout + 30,
        )
    finally:
        watchdog.cancel()


def _start_jax() -> str | None:
    """Joins the cluster if asked, turns on the compilation cache, and checks a backend exists; returns the cache."""
    _join_cluster()  # before anything touches a device: after it, jax.devices() lists every host's devices
    try:
        cache = runtime.enable_compilation_cache(_COMPILATION_CACHE.value)
    except OSError as e:  # the cache only saves time: a run goes on without it
        print(f"warning: {e}; running without the compilation cache", file=sys.stderr)
        cache = None
    try:
        devices = jax.devices()
    except (RuntimeError, AssertionError) as e:  # JAX_PLATFORMS naming a platform this machine lacks
        platforms, reason = os.environ.get("JAX_PLATFORMS", ""), (str(e).splitlines() or [type(e).__name__])[0]
        raise sharding.DeviceError(
            f"JAX finds no usable backend{f' for JAX_PLATFORMS={platforms}' if platforms else ''} "
            f"({reason}); unset JAX_PLATFORMS or name a platform this machine has"
        ) from e
    logging.info("JAX %s, backend %s, devices %s", jax.__version__, jax.default_backend(), devices)
    logging.info("compilation cache: %s", cache or "off")
    return cache


def _print_result(config, run_dir: str, result: dict, compiled: dict, cache: str | None) -> None:
    """The compilation figures, then the accuracy tables of summary.json (or the paper report's path)."""
    cache_use = (
        f"{compiled['cache_hits']} executables from the cache, {compiled['cache_misses']} compiled"
        if cache
        else "cache off"
    )
    logging.info(
        "compilation: %d executables, %.1fs tracing and lowering, %.1fs in XLA (%s); each named in %s",
        compiled["num_executables"],
        compiled["trace_seconds"],
        compiled["backend_seconds"],
        cache_use,
        os.path.join(run_dir, workdir.TIMINGS_FILE),
    )
    workdir.add_timing(run_dir, "compilation", compiled)  # a paper run's covers all its runs
    if paper.is_paper_config(config):
        print(f"\nWrote {result['report']} with Tables 1-5, figures and CSV/JSON results.")
        return
    print(f"\nAccuracy ({result['attack_labels']} labels for FGSM; eps={config.eval.eps}, sigma={config.eval.sigma}):")
    print(report.accuracy_table(result["accuracy"], result["eval_sizes"]))
    if "robustness" in result:
        robust = result["robustness"]
        print(f"\nRobustness on the first {robust['num_examples']} {config.robust.split} images:")
        print(report.robustness_table(robust))
    if "certification" in result:
        certified = result["certification"]
        budget = f"n0={certified['n0']}, n={certified['n']}, alpha={certified['alpha']}"
        print(f"\nCertified L2 accuracy of the smoothed classifier ({budget}):")
        print(report.certification_table(certified))
        report.plot_certification(certified, os.path.join(run_dir, "certification.png"))
    print("\nPerturbation statistics (after clipping, mean over images):")
    print(report.stats_table(result["perturbation_stats"]))
    figure = ", certification.png" if "certification" in result else ""
    print(f"\nWrote {run_dir}/summary.json, metrics.jsonl, timings.json{figure} and checkpoints/")


def main(argv: list[str]) -> None:
    del argv  # _parse_flags refuses positional arguments
    logging.get_absl_handler().addFilter(_keep_only_own_info)
    runtime.quiet_closed_loop_callbacks()
    # Orbax reads a damaged checkpoint in asyncio tasks whose errors asyncio logs
    # again, kilobytes each, when they are collected; our one error line says it.
    pylogging.getLogger("asyncio").setLevel(pylogging.CRITICAL)
    config, run_dir = _CONFIG.value, _WORKDIR.value
    runtime.raise_on_stop_signals()
    try:
        cache = _start_jax()
        compile_meter = runtime.CompileMeter().install()
        is_paper = paper.is_paper_config(config)
        paper.validate(config) if is_paper else validation.validate(config)  # before the workdir is created
        workdir.prepare(run_dir)
        with workdir.locked(run_dir):  # held until the last line is written
            if is_paper:
                result = paper.run(config, run_dir, overwrite=_OVERWRITE.value, lock=False)
            else:
                result = experiment.train_and_evaluate(config, run_dir, overwrite=_OVERWRITE.value, lock=False)
            _print_result(config, run_dir, result, compile_meter.summary(), cache)
    except USER_ERRORS as e:
        _refuse(str(e))
    except runtime.Interrupted as e:
        print(_interrupted_message(config, run_dir, str(e)), file=sys.stderr)
        runtime.exit_now(128 + e.signum)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
