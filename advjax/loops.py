"""One compiled fold over the batches of an epoch, in the form each backend runs fast.

Training and evaluation are both folds: `carry = body(carry, step, *operands)`
for step in [0, num_steps). The operands (device-resident data, permutation,
keys) are passed as arguments, never closed over, so they are not baked into
the executable as constants.

Two forms, chosen per backend (and, on CPU, per caller: see `resolve_form`):
- "scan": the whole epoch is one `lax.fori_loop` inside one jit. Best on
  GPU/TPU: one dispatch per epoch, no host work in between.
- "chunked": a jit of `chunk_size` Python-unrolled steps, dispatched
  asynchronously chunk after chunk (plus one jit for the remainder). Under
  XLA:CPU a CNN training step inside any while loop takes a slow path for the
  gradient convolutions (docs/design.md, "Convolutions in XLA:CPU loops");
  unrolled steps do not.
  Dispatch is asynchronous, so the host runs ahead and never waits inside the epoch.
Both forms run the same `body` with the same step indices, so they compute the
same function. Not always to the last bit: with full optimizations XLA may fuse
across a chunk's unrolled steps and round differently, while the loop's body is
compiled as one step, like a jitted step called once per batch (docs/design.md,
"Fused rounding").
"""

import functools
from collections.abc import Callable
from typing import Any

import jax

LOOP_FORMS = ("auto", "scan", "chunked")

Body = Callable[..., Any]  # (carry, step, *operands) -> carry
Fold = Callable[..., Any]  # (num_steps, carry, *operands) -> carry


def resolve_form(form: str, backend: str | None = None, *, cpu_form: str = "chunked") -> str:
    """'auto' becomes 'scan' on accelerators and `cpu_form` on CPU.

    `cpu_form` is the caller's measured choice for XLA:CPU: 'chunked' where the
    body has convolution gradients (or, for evaluation, where it measured
    faster), 'scan' where one loop is faster.
    """
    if form not in LOOP_FORMS:
        raise ValueError(f"loop form {form!r} is not one of {LOOP_FORMS}")
    if cpu_form not in ("scan", "chunked"):
        raise ValueError(f"cpu_form {cpu_form!r} is not 'scan' or 'chunked'")
    if form != "auto":
        return form
    return cpu_form if (backend or jax.default_backend()) == "cpu" else "scan"


def named(fn: Callable, name: str) -> Callable:
    """`fn` under another name (`fn` itself untouched): jit names its executables after the function, and
    timings.json lists them by that name."""

    @functools.wraps(fn)
    def renamed(*args, **kwargs):
        return fn(*args, **kwargs)

    renamed.__name__ = renamed.__qualname__ = name
    return renamed


# XLA:CPU at backend optimization level 1 compiles in less time than at the default and, on the programs
# pinned by tests/test_loops.py and tests/test_train.py, gives the same bits (docs/design.md, "Counting executables").
QUICK_CPU_COMPILE = {"xla_backend_optimization_level": 1}


def jit_once(fn: Callable, **jit_kwargs) -> Callable:
    """`jax.jit(fn, **jit_kwargs)` for a small program whose compile costs more than all its runs
    (initialization, keys, shuffles, a batch's slice): on CPU, compiled at QUICK_CPU_COMPILE.

    The backend is read at each call, not at import. Called inside another trace (jit, eval_shape), it is a
    plain nested jit: it becomes part of the outer program, and JAX takes compiler options at the top only.
    """
    plain = jax.jit(fn, **jit_kwargs)
    quick = jax.jit(fn, compiler_options=QUICK_CPU_COMPILE, **jit_kwargs)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if jax.default_backend() != "cpu":
            return plain(*args, **kwargs)
        try:
            return quick(*args, **kwargs)
        except ValueError as error:  # inside a trace: JAX has no public test for that before the call
            if "top-level" not in str(error):
                raise
            return plain(*args, **kwargs)

    return call


def _scan_fold(body: Body, name: str) -> Fold:
    def fold(num_steps, carry, *operands):
        return jax.lax.fori_loop(0, num_steps, lambda step, c: body(c, step, *operands), carry)

    return jax.jit(named(fold, name), static_argnums=0, donate_argnums=1)


def unrolled_chunk(body: Body, name: str = "chunk") -> Callable:
    """`chunk(size, carry, start, *operands)`: `body` for steps start..start+size-1, Python-unrolled in one jit.

    `size` is static: one executable per chunk length (and operand shapes).
    """

    def chunk(size, carry, start, *operands):
        for offset in range(size):
            carry = body(carry, start + offset, *operands)
        return carry

    return jax.jit(named(chunk, name), static_argnums=0, donate_argnums=1)


def _chunked_fold(body: Body, chunk_size: int, name: str) -> Fold:
    chunk = unrolled_chunk(body, f"{name}_chunk")  # one executable for full chunks, one per remainder length

    def fold(num_steps, carry, *operands):
        if num_steps == 0:
            return carry
        size = min(chunk_size, num_steps)
        num_full, remainder = divmod(num_steps, size)
        for index in range(num_full):
            carry = chunk(size, carry, index * size, *operands)
        if remainder:
            carry = chunk(remainder, carry, num_full * size, *operands)
        return carry

    return fold


def steps_per_chunk(chunk_size: int, num_seeds: int = 1) -> int:
    """Steps per compiled chunk when each step carries `num_seeds` vmapped seeds.

    A chunk exists to spread the per-dispatch cost over enough work. With K
    seeds a step is K times the work, so K times fewer steps do the same, and
    the chunk compiles about K times faster.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return max(1, chunk_size // max(1, num_seeds))


def largest_divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of `n` not above `limit` (at least 1): a chunk length that cuts `n` steps into equal
    chunks, so one executable serves them all."""
    return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0)


def make_fold(
    body: Body,
    *,
    form: str = "auto",
    chunk_size: int = 8,
    num_seeds: int = 1,
    cpu_form: str = "chunked",
    name: str = "fold",
) -> Fold:
    """Returns `fold(num_steps, carry, *operands)`, applying `body` for steps 0..num_steps-1.

    Build it once and call it every epoch: compiled code is reused for every call
    with the same `num_steps` (scan) or chunk length (chunked) and operand shapes.

    >>> fold = make_fold(lambda total, step, xs: total + xs[step], form="scan")
    >>> fold(3, 0.0, jnp.arange(3.0))  # 3.0
    `num_seeds` (the seeds `body` is vmapped over) shortens chunks; see steps_per_chunk.
    `cpu_form` is what 'auto' means on CPU (see resolve_form). `name` names the executables (`{name}` as a
    scan, `{name}_chunk` in chunks) in timings.json.
    """
    size = steps_per_chunk(chunk_size, num_seeds)
    if resolve_form(form, cpu_form=cpu_form) == "scan":
        return _scan_fold(body, name)
    return _chunked_fold(body, size, name)
