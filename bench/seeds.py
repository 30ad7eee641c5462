"""What K seeds cost against one: whole `launch.py` runs with num_seeds=1 and K, wall time. Prints JSON.

    python bench/seeds.py [--config=configs/bp.py] [--seeds=4] [--repeats=2] [--cache=cold|warm]

Each run is a fresh process and workdir, as a user would run it; the runs
alternate (1, K, 1, K, ...) so that a machine's drift hits both alike. The
breakdown (epochs, evaluation, compilation) comes from each run's timings.json.
`--cache=warm` runs each K once beforehand to fill a persistent compilation
cache, then measures on it; `cold` measures with the cache off.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CONFIG = flags.DEFINE_string("config", "configs/bp.py", "Config to launch.")
_SEEDS = flags.DEFINE_integer("seeds", 4, "K, compared with one seed.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Runs of each.")
_CACHE = flags.DEFINE_enum("cache", "cold", ["cold", "warm"], "Compilation cache off, or filled beforehand.")
_OVERRIDES = flags.DEFINE_list("overrides", [], "Extra --config.x=y overrides, e.g. train.epochs=2.")


def launch(num_seeds: int, cache_dir: str) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        command = [
            sys.executable,
            "launch.py",
            f"--config={_CONFIG.value}",
            f"--workdir={workdir}",
            f"--config.num_seeds={num_seeds}",
            f"--compilation_cache={cache_dir}",
            *(f"--config.{o}" for o in _OVERRIDES.value),
        ]
        start = time.perf_counter()
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
        with open(os.path.join(workdir, "timings.json")) as f:
            timings = json.load(f)
    compilation = timings.get("compilation", {})
    return {
        "wall_s": wall,
        "epochs_s": sum(e["epoch_seconds"] for e in timings["epochs"]),
        "evaluation_s": timings["evaluation_seconds"],
        "compile_s": compilation.get("trace_seconds", 0.0) + compilation.get("backend_seconds", 0.0),
    }


def main(argv):
    del argv
    import jax

    k = _SEEDS.value
    with tempfile.TemporaryDirectory() as cache:
        cache_dir = cache if _CACHE.value == "warm" else "none"
        if _CACHE.value == "warm":
            launch(1, cache_dir), launch(k, cache_dir)
        runs = {1: [], k: []}
        for _ in range(_REPEATS.value):
            for seeds in (1, k):
                runs[seeds].append(launch(seeds, cache_dir))
                print(f"num_seeds={seeds}: {runs[seeds][-1]['wall_s']:.1f}s", file=sys.stderr, flush=True)
    best = {seeds: min(r["wall_s"] for r in rs) for seeds, rs in runs.items()}
    print(
        json.dumps(
            {
                "machine": {
                    "backend": jax.default_backend(),
                    "device": str(jax.devices()[0].device_kind),
                    "host_cpus": os.cpu_count(),
                    "jax": jax.__version__,
                },
                "config": _CONFIG.value,
                "overrides": _OVERRIDES.value,
                "cache": _CACHE.value,
                "runs": {str(s): rs for s, rs in runs.items()},
                "best_wall_s": {str(s): w for s, w in best.items()},
                "ratio": best[k] / best[1],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    app.run(main)
