"""In-process cost of the request path's Python, without HTTP or a client: the scoring
handler called through ASGI at the app's front door (``ScoringApp``), inside the
middleware stack (``ServingMiddleware``) and through FastAPI's route, and with
orjson reading the candidates and writing the ranked items instead of the native codec
(``CTR_NATIVE_JSON=off``); the candidate-list check with and without its C-level
shortcut; and the request whose candidates' features are not cached (read from Redis and
encoded) against the one whose are; and the graph call's hand-off to the executor thread
and the cost of Python work between calls, against back-to-back calls. Same process,
interleaved, so the ratios hold on a noisy machine. Then the fast path's event-loop CPU
split by the service's own stages (its stage clock set to this thread's CPU time), with
either. On uvloop where installed, as the service runs. Needs Redis and a bundle
(``ctr bench-path``)."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

import service.asgi as service_asgi
from ctr.bundle import load_bundle
from service import metrics
from service.app import create_app
from service.callthreads import CallThreads
from service.loader import load_bench_db
from service.model import LoadedModel, load_model
from service.settings import Settings
from service.validate import _checked_candidates, _plain_ids
from training.bench_metrics import STAGES, stage_means, window_counts
from training.bench_util import Feeds, bodies_for, full_history_feeds, run_loop, uvloop_module


async def _call(app: Any, body: bytes) -> int:
    """One ``POST /v1/score`` straight through the ASGI interface."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/score", "raw_path": b"/v1/score", "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000),
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
    }  # fmt: skip
    sent = False
    status = 0

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


def without_fast_path(app: Any) -> Any:
    """The same app without its front-door routes (``ScoringApp.fast_routes``): every
    request goes through FastAPI's middleware and router, so ``POST /v1/score`` reaches
    the FastAPI route."""
    app.fast_routes = {}
    app.middleware_stack = None
    return app


def fast_path_in_stack(app: Any) -> Any:
    """The same app with its front-door routes answered by ``ServingMiddleware`` instead,
    inside FastAPI's and Starlette's middleware stack (where they were until session 23)."""
    from starlette.middleware import Middleware

    from service.serving import ServingMiddleware

    fast, app.fast_routes = app.fast_routes, {}
    app.user_middleware = [
        Middleware(ServingMiddleware, fast=fast) if m.cls is ServingMiddleware else m
        for m in app.user_middleware
    ]
    app.middleware_stack = None
    return app


async def _route_costs(settings: Settings, bodies: list[bytes], rounds: int, reps: int) -> dict:
    apps = {
        "fast path": create_app(settings),
        "orjson": create_app(settings.model_copy(update={"native_json": "off"})),
        "FastAPI route": without_fast_path(create_app(settings)),
        "in the stack": fast_path_in_stack(create_app(settings)),
    }
    times: dict[str, list[float]] = {k: [] for k in apps}
    contexts = {k: a.router.lifespan_context(a) for k, a in apps.items()}
    for ctx in contexts.values():
        await ctx.__aenter__()
    try:
        if apps["fast path"].state.ctr.codec is None:  # nothing to compare then
            raise RuntimeError("the native JSON codec did not load (see the log)")
        for app in apps.values():  # warm-up
            for b in bodies[:8]:
                assert await _call(app, b) == 200
        for _ in range(rounds):
            for name, app in apps.items():
                before = _scrape()
                start = time.thread_time()  # this thread's CPU: not ORT's, not idle waits
                statuses = [await _call(app, bodies[k % len(bodies)]) for k in range(reps)]
                times[name].append((time.thread_time() - start) * 1000 / reps)
                _check_round(statuses, before, name)
    finally:
        for ctx in contexts.values():
            await ctx.__aexit__(None, None, None)
    return {k: statistics.median(v) for k, v in times.items()}


def _scrape() -> str:
    return metrics.render()[0].decode()


def _check_round(statuses: list[int], before: str, what: str) -> None:
    """A round whose requests were not all served in full voids the run: a non-200, or
    a degraded answer (a 200 that skipped the Redis read: cheaper, so the figures would
    read lower, as a slow or unreachable Redis made them) or a service error between
    ``before`` and now (``ctr bench`` voids such windows too)."""
    bad = [s for s in statuses if s != 200]
    if bad:
        raise RuntimeError(f"{what}: {len(bad)} of {len(statuses)} requests answered "
                           f"HTTP {bad[0]}, not 200")  # fmt: skip
    counts = window_counts(before, _scrape())
    if counts["degraded"] or counts["service_errors"]:
        raise RuntimeError(f"{what}: {counts['degraded']:g} degraded answers and "
                           f"{counts['service_errors']:g} service errors "
                           f"({counts['errors_by_kind']}): is Redis slow or down?")  # fmt: skip


