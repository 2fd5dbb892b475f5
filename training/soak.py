"""``ctr soak``: a bounded soak run of the real service with a real Redis.

Mixed traffic (scores at several N plus event posts) from an async client at fixed
concurrency for ``--duration`` seconds. Every ``--sample`` seconds it reads the server's
resident memory (``/proc/<pid>/status``). It prints errors, throughput and RSS, and exits
non-zero on any error or when RSS grows more than ``--max-growth-mb`` between the end of
the warm-up and the end of the run.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

from training.bench_service import (
    _start_service,
    bodies_for,
    make_bundle,
    service_env,
    stop_service,
)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


async def _drive(url: str, bodies: list[bytes], concurrency: int, seconds: float,
                 pid: int, sample: float, warmup: float) -> dict[str, Any]:  # fmt: skip
    stats: dict[str, Any] = {"ok": 0, "errors": 0, "events": 0, "statuses": {}, "rss": []}
    stop = time.perf_counter() + seconds
    start = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def worker(k: int) -> None:
            i = k
            while time.perf_counter() < stop:
                if i % 10 == 0:
                    ev = {"user_id": f"u{i % 2000}", "event_id": f"soak-{k}-{i}",
                          "item_id": f"i{i % 1200}", "features": {"cate_id": "c1"},
                          "type": "click", "timestamp": time.time()}  # fmt: skip
                    r = await client.post("/v1/events", content=orjson.dumps(ev))
                    stats["events"] += 1
                    good = r.status_code == 202
                else:
                    r = await client.post("/v1/score", content=bodies[i % len(bodies)])
                    good = r.status_code == 200
                stats["ok" if good else "errors"] += 1
                stats["statuses"][r.status_code] = stats["statuses"].get(r.status_code, 0) + 1
                i += concurrency

        async def sampler() -> None:
            while time.perf_counter() < stop:
                stats["rss"].append((time.perf_counter() - start, rss_mb(pid)))
                await asyncio.sleep(sample)
            stats["rss"].append((time.perf_counter() - start, rss_mb(pid)))

        await asyncio.gather(sampler(), *(worker(k) for k in range(concurrency)))
    stats["elapsed"] = time.perf_counter() - start
    return stats


def run(duration: float, concurrency: int, sample: float, warmup: float, max_growth: float,
        redis_url: str, port: int, threads: int) -> int:  # fmt: skip
    from service.loader import load_into_redis

    with tempfile.TemporaryDirectory() as tmp:
        config, frame = make_bundle("din", Path(tmp), 50)
        load_into_redis(config, frame, redis_url, progress=False)
        bodies = []
        for n in (50, 200, 500, 1000):
            bodies += bodies_for(frame, n, count=16, seed=n)
        env = service_env(Path(tmp), config.name, redis_url, threads)
        proc, url = _start_service(env, port)
        try:
            stats = asyncio.run(
                _drive(url, bodies, concurrency, duration, proc.pid, sample, warmup)
            )
        finally:
            stop_service(proc)
    rss = np.array(stats["rss"])
    after_warm = rss[rss[:, 0] >= warmup]
    base = after_warm[0, 1] if len(after_warm) else rss[0, 1]
    end = rss[-1, 1]
    growth = end - base
    total = stats["ok"] + stats["errors"]
    print(f"soak: {duration:.0f} s, concurrency {concurrency}, {total} requests "
          f"({stats['events']} events), {total / stats['elapsed']:.1f} req/s")  # fmt: skip
    print(f"statuses: {stats['statuses']}  errors: {stats['errors']}")
    print(f"server RSS MB: start {rss[0, 1]:.1f}, after {warmup:.0f} s warm-up {base:.1f}, "
          f"end {end:.1f}, max {rss[:, 1].max():.1f}; growth after warm-up {growth:+.1f} MB "
          f"(bound {max_growth:.0f} MB)")  # fmt: skip
    ok = stats["errors"] == 0 and growth <= max_growth
    print("soak: PASS" if ok else "soak: FAIL")
    return 0 if ok else 1
