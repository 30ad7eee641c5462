"""Tests for advjax.robustness: the tick fold against direct attacks, grids, worst cases, the report.

Everything runs on a tiny tanh MLP over 6x6 images (tests/helpers.py), so compiling
the folds, not running them, is what costs time; the module turns most XLA
optimizations off for that reason.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from advjax import (
    apgd,
    attack_registry,
    attack_specs,
    attacks,
    eval_fold,
    iterative,
    models,
    norms,
    restarts,
    robustness,
)
from advjax.data import to_float_images
from tests.helpers import (
    GRID,
    MLP_CLASSES,
    MLP_NUM_EXAMPLES,
    MLP_SIDE,
    mlp_apply,
    mlp_dataset,
    mlp_eval_set,
    mlp_logits_fn,
    mlp_params,
    small_robust_section,
)

pytestmark = pytest.mark.usefixtures("quick_compile_module")


def direct_correct(params, es: eval_fold.EvalSet, key, grid, attack) -> np.ndarray:
    """[G, N]: `attack(logits_fn, x, y, eps, batch_key)` per batch and eps, unbatched and unfolded."""

    @jax.jit  # one compile serves every batch and eps
    def correct(params, x, y, eps, batch_key):
        logits_fn = mlp_logits_fn(params)
        return jnp.argmax(logits_fn(attack(logits_fn, x, y, eps, batch_key)), -1) == y

    rows = []
    for eps in grid:
        row = []
        for b in range(es.labels.shape[0]):
            x, y = to_float_images(es.images[b]), es.labels[b]
            row.append(np.asarray(correct(params, x, y, jnp.float32(eps), jax.random.fold_in(key, b))))
        rows.append(np.concatenate(row)[: es.num_examples])
    return np.stack(rows)


PGD = attack_specs.AttackSpec("pgd", num_steps=4, num_restarts=3, step_size=0.04)


@functools.cache
def pgd_result(form: str) -> robustness.RobustResult:
    # 3 batches x 3 restarts x 4 steps = 36 ticks: chunks of 5 leave a remainder of 1.
    sweep = robustness.make_robust_sweep(models.eval_apply(mlp_apply), PGD, form=form, chunk_size=5)
    return sweep(mlp_params(), mlp_eval_set(), jax.random.key(3), GRID)


# ----------------------------------------------------------------------------
# The tick fold computes exactly the attacks it replaces.


@pytest.mark.parametrize("form", ["scan", "chunked"])
def test_tick_fold_pgd_equals_attacks_pgd_per_batch_with_the_same_keys(form):
    pgd = lambda f, x, y, eps, k: attacks.pgd(f, x, y, eps, k, num_steps=4, num_restarts=3, step_size=0.04)
    expected = direct_correct(mlp_params(), mlp_eval_set(), jax.random.key(3), GRID, pgd)
    result = pgd_result(form)
    assert result.correct.shape == (len(GRID), MLP_NUM_EXAMPLES) and result.correct.dtype == bool
    np.testing.assert_array_equal(result.correct, expected)
    np.testing.assert_allclose(result.accuracy, expected.mean(-1))
    # Preconditions that make the comparison informative: the attack bites, yet not everywhere.
    assert 0 < expected.sum() and expected[-1].sum() < expected[0].sum()


@pytest.mark.slow
def test_wong_et_al_protocol_fold_equals_their_loop_written_out():
    # Their evaluation: each restart stops an example at its first success, and the
    # restart with the highest loss is kept, fooled or not.
    steps, num_restarts, step_size = 10, 5, 0.03

    def wong_pgd(logits_fn, x, y, eps, key):
        best = None
        for restart in range(num_restarts):
            adversarial = norms.uniform_in_ball(jax.random.fold_in(key, restart), x, eps, "linf")
            for _ in range(steps):
                adversarial = attacks.ascent_step(logits_fn, x, y, adversarial, eps, step_size, stop_on_success=True)
            candidate = (adversarial, restarts.attack_outcome(logits_fn, adversarial, y))
            best = candidate if best is None else restarts.keep_highest_loss(best, candidate)
        return best[0]

    params, es = trained()
    key, grid = jax.random.key(0), (0.3,)
    strict_spec = attack_specs.AttackSpec("pgd", num_steps=steps, num_restarts=num_restarts, step_size=step_size)
    wong_spec = strict_spec._replace(restart_selection="highest_loss", stop_on_success=True)
    swept = robustness.make_robust_sweep(models.eval_apply(mlp_apply), wong_spec, form="chunked", chunk_size=5)(
        params, es, key, grid
    )
    np.testing.assert_array_equal(swept.correct, direct_correct(params, es, key, grid, wong_pgd))
    library = lambda f, x, y, eps, k: attacks.pgd(
        f,
        x,
        y,
        eps,
        k,
        num_steps=steps,
        num_restarts=num_restarts,
        step_size=step_size,
        restart_selection="highest_loss",
        stop_on_success=True,
    )
    np.testing.assert_array_equal(swept.correct, direct_correct(params, es, key, grid, library))
    # The strict protocol fools every example this one does, and here a few more.
    strict = robustness.make_robust_sweep(models.eval_apply(mlp_apply), strict_spec, form="scan")(params, es, key, grid)
    assert np.all(strict.correct <= swept.correct) and strict.correct.sum() < swept.correct.sum()


def test_restarts_keep_the_worst_case_per_example():
    # Fewer restarts (a subset of the same draws) can only leave more examples correct.
    one = robustness.make_robust_sweep(models.eval_apply(mlp_apply), PGD._replace(num_restarts=1), form="scan")
    single = one(mlp_params(), mlp_eval_set(), jax.random.key(3), GRID)
    assert np.all(pgd_result("scan").correct <= single.correct)


@pytest.mark.slow
def test_l2_pgd_on_predicted_labels_and_one_step_attacks_equal_direct_calls():
    params, es, key = mlp_params(), mlp_eval_set(), jax.random.key(4)
    spec = attack_specs.AttackSpec(
        "pgd_l2", num_steps=3, num_restarts=2, relative_step_size=0.5, use_predicted_labels=True
    )
    swept = robustness.make_robust_sweep(models.eval_apply(mlp_apply), spec, form="scan")(params, es, key, (0.5, 1.5))

    def pgd_l2(f, x, y, eps, k):
        predicted = attacks.predicted_labels(f, x)
        return attacks.pgd(f, x, predicted, eps, k, norm="l2", num_steps=3, num_restarts=2, step_size=0.5 * eps)

    np.testing.assert_array_equal(swept.correct, direct_correct(params, es, key, (0.5, 1.5), pgd_l2))

    for name in ("fgsm", "fgsm_random_start", "bim", "deepfool"):
        swept = robustness.make_robust_sweep(
            models.eval_apply(mlp_apply), attack_specs.AttackSpec(name, num_steps=None), form="chunked", chunk_size=3
        )
        grid = (0.5, 2.0) if name == "deepfool" else GRID
        expected = direct_correct(params, es, key, grid, attack_registry.make_attack(name))
        np.testing.assert_array_equal(swept(params, es, key, grid).correct, expected, err_msg=name)


# 5 steps: APGD's checkpoints fall after every step, so the fold runs its halving rule on every tick.
APGD_CE = attack_specs.AttackSpec("apgd_ce", num_steps=5)


def test_tick_fold_apgd_ce_equals_a_direct_run_of_make_apgd_per_batch_with_the_same_keys():
    def direct(f, x, y, eps, batch_key):  # restart 0's key, as the module docstring's scheme says
        attack = apgd.make_apgd(f, eps, loss="ce", num_steps=5)
        return iterative.run(attack, x, y, jax.random.fold_in(batch_key, 0))

    params, es, key = mlp_params(), mlp_eval_set(), jax.random.key(3)
    expected = direct_correct(params, es, key, GRID, direct)
    swept = robustness.make_robust_sweep(models.eval_apply(mlp_apply), APGD_CE, form="chunked", chunk_size=4)
    np.testing.assert_array_equal(swept(params, es, key, GRID).correct, expected)
    assert 0 < expected.sum() and expected[-1].sum() < expected[0].sum()  # it bites, yet not everywhere
    # A different key moves some start: the comparison is not blind to the key scheme.
    assert not np.array_equal(direct_correct(params, es, jax.random.key(4), GRID, direct), expected)


@pytest.mark.slow
def test_apgd_ce_restarts_in_the_fold_equal_the_registry_attack_and_keep_the_worst_case():
    spec = APGD_CE._replace(num_restarts=3)
    params, es, key = mlp_params(), mlp_eval_set(), jax.random.key(3)
    swept = robustness.make_robust_sweep(models.eval_apply(mlp_apply), spec, form="scan")(params, es, key, GRID)
    registry = attack_registry.make_attack("apgd_ce", num_steps=5, num_restarts=3)
    np.testing.assert_array_equal(swept.correct, direct_correct(params, es, key, GRID, registry))
    one = robustness.make_robust_sweep(models.eval_apply(mlp_apply), APGD_CE, form="scan")(params, es, key, GRID)
    assert np.all(swept.correct <= one.correct)


def test_an_apgd_ce_tick_holds_no_while_loop():
    sweep = robustness.make_robust_sweep(models.eval_apply(mlp_apply), APGD_CE, form="chunked")
    es, grid = mlp_eval_set(), jnp.asarray(GRID)
    carry = sweep.initial_carry(len(GRID), es)
    args = (carry, 0, (mlp_params(), jax.random.key(0)), ((es.images, es.labels, es.mask), grid))
    jaxpr = str(jax.make_jaxpr(sweep.body)(*args))
    assert not re.search(r"\b(scan|while)\[", jaxpr) and "cond[" in jaxpr
    assert isinstance(carry.attack, apgd.APGDState) and carry.attack.point.shape == (len(GRID), 8, 6, 6, 1)


@pytest.mark.parametrize("name", ["pgd", "bim", "fgsm_random_start", "fgsm"])
def test_a_tick_holds_no_while_loop(name):
    # On XLA:CPU the CNN's input-gradient convolutions take a ~4x slower path
    # inside any while loop; the chunked form exists to keep them out of one.
    spec = attack_specs.AttackSpec(name, num_steps=None if name in ("fgsm_random_start", "fgsm") else 3)
    sweep = robustness.make_robust_sweep(models.eval_apply(mlp_apply), spec, form="chunked")
    es, grid = mlp_eval_set(), jnp.asarray(GRID)
    args = (
        sweep.initial_carry(len(GRID), es),
        0,
        (mlp_params(), jax.random.key(0)),
        ((es.images, es.labels, es.mask), grid),
    )
    # Checked in the jaxpr: there a loop is a scan or while primitive, while the
    # PRNG's own (harmless, convolution-free) round loop is still one random_bits.
    # A one-step fori_loop, even with unroll=True, is a scan that lowers to a while loop.
    jaxpr = str(jax.make_jaxpr(sweep.body)(*args))
    assert not re.search(r"\b(scan|while)\[", jaxpr)
    assert ("cond[" in jaxpr) == (name in ("pgd", "bim"))  # starts and scoring only on the ticks that need them
    deepfool_sweep = robustness.make_robust_sweep(
        models.eval_apply(mlp_apply), attack_specs.AttackSpec("deepfool"), form="chunked"
    )
    args = (deepfool_sweep.initial_carry(len(GRID), es), *args[1:])
    assert re.search(
        r"\bwhile\[", str(jax.make_jaxpr(deepfool_sweep.body)(*args))
    )  # the check can fail: DeepFool loops


def test_vmapped_grid_equals_one_call_per_eps():
    sweep = robustness.make_robust_sweep(models.eval_apply(mlp_apply), PGD, form="scan")
    params, es, key = mlp_params(), mlp_eval_set(), jax.random.key(3)
    grid = (0.05, 0.1, 0.3)
    together = sweep(params, es, key, grid)
    one_by_one = [sweep(params, es, key, (eps,)) for eps in grid]
    np.testing.assert_array_equal(together.correct, np.concatenate([r.correct for r in one_by_one]))
    np.testing.assert_allclose(together.accuracy, np.concatenate([r.accuracy for r in one_by_one]))


def test_new_grid_key_or_params_of_the_same_shapes_do_not_recompile():
    traces = []

    def counting_apply(*args, **kwargs):
        traces.append(None)  # runs only while tracing
        return mlp_apply(*args, **kwargs)

    sweep = robustness.make_robust_sweep(models.eval_apply(counting_apply), PGD._replace(num_restarts=1), form="scan")
    first = sweep(mlp_params(), mlp_eval_set(), jax.random.key(0), (0.1, 0.2))
    traced = len(traces)
    assert traced > 0
    second = sweep(mlp_params(1), mlp_eval_set(), jax.random.key(1), (0.3, 0.4))
    assert len(traces) == traced
    assert not np.array_equal(first.correct, second.correct)  # new values were used
    sweep(mlp_params(), mlp_eval_set(), jax.random.key(0), (0.1, 0.2, 0.3))  # another length: a new program
    assert len(traces) > traced


def test_padding_never_counts():
    # Every real example gets a label the model never predicts on it, while the
    # zero padding image is predicted as its label 0: counting padding would show.
    images, labels = mlp_dataset()
    top = np.argmax(np.asarray(mlp_logits_fn(mlp_params())(to_float_images(images))), -1)
    wrong = ((top + 1) % MLP_CLASSES).astype(np.int32)
    es = mlp_eval_set(wrong)
    assert int(np.argmax(np.asarray(mlp_logits_fn(mlp_params())(jnp.zeros((1, MLP_SIDE, MLP_SIDE, 1)))))) == 0
    for spec in (attack_specs.AttackSpec("clean"), PGD._replace(num_restarts=1)):
        result = robustness.make_robust_sweep(models.eval_apply(mlp_apply), spec, form="chunked")(
            mlp_params(), es, jax.random.key(0), GRID
        )
        assert result.correct.shape == (len(GRID), MLP_NUM_EXAMPLES)
        np.testing.assert_array_equal(result.accuracy, np.zeros(len(GRID)))


@pytest.mark.slow
def test_several_seeds_equal_each_seed_alone():
    params = jax.tree.map(lambda a, b: jnp.stack([a, b]), mlp_params(0), mlp_params(1))
    keys = jnp.stack([jax.random.key(5), jax.random.key(6)])
    spec = PGD._replace(num_restarts=2)
    both = robustness.make_robust_sweep(models.eval_apply(mlp_apply), spec, form="chunked", chunk_size=3, num_seeds=2)(
        params, mlp_eval_set(), keys, GRID
    )
    assert both.correct.shape == (2, len(GRID), MLP_NUM_EXAMPLES) and both.accuracy.shape == (2, len(GRID))
    single = robustness.make_robust_sweep(models.eval_apply(mlp_apply), spec, form="chunked", chunk_size=3)
    for s, seed_params in enumerate((mlp_params(0), mlp_params(1))):
        np.testing.assert_array_equal(both.correct[s], single(seed_params, mlp_eval_set(), keys[s], GRID).correct)


# ----------------------------------------------------------------------------
# Worst cases.


def test_worst_case_is_the_per_example_and():
    correct = {
        "a": np.array([True, True, False, True]),
        "b": np.array([True, False, True, True]),
        "c": np.array([True, True, True, False]),
    }
    assert robustness.worst_case(correct) == 0.25  # only example 0 survives all three
    assert robustness.worst_case({"a": correct["a"]}) == 0.75
    # Leading axes ([G, N]) are kept; a [1, N] array broadcasts over the grid.
    grid = robustness.worst_case({"x": np.array([[True, True], [False, True]]), "clean": np.array([[True, False]])})
    np.testing.assert_array_equal(grid, [0.5, 0.0])
    with pytest.raises(ValueError):
        robustness.worst_case({})


def test_worst_case_of_real_attacks_is_below_each_and_equals_the_and():
    params, es, key = mlp_params(), mlp_eval_set(), jax.random.key(3)
    fgsm = robustness.make_robust_sweep(models.eval_apply(mlp_apply), attack_specs.AttackSpec("fgsm"), form="chunked")(
        params, es, key, GRID
    )
    pgd = pgd_result("chunked")
    worst = robustness.worst_case({"fgsm": fgsm.correct, "pgd": pgd.correct})
    assert np.all(worst <= fgsm.accuracy) and np.all(worst <= pgd.accuracy)
    np.testing.assert_allclose(worst, (fgsm.correct & pgd.correct).mean(-1))


# ----------------------------------------------------------------------------
# On a trained model, and the configured report.


@functools.cache
def trained() -> tuple[dict, eval_fold.EvalSet]:
    """The MLP trained for a few hundred full-batch Adam steps on separable blocks (class c lights block c)."""
    rng = np.random.default_rng(0)
    n = 256
    labels = rng.integers(0, MLP_CLASSES, n).astype(np.int32)
    images = rng.integers(0, 80, (n, MLP_SIDE, MLP_SIDE, 1)).astype(np.uint8)
    for i, c in enumerate(labels):
        row, col = divmod(int(c), 2)
        images[i, 3 * row : 3 * row + 3, 3 * col : 3 * col + 3] = 200
    x, y = to_float_images(jnp.asarray(images)), jnp.asarray(labels)
    optimizer = optax.adam(0.03)
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(mlp_apply({"params": p}, x), y).mean()

    @jax.jit
    def fit(params):
        def step(carry, _):
            p, state = carry
            updates, state = optimizer.update(jax.grad(loss)(p), state)
            return (optax.apply_updates(p, updates), state), None

        return jax.lax.scan(step, (params, optimizer.init(params)), length=200)[0][0]

    start = jax.tree.map(lambda a: 0.3 * a, mlp_params(2))
    return fit(start), eval_fold.make_eval_set(images, labels, 200, 100)


@pytest.mark.slow
def test_pgd_is_at_least_as_strong_as_fgsm_on_a_trained_model():
    params, es = trained()
    grid, key = (0.1, 0.2, 0.3), jax.random.key(0)
    clean = robustness.make_robust_sweep(models.eval_apply(mlp_apply), attack_specs.AttackSpec("clean"), form="scan")(
        params, es, key, (0.0,)
    )
    fgsm = robustness.make_robust_sweep(models.eval_apply(mlp_apply), attack_specs.AttackSpec("fgsm"), form="scan")(
        params, es, key, grid
    )
    pgd = robustness.make_robust_sweep(
        models.eval_apply(mlp_apply), attack_specs.AttackSpec("pgd", num_steps=10, num_restarts=2), form="scan"
    )(params, es, key, grid)
    assert clean.accuracy[0] > 0.95  # the model learned the task
    assert fgsm.accuracy[-1] < clean.accuracy[0]  # FGSM bites, so the comparison is informative
    assert np.all(pgd.accuracy <= fgsm.accuracy), (pgd.accuracy, fgsm.accuracy)
    assert np.any(pgd.accuracy < fgsm.accuracy), (pgd.accuracy, fgsm.accuracy)


def test_report_states_each_attack_and_the_label_leaking_check():
    params, es = mlp_params(), mlp_eval_set()
    report = robustness.robustness_report(
        models.eval_apply(mlp_apply), params, es, jax.random.key(0), small_robust_section(), "chunked"
    )
    assert set(report["attacks"]) == {"fgsm", "pgd", "fgm_l2"}
    pgd = report["attacks"]["pgd"]
    assert (pgd["num_steps"], pgd["num_restarts"], pgd["step_size"], pgd["num_examples"]) == (
        3,
        2,
        0.01,
        MLP_NUM_EXAMPLES,
    )
    assert pgd["norm"] == "linf" and pgd["eps"] == list(GRID) and pgd["random_start"] and pgd["labels"] == "true"
    assert report["attacks"]["fgm_l2"]["eps"] == [1.0]

    # Label leaking: both numbers at every eps, and they differ because the model errs on the odd examples.
    leak = report["label_leaking"]
    assert leak["eps"] == list(GRID)
    assert len(leak["true_labels"]["accuracy"]) == len(leak["predicted_labels"]["accuracy"]) == len(GRID)
    assert leak["true_labels"]["accuracy"] != leak["predicted_labels"]["accuracy"]
    assert leak["true_labels"]["accuracy"] == report["attacks"]["fgsm"]["accuracy"]

    # Worst cases: per norm, over clean and every attack of that norm, below each of them.
    linf = report["worst_case"]["linf"]
    assert set(linf["over"]) == {"clean", "fgsm", "pgd", "fgsm_predicted_labels"}
    for curve in (pgd, report["attacks"]["fgsm"], leak["predicted_labels"]):
        assert all(w <= a for w, a in zip(linf["accuracy"], curve["accuracy"]))
    assert all(w <= report["clean_accuracy"] for w in linf["accuracy"])
    assert report["clean_accuracy_per_seed"] == [report["clean_accuracy"]]
    assert report["worst_case"]["l2"]["over"] == ["clean", "fgm_l2"]
    assert set(report["seconds"]) >= {"clean", "fgsm", "pgd", "fgm_l2", "fgsm_predicted_labels"}
