"""Tests for advjax.evaluate: the compiled evaluator against independent computations, sweeps, and the summary."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advjax import attacks, data, eval_fold, evaluate, models, noise, runtime, train
from tests.helpers import tiny_config

pytestmark = pytest.mark.usefixtures("quick_compile_module")

# 21 of 30 examples in batches of 8: 3 batches, the last with 3 padded slots,
# and 9 examples beyond num_examples that must not be read.
NUM_TOTAL, NUM_EXAMPLES, BATCH_SIZE = 30, 21, 8


NUM_BATCHES = 3


EPS, SIGMA = 0.1, 0.3


# ----------------------------------------------------------------------------
# Helpers.


@functools.cache
def model_and_params():
    """A small BP (quick to compile, no dropout) whose padding would show if it were counted.

    Random hidden biases keep ReLUs active on the all-zero padding image, so
    its input gradient is nonzero and FGSM moves it (with zero biases the
    gradient is exactly 0); the output bias makes it predict class 0, the
    padding label, so counting padding would add correct answers.
    """
    cfg = tiny_config("bp")
    cfg.model.hidden = (32,)
    model = models.build_model(cfg.model)
    params = train.init_params(jax.random.key(0), model)
    params["Dense_0"]["bias"] = 0.5 * jax.random.normal(jax.random.key(1), (32,))
    zero_logits = model.apply({"params": params}, jnp.zeros((1, 28, 28, 1)))[0]
    params["Dense_1"]["bias"] = params["Dense_1"]["bias"] - zero_logits + 3.0 * jax.nn.one_hot(0, 10)
    return model, params


@jax.jit
def _logits(params, images_u8):
    model, _ = model_and_params()
    return model.apply({"params": params}, data.to_float_images(images_u8), train=False)


def logits_fn_for(params):
    model, _ = model_and_params()
    return lambda z: model.apply({"params": params}, z, train=False)


def synthetic_images(seed: int, low: int = 0, high: int = 256, n: int = NUM_TOTAL) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, (n, 28, 28, 1), dtype=np.uint8)


@functools.cache
def dataset(seed: int = 0, low: int = 0, high: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Images with labels the model gets right on even indices and nearly right on odd ones.

    Even examples carry the model's top class, so clean accuracy is about 1/2
    and FGSM can lower it; odd ones carry its runner-up, so attacking the
    predicted label (pushing away from the top class) can make them correct
    while attacking the true label cannot: the two attacks give different counts.
    """
    _, params = model_and_params()
    images = synthetic_images(seed, low, high)
    order = np.argsort(np.asarray(_logits(params, images)), axis=-1)
    labels = np.where(np.arange(NUM_TOTAL) % 2 == 0, order[:, -1], order[:, -2]).astype(np.int32)
    return images, labels


@jax.jit
def _independent_fgsm(params, images_u8, attack_labels, eps):
    """FGSM on the whole set in one call: no batching, padding or masking."""
    x = data.to_float_images(images_u8)
    return x, attacks.fgsm(logits_fn_for(params), x, attack_labels, eps)


def independent_fgsm(params, images, labels, eps=EPS, attack_labels=None):
    """(number correct on FGSM images, mean per-image stats) over the first NUM_EXAMPLES, in numpy."""
    images, labels = images[:NUM_EXAMPLES], labels[:NUM_EXAMPLES]
    attack_labels = labels if attack_labels is None else attack_labels[:NUM_EXAMPLES]
    x, adversarial = _independent_fgsm(params, jnp.asarray(images), jnp.asarray(attack_labels), eps)
    correct = int(np.sum(np.argmax(np.asarray(_logits_float(params, adversarial)), -1) == labels))
    delta = (np.asarray(adversarial) - np.asarray(x)).reshape(NUM_EXAMPLES, -1).astype(np.float64)
    stats = {
        "mean": delta.mean(1).mean(),
        "std": delta.std(1).mean(),
        "linf": np.abs(delta).max(1).mean(),
        "l2": np.sqrt(np.square(delta).sum(1)).mean(),
    }
    return correct, stats


