"""Robustness evaluation that gradient masking cannot fool.

FGSM accuracy alone can be an illusion: a model that masks its gradients (FGSM
training's catastrophic overfitting, DESIGN.md pitfall 6) or that profits from
label leaking (pitfall 5) looks robust to one step and is not. This module
measures accuracy against eps for several attacks, including PGD with many
steps and restarts, and the per-example worst case over them: an example
counts as robust only if every attack (and the clean image) fails to fool the
model.

An iterative attack's evaluation is itself one fold (advjax.loops) over
"ticks": (batch, restart, step) flattened, batch outermost. Each tick takes
one projected step; a restart's first tick draws its start, its last tick
scores it and keeps the per-example worst case, and the kept correctness is
written into a [grid, batch, example] array that only leaves the device at the
end. Why ticks rather than calling `attacks.pgd` per batch: on XLA:CPU the
CNN's input-gradient convolutions run ~4x slower inside any while loop than
unrolled (DESIGN.md pitfall 9), and PGD-100 x 10 restarts cannot be unrolled
whole. As a fold, 'chunked' (CPU) runs jits of `chunk_size` unrolled ticks,
dispatched asynchronously, and 'scan' (accelerators) runs the whole evaluation
as one compiled call. Starts and scoring sit under `lax.cond`, so they run only
on the ticks that need them. One-step attacks and DeepFool take one tick per batch.

The eps grid is vmapped inside each tick, so all grid points advance together
and a new grid of the same length reuses the compiled code.

Key scheme (so a direct call can be matched): batch b uses
`batch_key = fold_in(key, b)`. An iterative attack's restart r starts from
`uniform_in_ball(fold_in(batch_key, r), ...)`, exactly what
`attacks.pgd(..., key=batch_key)` draws; a one-step attack gets `batch_key`
itself, as `attacks.make_attack(name)(..., key=batch_key)` would. Every grid
point uses the same keys (common random numbers).
"""

import inspect
import time
import zlib
from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from advjax import attacks, loops
from advjax.evaluate import EvalSet, make_eval_set
from advjax.train import to_float_images

# The norm each attack's eps is measured in: a worst case is only taken over
# attacks of the same norm, since their eps grids mean different things.
ATTACK_NORMS: dict[str, str] = {
    "fgsm": "linf",
    "fgsm_random_start": "linf",
    "bim": "linf",
    "pgd": "linf",
    "fgm_l2": "l2",
    "pgd_l2": "l2",
    "deepfool": "l2",
}
# Attacks run as projected steps, one per tick; the rest take one tick per batch.
ITERATIVE = ("bim", "pgd", "pgd_l2")
# 'clean' is the zero perturbation: inside every eps ball, so every worst case includes it.
NAMES = ("clean",) + tuple(attacks.ATTACKS)


class AttackSpec(NamedTuple):
    """One attack as evaluated. Step sizes: give at most one of `step_size` and
    `relative_step_size`; neither means the attack's default (2.5 eps / steps
    for BIM and PGD, 1.25 eps for fgsm_random_start)."""

    name: str  # a key of attacks.ATTACKS, or 'clean'
    num_steps: int | None = None  # iterative: steps per restart; deepfool: max_iter; None: the attack's default
    num_restarts: int = 1  # pgd / pgd_l2 only; the per-example worst restart is kept
    step_size: float | None = None  # absolute, per step (pixels for L-inf)
    relative_step_size: float | None = None  # per step, as a multiple of eps
    random_start: bool = True  # pgd / pgd_l2 only (bim starts at the clean image, fgsm_random_start always draws)
    use_predicted_labels: bool = False  # attack the model's own labels (pitfall 5: label leaking)
    # pgd / pgd_l2: which restart is kept per example (attacks.RESTART_SELECTIONS), and
    # whether an example stops once fooled. The defaults are the stronger choices;
    # 'highest_loss' with stop_on_success=True is Wong et al.'s (2020) evaluation.
    restart_selection: str = "success_first"
    stop_on_success: bool = False


