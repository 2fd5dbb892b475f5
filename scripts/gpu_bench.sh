#!/usr/bin/env bash
# The GPU figures in docs/benchmarks.md. Needs onnxruntime-gpu, a Redis on 6379 and
# bundles in $MODELS (make them with: python -c "from training.bench_service import
# make_bundle; ..." or any `ctr export`). Usage: scripts/gpu_bench.sh OUT [part]
#   part a: the model alone (ctr bench-gpu) and the service with graphs + fp16 + batching
#   part b: DIEN and DIN at N=500 open-loop: fp16, fp32, no batching, 4 workers on one GPU
set -euo pipefail
out=$1 part=${2:-a}
MODELS=${MODELS:-/tmp/bundles}
py=${PYTHON:-python3}
gpu=(--env CTR_PROVIDER=cuda --env CTR_CUDA_GRAPH=1 --env CTR_BATCH_MAX_USERS=16
     --env CTR_BATCH_MAX_CANDIDATES=8192 --env CTR_CUDA_GRAPH_BUCKETS=64,128,256,512,1024,2048,4096,8192)
bench=(-m ctr.cli bench --models-dir "$MODELS" --threads 0 --redis-url redis://127.0.0.1:6379/14)
if [ "$part" = a ]; then
  $py "${bench[@]}" --models bench-dien,bench-din --n 50,500,1000 --concurrency 1,8,32 \
    --seconds 3 --rates 200,360,500,800 "${gpu[@]}" --env CTR_PRECISION=fp16 --out "$out/fp16"
else
  one=(--n 500 --concurrency 1 --seconds 3)
  $py "${bench[@]}" --models bench-dien "${one[@]}" --rates 200,300,360,450 "${gpu[@]}" \
    --env CTR_PRECISION=fp16 --out "$out/dien_fp16"
  $py "${bench[@]}" --models bench-din "${one[@]}" --rates 200,300,360,450 "${gpu[@]}" \
    --env CTR_PRECISION=fp16 --out "$out/din_fp16"
  $py "${bench[@]}" --models bench-dien "${one[@]}" --rates 200,360 "${gpu[@]}" --out "$out/dien_fp32"
  $py "${bench[@]}" --models bench-dien "${one[@]}" --rates 200,360 --env CTR_PROVIDER=cuda \
    --env CTR_CUDA_GRAPH=1 --env CTR_PRECISION=fp16 --out "$out/dien_nobatch"
  $py "${bench[@]}" --models bench-dien "${one[@]}" --rates 800,1440,2000 "${gpu[@]}" \
    --env CTR_PRECISION=fp16 --env CTR_WORKERS=4 --out "$out/dien_workers4"
fi