@jax.jit
def _logits_float(params, x):
    return logits_fn_for(params)(x)


def eval_set(seed=0, low=0, high=256, num_examples=NUM_EXAMPLES):
    images, labels = dataset(seed, low, high)
    return eval_fold.make_eval_set(images, labels, num_examples, BATCH_SIZE)


@functools.cache
def full_evaluator(form: str):
    """Every perturbation; chunks of 2 make the 3 batches a chunk of 2 and a remainder of 1."""
    model, _ = model_and_params()
    return evaluate.make_evaluator(models.eval_apply(model.apply), form=form, chunk_size=2)


@functools.cache
def full_results(form: str = "chunked"):
    _, params = model_and_params()
    return full_evaluator(form)(params, eval_set(), jax.random.key(1), EPS, SIGMA)


def assert_count(accuracy: float, correct: int, num_examples: int = NUM_EXAMPLES):
    """An accuracy is a count over num_examples: compare the count exactly."""
    assert round(accuracy * num_examples) == correct, (accuracy * num_examples, correct)
    assert accuracy == pytest.approx(correct / num_examples, abs=1e-12)


# ----------------------------------------------------------------------------
# Pieces of the evaluator.


def test_perturb_batch_returns_exactly_the_requested_perturbations():
    w = jax.random.normal(jax.random.key(0), (784, 10))
    logits_fn = lambda z: z.reshape((z.shape[0], -1)) @ w  # a linear model is enough here
    x = jnp.asarray(synthetic_images(0, n=3), jnp.float32) / 255.0
    y = jnp.array([0, 1, 2])
    key, eps, sigma = jax.random.key(1), jnp.float32(EPS), jnp.float32(SIGMA)
    perturb = jax.jit(lambda names: evaluate.perturb_batch(logits_fn, x, y, key, eps, sigma, names), static_argnums=0)

    # matched_gaussian needs the FGSM image but must not report it.
    out = perturb(("matched_gaussian", "clean"))
    assert set(out) == {"matched_gaussian", "clean"}  # (jit returns dicts with sorted keys)
    np.testing.assert_array_equal(out["clean"], x)

    out = perturb(evaluate.PERTURBATIONS)
    assert set(out) == set(evaluate.PERTURBATIONS)
    # FGSM from its definition: a step of eps up the cross-entropy, i.e. down log p(y | x).
    log_likelihood = lambda z: jnp.sum(jax.nn.log_softmax(logits_fn(z))[jnp.arange(3), y])
    expected_fgsm = np.clip(np.asarray(x) - EPS * np.sign(np.asarray(jax.grad(log_likelihood)(x))), 0.0, 1.0)
    np.testing.assert_allclose(out["fgsm"], expected_fgsm, atol=1e-6)
    for name in evaluate.PERTURBATIONS:
        assert out[name].shape == x.shape
        assert float(out[name].min()) >= 0.0 and float(out[name].max()) <= 1.0


def test_summarize_divides_by_num_examples_and_leaves_out_clean_stats():
    totals = {
        "correct": {"clean": np.int32(7), "fgsm": np.int32(3)},
        "stats": {"clean": np.zeros(4, np.float32), "fgsm": np.array([1.0, 2.0, 3.0, 4.0], np.float32)},
    }
    summary = evaluate.summarize(totals, 10)
    assert summary["accuracy"] == pytest.approx({"clean": 0.7, "fgsm": 0.3})
    assert list(summary["perturbation_stats"]) == ["fgsm"]
    assert summary["perturbation_stats"]["fgsm"] == pytest.approx({"mean": 0.1, "std": 0.2, "linf": 0.3, "l2": 0.4})


