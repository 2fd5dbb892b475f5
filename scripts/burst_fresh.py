"""A fresh ``ctr serve`` worker hit by a burst: ``--burst`` scoring requests at once,
each of another user (100 candidates), right after ``/readyz`` says ready; prints the
status codes and how many answers were degraded, for ``--runs`` fresh workers.

Builds a small DIN bundle and loads it into ``--redis-url`` (a database it may
overwrite: by default the test database 13 of a private server). The service takes
this script's environment: ``CTR_REDIS_WARM_CONNECTIONS=0 .venv/bin/python
scripts/burst_fresh.py`` compares with the connections opened by the requests.

Usage: .venv/bin/python scripts/burst_fresh.py [--burst 64] [--runs 6]
           [--redis-url redis://127.0.0.1:16400/13]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


async def burst(port: int, bodies: list[dict]) -> list[tuple[int, bool]]:
    import httpx

    limits = httpx.Limits(max_connections=len(bodies) + 10)
    async with httpx.AsyncClient(timeout=30, limits=limits) as c:
        url = f"http://127.0.0.1:{port}/v1/score"
        rs = await asyncio.gather(*[c.post(url, json=b) for b in bodies])
    return [(r.status_code, r.status_code == 200 and r.json()["degraded"]) for r in rs]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--burst", type=int, default=64)
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:16400/13")
    args = ap.parse_args()
    os.environ["CTR_TEST_REDIS_URL"] = args.redis_url  # tests.helpers' Redis
    from tests.helpers import build_and_load, service_env
    from tests.redis_proc import free_port
    from tests.server_thread import serve_process

    print(f"command: {' '.join(sys.argv)}; CTR_REDIS_WARM_CONNECTIONS="
          f"{os.environ.get('CTR_REDIS_WARM_CONNECTIONS', '(default)')}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="burst-") as tmp:
        built = build_and_load(Path(tmp), "din")
        users = built.frame["user_id"].astype(str).unique()[: args.burst].tolist()
        items = built.frame["item_id"].astype(str).unique()[:100].tolist()
        bodies = [{"user_id": u, "candidates": [{"item_id": i} for i in items]} for u in users]
        env = service_env(built, args.redis_url)
        total = 0
        for run in range(args.runs):
            port = free_port()
            proc = serve_process(port, env)
            try:
                got = asyncio.run(burst(port, bodies))
            finally:
                proc.terminate()
                proc.wait(30)
            codes: dict[int, int] = {}
            for code, _ in got:
                codes[code] = codes.get(code, 0) + 1
            degraded = sum(d for _, d in got)
            total += degraded
            print(f"run {run}: {len(bodies)} at once on a fresh worker: status {codes}, "
                  f"degraded {degraded}", flush=True)  # fmt: skip
        print(f"degraded in all: {total} of {len(bodies) * args.runs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
