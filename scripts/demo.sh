#!/usr/bin/env bash
# The main job: install, train a small DIN, export it, load users into Redis,
# start the service, score a sample request and print the ranked result.
# Extra arguments go to `ctr demo` (e.g. --keep-serving, --config configs/movielens_din.yaml
# --data-root ../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/ctr demo "$@"
