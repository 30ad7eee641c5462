"""Tests for advjax.loops: form resolution, and that both fold forms equal a Python loop without retracing."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advjax import loops
from tests.helpers import full_optimizations

# (form, chunk_size, num_steps): scan; chunked with a remainder, with fewer
# steps than one chunk, with whole chunks only, with one-step chunks, and with
# exactly one chunk.
FOLD_CASES = [
    ("scan", 8, 7),
    ("chunked", 3, 7),
    ("chunked", 8, 5),
    ("chunked", 4, 8),
    ("chunked", 1, 5),
    ("chunked", 5, 5),
]


@pytest.fixture(autouse=True)
def _fresh_trace_counters():
    # chex keys its trace counters by call stack, so parametrized cases would share one.
    chex.clear_trace_counter()
    yield
    chex.clear_trace_counter()


def order_sensitive_body(carry, step, xs, ys):
    """acc <- 2 * acc + xs[step] - ys[step]; visits[step] += 1.

    Doubling makes the result depend on the order of the steps, `visits` shows
    each step ran exactly once, and two operands check that they arrive in order.
    Integers keep the comparison exact.
    """
    acc, visits = carry
    return acc * 2 + xs[step] - ys[step], visits.at[step].add(1)


def python_fold(num_steps, xs, ys):
    acc, visits = 0, np.zeros(len(xs), np.int32)
    for step in range(num_steps):
        acc = acc * 2 + int(xs[step]) - int(ys[step])
        visits[step] += 1
    return np.int32(acc), visits


def fresh_carry(length):
    # The fold donates its carry, so every call needs new buffers.
    return jnp.zeros((), jnp.int32), jnp.zeros((length,), jnp.int32)


def operands(seed, length=12):
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.integers(0, 5, length), jnp.int32),
        jnp.asarray(rng.integers(0, 3, length), jnp.int32),
    )


# ----------------------------------------------------------------------------
# resolve_form.


def test_resolve_form_auto_is_chunked_on_cpu():
    assert loops.resolve_form("auto", "cpu") == "chunked"


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_resolve_form_auto_is_scan_on_accelerators(backend):
    assert loops.resolve_form("auto", backend) == "scan"


def test_resolve_form_auto_defaults_to_the_current_backend():
    expected = "chunked" if jax.default_backend() == "cpu" else "scan"
    assert loops.resolve_form("auto") == expected


@pytest.mark.parametrize("cpu_form", ["scan", "chunked"])
def test_resolve_form_auto_on_cpu_is_the_callers_cpu_form(cpu_form):
    assert loops.resolve_form("auto", "cpu", cpu_form=cpu_form) == cpu_form
    assert loops.resolve_form("auto", "gpu", cpu_form=cpu_form) == "scan"


@pytest.mark.parametrize("cpu_form", ["auto", "while"])
def test_resolve_form_rejects_a_cpu_form_that_is_not_a_fold(cpu_form):
    with pytest.raises(ValueError, match="cpu_form"):
        loops.resolve_form("auto", "cpu", cpu_form=cpu_form)


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
@pytest.mark.parametrize("form", ["scan", "chunked"])
def test_resolve_form_keeps_an_explicit_form_on_any_backend(form, backend):
    assert loops.resolve_form(form, backend) == form


@pytest.mark.parametrize("form", ["while", "", "Scan", "unrolled"])
def test_resolve_form_rejects_unknown_forms(form):
    with pytest.raises(ValueError, match="loop form"):
        loops.resolve_form(form, "cpu")


@pytest.mark.parametrize("form", ["scan", "chunked", "auto"])
@pytest.mark.parametrize("chunk_size", [0, -1])
def test_make_fold_rejects_non_positive_chunk_size(form, chunk_size):
    with pytest.raises(ValueError, match="chunk_size"):
        loops.make_fold(order_sensitive_body, form=form, chunk_size=chunk_size)


# ----------------------------------------------------------------------------
# The fold computes the same function as a Python loop.


@pytest.mark.parametrize("form,chunk_size,num_steps", FOLD_CASES)
def test_fold_equals_python_loop(form, chunk_size, num_steps):
    xs, ys = operands(seed=num_steps)
    fold = loops.make_fold(order_sensitive_body, form=form, chunk_size=chunk_size)

    acc, visits = fold(num_steps, fresh_carry(len(xs)), xs, ys)

    expected_acc, expected_visits = python_fold(num_steps, np.asarray(xs), np.asarray(ys))
    chex.assert_trees_all_equal((acc, visits), (expected_acc, expected_visits))


@pytest.mark.parametrize("form", ["scan", "chunked"])
def test_fold_over_zero_steps_returns_the_carry(form):
    # The contract is "body for steps 0..num_steps-1": for zero steps, no body call.
    xs, ys = operands(seed=0)
    fold = loops.make_fold(order_sensitive_body, form=form, chunk_size=3)
    result = fold(0, (jnp.int32(5), jnp.zeros((len(xs),), jnp.int32)), xs, ys)
    chex.assert_trees_all_equal(result, (np.int32(5), np.zeros(len(xs), np.int32)))


@pytest.mark.parametrize("form", ["scan", "chunked"])
def test_fold_leaves_operands_usable(form):
    # Only the carry is donated: the epoch reuses the same device data every epoch.
    xs, ys = operands(seed=1)
    expected = (np.asarray(xs).copy(), np.asarray(ys).copy())
    fold = loops.make_fold(order_sensitive_body, form=form, chunk_size=3)
    fold(7, fresh_carry(len(xs)), xs, ys)
    assert not xs.is_deleted() and not ys.is_deleted()
    chex.assert_trees_all_equal((xs, ys), expected)


# ----------------------------------------------------------------------------
# Compiled code is reused.


def counting(fn, calls):
    """fn, appending to `calls` each time it runs (under jit: each time it is traced)."""

    def wrapped(*args):
        calls.append(None)
        return fn(*args)

    return wrapped


def test_scan_fold_traces_body_once_for_new_operand_values():
    calls = []
    body = chex.assert_max_traces(counting(order_sensitive_body, calls), n=1)
    fold = loops.make_fold(body, form="scan")

    for seed in range(3):
        xs, ys = operands(seed)
        result = fold(7, fresh_carry(len(xs)), xs, ys)
        # Still the right answer for the new values, from the old executable.
        chex.assert_trees_all_equal(result, python_fold(7, np.asarray(xs), np.asarray(ys)))
    assert len(calls) == 1


def test_scan_fold_retraces_for_a_new_step_count():
    # num_steps is static in the scan form; this also shows the counter sees retraces.
    calls = []
    fold = loops.make_fold(counting(order_sensitive_body, calls), form="scan")
    xs, ys = operands(0)
    fold(7, fresh_carry(len(xs)), xs, ys)
    fold(5, fresh_carry(len(xs)), xs, ys)
    assert len(calls) == 2


def test_chunked_fold_traces_each_chunk_length_once():
    # 7 steps in chunks of 3: two distinct chunk lengths (3 and the remainder 1).
    # Each chunk is Python-unrolled, so one trace of a length-k chunk calls the
    # body k times: 3 + 1 calls in all, however often the fold runs.
    calls = []
    body = chex.assert_max_traces(counting(order_sensitive_body, calls), n=3 + 1)
    fold = loops.make_fold(body, form="chunked", chunk_size=3)

    for seed in range(3):
        xs, ys = operands(seed)
        result = fold(7, fresh_carry(len(xs)), xs, ys)
        chex.assert_trees_all_equal(result, python_fold(7, np.asarray(xs), np.asarray(ys)))
        assert len(calls) == 3 + 1

    # 10 = 3 * 3 + 1 needs the same two chunk lengths, so nothing new is traced.
    xs, ys = operands(5)
    result = fold(10, fresh_carry(len(xs)), xs, ys)
    chex.assert_trees_all_equal(result, python_fold(10, np.asarray(xs), np.asarray(ys)))
    assert len(calls) == 3 + 1


def test_chunked_fold_traces_a_new_remainder_length():
    # 8 = 2 * 3 + 2 adds a length-2 chunk after the lengths 3 and 1 of 7 steps.
    calls = []
    fold = loops.make_fold(counting(order_sensitive_body, calls), form="chunked", chunk_size=3)
    xs, ys = operands(0)
    fold(7, fresh_carry(len(xs)), xs, ys)
    fold(8, fresh_carry(len(xs)), xs, ys)
    assert len(calls) == 3 + 1 + 2


@pytest.mark.parametrize("chunk_size,num_seeds,expected", [(8, 1, 8), (8, 4, 2), (8, 3, 2), (4, 8, 1), (1, 4, 1)])
def test_steps_per_chunk_divides_the_chunk_among_seeds(chunk_size, num_seeds, expected):
    assert loops.steps_per_chunk(chunk_size, num_seeds) == expected


def test_a_fold_over_four_seeds_compiles_chunks_a_quarter_as_long():
    # chunk_size 8 over 4 vmapped seeds: chunks of 2 steps, so one trace calls the body twice.
    calls = []
    fold = loops.make_fold(counting(order_sensitive_body, calls), form="chunked", chunk_size=8, num_seeds=4)
    xs, ys = operands(0)
    result = fold(8, fresh_carry(len(xs)), xs, ys)
    chex.assert_trees_all_equal(result, python_fold(8, np.asarray(xs), np.asarray(ys)))
    assert len(calls) == 2


@pytest.mark.parametrize(
    "n,limit,expected", [(10, 4, 2), (12, 4, 4), (11, 4, 1), (1, 4, 1), (3, 8, 3), (25, 4, 1), (6, 0, 1)]
)
def test_largest_divisor_at_most_cuts_the_steps_into_equal_chunks(n, limit, expected):
    assert loops.largest_divisor_at_most(n, limit) == expected
    assert n % expected == 0


@pytest.mark.parametrize("form, suffix", [("scan", ""), ("chunked", "_chunk")])
def test_a_named_fold_names_its_executable_and_leaves_the_body_alone(form, suffix):
    def body(total, step, xs):
        return total + xs[step]

    fold = loops.make_fold(body, form=form, chunk_size=2, name="my_fold")
    assert float(fold(4, jnp.float32(0), jnp.arange(4.0))) == 6.0
    jitted = fold if form == "scan" else fold.__closure__  # the chunk's jit sits in the chunked fold's closure
    if form == "chunked":
        jitted = next(c.cell_contents for c in jitted if hasattr(c.cell_contents, "lower"))
        lowered = jitted.lower(2, jnp.float32(0), 0, jnp.arange(4.0))
    else:
        lowered = jitted.lower(4, jnp.float32(0), jnp.arange(4.0))
    assert f"jit_my_fold{suffix}" in lowered.as_text()
    assert body.__name__ == "body"


def test_jit_once_gives_the_bits_of_jax_jit_for_an_initialization_and_a_shuffle():
    # The run-once programs compile at a lower XLA optimization level; their values must not move.
    def init_and_shuffle(key):
        a, b, c = jax.random.split(key, 3)
        glorot = jax.nn.initializers.glorot_uniform()(a, (784, 256))
        normal = jax.nn.initializers.truncated_normal(0.1)(b, (256, 10))
        return glorot, normal, jax.random.permutation(c, 60_000)

    with full_optimizations():  # against the default level, not the quick tier's
        once = loops.jit_once(init_and_shuffle)(jax.random.key(3))
        plain = jax.jit(init_and_shuffle)(jax.random.key(3))
    for left, right in zip(once, plain):
        np.testing.assert_array_equal(np.asarray(left), np.asarray(right))


def test_jit_once_compiles_at_the_quick_level_on_cpu_only(monkeypatch):
    called = []
    real_jit = jax.jit

    def recording_jit(fn, compiler_options=None, **kw):
        jitted = real_jit(fn, **kw)
        return lambda *args: called.append(compiler_options) or jitted(*args)

    monkeypatch.setattr(loops.jax, "jit", recording_jit)
    add_one = loops.jit_once(lambda x: x + 1)
    add_one(jnp.float32(1))
    monkeypatch.setattr(loops.jax, "default_backend", lambda: "gpu")
    add_one(jnp.float32(1))
    assert called == [loops.QUICK_CPU_COMPILE, None]
    assert loops.QUICK_CPU_COMPILE == {"xla_backend_optimization_level": 1}


def test_jit_once_inside_another_trace_is_a_plain_nested_jit():
    double = loops.jit_once(lambda x: 2 * x)
    assert float(jax.jit(lambda x: double(x) + 1)(jnp.float32(3))) == 7.0
    assert jax.eval_shape(double, jax.ShapeDtypeStruct((2,), jnp.float32)).shape == (2,)
    assert jax.eval_shape(lambda: double(jnp.ones(3))).shape == (3,)  # traced with concrete operands
