"""``ctr bench``: the real service, a real Redis and loaded users, driven over HTTP.

For each model (DIN, DIEN at L=50) and N it measures, in one run:

* end-to-end p50/p99 at concurrency 1 (a minimal keep-alive HTTP/1.1 client over
  asyncio streams, precomputed bodies, so client CPU barely counts);
* requests/s and candidates/s at saturation (a sweep of client concurrency);
* the per-stage breakdown from the service's own ``/metrics`` (mean per request);
* model-only ORT latency for the same shapes and threads, in the same process run,
  so the service overhead shows as a ratio.

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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
from prometheus_client.parser import text_string_to_metric_families

from ctr.bundle import load_bundle
from ctr.spec import load_config
from training.bench_util import p50_p99

ROOT = Path(__file__).resolve().parents[1]


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


STAGES = ("redis_fetch", "feature_mapping", "inference", "serialization")


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


async def _closed_loop(url: str, bodies: list[bytes], concurrency: int, seconds: float) -> dict:
    """``concurrency`` clients, each sending back-to-back for ``seconds``."""
    with client_gc_off():
        return await _closed_loop_run(url, bodies, concurrency, seconds)


async def _closed_loop_run(url: str, bodies: list[bytes], concurrency: int, seconds: float) -> dict:
    lat: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    host, port = url.split("//")[1].split(":")
    clients = [RawClient(host, int(port)) for _ in range(concurrency)]

    async def worker(k: int) -> None:
        nonlocal errors
        i = k
        client = clients[k]
        while time.perf_counter() < stop:
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
            "p50_ms": p50, "p99_ms": p99,
            "client_cpu_ms": cpu * 1000 / max(1, len(lat))}  # fmt: skip


async def _open_loop(
    url: str, bodies: list[bytes], rate: float, seconds: float, conns: int = 128
) -> dict:
    """Requests sent at a fixed ``rate`` (req/s) for ``seconds``, whatever the service's
    pace, over a pool of ``conns`` keep-alive connections. Latency counts from each
    request's scheduled send time, so a service that falls behind shows it in p99 rather
    than slowing the client down (no coordinated omission)."""
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
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(k, due)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    for c in clients:
        await c.close()
    p50, p99 = p50_p99(np.array(lat) * 1000)
    s50, s99 = p50_p99(np.array(sent) * 1000)  # from the actual send (client lag excluded)
    return {"rate": rate, "requests": len(lat), "errors": errors, "rps": len(lat) / elapsed,
            "p50_ms": p50, "p99_ms": p99, "sent_p50_ms": s50, "sent_p99_ms": s99}  # fmt: skip


def bodies_for(frame: Any, n: int, count: int = 64, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    users = frame["user_id"].astype(str).unique()
    items = frame["item_id"].astype(str).unique()
    out = []
    for _ in range(count):
        chosen = rng.choice(items, size=min(n, len(items)), replace=False).tolist()
        while len(chosen) < n:  # more candidates than known items: add unknown (OOV) IDs
            chosen.append(f"new-{len(chosen)}")
        body = {"user_id": str(rng.choice(users)), "candidates": [{"item_id": i} for i in chosen]}
        out.append(orjson.dumps(body))
    return out


def fused_library(bundle: Any, fused_ops: str, ops_library: str = "") -> Path | None:
    """The custom-op library when the service would serve ``bundle``'s fused graph under
    ``CTR_FUSED_OPS=fused_ops`` and ``CTR_OPS_LIBRARY=ops_library`` (so the model-only
    figures time the same graph; the service's parity check is not repeated here)."""
    from ctr import native
    from service.model import fused_wanted

    if bundle.fused is None or not fused_wanted(fused_ops, bundle):
        return None

    try:
        return native.library(ops_library or None).path
    except native.NativeError:
        return None


def model_only(
    bundle_dir: Path,
    name: str,
    n_values: list[int],
    threads: int,
    reps: int,
    streams: int = 0,
    par_seconds: float = 2.0,
    fused_ops: str = "auto",
    ops_library: str = "",
) -> dict:
    """ORT alone on the same shapes the service feeds (U=1, N candidates, full history),
    on the graph the service serves (the fused one where it would): latency of one
    stream with ``threads`` intra-op threads (ORT's defaults, spinning on), and the
    throughput of ``streams`` concurrent single-threaded runs (0 = one per core). What
    the model alone sustains is the better of the two."""
    import onnxruntime as ort

    from training.bench_util import _time, full_history_feed

    streams = streams or (os.cpu_count() or 1)
    b = load_bundle(bundle_dir, name)
    lib = fused_library(b, fused_ops, ops_library)

    def session(n_threads: int) -> Any:
        so = ort.SessionOptions()
        so.intra_op_num_threads = n_threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if lib is None:
            return ort.InferenceSession(str(b.model_path), so, providers=["CPUExecutionProvider"])
        so.register_custom_ops_library(str(lib))
        return ort.InferenceSession(b.fused_bytes(), so, providers=["CPUExecutionProvider"])

    sess = session(threads)
    narrow = session(1) if streams > 1 else None
    out = {}
    for n in n_values:
        feed = full_history_feed(b, n)
        t = _time(lambda f=feed: sess.run(["probs"], f), reps)
        par_rps = parallel_rps(narrow, feed, streams, par_seconds) if narrow else 0.0
        out[n] = model_row(t, par_rps)  # parallel: `streams` runs of 1 intra-op thread each
        # CPU per run of a one-thread session (a spinning pool would count its waits)
        out[n]["cpu_ms"] = cpu_per_run_ms(narrow or session(1), feed, max(20, reps))
    return out


def model_row(ms: np.ndarray, parallel: float) -> dict[str, float]:
    """Model-only figures from per-call times ``ms``: latency, one stream's runs/s, the
    ``parallel`` figure (concurrent streams or micro-batches) and the better of the two."""
    p50, p99 = p50_p99(ms)
    single = 1000.0 / p50
    return {"p50_ms": p50, "p99_ms": p99, "single_rps": single, "parallel_rps": parallel,
            "sustained_rps": max(single, parallel)}  # fmt: skip


def parallel_rps(sess: Any, feed: dict[str, np.ndarray], streams: int, seconds: float) -> float:
    """Runs/s of ``streams`` threads calling ``sess.run`` back to back (ORT drops the GIL)."""
    import threading

    for _ in range(3):
        sess.run(["probs"], feed)
    counts = [0] * streams
    stop = time.perf_counter() + seconds

    def loop(k: int) -> None:
        while time.perf_counter() < stop:
            sess.run(["probs"], feed)
            counts[k] += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(k,)) for k in range(streams)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return sum(counts) / (time.perf_counter() - started)


