#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian/Ubuntu machine with Python 3.11:
# a venv in .venv with torch 2.13.0 and the project (train + dev extras), and a Redis
# server answering on 127.0.0.1:6379 (redis-server installed with apt if missing: the
# fault tests also start private ones). TORCH_INDEX_URL, when set, is the index torch
# comes from (e.g. https://download.pytorch.org/whl/cpu for the CPU-only build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo

apt_install() {
  $SUDO apt-get update -q >/dev/null && \
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "$@" >/dev/null
}

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  if ! "$PY" -m venv .venv; then  # Debian/Ubuntu ship venv separately
    rm -rf .venv
    echo "[setup] installing python3-venv"
    apt_install python3-venv
    "$PY" -m venv .venv
  fi
fi
if ! .venv/bin/python -c "import torch, onnxruntime, fastapi, ctr" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ]; then
  echo "[setup] installing packages"
  .venv/bin/pip install -q --upgrade pip
  # exactly this pin (the CPU build on this project's machines); any other torch spec
  # pulls a multi-GB CUDA build
  .venv/bin/pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0
  .venv/bin/pip install -q -e '.[train,dev]'
  touch .venv/.installed
fi

redis_up() {
  .venv/bin/python - <<'PY'
import socket, sys
try:
    s = socket.create_connection(("127.0.0.1", 6379), timeout=1)
    s.sendall(b"PING\r\n"); ok = s.recv(16).startswith(b"+PONG")
except OSError:
    ok = False
sys.exit(0 if ok else 1)
PY
}

if ! command -v redis-server >/dev/null 2>&1; then
  echo "[setup] installing redis-server"
  if ! apt_install redis-server; then
    redis_up || { echo "[setup] no Redis answers and redis-server could not be installed" >&2; exit 1; }
    echo "[setup] warning: redis-server could not be installed; using the Redis on" \
      "127.0.0.1:6379 (the fault tests, which start their own, need the binary)" >&2
  fi
fi
if ! redis_up; then
  echo "[setup] starting redis-server on 127.0.0.1:6379"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --logfile /tmp/ctr-redis.log
  for _ in $(seq 50); do redis_up && break; sleep 0.1; done
fi
redis_up && echo "[setup] Redis answers on 127.0.0.1:6379"