async def _stage_round(
    app: Any, bodies: list[bytes], reps: int, before_each: Callable[[], None] | None = None
) -> tuple[float, dict[str, float]]:
    """One round of ``reps`` requests with the stage clock on this thread's CPU time: the
    event-loop CPU per request (ms, ``before_each`` not counted) and each stage's mean
    (ms). Every request must answer 200."""
    saved = service_asgi.STAGE_CLOCK
    service_asgi.STAGE_CLOCK = time.thread_time
    try:
        before, spent, statuses = _scrape(), 0.0, []
        for k in range(reps):
            if before_each is not None:
                before_each()
            start = time.thread_time()
            statuses.append(await _call(app, bodies[k % len(bodies)]))
            spent += time.thread_time() - start
    finally:
        service_asgi.STAGE_CLOCK = saved
    _check_round(statuses, before, "a stage round")
    means = stage_means(before, _scrape())
    return spent * 1000 / reps, {k: means[k] * 1000 for k in STAGES}


def _add_round(times: dict[str, list[float]], total: float, stages: dict[str, float]) -> None:
    times["total"].append(total)
    for k, v in stages.items():
        times[k].append(v)
    # the round's own rest: a median of the totals less the stages' medians is none of
    # the rounds' (medians do not add), and could go below 0
    times.setdefault("outside", []).append(total - sum(stages.values()))


async def _stage_costs(settings: Settings, bodies: list[bytes], rounds: int, reps: int) -> dict:
    """Event-loop CPU per request in each stage of ``service.scoring.score``, in ms
    (median over rounds). The stage clock reads this thread's CPU time, so ``inference``
    is the graph call where it runs on the event loop thread (``CTR_INLINE_MAX_MS``: each
    request here is alone in flight), else only the hand-off to the ORT thread and back;
    ``outside`` is the rest of the request (body read, ASGI and middleware; ``parse`` is
    the JSON's parse and validation)."""
    app = create_app(settings)
    ctx = app.router.lifespan_context(app)
    await ctx.__aenter__()
    times: dict[str, list[float]] = {k: [] for k in (*STAGES, "total")}
    try:
        for b in bodies[:8]:
            assert await _call(app, b) == 200
        for _ in range(rounds):
            _add_round(times, *await _stage_round(app, bodies, reps))
    finally:
        await ctx.__aexit__(None, None, None)
    return _stage_summary(times)


def _stage_summary(times: dict[str, list[float]]) -> dict[str, float]:
    """Medians of each stage's, the total's and ``outside``'s rounds (``outside``: each
    round's total less its stages)."""
    return {k: statistics.median(v) for k, v in times.items()}


STAGE_COLUMNS = (*STAGES, "outside", "total")


def _stage_header(label: str, *extra: str) -> list[str]:
    cols = (*STAGE_COLUMNS, *extra)
    return [f"| N | {label} | " + " | ".join(cols) + " |", "|---:|---|" + "---:|" * len(cols)]


def _stage_cells(st: dict[str, float]) -> str:
    return " | ".join(f"{st[k]:.3f}" for k in STAGE_COLUMNS)


COLD = ("warm", "unseen items", "caches off")


async def _cold_costs(settings: Settings, bodies: list[bytes], rounds: int, reps: int) -> dict:
    """Event-loop CPU per request (ms, median over interleaved rounds, with its split by
    stage) when the candidates were scored a moment ago (``warm``: the item caches hold
    them), when none of them was (``unseen items``: both item caches emptied before each
    request, outside the timing; the user's rows stay cached) and with
    ``CTR_ITEM_CACHE_TTL_S=0 CTR_USER_CACHE_SIZE=0`` (``caches off``: nothing kept,
    nothing stored). The last two read and encode all N items' features every time."""
    on = create_app(settings)
    off = create_app(settings.model_copy(update={"item_cache_ttl_s": 0, "user_cache_size": 0}))
    apps = {"warm": on, "unseen items": on, "caches off": off}
    times: dict[str, dict[str, list[float]]] = {
        v: {k: [] for k in (*STAGES, "total")} for v in COLD
    }
    contexts = [a.router.lifespan_context(a) for a in (on, off)]
    for ctx in contexts:
        await ctx.__aenter__()
    try:
        for app in (on, off):
            for b in bodies[:8]:
                assert await _call(app, b) == 200
        state = on.state.ctr

        def forget() -> None:  # the item caches, before each `unseen items` request
            state.item_cache.clear()
            state.require_model().rows.clear()

        for _ in range(rounds):
            for variant in COLD:
                hook = forget if variant == "unseen items" else None
                if variant == "warm":  # refilled, untimed: the round before emptied them
                    for b in bodies:
                        assert await _call(on, b) == 200
                _add_round(times[variant], *await _stage_round(apps[variant], bodies, reps, hook))
    finally:
        for ctx in contexts:
            await ctx.__aexit__(None, None, None)
    return {variant: _stage_summary(series) for variant, series in times.items()}


