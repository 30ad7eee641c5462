"""One experiment end to end, as thin wiring: config -> data -> model -> fit -> evaluate -> the workdir.

`config.num_seeds = K` trains K independently seeded models (seeds
`config.seed + i`) in one vmapped computation (advjax.seeds): init, shuffling,
dropout and noise all differ, and model i equals a K=1 run with seed `config.seed + i`.
"""

import contextlib
import time
from collections.abc import Callable

import jax
import ml_collections
from absl import logging

from advjax import checkpoint, data, evaluators, fit, memory, models, overfitting, sharding, train, validation, workdir

PERTURBATION_STATS_DEFINITION = (
    "per-image mean, std, L-inf and L2 of (perturbed - clean) after clipping to [0, 1], averaged over images"
)


def summarize(
    config: ml_collections.ConfigDict, results: dict, fitted: fit.Fitted, evaluated_epochs, mesh, data_identity: dict
) -> dict:
    """summary.json: the config, the data, where it ran, the evaluation's results and the training records."""
    return {
        "config": config.to_dict(),
        "data": data_identity,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "num_seeds": config.num_seeds,
        "attack_labels": "predicted" if config.eval.use_predicted_labels else "true",
        "perturbation_stats_definition": PERTURBATION_STATS_DEFINITION,
        **sharding.describe(mesh),
        **results,
        "overfitting_check": overfitting.summary(fitted.records),
        # Per seed, the epoch whose params were evaluated (train.keep_best); None: the last.
        "evaluated_epochs": evaluated_epochs,
        "epochs": fitted.records,
    }


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    run_dir: str,
    log: Callable[[str], None] = logging.info,
    overwrite: bool = False,
    lock: bool = True,
) -> dict:
    """Trains `config`, evaluates it, writes metrics, checkpoints, timings and summary; returns the summary.

    A workdir holding a run of the same config and data is resumed (a finished
    one is only evaluated again); one of another config or other data is
    refused unless `overwrite`, which deletes that run first. The config, the
    workdir and the data are all checked before anything in the workdir
    changes. The workdir is locked for the whole run (`lock=False`: the caller
    holds the lock), so a second process refuses instead of writing over it.

    >>> summary = train_and_evaluate(configs.bp_adv.get_config(), "runs/bp_adv")
    >>> summary["accuracy"]["test"]["fgsm"]
    """
    validation.validate(config)
    workdir.prepare(run_dir)
    with workdir.locked(run_dir) if lock else contextlib.nullcontext():
        mnist, identity = prepare_run(config, run_dir, log, overwrite)
        return _fit_and_evaluate(config, run_dir, mnist, identity, log)


def recover_config(run_dir: str, log: Callable[[str], None]) -> None:
    """Writes back a lost config.json (and its data identity) from the newest checkpoint, which holds both."""
    if workdir.read_saved_config(run_dir) is not None:
        return
    run = checkpoint.newest_run_item(run_dir)
    if run is None or "config" not in run:
        return
    workdir.save_config(run_dir, ml_collections.ConfigDict(run["config"]), run["data"] if "data" in run else None)
    log(
        f"warning: {run_dir}/{workdir.CONFIG_FILE} was missing; "
        f"recovered it from the checkpoint of epoch {run['epoch']}"
    )


def prepare_run(config: ml_collections.ConfigDict, run_dir: str, log: Callable[[str], None], overwrite: bool):
    """(data, its identity): the workdir checked against the config and the data, then cleared if `overwrite`."""
    mnist, identity = data.load(config.data)
    validation.check_sizes(config, mnist)
    memory.check_fits(config, mnist=mnist)
    if not overwrite:
        recover_config(run_dir, log)
    workdir.check(run_dir, config, overwrite)
    if not overwrite:
        workdir.check_data(run_dir, identity)
    if overwrite:
        workdir.clear_run(run_dir)
    workdir.save_config(run_dir, config, identity)
    log(
        f"data: {len(mnist.train.labels)} train / {len(mnist.validation.labels)} validation / "
        f"{len(mnist.test.labels)} test from {identity['location']} (sha256 {identity['sha256'][:12]})"
    )
    return mnist, identity


def same_model_summary(run_dir: str, records: list[dict], evaluated_epochs, identity: dict) -> dict | None:
    """The workdir's summary.json if it evaluated the very params about to be evaluated (the same training
    records, evaluated epochs and data: training is deterministic), else None.

    >>> previous = same_model_summary("runs/bp_adv", fitted.records, None, identity)
    """
    summary = workdir.read_summary(run_dir)
    try:
        same = summary["epochs"] == records and summary["evaluated_epochs"] == evaluated_epochs
        return summary if same and summary["data"]["sha256"] == identity["sha256"] else None
    except (KeyError, TypeError):  # no summary, or one from before the data were recorded
        return None


def _fit_and_evaluate(config, run_dir: str, mnist: data.MNIST, identity: dict, log: Callable[[str], None]) -> dict:
    model = models.build_model(config.model, data.dataset_info(config.data))
    mesh = sharding.data_mesh_for(config.num_devices)
    apply_fn, built = models.eval_apply(model.apply), None
    if mesh is None:  # the final evaluations compile on another core while training runs (fit.fit)
        built = evaluators.build(config, apply_fn)
    compile_ahead = None if built is None else (lambda params: built.compile_ahead(config, params, mnist))
    fitted = fit.fit(config, model, mnist, run_dir, log, mesh, data_identity=identity, compile_ahead=compile_ahead)
    params, selected = train.eval_variables(fitted.state), None  # with the batch statistics of a BatchNorm model
    if config.train.keep_best:
        params, selected = fit.restore_best_params(run_dir, fitted.state, config, fitted.records)
        attack = overfitting.CHECK_ATTACKS[overfitting.check_attack(fitted.records[-1])]
        log(
            f"evaluating the epoch{'s' if len(selected) > 1 else ''} of best held-out {attack} accuracy: "
            f"{', '.join(map(str, selected))}"
        )

    log(f"evaluating: FGSM eps={config.eval.eps}, Gaussian sigma={config.eval.sigma}, matched Gaussian, sweeps")
    start = time.perf_counter()
    previous = same_model_summary(run_dir, fitted.records, selected, identity)
    results = evaluators.evaluate_trained(config, apply_fn, params, mnist, mesh, previous, log, built=built)
    evaluation_seconds = time.perf_counter() - start
    # Wall-clock seconds go to timings.json; summary.json stays deterministic.
    robust_seconds = results["robustness"].pop("seconds", None) if "robustness" in results else None
    certify_seconds = results["certification"].pop("seconds", None) if "certification" in results else None
    summary = summarize(config, results, fitted, selected, mesh, identity)
    workdir.write_timings(
        run_dir,
        fitted.timings,
        evaluation_seconds,
        robustness_seconds=robust_seconds,
        certification_seconds=certify_seconds,
    )
    workdir.write_summary(run_dir, summary)  # last: it marks a finished run
    log(f"evaluation took {evaluation_seconds:.1f}s")
    return summary
