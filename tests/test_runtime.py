"""Tests for advjax.runtime: the compilation cache setting and the compile-time meter."""

import os
import time

import jax
import jax.numpy as jnp
import pytest
from jax import monitoring

from advjax import runtime


@pytest.mark.parametrize("setting", ["none", "off", "", "  None "])
def test_a_disabled_compilation_cache_is_left_off(setting):
    before = jax.config.jax_compilation_cache_dir
    assert runtime.enable_compilation_cache(setting) is None
    assert jax.config.jax_compilation_cache_dir == before


def test_the_default_cache_directory_follows_the_environment(tmp_path, monkeypatch):
    for variable in (runtime.CACHE_ENV, "JAX_COMPILATION_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert runtime.default_compilation_cache_dir() == os.path.join(tmp_path, "home", ".cache", "advjax", "jax")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert runtime.default_compilation_cache_dir() == os.path.join(tmp_path, "xdg", "advjax", "jax")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    assert runtime.default_compilation_cache_dir() == str(tmp_path / "jax")
    monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path / "ours"))
    assert runtime.default_compilation_cache_dir() == str(tmp_path / "ours")


def test_compile_meter_counts_a_fresh_jits_compilation():
    # A constant no other program has: neither the in-memory nor the persistent cache knows it.
    salt = float(time.time_ns() % 1_000_003)
    fresh = jax.jit(lambda x: jnp.sin(x) * salt + 1.0)
    x = jnp.ones(3)
    meter = runtime.CompileMeter().install()
    try:
        fresh(x).block_until_ready()
        first = meter.summary()
        fresh(x).block_until_ready()  # compiled already: nothing to count
        again = meter.summary()
        # The same program from another function: traced and lowered anew, its executable read from the disk cache.
        jax.jit(lambda y: jnp.sin(y) * salt + 1.0)(x).block_until_ready()
        reloaded = meter.summary()
    finally:
        monitoring.unregister_event_duration_listener(meter._on_duration)
        monitoring.unregister_event_listener(meter._on_event)
    assert set(first) == {"trace_seconds", "backend_seconds", "cache_hits", "cache_misses"}
    assert first["trace_seconds"] > 0 and first["backend_seconds"] > 0
    assert first["cache_misses"] >= 1 and first["cache_hits"] == 0
    assert again == first
    assert reloaded["cache_hits"] >= 1 and reloaded["cache_misses"] == first["cache_misses"]
