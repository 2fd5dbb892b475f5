"""``ctr bench``: the real service, a real Redis and loaded users, driven over HTTP.

For each model (DIN, DIEN at L=50) and N it measures, in one run:

* end-to-end p50/p99 at concurrency 1 (a minimal keep-alive HTTP/1.1 client over
  asyncio streams, precomputed bodies, so client CPU barely counts);
* requests/s and candidates/s at saturation (a sweep of client concurrency), 200
  replies only;
* the per-stage breakdown from the service's own ``/metrics`` (mean per request), and
  per window the degraded responses and service errors (a window with any is invalid);
* the model alone, loaded by the service's own ``load_model`` from the same settings
  and fed what the service builds for the same requests (users, stored histories and
  candidates): latency right before and after the service's c=1 window, and the
  requests it completes over a timed window for each count of concurrent calls the
  service allows, so the service overhead shows as a ratio. A full-history figure is
  kept apart as the worst case.

The client shares the machine with the service: on a 2-core box its CPU use is part
of what is measured, and the report says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from ctr.bundle import load_bundle
from ctr.spec import load_config
from service.runner import SplitRunner
from service.settings import Settings
from training.bench_util import (
    Feeds,
    bodies_for,  # also imported from here by training.soak and training.bench_path
    cycled_times,
    full_history_feeds,
    latency_row,
    mean_history,
    merged_feeds,
    p50_p99,
    redis_reader,
    request_feeds,
    run_loop,
    timed_rate,
    uvloop_module,
)
from training.bench_writes import UserWrites

if TYPE_CHECKING:
    from service.model import LoadedModel

ROOT = Path(__file__).resolve().parents[1]
BODIES = 64  # request bodies cycled over per N (each a loaded user and N candidates)
REPS = 128  # model-only calls per latency figure (two passes over the bodies)
# how long before a request's send time the open-loop client stops sleeping and watches
# the clock: asyncio rounds a timer's wait up to whole ms, so a plain sleep sends late
SEND_SPIN_S = 0.0015


def make_bundle(
    model_type: str, models_dir: Path, length: int, overrides: dict[str, Any] | None = None
) -> tuple[Any, Any]:
    """A bundle with random weights (latency does not depend on them) and a real mapping."""
    import torch

    from training.data import load_frame
    from training.dataset import prepare
    from training.export import export_bundle
    from training.models import build_model

    cfg = "synthetic_dien.yaml" if model_type == "dien" else "synthetic_din.yaml"
    config = load_config(
        ROOT / "configs" / cfg,
        {
            "name": f"bench-{model_type}",
            "model.type": model_type,
            "max_seq_len": length,
            **(overrides or {}),
        },
    )
    frame = load_frame(config)
    prep = prepare(config, frame)
    torch.manual_seed(0)
    model = build_model(config, prep.mapper.table_sizes()).eval()
    export_bundle(model, config, prep.mapper, {}, models_dir)
    return config, frame


def _samples(text: str, metrics: tuple[str, ...]) -> Iterator[Any]:
    """The samples of the metric families ``metrics`` in a /metrics scrape
    (prometheus_client's own parser)."""
    for family in text_string_to_metric_families(text):
        if family.name in metrics:
            yield from family.samples


def _sums(text: str, metric: str, label: str) -> dict[tuple[str, str], float]:
    """``{(label value, "sum"|"count"): value}`` of histogram ``metric``."""
    out: dict[tuple[str, str], float] = {}
    for sample in _samples(text, (metric,)):
        for kind in ("sum", "count"):
            if sample.name == f"{metric}_{kind}":
                key = (sample.labels.get(label, ""), kind)
                out[key] = out.get(key, 0.0) + sample.value
    return out


STAGES = ("parse", "redis_fetch", "feature_mapping", "inference", "serialization", "write")


def stage_means(before: str, after: str) -> dict[str, float]:
    """Mean seconds per request of each stage between two /metrics scrapes."""
    a = _sums(before, "ctr_stage_duration_seconds", "stage")
    b = _sums(after, "ctr_stage_duration_seconds", "stage")
    res = {}
    for stage in STAGES:
        n = b.get((stage, "count"), 0) - a.get((stage, "count"), 0)
        total = b.get((stage, "sum"), 0) - a.get((stage, "sum"), 0)
        res[stage] = total / n if n else float("nan")
    return res


def _counter(text: str, metric: str) -> dict[str, float]:
    """``{labels as text: value}`` of counter ``metric`` (its ``_total`` samples)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if metric in (family.name, family.name + "_total"):
            for smp in family.samples:
                if smp.name == metric:
                    key = ",".join(f"{k}={v}" for k, v in sorted(smp.labels.items()))
                    out[key] = out.get(key, 0.0) + smp.value
    return out


def user_rows_between(before: str, after: str) -> dict[str, float]:
    """Scoring requests by where the user's rows came from (``ctr_user_rows_total``:
    tracked, read, degraded) between two /metrics scrapes."""
    r0, r1 = _counter(before, "ctr_user_rows_total"), _counter(after, "ctr_user_rows_total")
    return {k.removeprefix("source="): v - r0.get(k, 0.0) for k, v in r1.items()}


def window_counts(before: str, after: str) -> dict[str, Any]:
    """Degraded responses (``ctr_degraded_responses_total``), service errors
    (``ctr_errors_total``, in all and by kind), graph calls run on the event loop
    thread (``ctr_inline_runs_total``, ``CTR_INLINE_MAX_MS``) and requests by where the
    user's rows came from (``ctr_user_rows_total``: tracked, read, degraded) between two
    /metrics scrapes."""

    def diff(metric: str) -> float:
        return sum(_counter(after, metric).values()) - sum(_counter(before, metric).values())

    e0, e1 = _counter(before, "ctr_errors_total"), _counter(after, "ctr_errors_total")
    kinds = {k: v - e0.get(k, 0.0) for k, v in e1.items() if v - e0.get(k, 0.0) > 0}
    return {"degraded": diff("ctr_degraded_responses_total"),
            "service_errors": sum(kinds.values()), "errors_by_kind": kinds,
            "inline_calls": diff("ctr_inline_runs_total"),
            "user_rows": user_rows_between(before, after)}  # fmt: skip


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


def gc_pauses(before: str, after: str) -> dict[str, float]:
    """The service's GC pauses between two /metrics scrapes (``ctr_gc_pause_seconds``,
    all generations): how many, and their total in ms."""

    def totals(text: str) -> tuple[float, float]:
        sums = _sums(text, "ctr_gc_pause_seconds", "generation")
        count = sum(v for (_, kind), v in sums.items() if kind == "count")
        return count, sum(v for (_, kind), v in sums.items() if kind == "sum")

    (c0, s0), (c1, s1) = totals(before), totals(after)
    return {"count": c1 - c0, "total_ms": (s1 - s0) * 1000}


def slow_counts(before: str, after: str, over: float = 0.03) -> dict[str, float]:
    """How many observations took longer than ``over`` seconds between two /metrics
    scrapes, per scoring stage and for whole requests as the service timed them: where a
    tail comes from (a stage, or outside the handler if none of them shows it)."""

    def above(text: str) -> dict[str, float]:
        out: dict[str, float] = {}
        names = ("ctr_stage_duration_seconds", "ctr_request_duration_seconds")
        for smp in _samples(text, names):
            key = smp.labels.get("stage") or f"request {smp.labels.get('route', '')}"
            if smp.name.endswith("_count"):
                out[key] = out.get(key, 0.0) + smp.value
            elif smp.name.endswith("_bucket") and float(smp.labels["le"]) == over:
                out[key] = out.get(key, 0.0) - smp.value
        return out

    a, b = above(before), above(after)
    return {k: v - a.get(k, 0.0) for k, v in b.items() if v - a.get(k, 0.0) > 0}


Before = Callable[[int], Awaitable[None]]


async def _closed_loop(
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
    """:func:`_closed_loop`'s run: every client connected before the clock starts;
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
    """One closed-loop window (:func:`_closed_loop`); with ``mix``, the scored users'
    writes before a share of its requests, and ``writes_per_req`` in the result."""

    async def go() -> dict:
        async with mix if mix is not None else contextlib.nullcontext():
            before = mix.before if mix is not None else None
            r = await _closed_loop(url, bodies, concurrency, seconds, before)
        if mix is not None:
            r["writes_per_req"] = mix.written / max(1, r["requests"])
        return r

    return run_loop(go())


