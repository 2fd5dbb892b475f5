#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian 12 / Ubuntu 24.04 machine with Python >= 3.11:
# a venv in .venv with torch 2.13.0 (CPU build) and the project (train + dev extras), a
# C++ compiler (the custom ops in native/ are built with it; several tests need them),
# and a Redis server (>= 7) answering at CTR_REDIS_URL, by default 127.0.0.1:6379 (redis-server
# installed with apt if missing: the fault tests also start private ones).
# torch: a local wheel where pip is configured with one (find-links), else the CPU build
# from PyTorch's CPU index (https://download.pytorch.org/whl/cpu). TORCH_INDEX_URL, when
# set, is the only index torch comes from (set it to https://pypi.org/simple for PyPI's
# CUDA build, several GB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "[setup] needs Python >= 3.11; $PY is $("$PY" -V 2>&1 || echo missing)." \
    "Point PYTHON at one, e.g. PYTHON=python3.11 bash scripts/setup.sh" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=sudo; fi
fi

apt_install() {
  if [ "$(id -u)" != 0 ] && [ -z "$SUDO" ]; then
    echo "[setup] cannot install $* (not root and no sudo); install it and run again" >&2
    return 1
  fi
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
# CTR_UNLOCKED=1 installs the newest whatever the venv holds (constraints.txt's header)
if [ "${CTR_UNLOCKED:-0}" = "1" ] \
   || ! .venv/bin/python -c "import torch, onnxruntime, fastapi, ctr" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ] || [ constraints.txt -nt .venv/.installed ]; then
  echo "[setup] installing packages"
  .venv/bin/pip install -q --upgrade pip
  # exactly this pin: on PyPI any torch spec is a multi-GB CUDA build
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    .venv/bin/pip install -q --index-url "$TORCH_INDEX_URL" torch==2.13.0
  elif .venv/bin/pip install -q --no-index --no-deps torch==2.13.0 2>/dev/null; then
    .venv/bin/pip install -q torch==2.13.0  # the local wheel's dependencies, from PyPI
  else
    .venv/bin/pip install -q --extra-index-url https://download.pytorch.org/whl/cpu \
      torch==2.13.0
  fi
  # the versions CI last passed with (constraints.txt); CTR_UNLOCKED=1: the newest
  if [ "${CTR_UNLOCKED:-0}" = "1" ]; then  # the installed ones too, torch's pin kept
    .venv/bin/pip install -q --upgrade --upgrade-strategy eager -e '.[train,dev]' \
      torch==2.13.0
  else
    .venv/bin/pip install -q -c constraints.txt -e '.[train,dev]'
  fi
  touch .venv/.installed
fi

# the Redis the next command uses: CTR_SETUP_REDIS_URL (scripts/test.sh sets it to
# CTR_TEST_REDIS_URL), else CTR_REDIS_URL, else redis://127.0.0.1:6379/0. One is started
# only for a redis:// URL on 127.0.0.1 or localhost; any other must already answer.
REDIS_URL="${CTR_SETUP_REDIS_URL:-${CTR_REDIS_URL:-redis://127.0.0.1:6379/0}}"
read -r REDIS_LOCAL REDIS_PORT REDIS_SHOWN < <(.venv/bin/python - "$REDIS_URL" <<'PY'
import sys
from urllib.parse import urlsplit
url = sys.argv[1]
# no password shown: none before an "@", none in a query (?password=)
local, port, shown = False, 0, url.split("@")[-1].split("?")[0]
try:
    u = urlsplit(url)
    if u.scheme == "redis" and u.hostname in ("127.0.0.1", "localhost") and "," not in url:
        local, port, shown = True, u.port or 6379, f"{u.hostname}:{u.port or 6379}"
except ValueError:  # a port that is not a number: redis-py says so below
    pass
print(int(local), port, shown)
PY
)
redis_up() {
  .venv/bin/python - "$REDIS_URL" <<'PY'
import sys
import redis
first = sys.argv[1].split(",")[0].strip()  # a cluster's node list: its first node
first = first if "://" in first else "redis://" + first
try:
    ok = bool(redis.Redis.from_url(first, socket_timeout=1, socket_connect_timeout=1).ping())
except Exception:
    ok = False
sys.exit(0 if ok else 1)
PY
}

if ! command -v g++ >/dev/null 2>&1 && ! command -v c++ >/dev/null 2>&1; then
  echo "[setup] installing g++ (builds the custom ops in native/)"
  apt_install g++ || echo "[setup] warning: no C++ compiler: the service serves" \
    "model.onnx, and the tests of the fused graphs fail" >&2
fi
if ! command -v redis-server >/dev/null 2>&1; then
  echo "[setup] installing redis-server"
  if ! apt_install redis-server; then
    redis_up || { echo "[setup] no Redis answers at $REDIS_SHOWN and redis-server could not be installed" >&2; exit 1; }
    echo "[setup] warning: redis-server could not be installed; using the Redis at" \
      "$REDIS_SHOWN (the fault tests, which start their own, need the binary)" >&2
  fi
fi
if ! redis_up && [ "$REDIS_LOCAL" = 1 ]; then
  echo "[setup] starting redis-server on 127.0.0.1:$REDIS_PORT"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
    --logfile "/tmp/ctr-redis-$REDIS_PORT.log"
  for _ in $(seq 50); do redis_up && break; sleep 0.1; done
fi
if redis_up; then
  echo "[setup] Redis answers at $REDIS_SHOWN"
elif [ "$REDIS_LOCAL" = 1 ]; then
  echo "[setup] no Redis answers at $REDIS_SHOWN (see /tmp/ctr-redis-$REDIS_PORT.log)" >&2
  exit 1
else
  echo "[setup] no Redis answers at $REDIS_SHOWN, and setup starts one only for a" \
    "redis:// URL on 127.0.0.1 or localhost: start it, or point CTR_REDIS_URL elsewhere" >&2
  exit 1
fi
