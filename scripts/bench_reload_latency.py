"""Scoring latency while the model reloads, end to end: the real service (``ctr serve``)
with a DIN bundle whose user table has ``--buckets`` hash rows (2,000,000: a 64 MB
table), a closed-loop client scoring without pause at ``--concurrency``, and a
``POST /admin/reload`` (the same version, loaded again) every ``--every`` seconds,
``--reloads`` times. Each scoring request is counted as *during a reload* where it was
in flight while a reload's call was, else as *between reloads*; for both, the p50, p99
and longest latency and the requests over 20 ms are printed.

With ``--a-root`` (another checkout, e.g. ``git worktree add /tmp/old REV``), the same
against that checkout's code serving, the sides alternated ``--rounds`` times; the
client, bundle, Redis and settings are the same.

Usage: .venv/bin/python scripts/bench_reload_latency.py [--buckets 2000000] [--n 50]
       [--concurrency 1] [--reloads 6] [--every 1.5] [--rounds 2] [--a-root /tmp/old]
       [--redis-url redis://127.0.0.1:6379/14] [--port 8731]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEY = "bench-reload"


Requests = list[tuple[float, float, int]]
Calls = list[tuple[float, float]]


async def _drive(
    url: str, bodies: list[bytes], concurrency: int, reloads: int, every: float
) -> tuple[Requests, Calls]:
    """Scoring requests ``(sent, answered, status)`` and reload calls ``(start, end)``."""
    import httpx

    from training.bench_client import RawClient

    host, port = url.split("//")[1].split(":")
    clients = [RawClient(host, int(port)) for _ in range(concurrency)]
    for c in clients:
        await c.connect()
    done = asyncio.Event()
    requests: Requests = []
    calls: Calls = []

    async def score(k: int) -> None:
        i = k
        while not done.is_set():
            t = time.perf_counter()
            status = await clients[k].post("/v1/score", bodies[i % len(bodies)])
            requests.append((t, time.perf_counter(), status))
            i += concurrency

    async def reload() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as h:
            await asyncio.sleep(every)
            for _ in range(reloads):
                t = time.perf_counter()
                r = await h.post("/admin/reload", json={}, headers={"X-API-Key": KEY})
                if r.status_code != 200:
                    raise RuntimeError(f"reload answered {r.status_code}: {r.text}")
                calls.append((t, time.perf_counter()))
                await asyncio.sleep(every)
        done.set()

    from training.bench_client import client_gc_off

    with client_gc_off():  # the client's own GC pauses are not the service's latency
        await asyncio.gather(reload(), *(score(k) for k in range(concurrency)))
    for c in clients:
        await c.close()
    return requests, calls


def _split(requests: Requests, calls: Calls) -> dict[str, np.ndarray]:
    during, between = [], []
    for sent, answered, status in requests:
        if status != 200:
            raise RuntimeError(f"a scoring request answered {status}")
        ms = (answered - sent) * 1e3
        overlaps = any(sent < end and answered > start for start, end in calls)
        (during if overlaps else between).append(ms)
    return {"during a reload": np.array(during), "between reloads": np.array(between)}


def _row(ms: np.ndarray) -> str:
    if ms.size == 0:
        return "no requests"
    p50, p99 = np.percentile(ms, 50), np.percentile(ms, 99)
    slow = int((ms > 20).sum())
    return (f"{ms.size:6d} requests  p50 {p50:6.2f}  p99 {p99:6.2f}  max {ms.max():7.2f} ms"
            f"  over 20 ms: {slow}")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--buckets", type=int, default=2_000_000)
    ap.add_argument("--n", type=int, default=50, help="candidates per scoring request")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--reloads", type=int, default=6)
    ap.add_argument("--every", type=float, default=1.5, help="seconds between reloads")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--a-root", type=Path, default=None, help="another checkout's root")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")  # a benchmark's own
    ap.add_argument("--force", action="store_true",
                    help="load into --redis-url even where it holds keys no benchmark wrote")
    ap.add_argument("--port", type=int, default=8731)
    args = ap.parse_args()

    from service.loader import check_bench_db, load_bench_db
    try:  # a database of its own, as `ctr bench`'s: checked before anything is built
        check_bench_db(args.redis_url, args.force)
    except ValueError as exc:
        raise SystemExit(f"{ap.prog}: {exc}") from None
    from training.bench_server import service_env, start_service, stop_service
    from training.bench_service import bundle_for
    from training.bench_util import bodies_for, run_loop

    sides: list[tuple[str, Path | None]] = [("B (this checkout)", None)]
    if args.a_root is not None:
        sides.insert(0, (f"A ({args.a_root})", args.a_root.resolve()))
    seen: dict[str, list[dict[str, np.ndarray]]] = {name: [] for name, _ in sides}
    reload_s: dict[str, list[float]] = {name: [] for name, _ in sides}
    with tempfile.TemporaryDirectory(prefix="bench-reload-latency-") as tmp:
        over = {"features.0.mapping.buckets": args.buckets}
        where, config, frame = bundle_for("din", None, tmp, over)
        load_bench_db(config, frame, args.redis_url)
        bodies = bodies_for(frame, args.n)
        env = service_env(where, config.name, args.redis_url, 2,
                          extra_env={"CTR_API_KEY": KEY})  # fmt: skip
        for _ in range(args.rounds):
            for name, root in sides:
                proc, url = start_service(env, args.port, root)
                try:
                    requests, calls = run_loop(
                        _drive(url, bodies, args.concurrency, args.reloads, args.every)
                    )
                finally:
                    stop_service(proc)
                seen[name].append(_split(requests, calls))
                reload_s[name] += [end - start for start, end in calls]
    print("command: .venv/bin/python scripts/bench_reload_latency.py " + " ".join(sys.argv[1:]))
    print(f"DIN, user table {args.buckets:,} rows, N = {args.n}, concurrency "
          f"{args.concurrency}, {args.reloads} reloads every {args.every} s, "
          f"{args.rounds} rounds a side, sides alternated; latency in ms:")  # fmt: skip
    for name, _ in sides:
        took = np.array(reload_s[name])
        print(f"{name}: a reload call took {np.median(took):.2f} s (median of {took.size})")
        for kind in ("during a reload", "between reloads"):
            pooled: Any = np.concatenate([r[kind] for r in seen[name]])
            print(f"  {kind:16s} {_row(pooled)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
