"""``ctr bench``'s measurement of one model against the running service: per N, the
service at concurrency 1, its closed-loop sweep and open-loop runs, each window with
what the service's /metrics saw over it, interleaved with the model-only baseline."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

from training.bench_baseline import (
    Baseline,
    baseline_feeds,
    baseline_latency,
    baseline_rates,
    model_only_row,
    speed_check,
    sustained,
)
from training.bench_client import closed_loop, drive, open_loop
from training.bench_metrics import gc_pauses, slow_counts, stage_means, window_counts
from training.bench_server import loop_cpu_s, tree_cpu_s
from training.bench_util import Feeds, bodies_for, mean_history, run_loop
from training.bench_writes import UserWrites

BODIES = 64  # request bodies cycled over per N (each a loaded user and N candidates)
REPS = 128  # model-only calls per latency figure (two passes over the bodies)


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
            url, lambda r=r: run_loop(open_loop(url, bodies, r, seconds))
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
    run_loop(closed_loop(url, bodies, 1, min(1.0, seconds)))  # warm: caches, pools
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


def measure_model(
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
