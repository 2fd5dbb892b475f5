#!/usr/bin/env bash
# Same-machine A/B of the service on a GPU, interleaved: old code vs this checkout, this
# checkout with Python's default GIL switch interval (5 ms) vs the service's (0.5 ms), and
# this checkout serving the standard graph (unfused) vs the fused AUGRU (new: auto), and
# this checkout copying into the CUDA-graph buffers with cudaMemcpy outside the GIL
# (direct: CTR_GPU_COPY=direct) vs through ORT's binding (new).
# DIEN at N=500, open loop at 360 and 500 req/s, graphs + fp16 + micro-batching, 1 worker.
# Needs onnxruntime-gpu, Redis on 6379 and bundles in $MODELS (default /tmp/bundles; the
# command that makes them is in scripts/gpu_bench.sh's header).
# Usage: [AB_VARIANTS="base new"] [AB_RATES=360,500] [PYTHON=...] \
#          bash scripts/gpu_ab.sh OUT BASE_SRC [REPS]
#   OUT, BASE_SRC and MODELS may be relative to the directory it is called from.
#   BASE_SRC: a folder with the old code's ctr/ and service/ (e.g. a `git worktree`); the
#   benchmark driver (training/) is this checkout's for both, so both report alike.
#   PYTHON: default .venv/bin/python when it exists, else python3.
#   (on a GPU machine set up by `source scripts/gpu_env.sh`, whose /tmp/site holds cp312
#   wheels for the image's python3, that is python3: carry no .venv there)
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: bash scripts/gpu_ab.sh OUT BASE_SRC [REPS]" >&2; exit 2; }
# the caller's relative paths become absolute before the cd to the repository root
out=$(realpath -m "$1") src=$(realpath "$2") reps=${3:-3}
MODELS=$(realpath "${MODELS:-/tmp/bundles}")
case "${PYTHON:-}" in */*) PYTHON=$(realpath -ms "$PYTHON") ;; esac  # a path: absolute too
cd "$(dirname "$0")/.."
# absolute: each variant runs from its own folder below
if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ -x .venv/bin/python ]; then py=$PWD/.venv/bin/python
else py=python3
fi
base=$(mktemp -d)
cp -r "$src/ctr" "$src/service" "$base/" && cp -r training "$base/"
# `python -m` puts the working directory first on sys.path, so each variant runs from
# its own folder (a PYTHONPATH entry alone would lose to this checkout)
site=${SITE:-/tmp/site}
gpu=(--env CTR_PROVIDER=cuda --env CTR_REQUIRE_GPU=1 --env CTR_CUDA_GRAPH=1 --env CTR_BATCH_MAX_USERS=16
     --env CTR_BATCH_MAX_CANDIDATES=8192 --env CTR_CUDA_GRAPH_BUCKETS=64,128,256,512,1024,2048,4096,8192
     --env CTR_PRECISION=fp16)
[ "${AB_CPU:-0}" = 1 ] && gpu=()  # a dry run of the script on a machine without a GPU
args=(-m ctr.cli bench --models-dir "$MODELS" --models bench-dien --n 500 --concurrency 1
      --seconds 3 --rates "${AB_RATES:-360,500}" --threads 1 --redis-url redis://127.0.0.1:6379/14 "${gpu[@]}")
mkdir -p "$out/runs"
for rep in $(seq 1 "$reps"); do
  for variant in ${AB_VARIANTS:-base switch5 new}; do
    case $variant in
      base) dir=$base extra=() ;;
      switch5) dir=$PWD extra=(--env CTR_SWITCH_INTERVAL_MS=5) ;;
      new) dir=$PWD extra=() ;;
      unfused) dir=$PWD extra=(--env CTR_FUSED_OPS=off) ;;
      direct) dir=$PWD extra=(--env CTR_GPU_COPY=direct) ;;
    esac
    echo "[ab] rep $rep $variant" >&2
    (cd "$dir" && PYTHONPATH="$site:$dir" $py "${args[@]}" "${extra[@]}" --out "$out/tmp" > /dev/null)
    cp "$out/tmp/bench_service.json" "$out/runs/${variant}_$rep.json"
    $py scripts/ab_summary.py "$out/runs" > "$out/ab.md"
  done
done
rm -rf "$out/tmp"
cat "$out/ab.md"
