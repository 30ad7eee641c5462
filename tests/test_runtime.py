"""Tests for advjax.runtime: the compilation cache setting, the compile-time meter, and stopping."""

import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import pytest

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
        meter.uninstall()
    assert set(first) == {
        "trace_seconds",
        "backend_seconds",
        "cache_hits",
        "cache_misses",
        "num_executables",
        "executables",
    }
    assert first["trace_seconds"] > 0 and first["backend_seconds"] > 0
    assert first["cache_misses"] >= 1 and first["cache_hits"] == 0
    assert again == first
    assert reloaded["cache_hits"] >= 1 and reloaded["cache_misses"] == first["cache_misses"]
    # Each executable is named and timed, and the reload is marked as the cache's.
    assert first["num_executables"] == len(first["executables"]) >= 1
    assert [e["name"] for e in first["executables"]].count("jit(<lambda>)") == 1
    assert not any(e["from_cache"] for e in first["executables"])
    assert reloaded["num_executables"] == first["num_executables"] + 1
    new = [e for e in reloaded["executables"] if e not in first["executables"]]
    assert len(new) == 1 and new[0]["name"] == "jit(<lambda>)" and new[0]["from_cache"]
    assert sum(e["seconds"] for e in reloaded["executables"]) == pytest.approx(reloaded["backend_seconds"])


def test_the_compile_meter_names_a_jitted_function_by_its_name():
    salt = float(time.time_ns() % 1_000_033)

    def scaled_sine(x):
        return jnp.sin(x) * salt

    meter = runtime.CompileMeter().install()
    try:
        jax.jit(scaled_sine)(jnp.ones(2)).block_until_ready()
    finally:
        meter.uninstall()
    assert "jit(scaled_sine)" in [e["name"] for e in meter.summary()["executables"]]


def test_an_unusable_cache_directory_is_named_and_the_cache_left_off(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    before = jax.config.jax_compilation_cache_dir
    with pytest.raises(OSError, match=f"the compilation cache directory {blocker}/jax is unusable"):
        runtime.enable_compilation_cache(str(blocker / "jax"))
    assert jax.config.jax_compilation_cache_dir == before


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_raises_interrupted_which_no_except_exception_catches(stop):
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        runtime.raise_on_stop_signals()
        with pytest.raises(runtime.Interrupted) as info:
            try:
                signal.raise_signal(stop)
            except Exception:  # the library's damage handlers must not take it
                pytest.fail("Interrupted was caught as an Exception")
        assert info.value.signum == stop and str(info.value) == stop.name
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def test_only_closed_loop_callbacks_are_silenced(capsys):
    old = sys.excepthook, sys.unraisablehook
    try:
        runtime.quiet_closed_loop_callbacks()
        sys.excepthook(RuntimeError, RuntimeError("Event loop is closed"), None)
        assert capsys.readouterr().err == ""
        sys.excepthook(ValueError, ValueError("a real fault"), None)
        assert "ValueError: a real fault" in capsys.readouterr().err
    finally:
        sys.excepthook, sys.unraisablehook = old
