"""Process-wide JAX settings, applied by entry points (launch.py, bench/), never by the library.

- The persistent compilation cache: the second run of a config loads its
  executables from disk instead of compiling them again.
- A compile-time meter built on `jax.monitoring`, so a run can report how long
  it spent compiling and how much the cache saved.
- Stopping: SIGINT and SIGTERM raise `Interrupted`, and `exit_now` ends the
  process at once after its last line.
"""

import dataclasses
import logging as pylogging
import os
import signal
import sys
import tempfile

import jax
from jax import monitoring

CACHE_ENV = "ADVJAX_COMPILATION_CACHE"
DISABLED = ("", "none", "off")

# Events JAX records for every compilation (jax/_src/dispatch.py, compiler.py).
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
CACHE_MISS_EVENT = "/jax/compilation_cache/cache_misses"


def default_compilation_cache_dir() -> str:
    """$ADVJAX_COMPILATION_CACHE, else JAX's own $JAX_COMPILATION_CACHE_DIR,
    else $XDG_CACHE_HOME/advjax/jax, else ~/.cache/advjax/jax."""
    for variable in (CACHE_ENV, "JAX_COMPILATION_CACHE_DIR"):
        if variable in os.environ:
            return os.environ[variable]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "advjax", "jax")


def enable_compilation_cache(cache_dir: str) -> str | None:
    """Turns on JAX's persistent compilation cache in `cache_dir` ('', 'none' or 'off': leave it off).

    Must run before the first compilation. Every executable is cached, however
    small or quick to compile: this project's CPU loops are many small jits
    whose compile times add up, while each stays under JAX's default 1 s floor.
    Returns the directory in use, or None. An unusable directory raises OSError
    naming it, and leaves the cache off (launch.py warns and runs on without it).

    >>> enable_compilation_cache("~/.cache/advjax/jax")
    """
    if cache_dir.strip().lower() in DISABLED:
        return None
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
    try:  # a directory JAX cannot write would fail later, mid-run
        os.makedirs(cache_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache_dir):
            pass
    except OSError as e:
        raise OSError(f"the compilation cache directory {cache_dir} is unusable ({e.strerror or e})") from e
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    return cache_dir


@dataclasses.dataclass
class CompileMeter:
    """Sums, from the moment it is installed, the time JAX spends turning functions into executables, and names
    each executable.

    `backend_seconds` is XLA compilation, or loading from the persistent cache
    on a hit; `trace_seconds` is tracing and lowering, which no cache skips.
    `executables` lists every executable in the order built: JAX's name for it
    (the jitted function's), its backend seconds and whether the persistent
    cache held it. A cache hit is recorded inside the backend step it belongs
    to, so it is matched to the next backend event; compilations in parallel
    threads would need a per-thread match.
    """

    trace_seconds: float = 0.0
    backend_seconds: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    executables: list[dict] = dataclasses.field(default_factory=list)
    _hit_pending: bool = dataclasses.field(default=False, repr=False)

    def install(self) -> "CompileMeter":
        monitoring.register_event_duration_secs_listener(self._on_duration)
        monitoring.register_event_listener(self._on_event)
        return self

    def uninstall(self) -> None:
        monitoring.unregister_event_duration_listener(self._on_duration)
        monitoring.unregister_event_listener(self._on_event)

    def _on_duration(self, event: str, seconds: float, **kwargs) -> None:
        if event in (TRACE_EVENT, LOWER_EVENT):
            self.trace_seconds += seconds
        elif event == BACKEND_COMPILE_EVENT:
            self.backend_seconds += seconds
            name = str(kwargs.get("fun_name", "?"))
            self.executables.append({"name": name, "seconds": seconds, "from_cache": self._hit_pending})
            self._hit_pending = False

    def _on_event(self, event: str, **_) -> None:
        if event == CACHE_HIT_EVENT:
            self.cache_hits += 1
            self._hit_pending = True
        elif event == CACHE_MISS_EVENT:
            self.cache_misses += 1

    def summary(self) -> dict:
        """The totals, the number of executables and each one's entry, slowest first (ties in build order)."""
        totals = {name: getattr(self, name) for name in ("trace_seconds", "backend_seconds", "cache_hits")}
        ranked = sorted(self.executables, key=lambda e: -e["seconds"])
        return totals | {"cache_misses": self.cache_misses, "num_executables": len(ranked), "executables": ranked}


# Stopping -------------------------------------------------------------------------


class Interrupted(BaseException):
    """SIGINT or SIGTERM during the run. A BaseException, as KeyboardInterrupt is, so that no
    `except Exception` in the library (or orbax) takes it for a fault and acts on it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, _frame) -> None:
    raise Interrupted(signum)


def raise_on_stop_signals() -> None:
    """SIGINT and SIGTERM raise Interrupted in the main thread, where the run stops at once: every file it writes
    is atomic and every checkpoint committed by a rename, so what it leaves a relaunch trusts.

    >>> raise_on_stop_signals()
    """
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, _raise_interrupted)


def exit_now(status: int) -> None:
    """Exits at once, flushed: orbax's and JAX's background threads would otherwise hold the process for minutes.

    >>> exit_now(2)
    """
    pylogging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def is_a_closed_loop_callback(exc_type: type, exc: BaseException) -> bool:
    """Tensorstore completes orbax's writes through asyncio callbacks: once a failed save has closed its loop,
    each callback left raises 'Event loop is closed', which tells nothing the run's error line does not.

    >>> is_a_closed_loop_callback(RuntimeError, RuntimeError("Event loop is closed"))  # True
    """
    return exc_type is RuntimeError and str(exc) == "Event loop is closed"


def _excepthook(exc_type, exc, traceback) -> None:
    if not is_a_closed_loop_callback(exc_type, exc):
        sys.__excepthook__(exc_type, exc, traceback)


def _unraisablehook(unraisable) -> None:
    if not is_a_closed_loop_callback(unraisable.exc_type, unraisable.exc_value):
        sys.__unraisablehook__(unraisable)


def quiet_closed_loop_callbacks() -> None:
    """Silences those callbacks' tracebacks, which tensorstore reports through both sys.excepthook and
    sys.unraisablehook; every other exception is reported as before.

    >>> quiet_closed_loop_callbacks()
    """
    sys.excepthook, sys.unraisablehook = _excepthook, _unraisablehook