class RobustResult(NamedTuple):
    """With num_seeds > 1 each array has a leading seed axis."""

    grid: np.ndarray  # [G] the eps values
    accuracy: np.ndarray  # [G] accuracy against the true labels
    correct: np.ndarray  # bool [G, N] per real example (padding removed), for worst cases across attacks


def _attack_default(name: str, parameter: str):
    """An attack's own default for a keyword, read from attacks.ATTACKS, so the defaults live in one place."""
    return inspect.signature(attacks.ATTACKS[name]).parameters[parameter].default


def num_steps(spec: AttackSpec) -> int:
    """The steps the attack takes (for deepfool its max_iter; 1 for one-step attacks)."""
    if spec.num_steps is not None:
        return spec.num_steps
    if spec.name in ITERATIVE:
        return _attack_default(spec.name, "num_steps")
    return _attack_default("deepfool", "max_iter") if spec.name == "deepfool" else 1


def check_spec(spec: AttackSpec) -> None:
    """Raises ValueError for a spec that would silently compute something else than it says."""
    if spec.name not in NAMES:
        raise ValueError(f"unknown attack {spec.name!r}; choose from {NAMES}")
    steps = num_steps(spec)
    if steps < 1:
        raise ValueError(f"{spec.name}: num_steps must be at least 1, got {steps}")
    if spec.num_restarts < 1:
        raise ValueError(f"{spec.name}: num_restarts must be at least 1, got {spec.num_restarts}")
    if spec.step_size is not None and spec.relative_step_size is not None:
        raise ValueError(f"{spec.name}: give step_size or relative_step_size, not both")
    takes_step = spec.name in ITERATIVE or spec.name == "fgsm_random_start"
    if not takes_step and (spec.step_size is not None or spec.relative_step_size is not None):
        raise ValueError(f"{spec.name} takes no step size")
    if spec.name not in ITERATIVE + ("deepfool",) and steps != 1:
        raise ValueError(f"{spec.name} is a one-step attack; num_steps must be 1 or None, got {steps}")
    if spec.restart_selection not in attacks.RESTART_SELECTIONS:
        raise ValueError(f"{spec.name}: restart_selection must be one of {tuple(attacks.RESTART_SELECTIONS)}, got {spec.restart_selection!r}")
    if spec.name not in ITERATIVE and (spec.stop_on_success or spec.restart_selection != "success_first"):
        raise ValueError(f"{spec.name} is a one-step attack: stop_on_success and restart_selection apply to bim, pgd and pgd_l2")
    restartable = spec.name in ("pgd", "pgd_l2") and spec.random_start
    if spec.num_restarts > 1 and not restartable:
        # Without a random draw every restart repeats the same deterministic attack.
        raise ValueError(f"{spec.name}: restarts need a random start (pgd or pgd_l2 with random_start=True)")


def _step_size(spec: AttackSpec, eps: jax.Array) -> jax.Array | float:
    if spec.step_size is not None:
        return spec.step_size
    if spec.relative_step_size is not None:
        return spec.relative_step_size * eps
    return attacks.default_step_size(eps, num_steps(spec))


def describe_step_size(spec: AttackSpec) -> float | str | None:
    """The step size as a report states it: a number, or its rule in terms of eps."""
    if spec.name not in ITERATIVE and spec.name != "fgsm_random_start":
        return None
    if spec.step_size is not None:
        return float(spec.step_size)
    if spec.relative_step_size is not None:
        return f"{spec.relative_step_size} * eps"
    return "2.5 * eps / num_steps" if spec.name in ITERATIVE else "1.25 * eps"


