"""``ctr serve`` stopped under load: ``--clients`` httpx clients score in a closed loop
(``--n`` candidates, known users) for ``--seconds``, then the service gets SIGTERM; what
each request got from then on is counted: answers by status, refused connections, and
requests lost to a reset (on a kept connection or a new one). A graceful stop answers or
refuses, and resets none (docs/api.md, the SIGTERM row).

Builds a small DIN bundle and loads it into ``--redis-url`` (a database it may
overwrite: by default the test database 13 of a private server); the service takes this
script's environment (``CTR_HTTP_FRONT=false`` ... to compare).

Usage: .venv/bin/python scripts/stop_under_load.py [--workers 3] [--clients 24]
           [--n 500] [--seconds 5] [--runs 2] [--redis-url redis://127.0.0.1:16400/13]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


async def drive(proc: object, port: int, users: list[str], items: list[str],
                args: argparse.Namespace) -> tuple[collections.Counter, float, int]:  # fmt: skip
    import httpx

    got: collections.Counter = collections.Counter()
    stop = False

    async def client() -> None:
        kept = 0  # requests on this connection before the one now sent
        # one client per task, made once (each loads the CA bundle: 24 remade after
        # every error blocked the loop about 0.5 s, a review); its pool drops a broken
        # connection, so the next request opens a new one
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            while not stop:
                cands = [{"item_id": i} for i in items[: args.n]]
                body = {"user_id": random.choice(users), "candidates": cands}
                try:
                    r = await c.post("/v1/score", json=body)
                except httpx.ConnectError:
                    got["connection refused"] += 1
                    kept = 0
                    await asyncio.sleep(0.05)
                    continue
                except httpx.TransportError as exc:
                    where = "a kept connection" if kept else "a new connection"
                    got[f"lost to {type(exc).__name__} on {where}"] += 1
                    kept = 0
                    await asyncio.sleep(0.05)
                    continue
                got[f"answered {r.status_code}"] += 1
                kept = 0 if r.headers.get("connection") == "close" else kept + 1

    tasks = [asyncio.create_task(client()) for _ in range(args.clients)]
    await asyncio.sleep(args.seconds)
    before = sum(got.values())
    got.clear()
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
    while proc.poll() is None:  # type: ignore[attr-defined]
        await asyncio.sleep(0.05)
    took = time.monotonic() - sent
    await asyncio.sleep(0.5)  # the clients' last tries meet a closed port
    stop = True
    await asyncio.gather(*tasks)
    return got, took, before


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--clients", type=int, default=24)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:16400/13")
    args = ap.parse_args()
    os.environ["CTR_TEST_REDIS_URL"] = args.redis_url  # tests.helpers' Redis
    from tests.helpers import build_and_load, service_env
    from tests.redis_proc import free_port
    from tests.server_thread import serve_process

    print(f"command: {' '.join(sys.argv)}")
    with tempfile.TemporaryDirectory(prefix="stop-") as tmp:
        built = build_and_load(Path(tmp), "din")
        users = built.frame["user_id"].astype(str).unique().tolist()
        items = built.frame["item_id"].astype(str).unique().tolist()
        (Path(tmp) / "prom").mkdir()
        env = service_env(built, args.redis_url, CTR_WORKERS=str(args.workers),
                          PROMETHEUS_MULTIPROC_DIR=str(Path(tmp) / "prom"))  # fmt: skip
        for run in range(args.runs):
            port = free_port()
            proc = serve_process(port, env)
            try:
                got, took, before = asyncio.run(drive(proc, port, users, items, args))
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            seen = dict(sorted(got.items()))
            print(f"run {run}: {before} requests before SIGTERM; exit {proc.returncode} "
                  f"{took:.2f} s after it; from the signal on: {seen}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