async def _open_loop(
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


def service_env(
    models_dir: Path,
    name: str,
    redis_url: str,
    threads: int,
    inflight: int = 1,
    extra_env: dict[str, str] | None = None,
) -> dict[str, str]:
    """The environment ``ctr serve`` gets from the benchmark: this process's, the
    benchmark's settings, then ``extra_env`` (``--env``), which wins. The model-only
    baseline reads its settings from the same dict (:func:`load_baseline`)."""
    env = dict(
        os.environ,
        CTR_MODELS_DIR=str(models_dir),
        CTR_MODEL_NAME=name,
        CTR_REDIS_URL=redis_url,
        CTR_INTRA_OP_THREADS=str(threads),
        CTR_INFERENCE_CONCURRENCY=str(inflight),
        CTR_LOG_LEVEL="warning",
        CTR_REDIS_TIMEOUT_MS="1000",
        CTR_REQUEST_TIMEOUT_MS="10000",
        CTR_MAX_IN_FLIGHT="1024",
    )
    env.update(extra_env or {})  # --env wins over the defaults above
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


class ServiceStartFailed(OSError):
    """The benchmark's service did not come up (it exited, another process answers on
    its port, or it never got ready): ``ctr`` prints it as one line, status 2."""


def ports_free(*ports: int) -> None:
    """:class:`ctr.demo.PortInUse` where a benchmark's port is held, checked before its
    bundle is built and Redis loaded (the service found it taken only after both)."""
    from ctr.demo import PortInUse, port_taken

    for port in ports:
        if port_taken("127.0.0.1", port):
            raise PortInUse(f"port {port} is in use (an earlier service?): stop it or pass --port")


def _start_service(env: dict[str, str], port: int, root: Path | None = None) -> Any:
    """``ctr serve`` in a subprocess with ``env`` (:func:`service_env`, the one the
    baseline is loaded from); ``(process, base URL)`` once ``/readyz`` answers 200 from
    that process or one of its workers, never from a service an earlier run left on the
    port (:class:`ServiceStartFailed`). ``root``: the checkout whose code serves (default: this
    one; another commit's work tree, to compare code with code)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ctr.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=root or ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1800):
            if proc.poll() is not None:
                raise ServiceStartFailed(f"the service exited with code {proc.returncode} "
                                         "during start-up (its log is above)")  # fmt: skip
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    pid = served_model(url, ("worker_pid",))["worker_pid"]
                    stat = _stat(pid) if isinstance(pid, int) else None
                    if pid != proc.pid and (stat is None or int(stat[1]) != proc.pid):
                        raise ServiceStartFailed(
                            f"{url} answers from process {pid}, not from the service just "
                            f"started ({proc.pid}): is an earlier service still on that port?"
                        )
                    return proc, url
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise ServiceStartFailed(f"the service on {url} did not become ready")
    except BaseException:
        # also a SIGTERM or Ctrl-C of this process alone while the service starts: the
        # caller holds no handle to it yet, and it would stay on the port, orphaned
        stop_service(proc)
        raise


def stop_service(proc: subprocess.Popen) -> None:
    """Stop a service :func:`_start_service` started: SIGTERM (a graceful shutdown), and
    SIGKILL if it has not ended 30 s later."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Baseline:
    """The model alone as the service loads it: :func:`service.model.load_model` with the
    settings the service reads from the same environment (provider, graph and its parity
    fallback, threads, spinning, the one-thread session for small calls, precision), one
    loaded model per uvicorn worker, timed through its runner."""

    settings: Settings
    models: list[LoadedModel]

    @property
    def model(self) -> LoadedModel:
        return self.models[0]

    def run(self, stream: int, feeds: Feeds) -> list[np.ndarray]:
        """One graph call on stream ``stream``'s worker model (no ``explain``)."""
        return self.models[stream % len(self.models)].run(feeds, False)

    def side_by_side(self, n: int) -> int:
        """Calls of ``n`` candidates the service's native runner runs at once on its
        one-thread session (``CTR_NATIVE_PARALLEL_CALLS``; 1: none side by side)."""
        native = self.model.native
        if native is None or native.route(n, busy=True)[1] != 1:  # not side by side
            return 1
        return native.parallel * len(self.models)

    def run_single(self, stream: int, feeds: Feeds) -> list[np.ndarray]:
        """One call on the one-thread session of stream ``stream``'s worker model."""
        runner = self.models[stream % len(self.models)].runner
        assert isinstance(runner, SplitRunner)
        return runner.single.run(feeds, ["probs"])

    def describe(self) -> dict[str, Any]:
        """What the baseline serves: graph, runner, provider, precision."""
        m = self.model
        return {"graph": m.graph, "graph_note": m.graph_note, "runner": m.runner.kind,
                "provider": m.provider, "precision": m.precision,
                "single_thread_max_candidates": m.single_thread_max,
                "workers": len(self.models)}  # fmt: skip


def baseline_settings(env: dict[str, str]) -> Settings:
    """:class:`service.settings.Settings` from an environment dict, as ``ctr serve`` reads
    it from its own (``CTR_*`` keys; unknown ones are ignored)."""
    keys = {k[4:].lower(): v for k, v in env.items() if k.startswith("CTR_")}
    return Settings(**keys)  # type: ignore[arg-type]


def load_baseline(env: dict[str, str]) -> Baseline:
    """:class:`Baseline` for the service started with ``env`` (:func:`service_env`)."""
    from service.model import load_model

    settings = baseline_settings(env)
    return Baseline(settings, [load_model(settings) for _ in range(settings.workers)])


def baseline_feeds(base: Baseline, bodies: list[bytes], redis_url: str) -> list[Feeds]:
    """The feeds the service builds for ``bodies`` (same users, stored histories and
    candidates), read from the loaded Redis by the service's own store and encoding code."""
    bundle = base.model.bundle
    read = redis_reader(redis_url, bundle.config.max_seq_len)
    return request_feeds(bundle, base.settings, bodies, read)


def baseline_latency(base: Baseline, feeds: list[Feeds], reps: int) -> dict[str, float]:
    """Latency of ``reps`` single calls through the service's runner, cycling ``feeds``."""
    return latency_row(cycled_times(lambda f: base.run(0, f), feeds, reps))


def stream_counts(base: Baseline) -> list[int]:
    """Graph calls at once that the service's settings allow, from 1 to all: per worker,
    its CUDA-graph streams or ``CTR_INFERENCE_CONCURRENCY``, times the workers (powers of
    two in between)."""
    per = base.model.streams or base.settings.inference_concurrency
    total = per * len(base.models)
    return sorted({1, total, *(2**k for k in range(total.bit_length()) if 2**k <= total)})


def batch_fits(settings: Settings, n: int) -> int:
    """Requests of ``n`` candidates one micro-batched call holds (1: batching off)."""
    users = settings.batch_max_users
    return max(1, min(users, settings.batch_max_candidates // n)) if users > 1 else 1


def baseline_rates(
    base: Baseline, feeds: list[Feeds], n: int, seconds: float
) -> dict[int, dict[str, float]]:
    """What the model alone sustains: requests completed over a timed window of
    ``seconds`` for each count of concurrent calls the service allows
    (:func:`stream_counts`); with micro-batching, calls of full batches of distinct
    users (:func:`batch_fits`)."""
    fits = batch_fits(base.settings, n)
    work = merged_feeds(feeds, fits)
    rates = {s: timed_rate(base.run, work, s, seconds, fits) for s in stream_counts(base)}
    side = base.side_by_side(n)
    if side > 1:  # and as the native runner runs larger calls: side by side, one thread each
        r = timed_rate(base.run_single, work, side, seconds, fits)
        r["one-thread session"] = True
        if side not in rates or r["rps"] > rates[side]["rps"]:
            rates[side] = r
    return rates


def model_only_row(
    base: Baseline,
    feeds: list[Feeds],
    before: dict[str, float],
    after: dict[str, float],
    reps: int,
) -> dict[str, Any]:
    """Model-only latency on the matched feeds, from the runs right ``before`` and
    ``after`` the service's c=1 window (the mean of their p50s is the baseline), the
    history lengths fed, and the full-history worst case (in no ratio)."""
    n = int(feeds[0]["user_idx"].shape[0])
    full = full_history_feeds(base.model.bundle, n)
    return {
        "p50_ms": (before["p50_ms"] + after["p50_ms"]) / 2,
        "p99_ms": max(before["p99_ms"], after["p99_ms"]),
        "samples": before["samples"] + after["samples"],
        "before": before,
        "after": after,
        "mean_hist_len": mean_history(feeds),
        "full_history": baseline_latency(base, full, reps),
    }


def sustained(mo: dict[str, Any], rates: dict[int, dict[str, float]]) -> None:
    """Put the model-alone throughput (the best measured window) into row ``mo``."""
    best = max(rates.values(), key=lambda r: r["rps"])
    mo["rates"] = rates
    mo["sustained_rps"] = best["rps"]
    mo["sustained_streams"] = best["streams"]
    mo["cpu_ms"] = rates[1]["cpu_ms"]  # CPU per request of one stream of the runner


def speed_check(single: dict[str, Any], mo: dict[str, Any], graphs: dict[str, Any]) -> str:
    """ "ok", or why the row's ratio is suspect: the service's own inference stage more
    than 10 % below the model-only p50 (the machine's speed moved between them), or the
    baseline serving another graph than the service."""
    notes = []
    inference = single["stages_ms"]["inference"]
    if inference < 0.9 * mo["p50_ms"]:
        notes.append(
            f"suspect: machine speed moved (service inference {inference:.2f} ms < 0.9 x "
            f"model-only {mo['p50_ms']:.2f} ms)"
        )
    served, base = graphs.get("service", {}).get("graph"), graphs["model_only"]["graph"]
    if served is not None and served != base:
        notes.append(f"suspect: model-only graph {base} but the service serves {served}")
    return "; ".join(notes) or "ok"


SERVED_KEYS = ("graph", "graph_note", "runner", "provider", "precision",
               "single_thread_max_candidates", "user_tracking", "gpu_copy")  # fmt: skip


def served_model(
    url: str, keys: tuple[str, ...] = SERVED_KEYS, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """What the running service serves (``/v1/models``): by default graph, runner,
    precision. With the service's key (``env``'s ``CTR_API_KEY``, else this process's),
    so that its notes read as they are, not hidden."""
    key = (os.environ if env is None else env).get("CTR_API_KEY", "").strip()
    headers = {"X-API-Key": key} if key else {}
    body = httpx.get(url + "/v1/models", timeout=10, headers=headers).json()
    return {k: body.get(k) for k in keys}


def _measured(url: str, work: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], str, str]:
    """``work()``'s result with the window's degraded responses and service errors (from
    the /metrics scrapes around it), and the two scrapes."""
    before = httpx.get(url + "/metrics").text
    res = work()
    after = httpx.get(url + "/metrics").text
    res.update(window_counts(before, after))
    return res, before, after


Mix = Callable[[], UserWrites | None]  # a window's writes (training.bench_writes), or none


def no_writes() -> None:
    return None


def service_single(
    url: str, pid: int, bodies: list[bytes], seconds: float, loop_cpu: bool, mix: Mix = no_writes
) -> dict[str, Any]:
    """The service at concurrency 1: latency, its stage breakdown, degraded responses
    and errors, and (one worker) its event loop's CPU per request. ``mix`` gives the
    window's writes."""
    cpu0 = loop_cpu_s(pid) if loop_cpu else None
    single, before, after = _measured(url, lambda: drive(url, bodies, 1, seconds, mix()))
    cpu1 = loop_cpu_s(pid) if cpu0 is not None else None
    single["stages_ms"] = {k: v * 1000 for k, v in stage_means(before, after).items()}
    if cpu0 is not None and cpu1 is not None and single["requests"]:
        single["loop_cpu_ms"] = (cpu1 - cpu0) * 1000 / single["requests"]
    return single


def service_sweep(
    url: str,
    pid: int,
    bodies: list[bytes],
    concurrency: list[int],
    seconds: float,
    mix: Mix = no_writes,
) -> dict[int, dict[str, Any]]:
    """The closed-loop sweep: per client concurrency, throughput, latency, degraded
    responses and errors, and the service's CPU per request (all its processes)."""
    sweep = {}
    for c in concurrency:
        svc0 = tree_cpu_s(pid)
        res, _, _ = _measured(url, lambda c=c: drive(url, bodies, c, seconds, mix()))
        svc1 = tree_cpu_s(pid)
        if svc0 is not None and svc1 is not None and res["requests"]:
            res["service_cpu_ms"] = (svc1 - svc0) * 1000 / res["requests"]
        sweep[c] = res
    return sweep


def service_open_loop(
    url: str, bodies: list[bytes], rates: list[float], seconds: float
) -> list[dict[str, Any]]:
    """Open-loop runs at each rate, with the service's GC pauses, slow observations,
    degraded responses and errors over each."""
    out = []
    for r in rates:
        res, before, after = _measured(
            url, lambda r=r: run_loop(_open_loop(url, bodies, r, seconds))
        )
        res["service_gc"] = gc_pauses(before, after)
        res["slow_over_30ms"] = slow_counts(before, after)
        out.append(res)
    return out


def measure_n(
    url: str,
    pid: int,
    base: Baseline,
    bodies: list[bytes],
    feeds: list[Feeds],
    plan: dict[str, Any],
) -> dict[str, Any]:
    """Everything for one model and N, in this order: the service warmed up; the model
    alone just before the service's c=1 window, that window, the model alone again (with
    writes, on the users' histories read again after the window, which its appends
    lengthened: ``mean_hist_len_before`` is the mean before); the model alone's
    throughput (on those feeds); the service's sweep; open-loop runs. ``plan``: seconds,
    concurrency, rates, reps, loop_cpu (one worker), the served graphs, and ``writes``:
    ``(redis_url, share, keep)`` of the scored users' writes in the closed-loop windows
    (:class:`training.bench_writes.UserWrites`; absent or share 0: none)."""
    seconds = plan["seconds"]
    run_loop(_closed_loop(url, bodies, 1, min(1.0, seconds)))  # warm: caches, pools
    redis_url, share, keep = plan.get("writes") or ("", 0.0, 0)

    def mix() -> UserWrites | None:
        return UserWrites(redis_url, bodies, share, keep) if share else None

    before = baseline_latency(base, feeds, plan["reps"])
    single = service_single(url, pid, bodies, seconds, plan["loop_cpu"], mix)
    hist_before = mean_history(feeds)
    if share:  # the window's writes lengthened the histories: fed as they are now
        feeds = baseline_feeds(base, bodies, base.settings.redis_url)
    after = baseline_latency(base, feeds, plan["reps"])
    mo = model_only_row(base, feeds, before, after, plan["reps"])
    mo["mean_hist_len_before"] = hist_before
    single["check"] = speed_check(single, mo, plan["graphs"])
    sustained(mo, baseline_rates(base, feeds, len(feeds[0]["user_idx"]), seconds))
    sweep = service_sweep(url, pid, bodies, plan["concurrency"], seconds, mix)
    ol = service_open_loop(url, bodies, plan["rates"], seconds)
    return {"model_only": mo, "single": single, "saturation": sweep, "open_loop": ol}


def loop_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) of process ``pid``'s main thread, where uvicorn's event
    loop runs with one worker; None where /proc cannot tell. Per request, it is what caps
    one worker: at most 1 / (loop CPU per request) requests/s, whatever the device."""
    try:
        with open(f"/proc/{pid}/task/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _tree_stats(pid: int) -> list[list[str]] | None:
    """``/proc/PID/stat`` fields (from the third on) of process ``pid`` and its
    descendants (uvicorn's workers); None where /proc cannot tell."""
    stats = {int(d): st for d in os.listdir("/proc") if d.isdigit() and (st := _stat(int(d)))}
    if pid not in stats:
        return None
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, st in stats.items() if int(st[1]) == parent and p not in tree]
        tree.update(kids)
        frontier += kids
    return [stats[p] for p in tree]


def tree_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) of process ``pid`` and its descendants
    (uvicorn's workers), the reaped ones included: the whole service; None where /proc
    cannot tell."""
    stats = _tree_stats(pid)
    if stats is None:
        return None
    # utime, stime, cutime, cstime (fields 14-17 of /proc/PID/stat)
    ticks = sum(sum(int(v) for v in st[11:15]) for st in stats)
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_rss_mb(pid: int) -> float | None:
    """Resident memory (MB) of process ``pid`` and its descendants; None where /proc
    cannot tell."""
    stats = _tree_stats(pid)
    if stats is None:
        return None
    # rss in pages: field 24 of /proc/PID/stat
    return sum(int(st[21]) for st in stats) * os.sysconf("SC_PAGE_SIZE") / 1e6


def _device(env: dict[str, str]) -> str:
    # the kernel release says which sandbox a lent machine ran in (gVisor reports 4.4.0,
    # and its syscalls, the event loop's included, cost far more than a VM's)
    cpu = f"{os.cpu_count()} CPU cores, Linux {platform.release()}"
    if env.get("CTR_PROVIDER") != "cuda":
        return f"CPU ({cpu})"
    try:
        gpu = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        gpu = "unknown GPU"
    return f"{gpu} (CUDA EP), {cpu}"


def _bundle_for(
    mt: str, models_dir: Path | None, tmp: str, overrides: dict[str, Any] | None
) -> tuple[Path, Any, Any]:
    """Where the bundle ``mt`` is, its config and its data frame (built when no
    ``models_dir``)."""
    from training.data import load_frame

    if models_dir is not None:
        config = load_bundle(models_dir, mt).config
        return models_dir, config, load_frame(config)
    config, frame = make_bundle(mt, Path(tmp), 50, overrides)
    return Path(tmp), config, frame


def run(
    models: list[str],
    n_values: list[int],
    concurrency: list[int],
    seconds: float,
    threads: int,
    redis_url: str,
    port: int,
    overrides: dict[str, Any] | None = None,
    inflight: int = 1,
    env: dict[str, str] | None = None,
    models_dir: Path | None = None,
    rates: list[float] | None = None,
    writes: float = 0.0,
) -> dict[str, Any]:
    """``inflight``: the service's ``CTR_INFERENCE_CONCURRENCY`` (ORT runs in flight).
    ``writes``: the share of closed-loop requests before which the client appends a
    behaviour to the request's user in Redis (:mod:`training.bench_writes`).
    ``env``: more ``CTR_*`` settings for the service (e.g. ``CTR_PROVIDER=cuda``); the
    model-only baseline is loaded by the service's own loader from the same settings.
    ``models_dir``: score existing bundles, named by ``models``, instead of building.
    ``rates``: also drive each N open-loop at these request rates (req/s)."""
    from service.loader import load_bench_db

    env = env or {}
    results: dict[str, Any] = {
        "threads": threads,
        "inflight": inflight,
        "env": env,
        "device": _device(env),
        "client_loop": "asyncio" if uvloop_module() is None else "uvloop",
        "seconds": seconds,
        "bodies": BODIES,
        "writes": writes,
        "models": {},
    }
    ports_free(port)
    with tempfile.TemporaryDirectory() as tmp:
        for mt in models:
            where, config, frame = _bundle_for(mt, models_dir, tmp, overrides)
            load_bench_db(config, frame, redis_url)
            svc_env = service_env(where, config.name, redis_url, threads, inflight, env)
            base = load_baseline(svc_env)
            proc, url = _start_service(svc_env, port)
            try:
                graphs = {"service": served_model(url, env=svc_env),
                          "model_only": base.describe()}  # fmt: skip
                plan = {"seconds": seconds, "concurrency": concurrency, "rates": rates or [],
                        "reps": REPS, "loop_cpu": _workers(results) == 1,
                        "writes": (redis_url, writes, config.max_seq_len)}  # fmt: skip
                results["models"][mt] = _measure_model(
                    mt, url, proc.pid, base, frame, n_values, {**plan, "graphs": graphs}
                )
                results["models"][mt]["L"] = config.max_seq_len
            finally:
                stop_service(proc)
    return results


def _measure_model(
    mt: str,
    url: str,
    pid: int,
    base: Baseline,
    frame: Any,
    n_values: list[int],
    plan: dict[str, Any],
) -> dict[str, Any]:
    """:func:`measure_n` for each N, gathered per table."""
    per_model: dict[str, Any] = {"graphs": plan["graphs"], "model_only": {}, "single": {},
                                 "saturation": {}, "open_loop": {}}  # fmt: skip
    for n in n_values:
        bodies = bodies_for(frame, n, BODIES)
        feeds = baseline_feeds(base, bodies, base.settings.redis_url)
        got = measure_n(url, pid, base, bodies, feeds, plan)
        for key, value in got.items():
            per_model[key][n] = value
        single, mo = got["single"], got["model_only"]
        best = max(got["saturation"].values(), key=lambda r: r["ok_rps"])
        print(
            f"[bench] {mt} N={n}: p50 {single['p50_ms']:.2f} ms (model {mo['p50_ms']:.2f}, "
            f"history {mo['mean_hist_len']:.1f}), best {best['ok_rps']:.0f} req/s (model "
            f"{mo['sustained_rps']:.0f}), {single['check']}",
            flush=True,
        )
    return per_model


def _workers(res: dict[str, Any]) -> int:
    return int(res.get("env", {}).get("CTR_WORKERS", os.environ.get("CTR_WORKERS", "1")))


def _workers_text(res: dict[str, Any]) -> str:
    w = _workers(res)
    return "1 uvicorn worker" if w == 1 else f"{w} uvicorn workers (loop CPU: not measured)"


def invalid(row: dict[str, Any]) -> str:
    """ "invalid: ..." when a measured window had non-200 replies, degraded responses or
    service errors (such a row never meets a target); "" otherwise."""
    parts = [
        f"{row[key]:.0f} {label}"
        for key, label in (
            ("degraded", "degraded"),
            ("service_errors", "errors"),
            ("errors", "non-200"),
        )  # fmt: skip
        if row.get(key)
    ]
    return "invalid: " + ", ".join(parts) if parts else ""


def verdict(row: dict[str, Any], met: bool) -> str:
    """The ``met`` cell: "invalid: ..." (:func:`invalid`), else yes / no."""
    return invalid(row) or ("yes" if met else "no")


def _p99(row: dict[str, Any], samples_key: str = "requests") -> str:
    """p99 with its sample count; "<1,000" marks a rough one."""
    count = int(row[samples_key])
    rough = ", <1,000" if count < 1000 else ""
    return f"{row['p99_ms']:.2f} (n={count}{rough})"


def _counts(row: dict[str, Any]) -> str:
    """non-200 | degraded | service errors cells."""
    return f"{row['errors']} | {row.get('degraded', 0):.0f} | {row.get('service_errors', 0):.0f}"


def _sweep_totals(sweep: dict[Any, dict[str, Any]]) -> dict[str, float]:
    """Non-200 replies, degraded responses and service errors over a whole sweep."""
    keys = ("errors", "degraded", "service_errors")
    return {k: sum(v.get(k, 0) for v in sweep.values()) for k in keys}


def _graph_text(res: dict[str, Any]) -> str:
    """Which graph and runner each model's service and baseline served."""
    out = []
    for mt, r in res["models"].items():
        g = r.get("graphs", {})
        svc, mo = g.get("service", {}), g.get("model_only", {})
        out.append(
            f"{mt}: service {svc.get('graph', '?')} graph ({svc.get('runner', '?')}), "
            f"model-only {mo.get('graph', '?')} graph ({mo.get('runner', '?')})"
        )
    return "; ".join(out)


def _tracking_text(res: dict[str, Any]) -> str:
    """Whether the service skipped the user's Redis read (``CTR_USER_TRACKING``)."""
    states = set()
    for r in res["models"].values():
        t = r.get("graphs", {}).get("service", {}).get("user_tracking") or {}
        states.add("on" if t.get("enabled") else f"off ({t.get('why_not') or 'unknown'})")
    share = res.get("writes", 0.0)
    written = (
        f"before {share:.0%} of the closed-loop requests the client appends a behaviour to "
        "that request's user in Redis (the service's append script, not timed; `--writes`)"
    )
    if states == {"on"}:
        return "user-row tracking on (CTR_USER_TRACKING): " + (
            f"{written}, and such a request reads; the others read nothing from Redis"
            if share
            else "nothing is written meanwhile, so a user's repeat request reads nothing from Redis"
        )
    text = "user-row tracking " + ", ".join(sorted(states)) + ": every request reads Redis"
    return text + (f"; {written}" if share else "")


WRITES_BASELINE = (
    " With writes, the model alone after each c=1 window and its throughput are timed on "
    "the histories read again after that window (its appends lengthen them); the table's "
    "mean history is theirs, the one before the window in the JSON "
    "(`mean_hist_len_before`). Until session 32 both were timed on the histories read "
    "before the first window, shorter than the ones the service scored."
)


def _lengths(res: dict[str, Any]) -> str:
    """The models' history length L (each bundle's ``max_seq_len``: ``--set`` or an
    existing bundle's own, not always 50)."""
    found = sorted({int(m["L"]) for m in res["models"].values() if "L" in m})
    return ", ".join(map(str, found)) if found else "50"


def _header(res: dict[str, Any], command: str) -> list[str]:
    t, k = res["threads"], res.get("inflight", 1)
    env_text = " ".join(f"{a}={b}" for a, b in res.get("env", {}).items())
    bodies = res.get("bodies", BODIES)
    return [
        f"Command: `{command}`",
        "",
        f"{res.get('device', f'CPU ({os.cpu_count()} cores)')}, {_workers_text(res)}, ORT "
        f"intra-op threads={t} per worker, {k} ORT run(s) in flight, L={_lengths(res)}; the "
        "HTTP client runs on "
        f"the same machine ({res.get('client_loop', 'asyncio')}). The benchmark cycles "
        f"{bodies} request bodies (a loaded user "
        "each, N candidates) over the loaded users, so the service's item, row and user "
        f"caches are warm; {_tracking_text(res)}. Model-only figures: the service's own loader"
        " (`load_model`, the same CTR_* settings: threads, spinning, one-thread session for "
        "small calls, graph and its parity fallback) in the benchmark process, timed through "
        "its runner on the feeds the service builds for those same requests (same users, "
        "stored histories and candidates, encoded by the service's code; mean history length "
        "in the table), cycled; measured right before and right after each N's c=1 window "
        "(the target uses their mean)."
        + (WRITES_BASELINE if res.get("writes") else "")
        + f" Graphs: {_graph_text(res)}. A window with any "
        "non-200 reply, degraded response or service error (ctr_degraded_responses_total, "
        "ctr_errors_total over the window) is invalid, never met. Check: suspect where the "
        "service's inference stage is more than 10 % below the model-only p50 (the "
        "machine's speed moved). p99 shows its sample count; under 1,000 it is rough. "
        "Loop CPU: CPU time of the service's event-loop thread per request at "
        "concurrency 1, where an idle worker runs the graph call on that thread "
        "(CTR_INLINE_MAX_MS), so it includes the model's run; under load the calls go "
        "to other threads."
        + (f" Service settings: {env_text}." if env_text else ""),
    ]


def _latency_table(res: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "| model | N | mean history | e2e p50 ms | e2e p99 ms | model-only p50 ms (before / "
        "after) | target 1.2x+1 ms | met | non-200 | degraded | service errors | parse | "
        "redis | mapping | inference | serialize | write | loop CPU ms/req | check |",
        "|---|---:|---:|---:|---:|---:|---:|:-:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for mt, r in res["models"].items():
        for n, s in r["single"].items():
            mo = r["model_only"][n]
            target = 1.2 * mo["p50_ms"] + 1.0
            st = s["stages_ms"]
            lines.append(
                f"| {mt} | {n} | {mo['mean_hist_len']:.1f} | {s['p50_ms']:.2f} | {_p99(s)} | "
                f"{mo['p50_ms']:.2f} ({_before_after(mo)}) | "
                f"{target:.2f} | {verdict(s, s['p50_ms'] <= target)} | {_counts(s)} | "
                f"{st['parse']:.2f} | {st['redis_fetch']:.2f} | {st['feature_mapping']:.2f} | "
                f"{st['inference']:.2f} | {st['serialization']:.2f} | {st['write']:.2f} | "
                f"{_ms(s, 'loop_cpu_ms')} | {s.get('check', '-')} |"
            )
    return lines


def _before_after(mo: dict[str, Any]) -> str:
    return f"{mo['before']['p50_ms']:.2f} / {mo['after']['p50_ms']:.2f}"


def _worst_case_table(res: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "Worst case, in no ratio: the model alone with every user a full history of L "
        "(random IDs), against the matched feeds above:",
        "",
        "| model | N | full history: p50 ms | p99 ms | matched feeds: p50 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for mt, r in res["models"].items():
        for n, mo in r["model_only"].items():
            full = mo["full_history"]
            lines.append(
                f"| {mt} | {n} | {full['p50_ms']:.2f} | {_p99(full, 'samples')} | "
                f"{mo['p50_ms']:.2f} |"
            )
    return lines


def _saturation_table(res: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "Saturation: the best requests/s over the client-concurrency sweep, 200 replies "
        "only, vs what the model alone sustains: requests completed over a timed window of "
        f"{res.get('seconds', '?')} s through the service's runner, for each number of "
        "graph calls at once the service's settings allow (ORT runs in flight x workers, or "
        "CUDA-graph streams; full micro-batches of distinct users when batching is on; "
        "and where the native runner runs calls of this N side by side on its one-thread "
        "session, CTR_NATIVE_PARALLEL_CALLS, that many streams of it), "
        "the best of them, measured just before the sweep. Non-200, degraded and service "
        "errors: over the whole sweep. CPU ms/req at the best point: the service's "
        "processes and threads (/proc; Redis, on the same machine, is not counted), the "
        "benchmark client, and the model alone (one stream of the service's runner, "
        "this process's CPU); inline calls: the share of the best point's requests whose "
        "graph call ran on the event loop thread (CTR_INLINE_MAX_MS); rows tracked: the "
        "share whose user rows were trusted without a Redis read (CTR_USER_TRACKING):",
        "",
        "| model | N | best req/s | at concurrency | candidates/s | model alone req/s |"
        " at streams | ratio | met (>= 80 %) | non-200 | degraded | service errors |"
        " CPU ms/req: service | client | model alone | inline calls | rows tracked |",
        "|---|---:|---:|---:|---:|---:|---:|---:|:-:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mt, r in res["models"].items():
        for n, sweep in r["saturation"].items():
            c, best = max(sweep.items(), key=lambda kv: kv[1]["ok_rps"])
            mo = r["model_only"][n]
            ratio = best["ok_rps"] / mo["sustained_rps"]
            totals = _sweep_totals(sweep)
            lines.append(
                f"| {mt} | {n} | {best['ok_rps']:.0f} | {c} | {best['ok_rps'] * n:,.0f} | "
                f"{mo['sustained_rps']:.0f} | {mo['sustained_streams']} | {ratio:.1%} | "
                f"{verdict(totals, ratio >= 0.8)} | {_counts(totals)} | "
                f"{_ms(best, 'service_cpu_ms')} | {_ms(best, 'client_cpu_ms')} | "
                f"{_ms(mo, 'cpu_ms')} | {_share(best)} | {_tracked(best)} |"
            )
    return lines


def _share(run: dict[str, Any]) -> str:
    """Inline graph calls as a share of the window's requests."""
    calls, requests = run.get("inline_calls"), run.get("requests")
    return "–" if calls is None or not requests else f"{calls / requests:.0%}"


def _tracked(run: dict[str, Any]) -> str:
    """The share of the window's requests whose user rows needed no Redis read."""
    rows = run.get("user_rows") or {}
    total = sum(rows.values())
    return "–" if not total else f"{rows.get('tracked', 0.0) / total:.0%}"


def _sweep_table(res: dict[str, Any]) -> list[str]:
    cs = _concurrencies(res)
    lines = [
        "",
        "Every point of the sweep (200 replies/s, then end-to-end p50 / p99 in ms, the p99's "
        "sample count; invalid windows say why):",
        "",
        "| model | N | " + " | ".join(f"c={c}" for c in cs) + " |",
        "|---|---:|" + "---:|" * len(cs),
    ]
    for mt, r in res["models"].items():
        for n, sweep in r["saturation"].items():
            cells = [_sweep_cell(sweep[c]) if c in sweep else "" for c in cs]
            lines.append(f"| {mt} | {n} | " + " | ".join(cells) + " |")
    return lines


def _sweep_cell(w: dict[str, Any]) -> str:
    why = invalid(w)
    return f"{w['ok_rps']:.0f} ({w['p50_ms']:.2f} / {_p99(w)})" + (f" {why}" if why else "")


def _open_loop_table(res: dict[str, Any]) -> list[str]:
    if not any(r.get("open_loop", {}).get(n) for r in res["models"].values() for n in r["single"]):
        return []
    lines = [
        "",
        "Open loop: requests sent at a fixed rate over a pool of warm connections (the "
        f"client watches the clock for the last {SEND_SPIN_S * 1000:g} ms before each send "
        "time, as the event loop's timers wake up to 1 ms late); latency from each "
        "request's scheduled send time (any client lag counts against the service), and "
        "from its actual send:",
        "",
        "| model | N | offered req/s | achieved req/s | p50 ms | p99 ms |"
        " from send: p50 | p99 | non-200 | degraded | service errors |"
        " service GC pauses (n, total ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mt, r in res["models"].items():
        for n, runs in r.get("open_loop", {}).items():
            for o in runs:
                lines.append(
                    f"| {mt} | {n} | {o['rate']:.0f} | {o['rps']:.0f} | {o['p50_ms']:.2f} | "
                    f"{_p99(o)} | {o['sent_p50_ms']:.2f} | {o['sent_p99_ms']:.2f} | "
                    f"{_counts(o)} | {_gc_cell(o)} |"
                )
    return lines


def render(res: dict[str, Any], command: str) -> str:
    """The report: the latency table, the full-history worst case, saturation, every
    sweep point and the open-loop runs."""
    lines = _header(res, command) + _latency_table(res) + _worst_case_table(res)
    lines += _saturation_table(res) + _sweep_table(res) + _open_loop_table(res)
    return "\n".join(lines)


def _ms(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.2f}" if key in row else "-"


def _gc_cell(run: dict[str, Any]) -> str:
    g = run.get("service_gc")
    return "-" if g is None else f"{g['count']:.0f}, {g['total_ms']:.1f}"


def _concurrencies(res: dict[str, Any]) -> list[Any]:
    seen: list[Any] = []
    for r in res["models"].values():
        for sweep in r["saturation"].values():
            seen += [c for c in sweep if c not in seen]
    return seen


def plot(res: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for mt, r in res["models"].items():
        ns = list(r["single"])
        ax.plot(ns, [r["single"][n]["p50_ms"] for n in ns], "o-", label=f"{mt} service p50")
        ax.plot(ns, [r["single"][n]["p99_ms"] for n in ns], "x:", label=f"{mt} service p99")
        ax.plot(ns, [r["model_only"][n]["p50_ms"] for n in ns], "s--", label=f"{mt} model p50")
    ax.set_xlabel("candidates per request (N)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Latency vs N (concurrency 1)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    p1 = out_dir / "latency_vs_n.png"
    fig.tight_layout()
    fig.savefig(p1, dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for mt, r in res["models"].items():
        for n, sweep in r["saturation"].items():
            cs = list(sweep)
            ax.plot(cs, [sweep[c]["ok_rps"] for c in cs], "o-", label=f"{mt} N={n}")
    ax.set_xlabel("client concurrency")
    ax.set_ylabel("requests / s")
    ax.set_title("Throughput vs concurrency")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    p2 = out_dir / "throughput_vs_concurrency.png"
    fig.tight_layout()
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [p1, p2]