@pytest.mark.parametrize("perturbations", [("clean", "pgd"), ("noise",)])
def test_make_evaluator_rejects_unknown_perturbations(perturbations):
    model, _ = model_and_params()
    with pytest.raises(ValueError, match="unknown perturbations"):
        evaluate.make_evaluator(models.eval_apply(model.apply), perturbations)


# ----------------------------------------------------------------------------
# The evaluator against independent computations.


def test_clean_accuracy_equals_numpy_over_the_real_examples():
    model, params = model_and_params()
    images, labels = dataset()
    # Precondition that makes the padding matter: the zero padding image is
    # classified as the padding label 0, so counting padding would inflate accuracy.
    assert int(np.argmax(np.asarray(_logits(params, np.zeros((1, 28, 28, 1), np.uint8))))) == 0

    predictions = np.argmax(np.asarray(_logits(params, images[:NUM_EXAMPLES])), -1)
    correct = int(np.sum(predictions == labels[:NUM_EXAMPLES]))

    assert 0 < correct < NUM_EXAMPLES
    assert_count(full_results()["accuracy"]["clean"], correct)


def test_fgsm_accuracy_equals_fgsm_on_the_whole_set():
    _, params = model_and_params()
    images, labels = dataset()
    correct, _ = independent_fgsm(params, images, labels)
    clean_correct = round(full_results()["accuracy"]["clean"] * NUM_EXAMPLES)
    assert correct < clean_correct  # the attack works, so the count is informative
    assert_count(full_results()["accuracy"]["fgsm"], correct)


def test_fgsm_stats_equal_numpy_on_clipped_images():
    # Full-range pixels: many FGSM steps are clipped at 0 or 1.
    _, params = model_and_params()
    images, labels = dataset()
    # Precondition: FGSM moves the zero padding image, so unmasked padding would change the sums.
    padding = np.zeros((1, 28, 28, 1), np.uint8)
    _, moved = _independent_fgsm(params, jnp.asarray(padding), jnp.zeros((1,), jnp.int32), EPS)
    assert float(jnp.max(moved)) == pytest.approx(EPS)
    _, expected = independent_fgsm(params, images, labels)
    stats = full_results()["perturbation_stats"]["fgsm"]
    assert set(stats) == set(evaluate.STATISTICS)
    assert stats == pytest.approx(expected, rel=1e-4, abs=1e-7)
    # Clipped pixels do not move, so the L2 norm falls short of eps * sqrt(784).
    assert stats["l2"] < 0.99 * EPS * 28


def test_fgsm_stats_on_interior_images_have_linf_eps():
    # Pixels in [26/255, 229/255] ~ [0.10, 0.90]: an eps=0.1 step is never
    # clipped, so every image moves by exactly eps in L-inf. Same shapes as the
    # main set, so the compiled evaluator is reused.
    _, params = model_and_params()
    images, labels = dataset(seed=1, low=26, high=230)
    results = full_evaluator("chunked")(params, eval_set(seed=1, low=26, high=230), jax.random.key(1), EPS, SIGMA)
    stats = results["perturbation_stats"]["fgsm"]
    assert stats["linf"] == pytest.approx(EPS, abs=1e-6)
    assert 0 < stats["l2"] <= EPS * 28 + 1e-5  # at most 784 pixels move, by eps each
    correct, expected = independent_fgsm(params, images, labels)
    assert stats == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert_count(results["accuracy"]["fgsm"], correct)


def test_perturbation_stats_exclude_clean():
    results = full_results()
    assert set(results["accuracy"]) == set(evaluate.PERTURBATIONS)
    assert set(results["perturbation_stats"]) == set(evaluate.PERTURBATIONS) - {"clean"}


