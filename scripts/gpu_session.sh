#!/usr/bin/env bash
# The one measuring call of a GPU session (docs/benchmarks.md 3.4, session 44), after
# scripts/gpu_kit.sh's uploads have put the kit in /tmp/parts, /tmp/whl and /tmp/redis
# on the same warm machine. About 5-6 minutes: give the call timeout_s 560; what it has
# written by then still comes back (one archive, $OUT/gpu_session.tgz, and ab.md).
#   device run, carry [".bench/bundles"] (bench-din and bench-dien, L = 50, made here by
#   gpu_bench.sh's header command with MODELS=.bench/bundles; else made there, ~2 min):
#     bash scripts/gpu_session.sh "$OUT"
# It does, in order, each step's output in the archive:
#   1. source scripts/gpu_env.sh (stops unless an ORT session really runs on CUDA)
#   2. ctr build-ops --cuda yes (the fused AUGRU kernel for this GPU)
#   3. scripts/gpu_ab.sh with AB_VARIANTS="new direct" AB_RATES=360, 2 reps: DIEN
#      N = 500 open loop at 360 req/s, ORT's copies vs CTR_GPU_COPY=direct (checklist 2
#      and 5), with scripts/stall_sampler.py beside every service it starts (checklist 1)
#   4. the same once with CTR_CUDA_GRAPH=0 (checklist 6)
# GPU_SESSION_CPU=1: a dry run on a machine without a GPU (no kit, no CUDA, AB_CPU=1).
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: bash scripts/gpu_session.sh OUT" >&2; exit 2; }
out=$(realpath -m "$1")
cd "$(dirname "$0")/.."
work=$(mktemp -d /tmp/gpu_session.XXXX)
cpu=${GPU_SESSION_CPU:-0}
log() { echo "[gpu_session $(date +%T)] $*" | tee -a "$work/session.log" >&2; }
finish() {
  touch "$work/done"
  cp "$work/ab/ab.md" "$out/ab.md" 2>/dev/null || true
  tar czf "$out/gpu_session.tgz" -C "$work" --exclude=site . 2>/dev/null
  log "archive: $out/gpu_session.tgz"
}
trap finish EXIT
mkdir -p "$out"
{ nvidia-smi || true; cat /proc/sys/kernel/random/boot_id; uname -r; nproc; } > "$work/machine.txt" 2>&1
if [ "$cpu" = 1 ]; then
  py=${PYTHON:-$PWD/.venv/bin/python}; export AB_CPU=1
else
  log "1. gpu_env"
  # shellcheck source=/dev/null
  source scripts/gpu_env.sh /tmp/parts /tmp/whl /tmp/redis > "$work/gpu_env.txt" 2>&1 \
    || { cat "$work/gpu_env.txt" >&2; log "no working CUDA: stopped"; exit 1; }
  py=python3
  log "2. build-ops"
  $py -m ctr.cli build-ops --cuda yes > "$work/build_ops.txt" 2>&1 || log "build-ops failed (see build_ops.txt): the fused graph is refused, the rest runs"
fi
export PYTHON=$py
MODELS=$(realpath -m "${MODELS:-.bench/bundles}")
export MODELS
if [ ! -d "$MODELS/bench-dien" ]; then
  log "bundles: making them in $MODELS"
  $py -c "from pathlib import Path; from training.bench_service import make_bundle; [make_bundle(m, Path('$MODELS'), 50) for m in ('din', 'dien')]" \
    > "$work/bundles.txt" 2>&1 || { log "no bundles (see bundles.txt)"; exit 1; }
fi
sampler() {  # every service the benchmarks start, sampled until it ends
  local last="" pid
  while [ ! -e "$work/done" ]; do
    pid=$(pgrep -f "ctr.cli serve" | head -1 || true)
    if [ -n "$pid" ] && [ "$pid" != "$last" ]; then
      last=$pid
      echo "== service pid $pid, $(date +%T)" >> "$work/stalls.txt"
      $py scripts/stall_sampler.py "$pid" 300 >> "$work/stalls.txt" 2>&1 || true
    fi
    sleep 0.2
  done
}
sampler &
log "3. A/B: new vs direct, 2 reps"
AB_VARIANTS="new direct" AB_RATES=360 bash scripts/gpu_ab.sh "$work/ab" . 2 > "$work/ab.txt" 2>&1 \
  || log "gpu_ab failed (see ab.txt)"
log "4. CTR_CUDA_GRAPH=0"
gpu=(--env CTR_PROVIDER=cuda --env CTR_REQUIRE_GPU=1 --env CTR_CUDA_GRAPH=0 --env CTR_BATCH_MAX_USERS=16
     --env CTR_BATCH_MAX_CANDIDATES=8192 --env CTR_PRECISION=fp16)
[ "$cpu" = 1 ] && gpu=()
$py -m ctr.cli bench --models-dir "$MODELS" --models bench-dien --n 500 --concurrency 1 \
  --seconds 3 --rates 360 --threads 1 --redis-url redis://127.0.0.1:6379/14 "${gpu[@]}" \
  --out "$work/nograph" > "$work/nograph.txt" 2>&1 || log "no-graph run failed (see nograph.txt)"
log "done"
