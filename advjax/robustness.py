"""Robustness evaluation that gradient masking cannot fool.

FGSM accuracy alone can be an illusion: a model that masks its gradients
(docs/design.md, "Catastrophic overfitting") or that profits from label
leaking ("Label leaking") looks robust to one step and is not. This module
measures accuracy against eps for several attacks, including PGD with many
steps and restarts, and the per-example worst case over them: an example
counts as robust only if every attack (and the clean image) fails to fool the
model.

An iterative attack's evaluation is itself one fold (advjax.eval_fold) over
"ticks": (batch, restart, step) flattened, batch outermost. Each tick takes
one step of the spec's IterativeAttack (`attack_specs.iterative_attack`:
`attacks.make_pgd` for BIM and PGD, the very attack `attacks.pgd` runs, and
`apgd.make_apgd` for APGD-CE) on its state (carried per grid point, whatever
its fields); a restart's first tick runs the attack's init
(the start), its last tick scores its finalize and keeps the per-example worst
case, and the kept correctness is written into a [grid, batch, example] array
that only leaves the device at the end. Ticks rather than `attacks.pgd` per
batch, because on XLA:CPU the input-gradient convolutions run slowly inside
any while loop ("Convolutions in XLA:CPU loops"), and PGD-100 x 10 restarts
cannot be unrolled whole. Starts and scoring sit under `lax.cond`, so they
run only on the ticks that need them. One-step attacks and DeepFool take one tick per batch.

The eps grid is vmapped inside each tick, so all grid points advance together
and a new grid of the same length reuses the compiled code.

Key scheme (so a direct call can be matched): batch b uses
`batch_key = fold_in(key, b)`. An iterative attack's restart r starts from
its init with `fold_in(batch_key, r)`, exactly what `attacks.pgd(..., key=batch_key)`
and `attack_registry.apgd_ce(..., key=batch_key)` use; a one-step attack gets `batch_key`
itself, as `attack_registry.make_attack(name)(..., key=batch_key)` would. Every grid
point uses the same keys (common random numbers).
"""

import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from advjax import attack_registry, attacks, restarts, seeds
from advjax.attack_specs import (
    ATTACK_NORMS,
    ITERATIVE,
    RESTARTABLE,
    AttackSpec,
    attack_specs,
    check_spec,
    describe_step_size,
    iterative_attack,
    num_steps,
    step_size,
)
from advjax.eval_fold import EvalSet, make_eval_fold, make_eval_set
from advjax.evaluate import attack_labels
from advjax.models import ApplyFn


class RobustResult(NamedTuple):
    """With num_seeds > 1 each array has a leading seed axis."""

    grid: np.ndarray  # [G] the eps values
    accuracy: np.ndarray  # [G] accuracy against the true labels
    correct: np.ndarray  # bool [G, N] per real example (padding removed), for worst cases across attacks


def _one_tick_attack(spec: AttackSpec) -> attack_registry.Attack:
    """`attack(logits_fn, images, labels, eps, key)` for an attack that needs one tick per batch."""
    if spec.name == "clean":
        return lambda logits_fn, images, labels, eps, key: images
    if spec.name == "fgsm_random_start":

        def fgsm_random_start(logits_fn, images, labels, eps, key):
            step = None if spec.step_size is None and spec.relative_step_size is None else step_size(spec, eps)
            return attacks.fgsm_random_start(logits_fn, images, labels, eps, key, step)

        return fgsm_random_start
    # fgsm, fgm_l2 and deepfool (deepfool_within eps) from the registry; they take no step size.
    params = {"max_iter": num_steps(spec)} if spec.name == "deepfool" else {}
    return attack_registry.make_attack(spec.name, **params)