HANDOFF = (
    "back to back",
    "executor",
    "native",
    "back to back, work between",
    "executor, work between",
    "native, work between",
)


def _request_work(keys: list[str]) -> int:
    """Python work of a request's size between two graph calls: a dict built from
    ``keys`` and looked up again (it evicts part of the CPU caches, as a request's
    parsing, Redis replies and encoding do)."""
    d = dict(zip(keys, range(len(keys)), strict=True))
    return sum(map(d.__getitem__, keys))


async def _handoff_costs(model: LoadedModel, feeds: list[Feeds], rounds: int, reps: int) -> dict:
    """Wall ms per graph call (median over interleaved rounds of each round's median):
    the service's loaded model (its default threads) on the same feeds, called back to
    back on this thread (what ``ctr bench`` times as the model alone) and awaited through
    the service's inference threads (:class:`CallThreads`, one thread) from the running
    loop, and on the model's native runner (``CTR_NATIVE_RUNNER``; absent when the
    model has none), as ``service.scoring.score`` hands it off, each also with :func:`_request_work`
    before every call (outside the timing)."""
    keys = [f"item-{k}" for k in range(20_000)]
    variants = [v for v in HANDOFF if model.native is not None or not v.startswith("native")]
    times: dict[str, list[float]] = {k: [] for k in variants}
    executor = CallThreads(1, "ort")
    try:
        for _ in range(rounds):
            for variant in variants:
                way, work = variant.split(",")[0], variant.endswith("between")
                one = []
                for k in range(reps):
                    f = feeds[k % len(feeds)]
                    if work:
                        _request_work(keys)
                    start = time.perf_counter()
                    if way == "executor":
                        await executor.call(model.run, f, False)
                    elif way == "native":
                        assert model.native is not None
                        await model.native.run(f)
                    else:
                        model.run(f, False)
                    one.append((time.perf_counter() - start) * 1000)
                times[variant].append(statistics.median(one))
    finally:
        executor.shutdown(wait=True)
    return {k: statistics.median(v) for k, v in times.items()}