def _one_tick_attack(spec: AttackSpec) -> attacks.Attack:
    """`attack(logits_fn, images, labels, eps, key)` for an attack that needs one tick per batch."""
    if spec.name == "clean":
        return lambda logits_fn, images, labels, eps, key: images
    if spec.name == "fgsm_random_start":
        def fgsm_random_start(logits_fn, images, labels, eps, key):
            step_size = None if spec.step_size is None and spec.relative_step_size is None else _step_size(spec, eps)
            return attacks.fgsm_random_start(logits_fn, images, labels, eps, key, step_size)

        return fgsm_random_start
    # fgsm, fgm_l2 and deepfool (deepfool_within eps) from the registry; they take no step size.
    params = {"max_iter": num_steps(spec)} if spec.name == "deepfool" else {}
    return attacks.make_attack(spec.name, **params)


class _Carry(NamedTuple):
    """The fold's state. The fields after `correct` are None for one-tick attacks."""

    correct: jax.Array  # bool [G, num_batches, B]: per example, correct on the kept adversarial image
    adversarial: jax.Array | None = None  # float [G, B, ...]: the running restart's iterate
    attack_labels: jax.Array | None = None  # int32 [B]: what the attack climbs away from
    kept_correct: jax.Array | None = None  # bool [G, B]: correctness on the worst restart so far
    kept: attacks.AttackOutcome | None = None  # [G, B] each: that restart's success and objective


def _when(predicate, fn: Callable, carry):
    """fn(carry) where `predicate` holds: a Python True applies it outright, a traced one under lax.cond."""
    if predicate is True:
        return fn(carry)
    return lax.cond(predicate, fn, lambda c: c, carry)


