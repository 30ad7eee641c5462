#!/usr/bin/env bash
# Every accelerator point of the issues in one run, each stage capped so that a slow
# one cannot starve the rest, and each stage's results written as soon as it ends:
#   1. configs/paper.py with K=8 seeds, end to end, compilation included (issue 3);
#   2. configs/cnn_adv.py twice on one compilation cache: cold, then warm (issue 4);
#   3. bench/throughput.py with the 101-point sweep on 10,000 images (issue 4).
#
#   bash bench/gpu_checks.sh OUT_DIR [TOTAL_SECONDS]
#
# Needs the MNIST files ($ADVJAX_DATA_DIR). EXTRA_PAPER_FLAGS, EXTRA_RUN_FLAGS and EXTRA_BENCH_FLAGS
# shrink the runs for a smoke test on CPU; leave them empty for the real measurement.
# SKIP_PAPER=1 leaves out stage 1 (issue 4's checks alone, in about 6 minutes on an H100).
set -u
out=${1:?usage: bench/gpu_checks.sh OUT_DIR [TOTAL_SECONDS]}
total=${2:-560}
mkdir -p "$out"
work=$(mktemp -d)
deadline=$((SECONDS + total))
export PYTHONUNBUFFERED=1

# At most $1 seconds, and never past the deadline (less a margin to pack results).
cap() { local left=$((deadline - SECONDS - 15)); echo $(( $1 < left ? $1 : (left > 1 ? left : 1) )); }
stamp() { date -u +%H:%M:%S; }

{
  echo "start $(stamp)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  python3 -c "import jax, flax, optax, chex; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
} >"$out/info.txt" 2>&1

# 1. The paper's six runs with eight seeds each, as a user would launch them.
if [ -z "${SKIP_PAPER:-}" ]; then
  start=$SECONDS
  timeout "$(cap 330)" python3 launch.py --config=configs/paper.py --workdir="$work/paper8" --config.num_seeds=8 \
    ${EXTRA_PAPER_FLAGS:-} >"$out/paper8.log" 2>&1
  echo "paper8 rc=$? wall_s=$((SECONDS - start)) end $(stamp)" >>"$out/info.txt"
  tar -czf "$out/paper8.tar.gz" -C "$work" --exclude=checkpoints paper8 2>>"$out/info.txt"
fi

# 2. The same config twice on one cache: the second run's compilation is the warm figure.
for run in cold warm; do
  start=$SECONDS
  timeout "$(cap 90)" python3 launch.py --config=configs/cnn_adv.py --workdir="$work/cnn_adv_$run" \
    --compilation_cache="$work/cache" ${EXTRA_RUN_FLAGS:-} >"$out/cnn_adv_$run.log" 2>&1
  echo "cnn_adv_$run rc=$? wall_s=$((SECONDS - start)) end $(stamp)" >>"$out/info.txt"
done
# 3. Throughput against the per-batch-loop baseline, and the 101-point sweep; the CNN first, as the harder case.
start=$SECONDS
timeout "$(cap 300)" python3 bench/throughput.py --models=cnn,bp --sweep_points=101 --sweep_images=10000 ${EXTRA_BENCH_FLAGS:-} \
  --output="$out/bench.json" >/dev/null 2>"$out/bench.log"
echo "bench rc=$? wall_s=$((SECONDS - start)) end $(stamp)" >>"$out/info.txt"

grep -h "compilation:" "$out"/cnn_adv_*.log >>"$out/info.txt"
echo "done $(stamp)" >>"$out/info.txt"
cat "$out/info.txt"
