"""Two service settings side by side, on one machine at one time (``ctr bench-pair``).

``ctr bench`` runs one configuration at a time, and on a shared machine whose speed
moves by 10–20 % between minutes, two runs cannot tell a 5 % change from the noise. Here
two ``ctr serve`` processes run at once on the same bundle and Redis: A with the ``--a``
settings, B with the ``--b`` ones. Short closed-loop windows alternate between them in the
order A B B A A B B A…, so drift in the machine's speed falls on both alike. Each window
records the requests per second and the service's CPU time per request (``/proc``, every
thread of the process), and the CPU the other side, not driven, used meanwhile. The
verdict compares B with A within each pair of windows (the i-th of A with the i-th of B)
and counts the pairs in which B is lower. Redis, the client and the other (idle) service
are not counted in the CPU per request."""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from service.loader import load_bench_db
from training.bench_client import closed_loop
from training.bench_metrics import counter, window_counts
from training.bench_server import (
    device,
    ports_free,
    served_model,
    service_env,
    start_service,
    stop_service,
    tree_cpu_s,
    tree_rss_mb,
)
from training.bench_service import bundle_for
from training.bench_util import bodies_for, run_loop
from training.bench_writes import ItemWrites, OtherWrites, UserWrites

SIDES = ("A", "B")
SERVED = (
    "graph",
    "runner",
    "provider",
    "precision",
    "json_encoder",
    "micro_batching",
    "native_runner",
    "user_tracking",
    "shared_weights",
)