def make_robust_sweep(
    apply_fn: Callable,
    spec: AttackSpec,
    *,
    form: str = "auto",
    chunk_size: int = 4,
    num_seeds: int = 1,
) -> Callable[..., RobustResult]:
    """`sweep(params, eval_set, key, eps_grid) -> RobustResult`, one compiled fold.

    Build it once and call it for any params, key, eval set of the same shape
    and grid of the same length without recompiling. With `num_seeds > 1`,
    `params` and `key` carry a leading seed axis, and so does every result array.
    """
    check_spec(spec)
    steps = num_steps(spec) if spec.name in ITERATIVE else 1
    restarts = spec.num_restarts
    ticks_per_batch = steps * restarts
    norm = ATTACK_NORMS.get(spec.name)
    one_tick = None if spec.name in ITERATIVE else _one_tick_attack(spec)
    random_start = spec.random_start and spec.name != "bim"

    def attack_labels_for(logits_fn, x, y):
        return attacks.predicted_labels(logits_fn, x) if spec.use_predicted_labels else y

    def body(carry: _Carry, tick, params, images, labels, key, grid) -> _Carry:
        batch = tick // ticks_per_batch
        restart = (tick // steps) % restarts
        step = tick % steps
        x, y = to_float_images(images[batch]), labels[batch]
        logits_fn = lambda z: apply_fn({"params": params}, z, train=False)  # eval mode (pitfall 1)
        batch_key = jax.random.fold_in(key, batch)
        is_correct = lambda logits: jnp.argmax(logits, axis=-1) == y  # always against the true labels
        write = lambda c, kept: c._replace(correct=lax.dynamic_update_index_in_dim(c.correct, kept, batch, axis=1))

        if one_tick is not None:
            attack_labels = attack_labels_for(logits_fn, x, y)
            adversarial = jax.vmap(lambda eps: one_tick(logits_fn, x, attack_labels, eps, batch_key))(grid)
            return write(carry, jax.vmap(lambda a: is_correct(logits_fn(a)))(adversarial))

        def start(c: _Carry) -> _Carry:
            if random_start:
                restart_key = jax.random.fold_in(batch_key, restart)  # attacks.pgd's draw for this restart
                first = jax.vmap(lambda eps: attacks.uniform_in_ball(restart_key, x, eps, norm))(grid)
            else:
                first = jnp.broadcast_to(x, c.adversarial.shape)
            return c._replace(adversarial=first, attack_labels=attack_labels_for(logits_fn, x, y))

        carry = _when(True if steps == 1 else step == 0, start, carry)

        take_step = lambda a, eps: attacks.ascent_step(
            logits_fn, x, carry.attack_labels, a, eps, _step_size(spec, eps), norm, stop_on_success=spec.stop_on_success
        )
        carry = carry._replace(adversarial=jax.vmap(take_step)(carry.adversarial, grid))

        def score(c: _Carry) -> _Carry:
            def outcome(a):
                logits = logits_fn(a)  # one forward pass serves the outcome and the correctness
                return is_correct(logits), attacks.attack_outcome(lambda _: logits, a, c.attack_labels)

            candidate = jax.vmap(outcome)(c.adversarial)
            if restarts > 1:
                # As attacks.pgd: the first restart is kept as is, later ones through the restart selection.
                merged = jax.vmap(attacks.RESTART_SELECTIONS[spec.restart_selection])((c.kept_correct, c.kept), candidate)
                candidate = jax.tree.map(lambda new, old: jnp.where(restart == 0, new, old), candidate, merged)
            kept_correct, kept = candidate
            # Written at every restart's end; the last restart's write holds the batch's worst case.
            return write(c._replace(kept_correct=kept_correct, kept=kept), kept_correct)

        return _when(True if steps == 1 else step == steps - 1, score, carry)

    body = loops.map_over_seeds(body, num_seeds, in_axes=(0, None, 0, None, None, 0, None))
    fold = loops.make_fold(body, form=form, chunk_size=chunk_size, num_seeds=num_seeds)

    def initial_carry(grid_size: int, eval_set: EvalSet) -> _Carry:
        lead = () if num_seeds == 1 else (num_seeds,)
        num_batches, batch_size = eval_set.labels.shape
        correct = jnp.zeros(lead + (grid_size, num_batches, batch_size), bool)
        if one_tick is not None:
            return _Carry(correct)
        per_example = lead + (grid_size, batch_size)
        return _Carry(
            correct=correct,
            adversarial=jnp.zeros(lead + (grid_size, batch_size) + eval_set.images.shape[2:], jnp.float32),
            attack_labels=jnp.zeros(lead + (batch_size,), jnp.int32),
            kept_correct=jnp.zeros(per_example, bool),
            kept=attacks.AttackOutcome(jnp.zeros(per_example, bool), jnp.zeros(per_example, jnp.float32)),
        )

    def sweep(params, eval_set: EvalSet, key: jax.Array, eps_grid: Sequence[float] | jax.Array) -> RobustResult:
        grid = jnp.asarray(eps_grid, jnp.float32)
        if grid.ndim != 1 or grid.shape[0] == 0:
            raise ValueError(f"eps_grid must be a non-empty list of numbers, got {eps_grid!r}")
        num_batches = eval_set.labels.shape[0]
        carry = fold(
            num_batches * ticks_per_batch, initial_carry(grid.shape[0], eval_set),
            params, eval_set.images, eval_set.labels, key, grid,
        )
        correct = np.asarray(carry.correct)  # [K?, G, num_batches, B]; the only transfer to the host
        correct = correct.reshape(correct.shape[:-2] + (-1,))[..., np.asarray(eval_set.mask).reshape(-1)]
        return RobustResult(np.asarray(grid), correct.sum(-1) / eval_set.num_examples, correct)

    # Exposed for inspection: tests check that a tick's program holds no while loop.
    sweep.fold, sweep.body, sweep.initial_carry = fold, body, initial_carry
    sweep.ticks_per_batch = ticks_per_batch
    return sweep


def worst_case_correct(correct_by_attack: Mapping[str, np.ndarray]) -> np.ndarray:
    """Per example, robust only if every attack failed: the AND of the correctness arrays (broadcast)."""
    if not correct_by_attack:
        raise ValueError("a worst case needs at least one attack")
    return np.logical_and.reduce(np.broadcast_arrays(*(np.asarray(c, bool) for c in correct_by_attack.values())))


def worst_case(correct_by_attack: Mapping[str, np.ndarray]) -> np.ndarray | float:
    """Accuracy under the per-example worst case over attacks: the mean over the last (example) axis.

    Arrays [..., N] (e.g. RobustResult.correct, [G, N]) give [...]; [N] gives a float.
    """
    accuracy = worst_case_correct(correct_by_attack).mean(axis=-1)
    return float(accuracy) if np.ndim(accuracy) == 0 else accuracy


# ----------------------------------------------------------------------------
# The configured report (config.robust).


def check_section(section) -> None:
    """Raises ValueError naming the config.robust field that cannot run, before anything compiles."""
    for name in section.attacks:
        if name not in attacks.ATTACKS:
            raise ValueError(f"config.robust.attacks: unknown attack {name!r}; choose from {tuple(attacks.ATTACKS)}")
    for field in ("eps_grid", "l2_eps_grid"):
        values = tuple(section[field])
        if not all(isinstance(v, (int, float)) and v >= 0 for v in values):
            raise ValueError(f"config.robust.{field}={values!r}: expected non-negative numbers")
    if not section.eps_grid:
        raise ValueError("config.robust.eps_grid is empty: the label-leaking check needs L-inf epsilons")
    if any(ATTACK_NORMS[n] == "l2" for n in section.attacks) and not section.l2_eps_grid:
        raise ValueError("config.robust.l2_eps_grid is empty but L2 attacks are configured")
    for field in ("pgd_steps", "pgd_restarts", "deepfool_max_iter", "chunk_size", "batch_size", "num_examples"):
        if not (isinstance(section[field], int) and section[field] > 0):
            raise ValueError(f"config.robust.{field}={section[field]!r}: expected a positive integer")
    if section.pgd_step_size < 0:
        raise ValueError(f"config.robust.pgd_step_size={section.pgd_step_size!r}: expected >= 0 (0: 2.5 eps / steps)")
    if section.get("pgd_protocol", "strict") not in PGD_PROTOCOLS:
        raise ValueError(f"config.robust.pgd_protocol={section.pgd_protocol!r}: expected one of {tuple(PGD_PROTOCOLS)}")


# How PGD keeps its restarts and whether an example stops once fooled (AttackSpec).
# 'strict' is the stronger attack; 'wong2020' reproduces Wong et al.'s MNIST
# evaluation, to compare with their published figures.
PGD_PROTOCOLS = {
    "strict": {"restart_selection": "success_first", "stop_on_success": False},
    "wong2020": {"restart_selection": "highest_loss", "stop_on_success": True},
}


def attack_specs(section) -> dict[str, AttackSpec]:
    """The configured attacks as specs. All attack the true labels; the label-leaking check adds predicted labels."""
    specs = {}
    for name in section.attacks:
        if name in ITERATIVE:
            # The absolute step is in L-inf pixels; L2 PGD keeps its relative default.
            absolute = section.pgd_step_size if section.pgd_step_size > 0 and ATTACK_NORMS[name] == "linf" else None
            specs[name] = AttackSpec(
                name, num_steps=section.pgd_steps, num_restarts=1 if name == "bim" else section.pgd_restarts,
                step_size=absolute, random_start=name != "bim",
                **(PGD_PROTOCOLS[section.get("pgd_protocol", "strict")] if name != "bim" else {}),
            )
        elif name == "deepfool":
            specs[name] = AttackSpec(name, num_steps=section.deepfool_max_iter)
        else:
            specs[name] = AttackSpec(name)
    return specs


def robust_eval_set(images, labels, section) -> EvalSet:
    """The first config.robust.num_examples of a split (all of it if fewer), in batches of config.robust.batch_size."""
    return make_eval_set(images, labels, min(section.num_examples, len(labels)), section.batch_size)


def seed_summary(accuracy: np.ndarray, num_seeds: int) -> dict:
    """[K?, G] accuracies -> the summary's mean / std / per-seed lists (every curve of summary.json)."""
    per_seed = np.asarray(accuracy).reshape(num_seeds, -1)
    return {
        "accuracy": per_seed.mean(0).tolist(),
        "accuracy_std": per_seed.std(0).tolist(),
        "accuracy_per_seed": per_seed.tolist(),
    }


def robustness_report(
    apply_fn: Callable,
    params,
    eval_set: EvalSet,
    key: jax.Array,
    section,
    form: str = "auto",
    *,
    num_seeds: int = 1,
) -> dict:
    """Every configured attack over its eps grid, worst cases and the label-leaking check, as a JSON-ready dict.

    `section` is config.robust; `eval_set` the caller's (see `robust_eval_set`).
    Each attack gets its own key, fold_in(key, crc32(its name)), so its numbers
    do not change when another attack is added to the list. Wall-clock times
    are under "seconds", apart from the deterministic results.
    """
    check_section(section)
    grids = {"linf": tuple(float(e) for e in section.eps_grid), "l2": tuple(float(e) for e in section.l2_eps_grid)}
    specs = attack_specs(section)
    # Extra runs: clean (in every worst case) and FGSM both ways (the label-leaking check).
    runs = {"clean": AttackSpec("clean"), **specs, "fgsm_predicted_labels": AttackSpec("fgsm", use_predicted_labels=True)}
    runs.setdefault("fgsm", AttackSpec("fgsm"))

    results: dict[str, RobustResult] = {}
    seconds: dict[str, float] = {}
    for name, spec in runs.items():
        grid = (0.0,) if name == "clean" else grids[ATTACK_NORMS[spec.name]]
        attack_key = loops.map_over_seeds(lambda k: jax.random.fold_in(k, zlib.crc32(name.encode())), num_seeds)(key)
        sweep = make_robust_sweep(apply_fn, spec, form=form, chunk_size=section.chunk_size, num_seeds=num_seeds)
        start = time.perf_counter()
        results[name] = sweep(params, eval_set, attack_key, grid)
        seconds[name] = time.perf_counter() - start

    clean = results["clean"]
    report = {
        "num_examples": eval_set.num_examples,
        "attack_labels": "true (label_leaking also runs FGSM on the model's predicted labels)",
        "clean_accuracy": float(np.mean(clean.accuracy)),
        "clean_accuracy_per_seed": np.asarray(clean.accuracy).reshape(num_seeds).tolist(),
        "attacks": {},
        "worst_case": {},
        "label_leaking": {
            "eps": list(grids["linf"]),
            "true_labels": seed_summary(results["fgsm"].accuracy, num_seeds),
            "predicted_labels": seed_summary(results["fgsm_predicted_labels"].accuracy, num_seeds),
        },
        "seconds": seconds,
    }
    for name, spec in specs.items():
        report["attacks"][name] = {
            "norm": ATTACK_NORMS[name],
            "eps": list(grids[ATTACK_NORMS[name]]),
            **seed_summary(results[name].accuracy, num_seeds),
            "num_steps": num_steps(spec),
            "num_restarts": spec.num_restarts,
            "step_size": describe_step_size(spec),
            "random_start": spec.random_start if name in ("pgd", "pgd_l2") else name == "fgsm_random_start",
            "restart_selection": spec.restart_selection,
            "stop_on_success": spec.stop_on_success,
            "labels": "predicted" if spec.use_predicted_labels else "true",
            "num_examples": eval_set.num_examples,
        }
    for norm in ("linf", "l2"):
        members = [n for n, s in runs.items() if n != "clean" and ATTACK_NORMS[s.name] == norm]
        if norm == "l2" and not any(ATTACK_NORMS[n] == "l2" for n in specs):
            continue
        # clean.correct has a grid axis of 1: it broadcasts over the eps grid.
        correct = worst_case_correct({"clean": clean.correct, **{n: results[n].correct for n in members}})
        report["worst_case"][norm] = {
            "eps": list(grids[norm]),
            **seed_summary(correct.mean(-1), num_seeds),
            "over": ["clean"] + members,
        }
    return report


# ----------------------------------------------------------------------------
# Catastrophic overfitting: FGSM training can learn to mask its gradient, after
# which FGSM accuracy rises while PGD accuracy collapses within an epoch (Wong
# et al. 2020; DESIGN.md pitfall 6). A cheap PGD check each epoch catches it.

OVERFITTING_DROP = 0.2  # a fall of PGD accuracy this large (absolute) below its best so far
# FGSM accuracy this far above PGD accuracy at the same eps: the model has
# learned to defeat the one-step attack, not to be robust (seen: fast training
# of BP at eps 0.3 holds FGSM accuracy 0.93 and PGD accuracy 0.01 from epoch 1).
MASKING_GAP = 0.5


def make_overfitting_check(
    apply_fn: Callable, eps: float, num_steps: int, *, form: str = "auto", chunk_size: int = 4, num_seeds: int = 1
) -> Callable[..., dict]:
    """`check(params, eval_set, key) -> {'fgsm': accuracy, 'pgd': accuracy}` at `eps`.

    PGD has one random start and `num_steps` steps of the default 2.5 eps / steps.
    With several seeds each accuracy is a list, one per seed.
    """
    sweeps = {
        "fgsm": make_robust_sweep(apply_fn, AttackSpec("fgsm"), form=form, chunk_size=chunk_size, num_seeds=num_seeds),
        "pgd": make_robust_sweep(apply_fn, AttackSpec("pgd", num_steps=num_steps), form=form, chunk_size=chunk_size, num_seeds=num_seeds),
    }

    def check(params, eval_set: EvalSet, key: jax.Array) -> dict:
        out = {}
        for name, sweep in sweeps.items():
            accuracy = np.asarray(sweep(params, eval_set, key, (eps,)).accuracy)[..., 0]
            out[name] = accuracy.tolist() if num_seeds > 1 else float(accuracy)
        return out

    return check


def catastrophic_overfitting_epoch(pgd_accuracy_by_epoch: Sequence[float | Sequence[float]]) -> int | None:
    """The first epoch (1-based) whose PGD accuracy fell OVERFITTING_DROP below the best before it, or None.

    With several seeds, a drop in any seed counts.
    """
    history = np.atleast_2d(np.asarray(pgd_accuracy_by_epoch, dtype=float).T).T  # [epochs, seeds]
    for epoch in range(1, len(history)):
        if np.any(history[epoch] < history[:epoch].max(axis=0) - OVERFITTING_DROP):
            return epoch + 1
    return None


def gradient_masking_epochs(
    fgsm_accuracy_by_epoch: Sequence[float | Sequence[float]], pgd_accuracy_by_epoch: Sequence[float | Sequence[float]]
) -> list[int]:
    """The epochs (1-based) whose FGSM accuracy exceeds their PGD accuracy by MASKING_GAP, in any seed.

    It catches what the drop rule cannot: a model that masks its gradient from
    the start and so never has a PGD accuracy to fall from. A list, because
    early epochs of a sound run can show the gap too (seen: fast training of
    the CNN, FGSM 0.92 / PGD 0.03 in epoch 1, then PGD 0.84 by epoch 10), and
    only the last epochs describe the model that training ends with.
    """
    fgsm = np.atleast_2d(np.asarray(fgsm_accuracy_by_epoch, dtype=float).T).T
    pgd = np.atleast_2d(np.asarray(pgd_accuracy_by_epoch, dtype=float).T).T
    return [epoch + 1 for epoch in range(len(pgd)) if np.any(fgsm[epoch] - pgd[epoch] > MASKING_GAP)]