def _check_costs(bodies: list[bytes], rounds: int, reps: int) -> dict:
    objs = [orjson.loads(b) for b in bodies]
    fns = {
        "C-level check": lambda o: _plain_ids(o["candidates"], 256),
        "per-candidate check": lambda o: _checked_candidates(o["candidates"], 256),
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for k in range(reps):
                fn(objs[k % len(objs)])
            times[name].append((time.perf_counter() - start) * 1e6 / reps)
    return {k: statistics.median(v) for k, v in times.items()}


def run(
    models_dir: Path, name: str, n_values: list[int], redis_url: str, rounds: int, reps: int
) -> dict:
    bundle = load_bundle(models_dir, name)
    from training.data import load_frame

    frame = load_frame(bundle.config)
    load_bench_db(bundle.config, frame, redis_url)
    settings = Settings(
        models_dir=str(models_dir), model_name=name, redis_url=redis_url,
        intra_op_threads=1, log_level="warning",
        # a read past the default 50 ms degrades the answer (voiding the round) on a
        # loaded machine: as `ctr bench`'s service, a second
        redis_timeout_ms=1000,
    )  # fmt: skip
    served = load_model(settings.model_copy(update={"intra_op_threads": 0}))  # as served
    out: dict[int, dict] = {}
    for n in n_values:
        bodies = bodies_for(frame, n)
        out[n] = {
            "request_ms": run_loop(_route_costs(settings, bodies, rounds, reps)),
            "check_us": _check_costs(bodies, rounds, reps * 4),
            "stage_ms": run_loop(_stage_costs(settings, bodies, rounds, reps)),
            "stage_ms_orjson": run_loop(
                _stage_costs(
                    settings.model_copy(update={"native_json": "off"}), bodies, rounds, reps
                )
            ),
            "cold_ms": run_loop(_cold_costs(settings, bodies, rounds, reps)),
            "handoff_ms": run_loop(
                _handoff_costs(served, full_history_feeds(bundle, n), rounds, reps)
            ),
        }
    return out


def render(res: dict, command: str) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        f"Event-loop CPU per scoring request, in-process (an ASGI call on "
        f"{'asyncio' if uvloop_module() is None else 'uvloop'}, "
        "as the service runs, with a real Redis and ORT on 1 thread; `time.thread_time()` "
        "of the loop's thread, so neither ORT's thread nor idle waits count), median over "
        "interleaved rounds, in ms; and the candidate-list check alone, µs per request:",
        "",
        "| N | loop CPU, fast path | FastAPI route | saved | in the stack | front door saves "
        "| fast path, orjson | native codec saves | C-level check µs | per-candidate check µs "
        "| ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, r in res.items():
        a, b = r["request_ms"]["fast path"], r["request_ms"]["FastAPI route"]
        o, st = r["request_ms"]["orjson"], r["request_ms"]["in the stack"]
        c, d = r["check_us"]["C-level check"], r["check_us"]["per-candidate check"]
        lines.append(
            f"| {n} | {a:.3f} | {b:.3f} | {b - a:.3f} | {st:.3f} | {st - a:.3f} | {o:.3f} "
            f"| {o - a:.3f} | {c:.0f} | {d:.0f} | {d / c:.1f}x |"
        )
    lines += [
        "",
        "Event-loop CPU per request on the fast path, by the service's own stages (ms; "
        "`inference` is the graph call itself where it runs on the event loop thread (each "
        "request here is alone in flight: `CTR_INLINE_MAX_MS`), else the hand-off to the "
        "ORT thread and back; `parse` the body's JSON read and checked; `outside` the "
        "body's arrival, ASGI and middleware), with the native codec and with orjson "
        "(`CTR_NATIVE_JSON=off`):",
        "",
        *_stage_header("JSON"),
    ]
    for n, r in res.items():
        for label, key in (("native", "stage_ms"), ("orjson", "stage_ms_orjson")):
            lines.append(f"| {n} | {label} | {_stage_cells(r[key])} |")
    lines += [
        "",
        "Event-loop CPU per request when the candidates' features must be read from Redis "
        "and encoded (ms, by stage as above, median over interleaved rounds): `warm`, the "
        "candidates were scored a moment ago (the item caches hold them); `unseen items`, "
        "none of them was (both item caches emptied before each request, outside the "
        "timing; the user's rows stay cached); `caches off`, `CTR_ITEM_CACHE_TTL_S=0 "
        "CTR_USER_CACHE_SIZE=0`; and each as a multiple of `warm`:",
        "",
        *_stage_header("items", "x warm"),
    ]
    for n, r in res.items():
        cold = r["cold_ms"]
        for variant in COLD:
            ratio = cold[variant]["total"] / cold["warm"]["total"]
            lines.append(f"| {n} | {variant} | {_stage_cells(cold[variant])} | {ratio:.2f}x |")
    lines += [
        "",
        "Wall ms per graph call of the served model (its default threads, full-history "
        "feeds), median over interleaved rounds: back to back on one thread (what `ctr "
        "bench` times as the model alone) and awaited through the service's inference "
        "thread (`CallThreads`) and on the native runner (`CTR_NATIVE_RUNNER`; `—` where "
        "the model has none) from the event loop, as the service hands it off, each also "
        "with request-sized Python "
        "work (20,000 dict inserts and lookups) before every call, outside the timing:",
        "",
        "| N | " + " | ".join(HANDOFF) + " | hand-off | native hand-off | work between |",
        "|---:|" + "---:|" * (len(HANDOFF) + 3),
    ]
    for n, r in res.items():
        h = r["handoff_ms"]
        cells = " | ".join(f"{h[k]:.3f}" if k in h else "—" for k in HANDOFF)
        hop = h["executor"] - h["back to back"]
        native = f"{h['native'] - h['back to back']:+.3f}" if "native" in h else "—"
        work = h["back to back, work between"] - h["back to back"]
        lines.append(f"| {n} | {cells} | {hop:+.3f} | {native} | {work:+.3f} |")
    return "\n".join(lines)
