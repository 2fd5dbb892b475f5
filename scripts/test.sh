#!/usr/bin/env bash
# The test command: install, lint, run the whole pytest suite against a real Redis.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/pytest -q -p no:cacheprovider "$@"
