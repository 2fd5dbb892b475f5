#!/usr/bin/env bash
# The GPU figures in docs/benchmarks.md. Needs onnxruntime-gpu, a Redis on 6379 and
# bundles in $MODELS (default /tmp/bundles): bench-din and bench-dien, random weights,
# L = 50 (training.bench_service.make_bundle(model_type, models_dir, length,
# overrides=None); needs torch), made from the repository root with (one line; python3
# where there is no .venv)
#   .venv/bin/python -c 'from pathlib import Path; from training.bench_service import make_bundle; [make_bundle(m, Path("/tmp/bundles"), 50) for m in ("din", "dien")]'
# or any `ctr export` into $MODELS.
# Usage: [MODELS=DIR] [PYTHON=...] bash scripts/gpu_bench.sh OUT [part]
#   OUT and MODELS may be relative to the directory it is called from.
#   PYTHON: default .venv/bin/python when it exists, else python3.
#   (on a GPU machine set up by `source scripts/gpu_env.sh`, whose /tmp/site holds cp312
#   wheels for the image's python3, that is python3: carry no .venv there)
#   part a: the service with graphs + fp16 + batching (DIEN and DIN, N 50/500/1000,
#           concurrency 1/8/32, open loop at 200-800 req/s)
#   part b: DIEN and DIN at N=500 open-loop: fp16, fp32, no batching, 4 workers on one GPU
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: bash scripts/gpu_bench.sh OUT [a|b]" >&2; exit 2; }
# the caller's relative paths become absolute before the cd to the repository root
out=$(realpath -m "$1") part=${2:-a}
MODELS=$(realpath -m "${MODELS:-/tmp/bundles}")
case "${PYTHON:-}" in */*) PYTHON=$(realpath -ms "$PYTHON") ;; esac  # a path: absolute too
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ -x .venv/bin/python ]; then py=$PWD/.venv/bin/python
else py=python3
fi
gpu=(--env CTR_PROVIDER=cuda --env CTR_REQUIRE_GPU=1 --env CTR_CUDA_GRAPH=1 --env CTR_BATCH_MAX_USERS=16
     --env CTR_BATCH_MAX_CANDIDATES=8192 --env CTR_CUDA_GRAPH_BUCKETS=64,128,256,512,1024,2048,4096,8192)
# one ORT intra-op thread: on the GPU the CPU provider only runs shape nodes, and more
# pool threads only compete with the event loop (and with the other workers)
bench=(-m ctr.cli bench --models-dir "$MODELS" --threads 1 --redis-url redis://127.0.0.1:6379/14)
if [ "$part" = a ]; then
  $py "${bench[@]}" --models bench-dien,bench-din --n 50,500,1000 --concurrency 1,8,32 \
    --seconds 3 --rates 200,360,500,800 "${gpu[@]}" --env CTR_PRECISION=fp16 --out "$out/fp16"
else
  # at most 8 files come back from the device tool: keep each run's table and JSON only
  one=(--n 500 --concurrency 1 --seconds 3)
  run() { local name=$1; shift; $py "${bench[@]}" "$@" --out "$out/tmp/$name"
          cp "$out/tmp/$name/bench_service.md" "$out/$name.md"
          cp "$out/tmp/$name/bench_service.json" "$out/$name.json"; }
  run dien_fp16 --models bench-dien "${one[@]}" --rates 200,300,360,450 "${gpu[@]}" \
    --env CTR_PRECISION=fp16
  run din_fp16 --models bench-din "${one[@]}" --rates 200,360,450 "${gpu[@]}" --env CTR_PRECISION=fp16
  run dien_nobatch --models bench-dien "${one[@]}" --rates 200,360 --env CTR_PROVIDER=cuda --env CTR_REQUIRE_GPU=1 \
    --env CTR_CUDA_GRAPH=1 --env CTR_PRECISION=fp16
  run dien_workers4 --models bench-dien "${one[@]}" --rates 800,1440,2000 "${gpu[@]}" \
    --env CTR_PRECISION=fp16 --env CTR_WORKERS=4
  rm -rf "$out/tmp"
fi