def cpu_per_run_ms(sess: Any, feed: dict[str, np.ndarray], runs: int = 200) -> float:
    """CPU ms (this process, all threads) per ``sess.run`` back to back: what the model
    alone costs the machine per request, whatever the wall time."""
    sess.run(["probs"], feed)
    cpu = time.process_time()
    for _ in range(runs):
        sess.run(["probs"], feed)
    return (time.process_time() - cpu) * 1000 / runs


def _start_service(
    models_dir: Path,
    name: str,
    redis_url: str,
    port: int,
    threads: int,
    inflight: int = 1,
    extra_env: dict[str, str] | None = None,
) -> Any:
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
    proc = subprocess.Popen(
        [sys.executable, "-m", "ctr.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(1800):
        if proc.poll() is not None:
            raise RuntimeError(f"service exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("service did not become ready")


def runner_model_only(
    models_dir: Path, name: str, n_values: list[int], env: dict[str, str], reps: int
) -> dict:
    """The model alone through the service's own loader and runner (same provider, IO
    binding, CUDA graphs and precision as ``env`` gives the service): latency of U=1
    calls, and with micro-batching on, the requests/s of full batches of
    ``CTR_BATCH_MAX_USERS`` users (what the batched model alone sustains)."""
    from service.batcher import merge_feeds
    from service.model import load_model
    from service.settings import Settings
    from training.bench_util import _time, full_history_feed

    keys = {k[4:].lower(): v for k, v in env.items() if k.startswith("CTR_")}
    settings = Settings(models_dir=str(models_dir), model_name=name, **keys)  # type: ignore[arg-type]
    model = load_model(settings)
    users = settings.batch_max_users
    out = {}
    for n in n_values:
        feed = full_history_feed(model.bundle, n)
        t = _time(lambda f=feed: model.run(f, False), reps)
        batched = 0.0
        if users > 1:
            fits = max(1, min(users, settings.batch_max_candidates // n))
            merged = merge_feeds([feed] * fits)
            tb = _time(lambda f=merged: model.run(f, False), max(10, reps // 2))
            batched = fits * 1000.0 / float(np.median(tb))
        out[n] = model_row(t, batched)  # parallel: full micro-batches, requests/s
    return out


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


def tree_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) of process ``pid`` and its descendants
    (uvicorn's workers), the reaped ones included: the whole service; None where /proc
    cannot tell."""
    stats = {int(d): st for d in os.listdir("/proc") if d.isdigit() and (st := _stat(int(d)))}
    if pid not in stats:
        return None
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, st in stats.items() if int(st[1]) == parent and p not in tree]
        tree.update(kids)
        frontier += kids
    # utime, stime, cutime, cstime (fields 14-17 of /proc/PID/stat)
    ticks = sum(sum(int(v) for v in stats[p][11:15]) for p in tree)
    return ticks / os.sysconf("SC_CLK_TCK")


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
) -> dict[str, Any]:
    """``inflight``: the service's ``CTR_INFERENCE_CONCURRENCY`` (ORT runs at once).
    ``env``: more ``CTR_*`` settings for the service (e.g. ``CTR_PROVIDER=cuda``); with
    ``CTR_PROVIDER=cuda`` the model-only figures come from the service's own runner.
    ``models_dir``: score existing bundles, named by ``models``, instead of building.
    ``rates``: also drive each N open-loop at these request rates (req/s)."""
    from service.loader import load_into_redis
    from training.data import load_frame

    env = env or {}
    results: dict[str, Any] = {
        "threads": threads,
        "inflight": inflight,
        "env": env,
        "device": _device(env),
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for mt in models:
            if models_dir is not None:
                where, config = models_dir, load_bundle(models_dir, mt).config
                frame = load_frame(config)
            else:
                where = Path(tmp)
                config, frame = make_bundle(mt, where, 50, overrides)
            load_into_redis(config, frame, redis_url, progress=False)
            if env.get("CTR_PROVIDER") == "cuda":
                mo = runner_model_only(where, config.name, n_values, env, 100)
            else:
                fused_ops = env.get("CTR_FUSED_OPS", os.environ.get("CTR_FUSED_OPS", "auto"))
                ops_lib = env.get("CTR_OPS_LIBRARY", os.environ.get("CTR_OPS_LIBRARY", ""))
                mo = model_only(where, config.name, n_values, threads, 100,
                                fused_ops=fused_ops, ops_library=ops_lib)  # fmt: skip
            proc, url = _start_service(where, config.name, redis_url, port, threads, inflight, env)
            per_model: dict[str, Any] = {
                "model_only": mo,
                "single": {},
                "saturation": {},
                "open_loop": {},
            }
            try:
                for n in n_values:
                    bodies = bodies_for(frame, n)
                    asyncio.run(_closed_loop(url, bodies, 1, 1.0))  # warm-up
                    before = httpx.get(url + "/metrics").text
                    cpu0 = loop_cpu_s(proc.pid) if _workers(results) == 1 else None
                    single = asyncio.run(_closed_loop(url, bodies, 1, seconds))
                    cpu1 = loop_cpu_s(proc.pid) if cpu0 is not None else None
                    after = httpx.get(url + "/metrics").text
                    single["stages_ms"] = {
                        k: v * 1000 for k, v in stage_means(before, after).items()
                    }
                    if cpu0 is not None and cpu1 is not None and single["requests"]:
                        single["loop_cpu_ms"] = (cpu1 - cpu0) * 1000 / single["requests"]
                    per_model["single"][n] = single
                    sweep = {}
                    for c in concurrency:
                        svc0 = tree_cpu_s(proc.pid)
                        sweep[c] = asyncio.run(_closed_loop(url, bodies, c, seconds))
                        svc1 = tree_cpu_s(proc.pid)
                        if svc0 is not None and svc1 is not None and sweep[c]["requests"]:
                            sweep[c]["service_cpu_ms"] = (svc1 - svc0) * 1000 / sweep[c]["requests"]
                    per_model["saturation"][n] = sweep
                    per_model["open_loop"][n] = []
                    for r in rates or []:
                        before = httpx.get(url + "/metrics").text
                        res = asyncio.run(_open_loop(url, bodies, r, seconds))
                        scrape = httpx.get(url + "/metrics").text
                        res["service_gc"] = gc_pauses(before, scrape)
                        res["slow_over_30ms"] = slow_counts(before, scrape)
                        per_model["open_loop"][n].append(res)
                    best = max(sweep.values(), key=lambda r: r["rps"])
                    print(
                        f"[bench] {mt} N={n}: p50 {single['p50_ms']:.2f} ms (model "
                        f"{mo[n]['p50_ms']:.2f}), best {best['rps']:.0f} req/s",
                        flush=True,
                    )
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            results["models"][mt] = per_model
    return results


def _workers(res: dict[str, Any]) -> int:
    return int(res.get("env", {}).get("CTR_WORKERS", os.environ.get("CTR_WORKERS", "1")))


def _workers_text(res: dict[str, Any]) -> str:
    w = _workers(res)
    return "1 uvicorn worker" if w == 1 else f"{w} uvicorn workers (loop CPU: not measured)"


def render(res: dict[str, Any], command: str) -> str:
    t = res["threads"]
    k = res.get("inflight", 1)
    env_text = " ".join(f"{a}={b}" for a, b in res.get("env", {}).items())
    lines = [
        f"Command: `{command}`",
        "",
        f"{res.get('device', f'CPU ({os.cpu_count()} cores)')}, {_workers_text(res)}, ORT "
        f"intra-op threads={t} per worker, {k} ORT run(s) in flight, L=50; the HTTP client runs on "
        "the same machine. Model-only figures: ORT alone in the benchmark process, same "
        "shapes. Loop CPU: CPU time of the service's event-loop thread per request at "
        "concurrency 1; 1000 / it bounds one worker's requests/s on any device."
        + (f" Service settings: {env_text}." if env_text else ""),
        "",
        "| model | N | e2e p50 ms | e2e p99 ms | model-only p50 ms | target 1.2x+1 ms |"
        " met | redis | mapping | inference | serialize | loop CPU ms/req |",
        "|---|---:|---:|---:|---:|---:|:-:|---:|---:|---:|---:|---:|",
    ]
    for mt, r in res["models"].items():
        for n, s in r["single"].items():
            mo = r["model_only"][n]["p50_ms"]
            target = 1.2 * mo + 1.0
            st = s["stages_ms"]
            lines.append(
                f"| {mt} | {n} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {mo:.2f} | "
                f"{target:.2f} | {'yes' if s['p50_ms'] <= target else 'no'} | "
                f"{st['redis_fetch']:.2f} | {st['feature_mapping']:.2f} | "
                f"{st['inference']:.2f} | {st['serialization']:.2f} | "
                + (f"{s['loop_cpu_ms']:.2f} |" if "loop_cpu_ms" in s else "- |")
            )
    lines += [
        "",
        "Saturation (best over the client-concurrency sweep) vs what the model alone "
        f"sustains: the better of one stream with {t} threads (1000 / p50) and "
        f"{os.cpu_count()} concurrent single-threaded streams. CPU ms/req at that point: "
        "the service's processes and threads (/proc; Redis, on the same machine, is not "
        "counted), the benchmark client, and one single-threaded model run alone:",
        "",
        "| model | N | best req/s | at concurrency | candidates/s | model alone: one stream |"
        " concurrent streams | ratio to the better | errors | CPU ms/req: service |"
        " client | model alone (1 thread) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mt, r in res["models"].items():
        for n, sweep in r["saturation"].items():
            c, best = max(sweep.items(), key=lambda kv: kv[1]["rps"])
            mo = r["model_only"][n]
            single = mo.get("single_rps", 1000.0 / mo["p50_ms"])
            sustained = mo.get("sustained_rps", single)
            errs = sum(v["errors"] for v in sweep.values())
            lines.append(
                f"| {mt} | {n} | {best['rps']:.0f} | {c} | {best['rps'] * n:,.0f} | "
                f"{single:.0f} | {mo.get('parallel_rps', 0.0):.0f} | "
                f"{best['rps'] / sustained:.0%} | {errs} | {_ms(best, 'service_cpu_ms')} | "
                f"{_ms(best, 'client_cpu_ms')} | {_ms(mo, 'cpu_ms')} |"
            )
    lines += [
        "",
        "Every point of the sweep (requests/s, then end-to-end p50 / p99 in ms):",
        "",
        "| model | N | " + " | ".join(f"c={c}" for c in _concurrencies(res)) + " |",
        "|---|---:|" + "---:|" * len(_concurrencies(res)),
    ]
    for mt, r in res["models"].items():
        for n, sweep in r["saturation"].items():
            cells = [
                f"{sweep[c]['rps']:.0f} ({sweep[c]['p50_ms']:.2f} / {sweep[c]['p99_ms']:.2f})"
                if c in sweep
                else ""
                for c in _concurrencies(res)
            ]
            lines.append(f"| {mt} | {n} | " + " | ".join(cells) + " |")
    if any(r.get("open_loop", {}).get(n) for r in res["models"].values() for n in r["single"]):
        lines += [
            "",
            "Open loop: requests sent at a fixed rate over a pool of warm connections; "
            "latency from each request's scheduled send time (any client lag counts against "
            "the service), and from its actual send:",
            "",
            "| model | N | offered req/s | achieved req/s | p50 ms | p99 ms |"
            " from send: p50 | p99 | errors | service GC pauses (n, total ms) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for mt, r in res["models"].items():
            for n, runs in r.get("open_loop", {}).items():
                for o in runs:
                    lines.append(
                        f"| {mt} | {n} | {o['rate']:.0f} | {o['rps']:.0f} | {o['p50_ms']:.2f} | "
                        f"{o['p99_ms']:.2f} | {o['sent_p50_ms']:.2f} | {o['sent_p99_ms']:.2f} | "
                        f"{o['errors']} | {_gc_cell(o)} |"
                    )
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
            ax.plot(cs, [sweep[c]["rps"] for c in cs], "o-", label=f"{mt} N={n}")
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