def served(url: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """What a side serves, from its ``/v1/models``: the settings' visible effects
    (:data:`SERVED`) and the ``worker_pid`` that answered (``env``: the side's, for
    its key)."""
    return served_model(url, (*SERVED, "worker_pid"), env)


def void_window(r: dict[str, Any], counts: dict[str, Any]) -> str | None:
    """Why a window says nothing of its side's cost, or None: a reply that was not 200,
    none at all, or a degraded response or service error between its /metrics scrapes
    (``counts``: :func:`training.bench_metrics.window_counts`). A degraded response is
    a 200 that skipped work (its Redis read failed), so it would lower the side's CPU
    per request unseen; ``ctr bench`` voids such windows too."""
    if r["errors"]:
        return f"{r['errors']} of {r['requests']} replies were not 200"
    if not r["requests"]:
        return "no request completed in the window"
    if counts["degraded"] or counts["service_errors"]:
        return (f"{counts['degraded']:g} degraded responses and {counts['service_errors']:g} "
                f"service errors {counts['errors_by_kind']} in a window")  # fmt: skip
    return None


def window_order(rounds: int) -> list[int]:
    """Which side (0: A, 1: B) each window drives: ``rounds`` windows of each, in the order
    A B B A A B B A…, so that a linear drift favours neither (with an even ``rounds``)."""
    pattern = [0, 1, 1, 0]
    return [pattern[i % 4] for i in range(2 * rounds)]


def paired(a: list[dict[str, float]], b: list[dict[str, float]], key: str) -> dict[str, Any]:
    """B's windows over A's, pair by pair (the i-th of each): the ratios, their median and
    in how many pairs B's ``key`` is lower."""
    ratios = [y[key] / x[key] for x, y in zip(a, b, strict=True)]
    return {
        "ratios": ratios,
        "median": statistics.median(ratios),
        "b_lower": sum(r < 1 for r in ratios),
        "pairs": len(ratios),
    }


def summarize(windows: list[list[dict[str, float]]]) -> dict[str, Any]:
    """``windows[side][i]``, side 0 = A and 1 = B, ``rounds`` windows each (as
    :func:`run` returns them): each side's medians, and B against A per pair of
    windows."""
    keys = ("rps", "cpu_ms", "p50_ms", "client_cpu_ms", "idle_cores", "tracked",
            "writes_per_req", "invalidations_per_s", "rss_mb")  # fmt: skip
    sides = [{k: statistics.median(w[k] for w in side) for k in keys} for side in windows]
    a, b = windows
    return {
        "sides": sides,
        "cpu_ms": paired(a, b, "cpu_ms"),
        "rps": paired(a, b, "rps"),
        "p50_ms": paired(a, b, "p50_ms"),
    }


def _cpu_s(pid: int) -> float:
    cpu = tree_cpu_s(pid)
    if cpu is None:
        raise RuntimeError(f"/proc does not tell the CPU time of process {pid}")
    return cpu


def scrape(url: str) -> str:
    """The side's ``/metrics``."""
    return httpx.get(url + "/metrics", timeout=10).text


def heard(text: str) -> float:
    """The invalidations a side has heard: user keys (``ctr_user_invalidations_total``)
    and item-feature hash reports (``ctr_item_invalidations_total``, ``--item-writes``;
    a side whose checkout has no such counter adds nothing)."""
    return sum(counter(text, "ctr_user_invalidations_total").values()) + sum(
        counter(text, "ctr_item_invalidations_total").values()
    )


async def _window(
    url: str,
    pid: int,
    idle_pid: int,
    bodies: list[bytes],
    concurrency: int,
    seconds: float,
    writes: UserWrites | None = None,
) -> dict[str, float]:
    """One closed-loop window on ``url`` (the service ``pid``) while the other side
    (``idle_pid``) is not driven: requests/s, the service's CPU ms per request, p50, the
    client's CPU ms per request, the CPU the idle side used meanwhile (cores), the share
    of requests whose user rows were tracked (no read), the scored users' writes per
    request (``writes``, opened here) and the invalidations the side heard per second.
    The ``/metrics`` scrapes fall outside the CPU measured."""
    async with writes if writes is not None else contextlib.nullcontext():
        rows0, heard_from = scrape(url), time.perf_counter()
        before, idle_before, start = _cpu_s(pid), _cpu_s(idle_pid), time.perf_counter()
        r = await closed_loop(
            url, bodies, concurrency, seconds, writes.before if writes is not None else None
        )
        after, idle_after, wall = _cpu_s(pid), _cpu_s(idle_pid), time.perf_counter() - start
        heard_for, rows1 = time.perf_counter() - heard_from, scrape(url)
    counts = window_counts(rows0, rows1)  # its user_rows too
    why = void_window(r, counts)
    if why:
        raise RuntimeError(f"{why} ({url})")
    scored = counts["user_rows"]
    rss = tree_rss_mb(pid)
    return {"pid": pid, "rps": r["ok_rps"], "cpu_ms": (after - before) * 1000 / r["requests"],
            "rss_mb": float("nan") if rss is None else rss,
            "p50_ms": r["p50_ms"], "client_cpu_ms": r["client_cpu_ms"],
            "idle_cores": (idle_after - idle_before) / wall,
            "tracked": scored.get("tracked", 0.0) / max(1.0, sum(scored.values())),
            "writes_per_req": writes.written / r["requests"] if writes is not None else 0.0,
            "invalidations_per_s": (heard(rows1) - heard(rows0)) / heard_for,
            }  # fmt: skip


def run(
    model: str,
    n: int,
    concurrency: int,
    rounds: int,
    seconds: float,
    envs: tuple[dict[str, str], dict[str, str]],
    redis_url: str,
    ports: tuple[int, int],
    threads: int,
    inflight: int,
    models_dir: Path | None = None,
    writes: float = 0.0,
    other_writes: float = 0.0,
    pipelined: bool = False,
    overrides: dict[str, Any] | None = None,
    roots: tuple[Path | None, Path | None] = (None, None),
    b_first: bool = False,
    item_writes: float = 0.0,
) -> dict[str, Any]:
    """Start A (``envs[0]`` over the benchmark's settings, on ``ports[0]``) and B, warm
    both, then ``rounds`` windows of ``seconds`` each per side. ``writes``: the share of
    requests before which the client appends a behaviour to the request's user in Redis;
    ``other_writes``: appends per second for users nobody scores, from a process of its
    own through warm-up and every window, each its own round trip (``pipelined``: 10 ms
    of them per pipeline; :mod:`training.bench_writes`); ``item_writes``: writes per
    second to one item-feature hash, a field no candidate has, from a process of its
    own (each side's ``CTR_ITEM_TRACKING`` hears them). ``overrides``: config keys for
    the bundle built (``--set``; not with ``models_dir``). ``roots``: each side's
    checkout of this project (``--a-root``, ``--b-root``; None: this one), to compare
    one commit's code with another's on the same bundle. Returns the settings,
    ``served[side]`` (what each side's ``/v1/models`` shows), ``windows[side][i]`` (the
    dicts of :func:`_window`, with the ``pid`` driven) and ``summary``
    (:func:`summarize`). A window :func:`void_window` voids (a reply other than 200,
    none at all, a degraded response or a service error) stops the run
    (``RuntimeError``)."""
    if rounds < 2 or rounds % 2 or seconds <= 0:
        # A B B A: with an odd count the last pair is A then B, unmirrored, and a steady
        # drift moves the median by about one window's worth
        raise ValueError("bench-pair needs an even number of rounds (2 or more) and seconds > 0")
    if overrides and models_dir is not None:
        raise ValueError("bench-pair --set changes the bundle it builds, not one in --models-dir")
    ports_free(*ports)  # before the bundle is built and Redis loaded
    with tempfile.TemporaryDirectory() as tmp:
        where, config, frame = bundle_for(model, models_dir, tmp, overrides)
        load_bench_db(config, frame, redis_url)
        bodies = bodies_for(frame, n)
        keep = config.max_seq_len
        procs: list[tuple[subprocess.Popen, str]] = []
        try:
            # ``b_first``: B's service starts first (session 32 saw the side started
            # second come out dearer in some runs; the flag checks it)
            sides = list(zip(envs, ports, roots, strict=True))
            side_envs: list[dict[str, str]] = []
            for extra, port, root in reversed(sides) if b_first else sides:
                env = service_env(where, config.name, redis_url, threads, inflight, extra)
                procs.append(start_service(env, port, root))
                side_envs.append(env)
            if b_first:
                procs.reverse()  # procs[0] is A's
                side_envs.reverse()
            what = [served(url, env) for (_, url), env in zip(procs, side_envs, strict=True)]
            with (
                OtherWrites(redis_url, other_writes, keep, pipelined) as others,
                ItemWrites(redis_url, item_writes, written_item_feature(config)) as items,
            ):
                for _, url in procs:  # warm: caches, the graph's size range, the connections
                    run_loop(closed_loop(url, bodies, concurrency, 1.0))
                windows: list[list[dict[str, float]]] = [[], []]
                for side in window_order(rounds):
                    (proc, url), (idle, _) = procs[side], procs[1 - side]
                    mix = UserWrites(redis_url, bodies, writes, keep) if writes else None
                    windows[side].append(
                        run_loop(
                            _window(url, proc.pid, idle.pid, bodies, concurrency, seconds, mix)
                        )
                    )
        finally:
            for proc, _ in procs:
                stop_service(proc)
    return {
        "model": model, "n": n, "concurrency": concurrency, "rounds": rounds,
        "seconds": seconds, "threads": threads, "inflight": inflight,
        "writes": writes, "other_writes": other_writes, "pipelined": pipelined,
        "overrides": overrides or {},
        "roots": [None if r is None else str(r) for r in roots],
        "other_writes_achieved": others.achieved,
        "item_writes": item_writes, "item_writes_achieved": items.achieved,
        "item_writes_key": items.key,
        "envs": list(envs), "served": what, "b_first": b_first,
        "device": device({**envs[0], **envs[1]}), "windows": windows,
        "summary": summarize(windows),
    }  # fmt: skip


def written_item_feature(config: Any) -> str:
    """The item feature whose hash ``--item-writes`` writes: the first item-side feature
    other than the ID, as the service reads them (``ctr:item:<source>``)."""
    id_source = config.item_id_feature.source
    for f in config.item_sparse + config.item_dense:
        if f.source != id_source:
            return str(f.source)
    return str(id_source)  # an ID-only model reads no item hash: the writes change nothing


def _env_text(env: dict[str, str]) -> str:
    """A side's settings as markdown code spans."""
    return " ".join(f"`{k}={v}`" for k, v in env.items()) or "(the defaults)"


def _side_text(res: dict[str, Any], k: int) -> str:
    """Side ``k``'s settings, and the checkout its code came from where not this one."""
    root = (res.get("roots") or [None, None])[k]
    return _env_text(res["envs"][k]) + (f" (code: `{root}`)" if root else "")


def _writes_text(res: dict[str, Any]) -> str:
    """What the run wrote to Redis while it measured (:mod:`training.bench_writes`)."""
    share, other = res.get("writes", 0.0), res.get("other_writes", 0.0)
    parts = [
        f"before {share:.0%} of the requests the client appended a behaviour to that "
        "request's user in Redis (the service's append script, not timed)"
        if share
        else "no writes for the scored users (every repeat request finds its user unchanged)",
        f"a process of its own appended {res['other_writes_achieved']:,.0f} behaviours/s "
        f"(asked: {other:,.0f}) for users nobody scores, "
        + (
            "10 ms of them per pipeline (named to the trackers together)"
            if res.get("pipelined")
            else "each a round trip of its own (named to the trackers one by one)"
        )
        if other
        else "no writes for other users",
    ]
    if res.get("item_writes"):
        parts.append(
            f"a process of its own wrote {res['item_writes_achieved']:,.1f} fields/s (asked: "
            f"{res['item_writes']:,.1f}) of item-feature hash `{res['item_writes_key']}`, "
            "each a round trip of its own, a field no candidate has (no answer changes)"
        )
    return "Writes while measuring: " + "; ".join(parts) + "."


def render(res: dict[str, Any], command: str) -> str:
    """The report: each side's medians, B against A pair by pair, every window's CPU."""
    s = res["summary"]
    lines = [
        f"Command: `{command}`",
        "",
        f"{res['device']}; {res['model']} at N = {res['n']}, concurrency "
        f"{res['concurrency']}, {res['rounds']} windows of {res['seconds']:g} s per side in "
        "the order A B B A…"
        + ("; B's service started first" if res.get("b_first") else "")
        + "; ORT intra-op threads "
        f"{res['threads']}, {res['inflight']} run(s) in flight. CPU ms/req: the service "
        "process's CPU time (all threads) per request over its windows; RSS MB: its "
        "resident memory (all processes) at the end of each window; medians over the "
        "windows.",
        "",
        "| side | settings | req/s | CPU ms/req | p50 ms | client CPU ms/req | "
        "the other side, idle (cores) | users' rows tracked | writes/req | "
        "invalidations heard/s | RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k, side in enumerate(s["sides"]):
        lines.append(
            f"| {SIDES[k]} | {_side_text(res, k)} | {side['rps']:,.0f} | "
            f"{side['cpu_ms']:.3f} | {side['p50_ms']:.2f} | {side['client_cpu_ms']:.3f} | "
            f"{s['sides'][1 - k]['idle_cores']:.3f} | {side['tracked']:.1%} | "
            f"{side['writes_per_req']:.3f} | {side['invalidations_per_s']:,.0f} | "
            f"{side.get('rss_mb', float('nan')):,.0f} |"
        )
    lines += ["", _writes_text(res)]
    a, b = res["served"]
    differ = [f"{k} (A {a[k]}, B {b[k]})" for k in SERVED if a.get(k) != b.get(k)]
    lines += [
        "",
        "What `/v1/models` shows of the two: "
        + ("differs in " + "; ".join(differ) if differ else "the same")
        + ".",
    ]
    lines += ["", "B against A, window pair by window pair:", ""]
    lines += ["| figure | median B / A | pairs where B is lower |", "|---|---:|---:|"]
    for key, label in (("cpu_ms", "CPU ms/req"), ("rps", "req/s"), ("p50_ms", "p50")):
        p = s[key]
        lines.append(f"| {label} | {p['median']:.3f} | {p['b_lower']} of {p['pairs']} |")
    cpu = s["cpu_ms"]
    lines += [
        "",
        "CPU ms/req per window, A: "
        + ", ".join(f"{w['cpu_ms']:.3f}" for w in res["windows"][0])
        + "; B: "
        + ", ".join(f"{w['cpu_ms']:.3f}" for w in res["windows"][1]),
        "",
        f"Reading it: B's CPU per request is {cpu['median']:.3f}x A's (median of the "
        f"pairs), lower in {cpu['b_lower']} of {cpu['pairs']} pairs. Where B is lower (or "
        "higher) in nearly every pair, the difference is B's; where the pairs split, it "
        "is within this machine's noise. The idle column is CPU the side not driven used "
        "meanwhile (a spinning thread, a timer), which no CPU ms/req counts. Read the "
        "CPU per request: in runs whose sides should not differ, B's req/s came out about "
        '4 % lower and its p50 4–5 % higher (docs/benchmarks.md, "Session 18").',
    ]
    return "\n".join(lines)
