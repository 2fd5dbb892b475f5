"""``ctr bench``'s load generators: a minimal keep-alive HTTP/1.1 client, the
closed-loop and open-loop drivers built on it, and the client's garbage collection held
off while they measure."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Awaitable, Callable, Iterator

import numpy as np

from training.bench_util import p50_p99, run_loop
from training.bench_writes import UserWrites

# how long before a request's send time the open-loop client stops sleeping and watches
# the clock: asyncio rounds a timer's wait up to whole ms, so a plain sleep sends late
SEND_SPIN_S = 0.0015


class RawClient:
    """A minimal keep-alive HTTP/1.1 client (a few µs per request), so the client's own
    CPU time on this shared machine stays out of the service's latency."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def post(self, path: str, body: bytes) -> int:
        await self.connect()
        assert self.reader is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readline()
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await self.reader.readexactly(length)
        return int(status_line.split()[1])

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@contextlib.contextmanager
def client_gc_off() -> Iterator[None]:
    """No garbage collection in the load generator while it measures.

    The client's latencies run from send (or scheduled send) to reply, so a collection in
    the client's own heap (pandas, ORT and the bench's model-only session live there)
    would count its pause against the service: 150-250 ms p99 stalls on the H100 runs
    came from there. Everything alive is frozen first; the run's own garbage waits for
    the collection after it."""
    enabled, frozen = gc.isenabled(), gc.get_freeze_count() > 0
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        if not frozen:  # leave a caller's own freeze alone
            gc.unfreeze()
        if enabled:
            gc.enable()


Before = Callable[[int], Awaitable[None]]


async def closed_loop(
    url: str, bodies: list[bytes], concurrency: int, seconds: float, before: Before | None = None
) -> dict:
    """``concurrency`` clients, each sending back-to-back for ``seconds``; ``before(i)``,
    when given, is awaited before each request for ``bodies[i % len(bodies)]`` and is not
    part of its measured time (:mod:`training.bench_writes`)."""
    with client_gc_off():
        return await _closed_loop_run(url, bodies, concurrency, seconds, before)


async def _closed_loop_run(
    url: str, bodies: list[bytes], concurrency: int, seconds: float, before: Before | None = None
) -> dict:
    """:func:`closed_loop`'s run: every client connected before the clock starts;
    ``ok_rps`` counts 200 replies only."""
    lat: list[float] = []
    errors = 0
    host, port = url.split("//")[1].split(":")
    clients = [RawClient(host, int(port)) for _ in range(concurrency)]
    for c in clients:
        await c.connect()  # connection set-up stays out of the measurement
    stop = time.perf_counter() + seconds

    async def worker(k: int) -> None:
        nonlocal errors
        i = k
        client = clients[k]
        while time.perf_counter() < stop:
            if before is not None:
                await before(i)
            t = time.perf_counter()
            status = await client.post("/v1/score", bodies[i % len(bodies)])
            lat.append(time.perf_counter() - t)
            errors += status != 200
            i += concurrency

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    for c in clients:
        await c.close()
    p50, p99 = p50_p99(np.array(lat) * 1000)
    return {"requests": len(lat), "errors": errors, "rps": len(lat) / elapsed,
            "ok_rps": (len(lat) - errors) / elapsed, "p50_ms": p50, "p99_ms": p99,
            "client_cpu_ms": cpu * 1000 / max(1, len(lat))}  # fmt: skip


def drive(
    url: str, bodies: list[bytes], concurrency: int, seconds: float, mix: UserWrites | None
) -> dict:
    """One closed-loop window (:func:`closed_loop`); with ``mix``, the scored users'
    writes before a share of its requests, and ``writes_per_req`` in the result."""

    async def go() -> dict:
        async with mix if mix is not None else contextlib.nullcontext():
            before = mix.before if mix is not None else None
            r = await closed_loop(url, bodies, concurrency, seconds, before)
        if mix is not None:
            r["writes_per_req"] = mix.written / max(1, r["requests"])
        return r

    return run_loop(go())


async def open_loop(
    url: str, bodies: list[bytes], rate: float, seconds: float, conns: int = 128
) -> dict:
    """Requests sent at a fixed ``rate`` (req/s) for ``seconds``, whatever the service's
    pace, over a pool of ``conns`` keep-alive connections. Latency counts from each
    request's scheduled send time, so a service that falls behind shows it in p99 rather
    than slowing the client down (no coordinated omission). Each send waits on the
    event loop's timer until ``SEND_SPIN_S`` before its time, then watches the clock:
    asyncio rounds a timer's wait up to whole milliseconds, and with a plain sleep the
    p50 from the scheduled time was 0.6-1.0 ms above the p50 from the send
    (docs/benchmarks.md, "Session 17"). The watch costs the client 0.5-1.5 ms of CPU
    per request; from about 700 req/s on it never sleeps."""
    with client_gc_off():
        return await _open_loop_run(url, bodies, rate, seconds, conns)


async def _open_loop_run(
    url: str, bodies: list[bytes], rate: float, seconds: float, conns: int
) -> dict:
    host, port = url.split("//")[1].split(":")
    pool: asyncio.LifoQueue[RawClient] = asyncio.LifoQueue()  # reuse the warmest
    clients = [RawClient(host, int(port)) for _ in range(conns)]
    for c in clients:
        await c.connect()  # connection set-up stays out of the measurement
        pool.put_nowait(c)
    lat: list[float] = []
    sent: list[float] = []
    errors = 0
    total = max(1, int(rate * seconds))
    start = time.perf_counter() + 0.05

    async def one(k: int, due: float) -> None:
        nonlocal errors
        client = await pool.get()
        t = time.perf_counter()
        try:
            status = await client.post("/v1/score", bodies[k % len(bodies)])
        finally:
            pool.put_nowait(client)
        done = time.perf_counter()
        lat.append(done - due)
        sent.append(done - t)
        errors += status != 200

    tasks = []
    for k in range(total):
        due = start + k / rate
        delay = due - time.perf_counter()
        if delay > SEND_SPIN_S:  # the event loop's timers wake up to 1 ms late:
            await asyncio.sleep(delay - SEND_SPIN_S)
        while time.perf_counter() < due:  # the last stretch on the clock, yielding
            await asyncio.sleep(0)  # so that replies are still read meanwhile
        tasks.append(asyncio.create_task(one(k, due)))
    await asyncio.gather(*tasks)
    # the sends span total / rate (the k-th at k / rate, then one interval): the time
    # to the last reply alone, (total - 1) / rate plus a latency, read above the rate
    elapsed = max(time.perf_counter() - start, total / rate)
    for c in clients:
        await c.close()
    p50, p99 = p50_p99(np.array(lat) * 1000)
    s50, s99 = p50_p99(np.array(sent) * 1000)  # from the actual send (client lag excluded)
    return {"rate": rate, "requests": len(lat), "errors": errors, "rps": len(lat) / elapsed,
            "p50_ms": p50, "p99_ms": p99, "sent_p50_ms": s50, "sent_p99_ms": s99}  # fmt: skip