def test_gaussian_and_matched_accuracies_are_fractions_and_noise_is_measured():
    results = full_results()
    for name in ("gaussian", "matched_gaussian"):
        accuracy = results["accuracy"][name]
        assert 0.0 <= accuracy <= 1.0
        assert accuracy * NUM_EXAMPLES == pytest.approx(round(accuracy * NUM_EXAMPLES), abs=1e-9)
    # sigma=0.3 noise, clipped: a positive std below sigma, and linf above it.
    gaussian = results["perturbation_stats"]["gaussian"]
    assert 0.05 < gaussian["std"] < SIGMA and gaussian["linf"] > SIGMA


def test_zero_strengths_leave_every_perturbation_clean():
    # eps and sigma are traced: with both 0, FGSM and Gaussian noise are the
    # identity, and the matched noise (mean and std of a zero FGSM step) is too.
    _, params = model_and_params()
    results = full_evaluator("chunked")(params, eval_set(), jax.random.key(1), 0.0, 0.0)
    clean = results["accuracy"]["clean"]
    assert results["accuracy"] == pytest.approx({p: clean for p in evaluate.PERTURBATIONS})
    for name, stats in results["perturbation_stats"].items():
        assert stats == pytest.approx({s: 0.0 for s in evaluate.STATISTICS}, abs=1e-7), name


def test_attacking_predicted_labels_equals_the_independent_computation():
    model, params = model_and_params()
    images, labels = dataset()
    predicted = np.argmax(np.asarray(_logits(params, images)), -1).astype(np.int32)
    with_predicted, predicted_stats = independent_fgsm(params, images, labels, attack_labels=predicted)
    with_true, true_stats = independent_fgsm(params, images, labels)
    assert with_predicted != with_true  # precondition: the two label choices are distinguishable

    results = evaluate.make_evaluator(
        models.eval_apply(model.apply), ("clean", "fgsm"), use_predicted_labels=True, form="scan"
    )(params, eval_set(), jax.random.key(1), EPS, SIGMA)
    # Accuracy is still measured against the true labels.
    assert_count(results["accuracy"]["fgsm"], with_predicted)
    assert results["accuracy"]["clean"] == full_results()["accuracy"]["clean"]
    assert results["perturbation_stats"]["fgsm"] == pytest.approx(predicted_stats, rel=1e-4, abs=1e-7)


def test_scan_and_chunked_forms_give_equal_results():
    assert full_results("scan") == full_results()  # chunked


# ----------------------------------------------------------------------------
# Compiled code is reused.


@pytest.mark.parametrize("form", [pytest.param("scan", marks=pytest.mark.slow), "chunked"])
def test_new_strengths_params_or_eval_set_do_not_recompile(form):
    model, params = model_and_params()
    calls = []

    def counting_apply(*args, **kwargs):
        calls.append(None)  # runs only while tracing, inside the compiled fold
        return model.apply(*args, **kwargs)

    evaluator = evaluate.make_evaluator(models.eval_apply(counting_apply), form=form, chunk_size=2)
    first = evaluator(params, eval_set(), jax.random.key(1), EPS, SIGMA)
    traced = len(calls)
    assert traced > 0

    stronger = evaluator(params, eval_set(), jax.random.key(1), 2 * EPS, 2 * SIGMA)
    other_params = train.init_params(jax.random.key(5), model)
    # Other images, and 22 rather than 21 examples: still 3 batches of 8.
    other_set = evaluator(other_params, eval_set(seed=2, num_examples=22), jax.random.key(3), EPS, SIGMA)
    assert len(calls) == traced

    # The new values were used, not just cached results.
    assert stronger["perturbation_stats"]["fgsm"]["linf"] > first["perturbation_stats"]["fgsm"]["linf"]
    assert stronger["perturbation_stats"]["gaussian"]["std"] > first["perturbation_stats"]["gaussian"]["std"]
    assert other_set != first


# ----------------------------------------------------------------------------
# Sweeps: a whole grid of sigmas or epsilons in one compiled call.


def _sweep_inputs():
    model, params = model_and_params()
    images, labels = dataset()
    return model, params, eval_fold.make_eval_set(images, labels, NUM_EXAMPLES, BATCH_SIZE)


