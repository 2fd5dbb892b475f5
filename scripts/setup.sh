#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian/Ubuntu machine with Python 3.11:
# a venv in .venv with the CPU build of torch and the project (train + dev extras),
# and a Redis server answering on $CTR_REDIS_HOST:6379 (installed with apt if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, onnxruntime, fastapi, ctr" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ]; then
  echo "[setup] installing packages"
  .venv/bin/pip install -q --upgrade pip
  # exactly this pin: the CPU build. Any other torch spec pulls a multi-GB CUDA build.
  .venv/bin/pip install -q torch==2.13.0
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
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q redis-server >/dev/null
fi
if ! redis_up; then
  echo "[setup] starting redis-server on 127.0.0.1:6379"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --logfile /tmp/ctr-redis.log
  for _ in $(seq 50); do redis_up && break; sleep 0.1; done
fi
redis_up && echo "[setup] Redis answers on 127.0.0.1:6379"
