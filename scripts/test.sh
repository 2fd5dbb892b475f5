#!/usr/bin/env bash
# The test command: install, lint, run the whole pytest suite against a real Redis.
set -euo pipefail
cd "$(dirname "$0")/.."
# the Redis the tests use (tests/helpers.py's default) answers, or is started
CTR_SETUP_REDIS_URL="${CTR_TEST_REDIS_URL:-redis://127.0.0.1:6379/13}" bash scripts/setup.sh
.venv/bin/ruff check .
# promtool (Prometheus's) for the dashboard and alert-rule query tests: Debian's
# prometheus package unpacked for its promtool alone into .venv/bin (nothing installed,
# no daemon); where apt cannot fetch it, those tests skip (README, "Tests")
fetch_promtool() {
  (cd "$1" && timeout 300 apt-get download prometheus > /dev/null 2>&1 \
    && dpkg-deb -x prometheus_*.deb x && [ -x x/usr/bin/promtool ])
}
if ! command -v promtool > /dev/null && [ ! -x .venv/bin/promtool ] && command -v apt-get > /dev/null; then
  tmp=$(mktemp -d)
  # a fresh machine's apt may have no package lists yet: read them once (root only)
  if fetch_promtool "$tmp" || { [ "$(id -u)" = 0 ] && apt-get update -q > /dev/null 2>&1 \
      && fetch_promtool "$tmp"; }; then
    cp "$tmp/x/usr/bin/promtool" .venv/bin/promtool
    echo "[test] promtool: $(.venv/bin/promtool --version 2>&1 | head -1)"
  else
    echo "[test] promtool not fetched (apt-get download prometheus): the query tests skip"
  fi
  rm -rf "$tmp"
fi
# a tool or package that setup.sh installs but a test finds missing fails the run
# instead of skipping quietly (README, "Tests", says what may still skip)
export CTR_TEST_STRICT="${CTR_TEST_STRICT:-1}"
# two pytest-xdist workers (CTR_TEST_WORKERS; 0 runs in this process), each test file
# on one worker, the longest files first (tests/conftest.py), each worker on a Redis
# database of its own (tests/helpers.py); the tests wait on subprocesses, sockets and
# timers more than they compute; the 25 slowest tests are listed at the end
exec .venv/bin/pytest -q -p no:cacheprovider -n "${CTR_TEST_WORKERS:-2}" --dist loadfile \
  --no-loadscope-reorder --durations=25 "$@"
