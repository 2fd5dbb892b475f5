#!/usr/bin/env bash
# Builds the offline kit that scripts/gpu_env.sh consumes on a GPU machine with no network,
# into the git-ignored folders .gpu1 .. .gpu4 (each under 62 MiB, one device upload each):
#   .gpu1/part00  .gpu2/part01  .gpu3/part02     xz tarball of onnxruntime-gpu, split in 60 MiB
#   .gpu4/part03                                 (the rest of it)
#   .gpu4/whl/*.whl                              the service's cp312 / pure-Python wheels
#   .gpu4/redis/redis-server + its non-glibc .so's
#   .gpu1/kit.tar.xz.sha256                      checksum of the joined parts
# Use: run from the repository root here (`bash scripts/gpu_kit.sh`), then upload each
# folder with its own device call, carry: [".gpuN"], copying it out of the work tree
# (/tmp survives between calls only while the machine stays warm):
#   carry [".gpu1"]: mkdir -p /tmp/parts && cp .gpu1/part* /tmp/parts/
#   carry [".gpu2"]: mkdir -p /tmp/parts && cp .gpu2/part* /tmp/parts/
#   carry [".gpu3"]: mkdir -p /tmp/parts && cp .gpu3/part* /tmp/parts/
#   carry [".gpu4"]: mkdir -p /tmp/parts && cp .gpu4/part* /tmp/parts/ \
#                    && rm -rf /tmp/whl /tmp/redis && cp -r .gpu4/whl /tmp/whl && cp -r .gpu4/redis /tmp/redis
#   then, in the same or a later call:  source scripts/gpu_env.sh /tmp/parts /tmp/whl /tmp/redis
# Optional check there: cat /tmp/parts/part* | sha256sum  vs  .gpu1/kit.tar.xz.sha256
# Idempotent: downloads and the xz tarball are cached in $GPU_KIT_CACHE and reused.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CACHE=${GPU_KIT_CACHE:-/tmp/gpu_kit_cache}
ORT=onnxruntime-gpu==1.31.1          # the CUDA 13 build (Requires-Dist nvidia-cuda-runtime~=13.0)
# The target (Python 3.12, PyTorch 2.11+cu130 image) already has: numpy onnx onnxruntime(cpu)
# protobuf prometheus-client pyyaml httpx h11 anyio click uvloop typing-extensions pillow
# matplotlib psutil packaging flatbuffers sympy. The rest of the runtime closure of
# pyproject's dependencies, pinned as in .venv:
WHEELS=(
  annotated-doc==0.0.7 annotated-types==0.8.0 fastapi==0.165.0 hiredis==3.5.0
  httptools==0.9.0 idna==3.20 opentelemetry-api==1.45.2 orjson==3.13.0 pandas==3.1.1
  pydantic==2.14.3 pydantic-core==2.50.4 pydantic-settings==2.16.3 python-dateutil==4.0.0
  python-dotenv==1.2.4 redis==8.1.0 starlette==1.10.0 tqdm==4.70.1 typing-inspection==0.4.5
  tzdata==2026.6 uvicorn==0.54.0 watchfiles==1.3.0 websockets==17.4
)
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
MAX=$((62 * 1024 * 1024))

mkdir -p "$CACHE/ort" "$CACHE/whl"

# a. onnxruntime-gpu -> xz tarball -> 60 MiB parts
whl=$(ls "$CACHE"/ort/onnxruntime_gpu-*.whl 2>/dev/null | head -1 || true)
if [ -z "$whl" ]; then
  $PY -m pip download -q --no-deps "${PLAT[@]}" -d "$CACHE/ort" "$ORT"
  whl=$(ls "$CACHE"/ort/onnxruntime_gpu-*.whl | head -1)
fi
sum=$(sha256sum "$whl" | cut -d' ' -f1)
if [ ! -s "$CACHE/kit.tar.xz" ] || [ "$(cat "$CACHE/kit.src" 2>/dev/null)" != "$sum" ]; then
  echo "[gpu_kit] compressing $(basename "$whl") (xz -9, a few minutes)"
  rm -rf "$CACHE/unz" "$CACHE/kit.tar.xz" "$CACHE/kit.src"
  mkdir "$CACHE/unz"
  unzip -q "$whl" -d "$CACHE/unz"
  # every top-level entry of the wheel, in a reproducible order and with fixed metadata
  (cd "$CACHE/unz" && ls -A) > "$CACHE/top"
  tar c --sort=name --mtime='2000-01-01 00:00Z' --owner=0 --group=0 --numeric-owner \
    -C "$CACHE/unz" -T "$CACHE/top" | xz -T2 -9 > "$CACHE/kit.tar.xz.tmp"
  mv "$CACHE/kit.tar.xz.tmp" "$CACHE/kit.tar.xz"
  echo "$sum" > "$CACHE/kit.src"
  rm -rf "$CACHE/unz"
fi
rm -rf "$CACHE/split" && mkdir "$CACHE/split"
(cd "$CACHE/split" && split -b 60M -d "$CACHE/kit.tar.xz" part)
n=$(ls "$CACHE/split" | wc -l)
[ "$n" -le 4 ] || { echo "[gpu_kit] $n parts: more than .gpu1-.gpu4 hold" >&2; exit 1; }
for i in 1 2 3 4; do
  mkdir -p ".gpu$i"
  rm -f ".gpu$i"/part*
  p=$(printf 'part%02d' $((i - 1)))
  [ -f "$CACHE/split/$p" ] && cp "$CACHE/split/$p" ".gpu$i/$p"
done
(cd "$CACHE" && sha256sum kit.tar.xz) > .gpu1/kit.tar.xz.sha256
rm -rf "$CACHE/split"

# b. the service's wheels
$PY -m pip download -q --no-deps "${PLAT[@]}" -d "$CACHE/whl" "${WHEELS[@]}"
rm -rf .gpu4/whl && mkdir -p .gpu4/whl
for spec in "${WHEELS[@]}"; do
  name=${spec%%==*} ver=${spec#*==}
  f=$(ls "$CACHE"/whl/*.whl | grep -i "/${name//-/[-_.]}-${ver}-" | head -1 || true)
  [ -n "$f" ] || { echo "[gpu_kit] no wheel for $spec" >&2; exit 1; }
  cp "$f" .gpu4/whl/
done

# c. redis-server and the libraries it needs beyond glibc
rs=$(command -v redis-server || true)
if [ -z "$rs" ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q redis-server >/dev/null
  rs=$(command -v redis-server)
fi
rm -rf .gpu4/redis && mkdir -p .gpu4/redis
cp -L "$rs" .gpu4/redis/redis-server
ldd "$rs" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' | while read -r soname path; do
  case $soname in
    libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|ld-linux*) ;;
    *) cp -L "$path" ".gpu4/redis/$soname" ;;
  esac
done

for i in 1 2 3 4; do
  size=$(du -sb ".gpu$i" | cut -f1)
  [ "$size" -lt "$MAX" ] || { echo "[gpu_kit] .gpu$i is $size bytes, over 62 MiB" >&2; exit 1; }
done
du -sh .gpu1 .gpu2 .gpu3 .gpu4