class _Carry(NamedTuple):
    """The fold's state. The fields after `correct` are None for one-tick attacks."""

    correct: jax.Array  # bool [G, num_batches, B]: per example, correct on the kept adversarial image
    attack: Any = None  # the running restart's IterativeAttack state, per grid point: leaves [G, B, ...]
    labels: jax.Array | None = None  # [B]: the labels the attack moves away from (true or predicted)
    kept_correct: jax.Array | None = None  # bool [G, B]: correctness on the worst restart so far
    kept: restarts.AttackOutcome | None = None  # [G, B] each: that restart's success and objective


def _when(predicate, fn: Callable, carry):
    """fn(carry) where `predicate` holds: a Python True applies it outright, a traced one under lax.cond."""
    if predicate is True:
        return fn(carry)
    return lax.cond(predicate, fn, lambda c: c, carry)


def _write(carry: _Carry, correct: jax.Array, batch) -> _Carry:
    """The batch's correctness [G, B] into the [G, num_batches, B] record."""
    return carry._replace(correct=lax.dynamic_update_index_in_dim(carry.correct, correct, batch.index, axis=1))


def _is_correct(logits: jax.Array, batch) -> jax.Array:
    return jnp.argmax(logits, axis=-1) == batch.labels  # always against the true labels


def _one_tick_per_batch(spec: AttackSpec) -> Callable:
    attack = _one_tick_attack(spec)

    def per_batch(carry: _Carry, batch, logits_fn, grid) -> _Carry:
        labels = attack_labels(logits_fn, batch.images, batch.labels, spec.use_predicted_labels)
        adversarial = jax.vmap(lambda eps: attack(logits_fn, batch.images, labels, eps, batch.key))(grid)
        return _write(carry, jax.vmap(lambda a: _is_correct(logits_fn(a), batch))(adversarial), batch)

    return per_batch