@pytest.mark.parametrize("form", [pytest.param("scan", marks=pytest.mark.slow), "chunked"])
def test_gaussian_sweep_equals_a_python_loop_over_the_same_sigmas_and_keys(form):
    model, params, eval_set = _sweep_inputs()
    sigmas = [0.0, 0.2, 0.5, 1.0]
    key = jax.random.key(7)
    swept = evaluate.make_sweep(models.eval_apply(model.apply), "gaussian", form=form, chunk_size=2)(
        params, eval_set, key, sigmas
    )
    # The loop applies the same per-batch key, fold_in(key, batch), at each sigma,
    # to the same padded batches (noise is drawn for the padded shape), counting only real examples.
    looped = []
    for sigma in sigmas:
        correct = 0
        for b in range(NUM_BATCHES):
            xb = data.to_float_images(eval_set.images[b])
            noisy = noise.gaussian(jax.random.fold_in(key, b), xb, sigma)
            hits = np.argmax(logits_fn_for(params)(noisy), -1) == np.asarray(eval_set.labels[b])
            correct += int(np.sum(hits & np.asarray(eval_set.mask[b])))
        looped.append(correct / NUM_EXAMPLES)
    np.testing.assert_allclose(swept, looped, atol=1e-9)
    assert swept[0] == pytest.approx(
        evaluate.make_evaluator(models.eval_apply(model.apply), ("clean",))(params, eval_set, key)["accuracy"]["clean"]
    )


def test_fgsm_sweep_equals_the_evaluator_at_each_eps():
    model, params, eval_set = _sweep_inputs()
    grid = [0.0, 0.05, 0.1, 0.3]
    swept = evaluate.make_sweep(models.eval_apply(model.apply), "fgsm")(params, eval_set, jax.random.key(0), grid)
    evaluator = evaluate.make_evaluator(models.eval_apply(model.apply), ("fgsm",))
    expected = [evaluator(params, eval_set, jax.random.key(0), eps)["accuracy"]["fgsm"] for eps in grid]
    np.testing.assert_allclose(swept, expected, atol=1e-9)
    assert swept[0] > swept[-1]  # the model is attackable, so the curve is not flat


@pytest.mark.parametrize("perturbation", [pytest.param("gaussian", marks=pytest.mark.slow), "fgsm"])
def test_a_new_grid_of_the_same_length_does_not_recompile(perturbation):
    model, params, eval_set = _sweep_inputs()
    traced = []

    def counting_apply(*args, **kwargs):
        traced.append(1)
        return model.apply(*args, **kwargs)

    sweep = evaluate.make_sweep(models.eval_apply(counting_apply), perturbation, form="scan")
    sweep(params, eval_set, jax.random.key(0), [0.1, 0.2, 0.3])
    first = len(traced)
    sweep(params, eval_set, jax.random.key(1), [0.4, 0.5, 0.6])
    assert len(traced) == first > 0
    sweep(params, eval_set, jax.random.key(1), [0.4, 0.5])  # another length: a new program
    assert len(traced) > first


def test_sweep_memory_holds_one_batch_times_the_grid_not_the_split_times_the_grid():
    model, params, _ = _sweep_inputs()
    num, batch, grid = 5000, 250, jnp.linspace(0.0, 1.0, 21)
    eval_set = eval_fold.make_eval_set(np.zeros((num, 28, 28, 1), np.uint8), np.zeros(num, np.int32), num, batch)
    sweep = evaluate.make_sweep(models.eval_apply(model.apply), "gaussian", form="scan")
    # Ask XLA how much scratch memory the compiled sweep needs.
    compiled = sweep.fold.lower(*sweep.fold_args(params, eval_set, jax.random.key(0), grid)).compile()
    one_batch_times_grid = 21 * batch * 28 * 28 * 4
    whole_split_times_grid = 21 * num * 28 * 28 * 4
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 4 * one_batch_times_grid < whole_split_times_grid / 4


