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

from training.bench_server import ports_free, service_env, start_service, stop_service
from training.bench_service import make_bundle
from training.bench_util import bodies_for


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and of its child processes (uvicorn's workers where
    ``CTR_WORKERS`` > 1: the parent alone stayed flat while a worker grew); NaN once the
    process has gone."""
    total, found = 0.0, False
    for p in (pid, *_children(pid)):
        try:
            lines = Path(f"/proc/{p}/status").read_text().splitlines()
        except OSError:  # gone meanwhile
            continue
        for line in lines:
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024.0
                found = True
    return total if found else float("nan")


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (/proc/*/stat)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[1] == str(pid):
            out.append(int(stat.parent.name))
    return out


async def _drive(url: str, bodies: list[bytes], concurrency: int, seconds: float,
                 proc: Any, sample: float, warmup: float,
                 headers: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """``statuses`` counts answers by status, ``degraded`` scores among the 200s (no
    Redis read: an error here, as the locustfile counts it) and requests that got no
    answer by the exception's name (the server gone: the run ends, summarised)."""
    stats: dict[str, Any] = {"ok": 0, "errors": 0, "events": 0, "statuses": {}, "rss": [],
                             "degraded": 0}  # fmt: skip
    stop = time.perf_counter() + seconds
    start = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency)
    gone = asyncio.Event()

    def count(key: Any) -> None:
        stats["statuses"][key] = stats["statuses"].get(key, 0) + 1

    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits,
                                 headers=headers or {}) as client:  # fmt: skip

        async def worker(k: int) -> None:
            i = k
            while time.perf_counter() < stop and not gone.is_set():
                try:
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
                        if good and orjson.loads(r.content).get("degraded"):
                            stats["degraded"] += 1
                            good = False
                except httpx.HTTPError as exc:  # no answer: the server gone, or a reset
                    stats["errors"] += 1
                    count(type(exc).__name__)
                    if proc.poll() is not None:  # exited (its /proc entry stays, unreaped)
                        gone.set()
                    else:
                        await asyncio.sleep(0.05)  # a reset: no tight loop of them
                    i += concurrency
                    continue
                stats["ok" if good else "errors"] += 1
                count(r.status_code)
                i += concurrency

        async def sampler() -> None:
            while time.perf_counter() < stop and not gone.is_set():
                stats["rss"].append((time.perf_counter() - start, rss_mb(proc.pid)))
                await asyncio.sleep(sample)
            stats["rss"].append((time.perf_counter() - start, rss_mb(proc.pid)))

        await asyncio.gather(sampler(), *(worker(k) for k in range(concurrency)))
    stats["elapsed"] = time.perf_counter() - start
    stats["server_gone"] = gone.is_set()
    return stats


def run(duration: float, concurrency: int, sample: float, warmup: float, max_growth: float,
        redis_url: str, port: int, threads: int) -> int:  # fmt: skip
    from service.loader import load_bench_db

    if duration <= warmup:  # no sample after the warm-up: growth would include start-up
        raise ValueError(f"--duration {duration:g} must be longer than --warmup {warmup:g}")
    ports_free(port)  # before the bundle is built and Redis loaded
    with tempfile.TemporaryDirectory() as tmp:
        config, frame = make_bundle("din", Path(tmp), 50)
        load_bench_db(config, frame, redis_url)
        bodies = []
        for n in (50, 200, 500, 1000):
            bodies += bodies_for(frame, n, count=16, seed=n)
        env = service_env(Path(tmp), config.name, redis_url, threads)
        # the service's own key, where the environment sets one: the events need it
        key = env.get("CTR_API_KEY", "").strip()
        headers = {"X-API-Key": key} if key else {}
        proc, url = start_service(env, port)
        try:
            stats = asyncio.run(
                _drive(url, bodies, concurrency, duration, proc, sample, warmup, headers)
            )
        finally:
            stop_service(proc)
    rss = np.array([r for r in stats["rss"] if not np.isnan(r[1])] or [(0.0, float("nan"))])
    after_warm = rss[rss[:, 0] >= warmup]
    base = after_warm[0, 1] if len(after_warm) else float("nan")
    end = rss[-1, 1]
    growth = end - base
    total = stats["ok"] + stats["errors"]
    print(f"soak: {duration:.0f} s, concurrency {concurrency}, {total} requests "
          f"({stats['events']} events), {total / stats['elapsed']:.1f} req/s")  # fmt: skip
    print(f"statuses: {stats['statuses']}  errors: {stats['errors']} (of which degraded "
          f"scores: {stats['degraded']})")  # fmt: skip
    if stats["server_gone"]:
        print("the server exited during the run")
    print(f"server RSS MB (the service and its workers): start {rss[0, 1]:.1f}, after "
          f"{warmup:.0f} s warm-up {base:.1f}, end {end:.1f}, max {np.nanmax(rss[:, 1]):.1f}; "
          f"growth after warm-up {growth:+.1f} MB (bound {max_growth:.0f} MB)")  # fmt: skip
    ok = (stats["errors"] == 0 and not stats["server_gone"] and not np.isnan(growth)
          and growth <= max_growth)  # fmt: skip
    print("soak: PASS" if ok else "soak: FAIL")
    return 0 if ok else 1
