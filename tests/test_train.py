"""Tests for advjax.train: the train state, schedules, one step, the shuffle, and the compiled epoch."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advjax import data, loops, models, objectives, train
from tests.helpers import Setup, full_optimizations, small_config, synthetic_data, tiny_config

# Compilation dominates these tests, and this roughly halves BP compile
# time. It also matters for the exact comparisons: with full optimizations
# XLA may fuse across the unrolled steps of a chunk and round differently;
# with FGSM training that moves the output bias by 1-2 ulp (seen: 4.7e-10
# with chunk_size 2). The tests below check the loop logic (same batches,
# same keys, same order), which must then agree bit for bit.
pytestmark = pytest.mark.usefixtures("quick_compile_module")


MODES = objectives.TRAINING_MODES
# The epoch comparisons compile every form of a mode's epoch: ordinary and FGSM training (whose sign() turns any
# rounding difference into another model) in the quick tier, the rest in the full one.
# A step of the multi-step defenses compiles their attack: in the full tier (tests/test_objectives.py checks
# each objective itself in the quick one).
STEP_MODES = [pytest.param(m, marks=pytest.mark.slow) if m in ("pgd", "trades", "nfgsm", "fast") else m for m in MODES]
# FGSM exercises every part of the step; the other modes run in the full tier.
EPOCH_MODES = [mode if mode == "fgsm" else pytest.param(mode, marks=pytest.mark.slow) for mode in MODES]


# (form, chunk_size) for a 3-step epoch: one while loop; one step per chunk;
# a chunk of 2 plus a remainder of 1; one chunk shorter than chunk_size.


# (form, chunk_size) for a 3-step epoch: one while loop; one step per chunk;
# a chunk of 2 plus a remainder of 1; one chunk shorter than chunk_size.
FORMS = [("scan", 8), ("chunked", 1), ("chunked", 2), ("chunked", 8)]


NUM_EXAMPLES, BATCH_SIZE = 27, 8  # 3 steps; the last 3 examples are dropped


NUM_STEPS = NUM_EXAMPLES // BATCH_SIZE


# ----------------------------------------------------------------------------
# Helpers.


_jitted_step = jax.jit(train.train_step, static_argnums=1)


def python_epoch(setup, state, images, labels, permutation, rng, batch_size):
    """The epoch as a plain Python loop: numpy batch gathering, one jitted train_step per batch.

    The uint8 -> float conversion is fused into the step, as in the epoch:
    converting outside changes how XLA fuses it with the Gaussian noise and
    moves the result by float rounding.
    """
    step_fn = jax.jit(lambda s, x_u8, y, key: train.train_step(s, setup.objective, data.to_float_images(x_u8), y, key))
    permutation = np.asarray(permutation)
    loss, correct = np.float32(0.0), 0
    num_steps = len(permutation) // batch_size
    for step in range(num_steps):
        index = permutation[step * batch_size : (step + 1) * batch_size]
        key = jax.random.fold_in(rng, state.step)
        state, (batch_loss, batch_correct) = step_fn(state, images[index], labels[index], key)
        loss = np.float32(loss + np.float32(batch_loss))  # float32, in step order, as on the device
        correct += int(batch_correct)
    return state, (loss, np.int32(correct), np.int32(num_steps * batch_size))


def run_epoch(setup, form, chunk_size, images, labels, permutation, rng, initial_step=0):
    epoch = train.make_epoch_fn(setup.objective, len(labels), BATCH_SIZE, form=form, chunk_size=chunk_size)
    return epoch(
        setup.state(initial_step), train.EpochTotals.zeros(), jnp.asarray(images), jnp.asarray(labels), permutation, rng
    )


# ----------------------------------------------------------------------------
# State and schedules.


def test_create_train_state_bp_param_shapes():
    cfg = tiny_config("bp")  # the paper's 784-256-256-10
    # Shapes only: eval_shape skips the (slow, for the CNN) initialisation itself.
    state = jax.eval_shape(
        lambda key: train.create_train_state(key, models.build_model(cfg.model), cfg.train, 4), jax.random.key(0)
    )
    shapes = jax.tree.map(lambda leaf: leaf.shape, state.params)
    assert shapes == {
        "Dense_0": {"kernel": (784, 256), "bias": (256,)},
        "Dense_1": {"kernel": (256, 256), "bias": (256,)},
        "Dense_2": {"kernel": (256, 10), "bias": (10,)},
    }


def test_create_train_state_cnn_param_shapes():
    cfg = tiny_config("cnn")
    # Shapes only: eval_shape skips the (slow, for the CNN) initialisation itself.
    state = jax.eval_shape(
        lambda key: train.create_train_state(key, models.build_model(cfg.model), cfg.train, 4), jax.random.key(0)
    )
    shapes = jax.tree.map(lambda leaf: leaf.shape, state.params)
    assert shapes == {
        "Conv_0": {"kernel": (5, 5, 1, 32), "bias": (32,)},
        "Conv_1": {"kernel": (5, 5, 32, 64), "bias": (64,)},
        "Dense_0": {"kernel": (7 * 7 * 64, 1024), "bias": (1024,)},
        "Dense_1": {"kernel": (1024, 10), "bias": (10,)},
    }


def test_create_train_state_depends_on_the_key():
    setup = Setup()
    a = train.create_train_state(jax.random.key(0), setup.model, setup.config.train, 4)
    b = train.create_train_state(jax.random.key(1), setup.model, setup.config.train, 4)
    assert not np.array_equal(a.params["Dense_0"]["kernel"], b.params["Dense_0"]["kernel"])
    assert int(a.step) == 0


def test_cosine_schedule_decays_to_zero_at_the_end_of_the_run():
    cfg = small_config(schedule="cosine")
    cfg.train.epochs, steps_per_epoch = 3, 5
    schedule = train.learning_rate_schedule(cfg.train, steps_per_epoch)
    total = cfg.train.epochs * steps_per_epoch
    got = np.array([float(schedule(t)) for t in range(total + 1)])
    expected = cfg.train.learning_rate * 0.5 * (1 + np.cos(np.pi * np.arange(total + 1) / total))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9)
    assert got[0] == pytest.approx(cfg.train.learning_rate)
    assert abs(got[-1]) < 1e-9
    assert np.all(np.diff(got) < 0)


@pytest.mark.parametrize("peak, total, peak_step", [(0.4, 1950, 780), (0.4, 7, 2), (0.5, 5265, 2632), (0.25, 8, 2)])
def test_cyclic_schedule_rises_linearly_to_the_rate_at_its_peak_share_and_falls_to_zero(peak, total, peak_step):
    cfg = small_config(schedule="cyclic")
    cfg.train.epochs, cfg.train.cyclic_peak = 1, peak
    schedule = train.learning_rate_schedule(cfg.train, total)
    rates = np.array([float(schedule(t)) for t in range(total + 1)])
    assert int(np.argmax(rates)) == peak_step  # 2/5 of 1950 is exactly 780: no float rounding moves it
    assert rates[peak_step] == pytest.approx(cfg.train.learning_rate) and rates[0] == 0 and rates[-1] == 0
    np.testing.assert_allclose(np.diff(rates[: peak_step + 1]), cfg.train.learning_rate / peak_step, rtol=1e-3)


def test_constant_schedule_stays_at_the_learning_rate():
    cfg = small_config(schedule="constant")
    schedule = train.learning_rate_schedule(cfg.train, 5)
    for t in (0, 1, 5, cfg.train.epochs * 5, 10_000):
        assert float(schedule(t)) == pytest.approx(cfg.train.learning_rate)


def test_unknown_schedule_raises():
    cfg = small_config(schedule="linear")
    with pytest.raises(ValueError, match="schedule"):
        train.learning_rate_schedule(cfg.train, 5)


def test_the_default_optimizer_is_adam_alone_so_older_checkpoints_keep_their_optimizer_state():
    import optax

    cfg = small_config()
    params = {"w": jnp.ones(3)}
    adam = optax.adam(train.learning_rate_schedule(cfg.train, 5)).init(params)
    assert jax.tree.structure(train.make_optimizer(cfg.train, 5).init(params)) == jax.tree.structure(adam)
    cfg.train.optimizer = "rmsprop"
    with pytest.raises(ValueError, match="train.optimizer='rmsprop'"):
        train.make_optimizer(cfg.train, 5)


def test_sgd_with_momentum_and_weight_decay_steps_as_pytorch_does():
    cfg = small_config()
    cfg.train.optimizer, cfg.train.learning_rate, cfg.train.momentum, cfg.train.weight_decay = "sgd", 0.1, 0.9, 0.01
    tx = train.make_optimizer(cfg.train, 5)
    p0, grads = np.array([1.0, -2.0]), [np.array([0.5, 0.25]), np.array([-1.0, 2.0])]
    params, opt_state = jnp.asarray(p0), tx.init(jnp.asarray(p0))
    # PyTorch's SGD: d = g + wd p; buf = momentum buf + d (buf = d at the first step); p -= lr buf.
    expected, buf = p0, np.zeros(2)
    for g in grads:
        updates, opt_state = tx.update(jnp.asarray(g), opt_state, params)
        params = params + updates
        buf = 0.9 * buf + g + 0.01 * expected
        expected = expected - 0.1 * buf
    np.testing.assert_allclose(params, expected, rtol=1e-6)
    cfg.train.momentum, cfg.train.weight_decay = 0.0, 0.0  # plain SGD
    plain = train.make_optimizer(cfg.train, 5)
    updates, _ = plain.update(jnp.asarray(grads[0]), plain.init(params), params)
    np.testing.assert_allclose(updates, -0.1 * grads[0], rtol=1e-6)


@pytest.mark.parametrize("schedule,moves_at_the_end", [("cosine", False), ("constant", True)])
def test_train_state_optimizer_follows_the_schedule(schedule, moves_at_the_end):
    # One epoch of two steps: the cosine rate is 0 at step 2, so a third step
    # must leave the params exactly where they were; a constant rate must not.
    setup = Setup(schedule=schedule, steps_per_epoch=2)
    setup.config.train.epochs = 1
    state = train.create_train_state(jax.random.key(0), setup.model, setup.config.train, 2)
    images, labels = synthetic_data(8)
    x, y = jnp.asarray(images.astype(np.float32) / 255.0), jnp.asarray(labels)
    initial = state.params
    for step in range(2):
        state, _ = _jitted_step(state, setup.objective, x, y, jax.random.key(step))
    before = state.params
    # Steps 0 and 1 run at rates 2e-3 and 1e-3 in both schedules.
    assert not np.array_equal(before["Dense_0"]["kernel"], initial["Dense_0"]["kernel"])
    state, _ = _jitted_step(state, setup.objective, x, y, jax.random.key(2))
    if moves_at_the_end:
        assert not np.array_equal(state.params["Dense_0"]["kernel"], before["Dense_0"]["kernel"])
    else:
        chex.assert_trees_all_equal(state.params, before)


# ----------------------------------------------------------------------------
# One step.


@pytest.mark.parametrize("mode", STEP_MODES)
def test_train_steps_lower_the_loss_on_a_fixed_batch(mode):
    setup = Setup(mode=mode)
    state = setup.state()
    images, labels = synthetic_data(16)
    x, y = jnp.asarray(images.astype(np.float32) / 255.0), jnp.asarray(labels)
    key = jax.random.key(7)  # one key throughout, so the noise is fixed and the loss comparable
    loss_fn = jax.jit(setup.objective)
    before = float(loss_fn(state.params, x, y, key)[0])
    for _ in range(10):
        state, _ = _jitted_step(state, setup.objective, x, y, key)
    after = float(loss_fn(state.params, x, y, key)[0])
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize("mode", STEP_MODES)
def test_train_step_reports_the_objective_loss_and_correct_count(mode):
    setup = Setup(mode=mode)
    state = setup.state()
    images, labels = synthetic_data(16, seed=1)
    x, y, key = jnp.asarray(images.astype(np.float32) / 255.0), jnp.asarray(labels), jax.random.key(3)

    new_state, (loss, correct) = _jitted_step(state, setup.objective, x, y, key)

    # The objective's (loss, logits) at the params before the step.
    expected_loss, logits = jax.jit(setup.objective)(state.params, x, y, key)
    assert float(loss) == pytest.approx(float(expected_loss), rel=1e-6)
    assert int(correct) == int(np.sum(np.argmax(np.asarray(logits), -1) == labels))
    assert int(new_state.step) == 1
    assert not np.array_equal(new_state.params["Dense_0"]["kernel"], state.params["Dense_0"]["kernel"])


# ----------------------------------------------------------------------------
# The shuffle.


def test_epoch_permutation_is_a_permutation():
    perm = np.asarray(train.epoch_permutation(jax.random.key(0), 3, 50))
    np.testing.assert_array_equal(np.sort(perm), np.arange(50))


def test_epoch_permutation_is_reproducible_and_differs_per_epoch_and_key():
    key = jax.random.key(0)
    perms = [np.asarray(train.epoch_permutation(key, epoch, 50)) for epoch in range(3)]
    np.testing.assert_array_equal(perms[1], np.asarray(train.epoch_permutation(key, 1, 50)))
    assert not np.array_equal(perms[0], perms[1]) and not np.array_equal(perms[1], perms[2])
    assert not np.array_equal(perms[0], np.asarray(train.epoch_permutation(jax.random.key(1), 0, 50)))


def test_epoch_permutation_accepts_a_traced_epoch():
    traced = jax.jit(train.epoch_permutation, static_argnums=2)(jax.random.key(0), jnp.int32(2), 50)
    chex.assert_trees_all_equal(traced, train.epoch_permutation(jax.random.key(0), 2, 50))


# ----------------------------------------------------------------------------
# The epoch.


@pytest.mark.parametrize(
    "num_examples,batch_size,num_steps", [(27, 8, 3), (32, 8, 4), (8, 8, 1), (15, 8, 1), (50_000, 128, 390)]
)
def test_epoch_drops_the_last_partial_batch(num_examples, batch_size, num_steps):
    epoch = train.make_epoch_fn(Setup().objective, num_examples, batch_size)
    assert epoch.num_steps == num_steps


@pytest.mark.parametrize("num_examples,batch_size", [(7, 8), (0, 8)])
def test_epoch_rejects_a_batch_larger_than_the_data(num_examples, batch_size):
    with pytest.raises(ValueError, match="batch size"):
        train.make_epoch_fn(Setup().objective, num_examples, batch_size)


def test_epoch_totals_start_at_zero():
    totals = train.EpochTotals.zeros()
    no_step = np.int32(train.EpochTotals.NO_STEP)
    chex.assert_trees_all_equal(totals, train.EpochTotals(np.float32(0), np.int32(0), np.int32(0), no_step))
    assert [t.dtype for t in totals] == [jnp.float32, jnp.int32, jnp.int32, jnp.int32]


@pytest.mark.parametrize("num_seeds", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_epoch_records_the_first_step_whose_loss_is_not_finite(num_seeds):
    # A learning rate of 1e30 blows the params up at the first update: the loss
    # of the second step (global step INITIAL_STEP + 2) is the first non-finite one.
    setup = Setup()
    setup.config.train.learning_rate = 1e30
    images, labels = synthetic_data(NUM_EXAMPLES, seed=4)
    epoch = train.make_epoch_fn(setup.objective, NUM_EXAMPLES, BATCH_SIZE, form="chunked", num_seeds=num_seeds)
    state = train.create_train_state(jax.random.key(0), setup.model, setup.config.train, 4).replace(step=INITIAL_STEP)
    permutation = train.epoch_permutation(jax.random.key(5), 0, NUM_EXAMPLES)
    rng = jax.random.key(6)
    if num_seeds > 1:
        stack = lambda tree: jax.tree.map(lambda x: jnp.stack([x] * num_seeds), tree)
        state, permutation, rng = stack(state), stack(permutation), jax.random.split(rng, num_seeds)
    _, totals = epoch(
        state, train.EpochTotals.zeros(num_seeds), jnp.asarray(images), jnp.asarray(labels), permutation, rng
    )
    np.testing.assert_array_equal(
        totals.first_nonfinite_step, np.full((num_seeds,) if num_seeds > 1 else (), INITIAL_STEP + 2)
    )


# A later epoch's starting step: the keys must come from the optimizer step
# count, not from the step's index within the epoch (they agree in epoch 0 only).
INITIAL_STEP = 100


@functools.cache
def bp_epoch_results(mode):
    """One BP epoch in every form, shared by the tests below (compiling dominates)."""
    setup = Setup(mode=mode)
    images, labels = synthetic_data(NUM_EXAMPLES, seed=4)
    permutation = train.epoch_permutation(jax.random.key(5), 0, NUM_EXAMPLES)
    rng = jax.random.key(6)
    results = {f: run_epoch(setup, *f, images, labels, permutation, rng, INITIAL_STEP) for f in FORMS}
    return setup, (images, labels, permutation, rng), results


@pytest.mark.parametrize("mode", EPOCH_MODES)
def test_epoch_forms_give_identical_results_for_bp(mode):
    _, _, results = bp_epoch_results(mode)

    scan_state, scan_totals = results[("scan", 8)]
    for form, (state, totals) in results.items():
        chex.assert_trees_all_equal(state.params, scan_state.params, custom_message=str(form))
        chex.assert_trees_all_equal(state.opt_state, scan_state.opt_state, custom_message=str(form))
        chex.assert_trees_all_equal(totals, scan_totals, custom_message=str(form))
        assert int(state.step) == INITIAL_STEP + NUM_STEPS


@pytest.mark.parametrize("mode", EPOCH_MODES)
def test_epoch_equals_a_python_loop_of_train_steps(mode):
    setup, (images, labels, permutation, rng), results = bp_epoch_results(mode)
    state, totals = results[("chunked", 2)]  # the forms are compared with each other above
    expected_state, (loss, correct, examples) = python_epoch(
        setup, setup.state(INITIAL_STEP), images, labels, permutation, rng, BATCH_SIZE
    )

    chex.assert_trees_all_equal(state.params, expected_state.params)
    chex.assert_trees_all_equal(state.step, expected_state.step)
    chex.assert_trees_all_equal(totals, train.EpochTotals(loss, correct, examples, np.int32(train.EpochTotals.NO_STEP)))
    assert int(totals.examples) == NUM_STEPS * BATCH_SIZE == 24


@pytest.mark.parametrize("model_name,expected", [("bp", "scan"), ("cnn", "chunked"), ("small_cnn", "chunked")])
def test_auto_epoch_form_on_cpu_is_chunked_only_for_convolutions(model_name, expected, monkeypatch):
    chosen = []
    monkeypatch.setattr(loops, "_scan_fold", lambda body, name: chosen.append("scan"))
    monkeypatch.setattr(loops, "_chunked_fold", lambda body, size, name: chosen.append("chunked"))
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    convolutional = models.has_convolutions(small_config(model_name).model)
    train.make_epoch_fn(Setup().objective, NUM_EXAMPLES, BATCH_SIZE, convolutional=convolutional)
    assert chosen == [expected]


def test_bp_default_epoch_is_bit_identical_to_one_jitted_step_per_batch():
    # The speed work must not move results. On CPU, BP's default fold is one
    # fori_loop, whose body XLA compiles as one step; unrolled chunks of steps
    # are fused across steps with full optimizations and round differently
    # (seen: chunks of 8 leave Dense_0 1e-7 away from this reference after 4
    # steps, and after configs/bp_adv.py's 5 epochs FGSM test accuracy
    # 0.9182 against 0.9233). So this runs with full optimizations, on the
    # paper's 784-256-256-10 net, in FGSM mode, where sign() amplifies any
    # rounding difference.
    setup = Setup(
        mode="fgsm", hidden=(256, 256), deterministic=True
    )  # the shared-pass FGSM gradient, as launch.py uses
    num_examples, batch_size = 160, 16  # 10 steps: more than a chunk of 8
    images, labels = synthetic_data(num_examples, seed=3)
    permutation = train.epoch_permutation(jax.random.key(1), 0, num_examples)
    rng = jax.random.key(2)
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        epoch = train.make_epoch_fn(setup.objective, num_examples, batch_size, convolutional=False)
        state, totals = epoch(
            setup.state(), train.EpochTotals.zeros(), jnp.asarray(images), jnp.asarray(labels), permutation, rng
        )
        expected_state, (loss, correct, _) = python_epoch(
            setup, setup.state(), images, labels, permutation, rng, batch_size
        )
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)
    chex.assert_trees_all_equal(state.params, expected_state.params)
    chex.assert_trees_all_equal(state.opt_state, expected_state.opt_state)
    assert (float(totals.loss), int(totals.correct)) == (float(loss), int(correct))


def test_epoch_ignores_the_dropped_examples():
    # The examples at permutation[24:] are never read; any other example is.
    setup = Setup()
    images, labels = synthetic_data(NUM_EXAMPLES, seed=8)
    permutation = train.epoch_permutation(jax.random.key(1), 0, NUM_EXAMPLES)
    dropped, used = np.asarray(permutation)[NUM_STEPS * BATCH_SIZE :], np.asarray(permutation)[0]
    epoch = train.make_epoch_fn(setup.objective, NUM_EXAMPLES, BATCH_SIZE, form="chunked", chunk_size=4)

    def final_params(imgs, lbls):
        state, _ = epoch(
            setup.state(),
            train.EpochTotals.zeros(),
            jnp.asarray(imgs),
            jnp.asarray(lbls),
            permutation,
            jax.random.key(2),
        )
        return state.params

    reference = final_params(images, labels)
    changed_images, changed_labels = images.copy(), labels.copy()
    changed_images[dropped] = 255 - changed_images[dropped]
    changed_labels[dropped] = (changed_labels[dropped] + 1) % 10
    chex.assert_trees_all_equal(final_params(changed_images, changed_labels), reference)

    changed_images = images.copy()
    changed_images[used] = 255 - changed_images[used]
    assert not np.array_equal(final_params(changed_images, labels)["Dense_0"]["kernel"], reference["Dense_0"]["kernel"])


@pytest.mark.parametrize("form,chunk_size,traces", [("scan", 8, 1), ("chunked", 2, 2 + 1)])
def test_epoch_does_not_recompile_across_epochs(monkeypatch, form, chunk_size, traces):
    # The body calls train.train_step once per trace of one step. The scan form
    # traces one step; the chunked form unrolls each distinct chunk length
    # (2 and the remainder 1 of 3 steps) once, so 2 + 1 step traces.
    calls = []
    original = train.train_step

    def counting_train_step(*args):
        calls.append(None)
        return original(*args)

    monkeypatch.setattr(train, "train_step", chex.assert_max_traces(counting_train_step, n=traces))
    setup = Setup()
    images, labels = map(jnp.asarray, synthetic_data(NUM_EXAMPLES))
    epoch = train.make_epoch_fn(setup.objective, NUM_EXAMPLES, BATCH_SIZE, form=form, chunk_size=chunk_size)
    state, shuffle_rng, step_rng = setup.state(), jax.random.key(1), jax.random.key(2)
    for index in range(3):
        permutation = train.epoch_permutation(shuffle_rng, index, NUM_EXAMPLES)
        state, totals = epoch(state, train.EpochTotals.zeros(), images, labels, permutation, step_rng)
        assert len(calls) == traces
        assert int(totals.examples) == NUM_STEPS * BATCH_SIZE
    assert int(state.step) == 3 * NUM_STEPS


@pytest.mark.slow
def test_epoch_forms_agree_for_a_tiny_cnn():
    # Two steps of 4 images, with dropout on. XLA:CPU compiles the gradient
    # convolutions differently inside a while loop (the scan form) than in
    # straight-line code (the chunked form), so the float results need not be
    # bit-identical; they differ by ~5e-6 in almost every parameter here. A wrong
    # batch or key would move most parameters by about the learning rate (2e-3),
    # some 10% of a typical kernel entry.
    setup = Setup(model="cnn")
    images, labels = synthetic_data(8, seed=9)
    permutation = train.epoch_permutation(jax.random.key(1), 0, 8)

    def run(form, chunk_size):
        epoch = train.make_epoch_fn(setup.objective, 8, 4, form=form, chunk_size=chunk_size)
        return epoch(
            setup.state(),
            train.EpochTotals.zeros(),
            jnp.asarray(images),
            jnp.asarray(labels),
            permutation,
            jax.random.key(2),
        )

    scan_state, scan_totals = run("scan", 8)
    chunked_state, chunked_totals = run("chunked", 2)

    # Compared per parameter array by relative L2 distance rather than per
    # element: Adam divides by sqrt(v), so an element whose gradient is ~0
    # can move by a sizeable fraction of the learning rate on a rounding
    # difference (seen: 1.1e-4 in one of 51200 Conv_1 kernel elements).
    def relative_distance(a, b):
        return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))

    distances = jax.tree.map(relative_distance, chunked_state.params, scan_state.params)
    assert max(jax.tree.leaves(distances)) < 1e-3, distances
    chex.assert_trees_all_close(chunked_totals.loss, scan_totals.loss, rtol=1e-5)
    chex.assert_trees_all_equal(
        (chunked_totals.correct, chunked_totals.examples, chunked_state.step),
        (scan_totals.correct, scan_totals.examples, scan_state.step),
    )
    assert int(chunked_totals.examples) == 8


@pytest.mark.slow  # three runs: two seeds at once, then each alone
def test_a_convnets_seeds_train_one_by_one_on_cpu_not_as_a_grouped_convolution():
    # docs/design.md, "Seeds of a convnet": on XLA:CPU a vmapped convolution (one group per seed) runs many
    # times slower than the seeds' convolutions one by one; each seed still trains as it would alone.
    setup = Setup(model="small_cnn", mode="fgsm")
    images, labels = synthetic_data(NUM_EXAMPLES, seed=4)
    perms = jnp.stack([train.epoch_permutation(jax.random.key(5 + i), 0, NUM_EXAMPLES) for i in range(2)])
    rngs = jax.random.split(jax.random.key(6), 2)
    base = setup.state(INITIAL_STEP)  # one optimizer object, so that the two states stack
    states = [base, base.replace(params=jax.tree.map(lambda p: -p, base.params))]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
    epoch = train.make_epoch_fn(setup.objective, NUM_EXAMPLES, BATCH_SIZE, form="chunked", chunk_size=2, num_seeds=2)
    args = (stacked, train.EpochTotals.zeros(2), jnp.asarray(images), jnp.asarray(labels), perms, rngs)
    program = str(jax.make_jaxpr(lambda *a: epoch.fold(*epoch.fold_args(*a)))(*args))
    assert "conv_general_dilated" in program and "feature_group_count=2" not in program
    together, _ = epoch(*args)
    alone = train.make_epoch_fn(setup.objective, NUM_EXAMPLES, BATCH_SIZE, form="chunked", chunk_size=1)
    for i, state in enumerate(states):
        fresh = jax.tree.map(jnp.copy, state)  # the epoch donates its carry, and the two states share buffers
        single, _ = alone(fresh, train.EpochTotals.zeros(), jnp.asarray(images), jnp.asarray(labels), perms[i], rngs[i])
        chex.assert_trees_all_close(
            jax.tree.map(lambda p, i=i: p[i], together.params), single.params, rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize(
    "model_name",
    ["bp", *(pytest.param(name, marks=pytest.mark.slow) for name in ("cnn", "small_cnn", "preact_resnet18"))],
)
def test_create_states_compiled_quickly_gives_the_bits_of_a_plain_jit(model_name):
    # create_states compiles at XLA's quick CPU level (loops.jit_once); the initial weights must not move.
    cfg = tiny_config(model_name)
    cfg.model.name = model_name
    model = models.build_model(cfg.model)
    create = lambda rng: train.create_train_state(rng, model, cfg.train, 10)
    with full_optimizations():
        keys = jax.random.split(jax.random.key(5), 2)
        quick = train.create_states(keys, model, cfg.train, 10, 2)
        plain = jax.jit(jax.vmap(create))(keys)
    chex.assert_trees_all_equal(quick.params, plain.params)