def test_resolve_grid_chunk_maps_points_one_by_one_on_cpu_and_all_at_once_elsewhere():
    assert evaluate.resolve_grid_chunk(0, 21, "cpu") == 1
    assert evaluate.resolve_grid_chunk(0, 21, "gpu") == 21
    assert evaluate.resolve_grid_chunk(5, 21, "cpu") == 5
    assert evaluate.resolve_grid_chunk(50, 21, "tpu") == 21


@pytest.mark.parametrize(
    "perturbation", [p if p != "matched_gaussian" else pytest.param(p, marks=pytest.mark.slow) for p in evaluate.SWEEPS]
)
def test_sweep_result_does_not_depend_on_how_many_grid_points_share_a_pass(perturbation):
    model, params, eval_set = _sweep_inputs()
    grid = [0.0, 0.1, 0.3, 0.6]
    results = [
        evaluate.make_sweep(models.eval_apply(model.apply), perturbation, grid_chunk=chunk)(
            params, eval_set, jax.random.key(3), grid
        )
        for chunk in (1, 2, 4)
    ]
    np.testing.assert_allclose(results[0], results[1], atol=1e-9)
    np.testing.assert_allclose(results[0], results[2], atol=1e-9)


@pytest.mark.slow
def test_matched_gaussian_sweep_equals_a_python_loop():
    model, params, eval_set = _sweep_inputs()
    grid, key = [0.05, 0.3], jax.random.key(11)
    swept = evaluate.make_sweep(models.eval_apply(model.apply), "matched_gaussian")(params, eval_set, key, grid)
    logits_fn = logits_fn_for(params)
    looped = []
    for eps in grid:
        correct = 0
        for b in range(NUM_BATCHES):
            xb, yb = data.to_float_images(eval_set.images[b]), eval_set.labels[b]
            noisy = noise.matched_gaussian(jax.random.fold_in(key, b), xb, attacks.fgsm(logits_fn, xb, yb, eps))
            hits = np.argmax(logits_fn(noisy), -1) == np.asarray(yb)
            correct += int(np.sum(hits & np.asarray(eval_set.mask[b])))
        looped.append(correct / NUM_EXAMPLES)
    np.testing.assert_allclose(swept, looped, atol=1e-9)


@pytest.mark.parametrize("form", ["scan", "chunked"])
def test_compile_ahead_leaves_nothing_to_compile_but_the_batch_slice(form):
    # What fit.fit compiles in a thread while training runs: the evaluation proper must be among it, or
    # the evaluation after training compiles it again (docs/design.md, "Counting executables").
    model, params = model_and_params()
    evaluator = evaluate.make_evaluator(models.eval_apply(model.apply), form=form)
    sweep = evaluate.make_sweep(models.eval_apply(model.apply), "fgsm", form=form)
    images, labels = dataset(4)
    split = data.Split(images, labels)
    meter = runtime.CompileMeter().install()
    try:
        params_shape, spec = (
            jax.eval_shape(lambda p: p, params),
            eval_fold.eval_set_spec(split, NUM_EXAMPLES, BATCH_SIZE),
        )
        evaluator.compile_ahead(params_shape, spec, jax.random.key(1))
        sweep.compile_ahead(params_shape, spec, jax.random.key(1), (0.1, 0.2))
        ahead = len(meter.executables)
        es = eval_fold.make_eval_set(images, labels, NUM_EXAMPLES, BATCH_SIZE)
        evaluator(params, es, jax.random.key(1), EPS, SIGMA)
        sweep(params, es, jax.random.key(1), (0.3, 0.4))
        later = [e["name"] for e in meter.executables[ahead:]]
    finally:
        meter.uninstall()
    assert ahead >= 2
    assert all("take_batch" in name for name in later), later
