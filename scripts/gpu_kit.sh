#!/usr/bin/env bash
# Builds the offline kit that scripts/gpu_env.sh consumes on a GPU machine with no network,
# into the git-ignored folders .gpu1 .. .gpuK, one device upload each. The tool sends the
# working tree with each carried folder, 64 MiB in all, so each folder gets what the tree
# leaves (the script prints K; with a 15 MB tree, K = 5 folders of about 47 MiB):
#   .gpuN/partNN               the xz tarball of onnxruntime-gpu, split
#   .gpuK/whl/*.whl            the service's cp312 / pure-Python wheels
#   .gpuK/redis/               redis-server + its non-glibc .so's
#   .gpu1/kit.tar.xz.sha256    checksum of the joined parts
# Use: run from the repository root here (`bash scripts/gpu_kit.sh`), add no file to the
# tree afterwards, then upload each folder with its own device call, back to back (/tmp
# survives between calls only while the machine stays warm, 30 s after a call; the
# boot_id shows a fresh machine at once):
#   carry [".gpuN"]: cat /proc/sys/kernel/random/boot_id; mkdir -p /tmp/parts && cp .gpuN/part* /tmp/parts/ && ls /tmp/parts
#   carry [".gpuK"]: the same, then  rm -rf /tmp/whl /tmp/redis && cp -r .gpuK/whl /tmp/whl && cp -r .gpuK/redis /tmp/redis
#   then, in the same call:  source scripts/gpu_env.sh /tmp/parts /tmp/whl /tmp/redis || exit 1
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
# pyproject's dependencies, at the versions constraints.txt pins (as in .venv: the
# device then runs what the tests ran here, e.g. the uvicorn service.front builds on):
NAMES=(
  annotated-doc annotated-types fastapi hiredis httptools idna opentelemetry-api orjson
  pandas pydantic pydantic-core pydantic-settings python-dateutil python-dotenv redis
  starlette tqdm typing-inspection tzdata uvicorn watchfiles websockets
)
WHEELS=()
for name in "${NAMES[@]}"; do
  pin=$(grep -i -E "^${name//-/[-_.]}==" constraints.txt | head -1 || true)
  [ -n "$pin" ] || { echo "[gpu_kit] $name is not pinned in constraints.txt" >&2; exit 1; }
  WHEELS+=("$name==${pin#*==}")
done
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
# The device tool sends the working tree (tracked + untracked-not-ignored files, shared/)
# AND the carried folder in one call, 64 MiB in all: each .gpuN gets what the tree leaves
# (minus GPU_KIT_SLACK_MIB, default 2, for files added before the calls)
tree=$({ git ls-files -z; git ls-files -z -o --exclude-standard; } \
       | { xargs -0 -r stat -c %s -- 2>/dev/null || true; } | awk '{s += $1} END {print s + 0}')
[ -d shared ] && tree=$((tree + $(du -sb shared | cut -f1)))
MAX=$((64 * 1024 * 1024 - tree - ${GPU_KIT_SLACK_MIB:-2} * 1024 * 1024))
PART=$(( (MAX / 1048576 - 1) * 1048576 ))
[ "$PART" -ge $((8 * 1048576)) ] || { echo "[gpu_kit] the tree ($tree bytes) leaves no room" >&2; exit 1; }

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
(cd "$CACHE/split" && split -b "$PART" -d "$CACHE/kit.tar.xz" part)
n=$(ls "$CACHE/split" | wc -l)
rm -rf .gpu[0-9]*
for i in $(seq 1 "$n"); do
  mkdir -p ".gpu$i"
  p=$(printf 'part%02d' $((i - 1)))
  cp "$CACHE/split/$p" ".gpu$i/$p"
done
(cd "$CACHE" && sha256sum kit.tar.xz) > .gpu1/kit.tar.xz.sha256
rm -rf "$CACHE/split"

# b. the service's wheels
$PY -m pip download -q --no-deps "${PLAT[@]}" -d "$CACHE/whl" "${WHEELS[@]}"
last=.gpu$n
rm -rf "$last/whl" && mkdir -p "$last/whl"
for spec in "${WHEELS[@]}"; do
  name=${spec%%==*} ver=${spec#*==}
  f=$(ls "$CACHE"/whl/*.whl | grep -i "/${name//-/[-_.]}-${ver}-" | head -1 || true)
  [ -n "$f" ] || { echo "[gpu_kit] no wheel for $spec" >&2; exit 1; }
  cp "$f" "$last/whl/"
done

# c. redis-server and the libraries it needs beyond glibc
rs=$(command -v redis-server || true)
if [ -z "$rs" ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q redis-server >/dev/null
  rs=$(command -v redis-server)
fi
rm -rf "$last/redis" && mkdir -p "$last/redis"
cp -L "$rs" "$last/redis/redis-server"
ldd "$rs" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' | while read -r soname path; do
  case $soname in
    libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|ld-linux*) ;;
    *) cp -L "$path" "$last/redis/$soname" ;;
  esac
done

for i in $(seq 1 "$n"); do
  size=$(du -sb ".gpu$i" | cut -f1)
  [ "$size" -lt "$MAX" ] || { echo "[gpu_kit] .gpu$i is $size bytes, over the $MAX the tree leaves" >&2; exit 1; }
done
echo "[gpu_kit] tree $tree bytes; $n uploads (.gpu1 .. .gpu$n, $last with whl/ and redis/), each under $MAX bytes"
du -sh .gpu[0-9]*