def _iterative_per_tick(spec: AttackSpec) -> Callable:
    """One step of the spec's IterativeAttack per tick; a restart's first tick runs its init, its last scores
    its finalize."""
    steps, num_restarts = num_steps(spec), spec.num_restarts
    select = jax.vmap(restarts.RESTART_SELECTIONS[spec.restart_selection])

    def per_tick(carry: _Carry, batch, logits_fn, grid) -> _Carry:
        restart, step = (batch.tick // steps) % num_restarts, batch.tick % steps
        attack_at = lambda eps: iterative_attack(spec, logits_fn, eps)  # the very attack a direct call runs

        def start(c: _Carry) -> _Carry:
            labels = attack_labels(logits_fn, batch.images, batch.labels, spec.use_predicted_labels)
            restart_key = jax.random.fold_in(batch.key, restart)  # a direct call's key for this restart
            states = jax.vmap(lambda eps: attack_at(eps).init(batch.images, labels, restart_key))(grid)
            return c._replace(attack=states, labels=labels.astype(jnp.int32))

        carry = _when(True if steps == 1 else step == 0, start, carry)
        carry = carry._replace(attack=jax.vmap(lambda state, eps: attack_at(eps).step(state, step))(carry.attack, grid))

        def score(c: _Carry) -> _Carry:
            def outcome(state, eps):
                adversarial = attack_at(eps).finalize(state)
                logits = logits_fn(adversarial)  # one forward pass serves the outcome and the correctness
                return _is_correct(logits, batch), restarts.attack_outcome(lambda _: logits, adversarial, c.labels)

            candidate = jax.vmap(outcome)(c.attack, grid)
            if num_restarts > 1:
                # As attacks.pgd: the first restart is kept as is, later ones through the restart selection.
                merged = select((c.kept_correct, c.kept), candidate)
                candidate = jax.tree.map(lambda new, old: jnp.where(restart == 0, new, old), candidate, merged)
            kept_correct, kept = candidate
            # Written at every restart's end; the last restart's write holds the batch's worst case.
            return _write(c._replace(kept_correct=kept_correct, kept=kept), kept_correct, batch)

        return _when(True if steps == 1 else step == steps - 1, score, carry)

    return per_tick


def _state_shapes(spec: AttackSpec, batch_size: int, image_shape: tuple) -> Any:
    """The attack state's shapes and dtypes for one batch at one eps.

    Traced with a stand-in model: every state here (PGD's, APGD's) is shaped by the images alone."""
    stand_in = lambda x: x.reshape(x.shape[0], -1)
    images = jax.ShapeDtypeStruct((batch_size,) + image_shape, jnp.float32)
    labels = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    init = lambda x, y, key: iterative_attack(spec, stand_in, 0.1).init(x, y, key)
    return jax.eval_shape(init, images, labels, jax.eval_shape(jax.random.key, 0))


def _initial_carry(spec: AttackSpec, num_seeds: int, grid_size: int, eval_set: EvalSet) -> _Carry:
    lead = seeds.seed_shape(num_seeds)
    num_batches, batch_size = eval_set.labels.shape
    correct = np.zeros(lead + (grid_size, num_batches, batch_size), bool)  # host arrays: see evaluate._zero_totals
    if spec.name not in ITERATIVE:
        return _Carry(correct)
    per_example = lead + (grid_size, batch_size)
    # A buffer per leaf, never one array twice: the fold donates its carry, leaf by leaf.
    shapes = _state_shapes(spec, batch_size, tuple(eval_set.images.shape[2:]))
    return _Carry(
        correct=correct,
        attack=jax.tree.map(lambda s: np.zeros(lead + (grid_size,) + s.shape, s.dtype), shapes),
        labels=np.zeros(lead + (batch_size,), np.int32),
        kept_correct=np.zeros(per_example, bool),
        kept=restarts.AttackOutcome(np.zeros(per_example, bool), np.zeros(per_example, np.float32)),
    )


def make_robust_sweep(
    apply_fn: ApplyFn, spec: AttackSpec, *, form: str = "auto", chunk_size: int = 4, num_seeds: int = 1
) -> Callable[..., RobustResult]:
    """`sweep(params, eval_set, key, eps_grid) -> RobustResult`, one compiled fold.

    Build it once and call it for any params, key, eval set of the same shape
    and grid of the same length without recompiling. With `num_seeds > 1`,
    `params` and `key` carry a leading seed axis, and so does every result array.

    >>> pgd = make_robust_sweep(apply_fn, AttackSpec("pgd", num_steps=50, num_restarts=10, step_size=0.01))
    >>> pgd(params, make_eval_set(images, labels, 1000, 500), jax.random.key(0), (0.1, 0.3)).accuracy  # [2]
    """
    check_spec(spec)
    iterative = spec.name in ITERATIVE
    ticks_per_batch = num_steps(spec) * spec.num_restarts if iterative else 1
    per_batch = _iterative_per_tick(spec) if iterative else _one_tick_per_batch(spec)
    run = make_eval_fold(
        per_batch,
        apply_fn,
        ticks_per_batch=ticks_per_batch,
        form=form,
        chunk_size=chunk_size,
        num_seeds=num_seeds,
        name=f"robust_{spec.name}",
    )

    def sweep(params, eval_set: EvalSet, key: jax.Array, eps_grid: Sequence[float] | jax.Array) -> RobustResult:
        grid = np.asarray(eps_grid, np.float32)
        if grid.ndim != 1 or grid.shape[0] == 0:
            raise ValueError(f"eps_grid must be a non-empty list of numbers, got {eps_grid!r}")
        carry = run(params, eval_set, key, _initial_carry(spec, num_seeds, grid.shape[0], eval_set), grid)
        correct = np.asarray(carry.correct)  # [K?, G, num_batches, B]; the only transfer to the host
        correct = correct.reshape(correct.shape[:-2] + (-1,))[..., np.asarray(eval_set.mask).reshape(-1)]
        return RobustResult(np.asarray(grid), correct.sum(-1) / eval_set.num_examples, correct)

    def compile_ahead(params, eval_set: EvalSet, key: jax.Array, eps_grid: Sequence[float]) -> None:
        grid = np.asarray(eps_grid, np.float32)
        run.compile_ahead(params, eval_set, key, _initial_carry(spec, num_seeds, grid.shape[0], eval_set), grid)

    # Exposed for inspection: tests check that a tick's program holds no while loop.
    sweep.fold, sweep.body, sweep.ticks_per_batch = run.fold, run.body, ticks_per_batch
    sweep.compile_ahead = compile_ahead
    sweep.initial_carry = lambda grid_size, eval_set: _initial_carry(spec, num_seeds, grid_size, eval_set)
    return sweep


def worst_case_correct(correct_by_attack: Mapping[str, np.ndarray]) -> np.ndarray:
    """Per example, robust only if every attack failed: the AND of the correctness arrays (broadcast).

    >>> worst_case_correct({"fgsm": fgsm.correct, "pgd": pgd.correct})  # bool [G, N]
    """
    if not correct_by_attack:
        raise ValueError("a worst case needs at least one attack")
    return np.logical_and.reduce(np.broadcast_arrays(*(np.asarray(c, bool) for c in correct_by_attack.values())))


def worst_case(correct_by_attack: Mapping[str, np.ndarray]) -> np.ndarray | float:
    """Accuracy under the per-example worst case over attacks: the mean over the last (example) axis.

    Arrays [..., N] (e.g. RobustResult.correct, [G, N]) give [...]; [N] gives a float.

    >>> worst_case({"fgsm": fgsm_result.correct, "pgd": pgd_result.correct})  # [G]
    """
    accuracy = worst_case_correct(correct_by_attack).mean(axis=-1)
    return float(accuracy) if np.ndim(accuracy) == 0 else accuracy


# ----------------------------------------------------------------------------
# The configured report (config.robust).


def robust_eval_set(images, labels, section) -> EvalSet:
    """The first config.robust.num_examples of a split (all of it if fewer), in batches of config.robust.batch_size.

    >>> eval_set = robust_eval_set(mnist.test.images, mnist.test.labels, config.robust)
    """
    return make_eval_set(images, labels, min(section.num_examples, len(labels)), section.batch_size)


def _run_attacks(apply_fn, params, eval_set, key, section, form, runs, grids, num_seeds):
    """{name: RobustResult} and {name: seconds}: each run over its norm's grid, with its own key."""
    results, seconds = {}, {}
    for name, spec in runs.items():
        grid = (0.0,) if name == "clean" else grids[ATTACK_NORMS[spec.name]]
        # fold_in(key, crc32(name)): an attack's numbers do not change when another is added to the list.
        salt = zlib.crc32(name.encode())
        attack_key = seeds.fold_in(key, salt, num_seeds)
        sweep = make_robust_sweep(apply_fn, spec, form=form, chunk_size=section.chunk_size, num_seeds=num_seeds)
        start = time.perf_counter()
        results[name] = sweep(params, eval_set, attack_key, grid)
        seconds[name] = time.perf_counter() - start
    return results, seconds


def _describe_attack(name: str, spec: AttackSpec, grid: tuple, result: RobustResult, num_examples: int, k: int):
    return {
        "norm": ATTACK_NORMS[name],
        "eps": list(grid),
        **seeds.seed_summary(result.accuracy, k),
        "num_steps": num_steps(spec),
        "num_restarts": spec.num_restarts,
        "step_size": describe_step_size(spec),
        "random_start": spec.random_start if name in RESTARTABLE else name == "fgsm_random_start",
        "restart_selection": spec.restart_selection,
        "stop_on_success": spec.stop_on_success,
        "labels": "predicted" if spec.use_predicted_labels else "true",
        "num_examples": num_examples,
    }


def _checked_extra(extra_linf: Mapping[str, np.ndarray] | None, shape: tuple, runs: Mapping) -> dict:
    """extra_linf as bool arrays, refused where a name clashes with a run or a shape is not [K?, G, N]."""
    extra = {name: np.asarray(correct, bool) for name, correct in (extra_linf or {}).items()}
    for name, correct in extra.items():
        if name in runs or correct.shape != shape:
            raise ValueError(f"extra_linf[{name!r}]: expected a new name and shape {shape}, got {correct.shape}")
    return extra


def _worst_cases(runs: dict, results: dict, grids: dict, extra: dict, k: int, l2: bool) -> dict:
    """Per norm (L2 only when an L2 attack is configured), the worst case over clean, that norm's runs and,
    for L-inf, the extra evaluations."""
    worst = {}
    for norm in ("linf", "l2") if l2 else ("linf",):
        members = [n for n, s in runs.items() if n != "clean" and ATTACK_NORMS[s.name] == norm]
        # clean.correct has a grid axis of 1: it broadcasts over the eps grid.
        correct = {"clean": results["clean"].correct, **{n: results[n].correct for n in members}}
        correct |= extra if norm == "linf" else {}
        worst[norm] = {
            "eps": list(grids[norm]),
            **seeds.seed_summary(worst_case_correct(correct).mean(-1), k),
            "over": list(correct),
        }
    return worst


def robustness_report(
    apply_fn: ApplyFn,
    params,
    eval_set: EvalSet,
    key: jax.Array,
    section,
    form: str = "auto",
    *,
    num_seeds: int = 1,
    extra_linf: Mapping[str, np.ndarray] | None = None,
) -> dict:
    """Every configured attack over its eps grid, worst cases and the label-leaking check, as a JSON-ready dict.

    `section` is a validated config.robust; `eval_set` the caller's (see `robust_eval_set`).
    `extra_linf`: per-example correctness [K?, G, N] of other L-inf evaluations on the same eval set and
    eps grid (e.g. {"autoattack": its final robust set}); each joins the L-inf worst case and its "over" list.
    Wall-clock times are under "seconds", apart from the deterministic results.

    >>> robustness_report(apply_fn, params, robust_eval_set(images, labels, config.robust), key, config.robust)
    """
    grids = {"linf": tuple(float(e) for e in section.eps_grid), "l2": tuple(float(e) for e in section.l2_eps_grid)}
    specs = attack_specs(section)
    # Extra runs: clean (in every worst case) and FGSM both ways (the label-leaking check).
    runs = {
        "clean": AttackSpec("clean"),
        **specs,
        "fgsm_predicted_labels": AttackSpec("fgsm", use_predicted_labels=True),
    }
    runs.setdefault("fgsm", AttackSpec("fgsm"))
    linf_shape = seeds.seed_shape(num_seeds) + (len(grids["linf"]), eval_set.num_examples)
    extra = _checked_extra(extra_linf, linf_shape, runs)
    results, seconds = _run_attacks(apply_fn, params, eval_set, key, section, form, runs, grids, num_seeds)
    clean, k = results["clean"], num_seeds
    report = {
        "num_examples": eval_set.num_examples,
        "attack_labels": "true (label_leaking also runs FGSM on the model's predicted labels)",
        "clean_accuracy": float(np.mean(clean.accuracy)),
        "clean_accuracy_per_seed": seeds.per_seed(clean.accuracy, k).reshape(k).tolist(),
        "attacks": {},
        "worst_case": {},
        "label_leaking": {
            "eps": list(grids["linf"]),
            "true_labels": seeds.seed_summary(results["fgsm"].accuracy, k),
            "predicted_labels": seeds.seed_summary(results["fgsm_predicted_labels"].accuracy, k),
        },
        "seconds": seconds,
    }
    for name, spec in specs.items():
        grid = grids[ATTACK_NORMS[name]]
        report["attacks"][name] = _describe_attack(name, spec, grid, results[name], eval_set.num_examples, k)
    report["worst_case"] = _worst_cases(runs, results, grids, extra, k, l2=any(ATTACK_NORMS[n] == "l2" for n in specs))
    return report
