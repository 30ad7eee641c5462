"""Whole-process time of `launch.py`, cold and warm compilation cache, against a PyTorch eager baseline. Prints JSON.

    ADVJAX_DATA_DIR=/path/to/mnist python bench/startup.py [--config_name=configs/bp_adv.py] [--repeats=2]
        [--overrides=train.epochs=2,...] [--baseline=bench/torch_bp_adv.py] [--baseline_threads=2]

Each run is a fresh process, timed from spawn to exit, in a fresh workdir: everything a user waits for
(interpreter, imports, data, compilation, training, evaluation, writing the workdir). Per repeat, in turn:
ours with a fresh, empty persistent compilation cache (cold), ours again on the cache that run filled (warm),
then the baseline (bench/torch_bp_adv.py, the same work in PyTorch eager; only for configs/bp_adv.py without
overrides: `--baseline=` skips it). The best of each side counts. Ours also report their timings.json
compilation figures (executables, XLA seconds: compiling, or loading from the cache; tracing seconds). With
`--serial_compile`, ours compile one program at a time (fit's compile-ahead thread off), so that the XLA
seconds add up to the compile work rather than to durations that overlap training and each other.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from importlib import metadata

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import machine  # noqa: E402

_CONFIG = flags.DEFINE_string("config_name", "configs/bp_adv.py", "Config to launch.")
_OVERRIDES = flags.DEFINE_list("overrides", [], "Extra --config.x=y overrides, e.g. train.epochs=2.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Rounds of (ours cold, ours warm, baseline).")
_BASELINE = flags.DEFINE_string(
    "baseline", "bench/torch_bp_adv.py", "The baseline script (run for configs/bp_adv.py alone); empty: none."
)
_THREADS = flags.DEFINE_integer("baseline_threads", 2, "The baseline's --threads (torch.set_num_threads).")
_SERIAL = flags.DEFINE_bool(
    "serial_compile",
    False,
    "Ours without the thread that compiles while the first epoch trains: every program compiles on first use, "
    "one at a time, so the XLA seconds are the compile work, not overlapping durations.",
)
# `python -c SERIAL launch.py ARGS...`: launch.py with fit's background compilation switched off (the name is
# read first, so that a rename fails loudly rather than leaving the thread on).
SERIAL = (
    "import runpy, sys; import advjax.fit; advjax.fit._in_background; advjax.fit._in_background = lambda *args: None; "
    "sys.argv = sys.argv[1:]; runpy.run_path('launch.py', run_name='__main__')"
)
COMPILATION = ("num_executables", "cache_hits", "cache_misses", "backend_seconds", "trace_seconds")


def timed(command: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return seconds, result.stdout


def ours(cache_dir: str) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        seconds, _ = timed(
            [
                sys.executable,
                *(("-c", SERIAL) if _SERIAL.value else ()),
                "launch.py",
                f"--config={_CONFIG.value}",
                f"--workdir={workdir}",
                f"--compilation_cache={cache_dir}",
                *(f"--config.{o}" for o in _OVERRIDES.value),
            ]
        )
        with open(os.path.join(workdir, "timings.json")) as f:
            compilation = json.load(f).get("compilation", {})
        with open(os.path.join(workdir, "summary.json")) as f:
            test = json.load(f)["accuracy"].get("test")
    return {"wall_s": seconds, "compilation": {k: compilation.get(k) for k in COMPILATION}, "test_accuracy": test}


def baseline() -> dict:
    seconds, stdout = timed([sys.executable, _BASELINE.value, f"--threads={_THREADS.value}"])
    out = json.loads(stdout.strip().splitlines()[-1])
    return {"wall_s": seconds, "seconds": out["seconds"], "test_accuracy": out["accuracy"]["test"]}


def main(argv):
    del argv
    same_work = os.path.normpath(_CONFIG.value) == os.path.normpath("configs/bp_adv.py") and not _OVERRIDES.value
    sides = ["ours_cold", "ours_warm"] + (["torch"] if _BASELINE.value and same_work else [])
    if _BASELINE.value and not same_work:
        print("no baseline: it does configs/bp_adv.py's work, without overrides", file=sys.stderr)
    runs, load_before = {side: [] for side in sides}, os.getloadavg()
    for _ in range(_REPEATS.value):
        with tempfile.TemporaryDirectory() as cache_dir:
            for side in sides:
                runs[side].append(baseline() if side == "torch" else ours(cache_dir))
                print(f"{side}: {runs[side][-1]['wall_s']:.1f}s", file=sys.stderr, flush=True)
    best = {side: min(r["wall_s"] for r in rs) for side, rs in runs.items()}
    versions = {p: metadata.version(p) for p in ("jax", "jaxlib", "torch")}
    print(
        json.dumps(
            {
                "machine": machine()
                | {"load_average": {"before": load_before, "after": os.getloadavg()}, "versions": versions},
                "config": _CONFIG.value,
                "overrides": _OVERRIDES.value,
                "serial_compile": _SERIAL.value,
                "baseline": f"{_BASELINE.value} --threads={_THREADS.value}" if "torch" in runs else None,
                "runs": runs,
                "best_wall_s": best,
                "ratio": {f"{side}/torch": best[side] / best["torch"] for side in sides[:2] if "torch" in best},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    app.run(main)
