"""``ctr bench`` end to end at a tiny size: it starts the real service on a real Redis,
drives it over HTTP and reports every figure the docs quote (no timing assertions)."""

from __future__ import annotations

import gc
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import ROOT
from tests.redis_proc import RedisProcess, free_port
from training.bench_metrics import STAGES
from training.bench_service import make_bundle
from training.bench_util import bodies_for


def test_service_benchmark_reports_every_figure() -> None:
    from training.bench_measure import REPS
    from training.bench_report import render
    from training.bench_service import run

    proc = RedisProcess().start()
    try:
        res = run(
            ["din"], [20], [1, 2], 0.3, 1, proc.url, free_port(), inflight=2, rates=[200],
            writes=0.5,
        )  # fmt: skip
    finally:
        proc.stop()
    din = res["models"]["din"]
    mo = din["model_only"][20]
    # the baseline: the service's own loader and graph, its latency right before and
    # after the service's c=1 window, on the feeds of the same requests (real histories)
    assert din["graphs"]["model_only"]["graph"] == din["graphs"]["service"]["graph"]
    assert mo["before"]["samples"] == mo["after"]["samples"] == REPS
    assert mo["p50_ms"] == (mo["before"]["p50_ms"] + mo["after"]["p50_ms"]) / 2
    assert 0 < mo["mean_hist_len"] <= 50 and mo["full_history"]["p50_ms"] > 0
    # --writes: the c=1 window's appends lengthen the histories, and the model alone
    # after it (and its throughput) is fed them as they are then, read again
    assert 0 < mo["mean_hist_len_before"] < mo["mean_hist_len"]
    # what the model alone sustains: runs completed over a timed window, for each count
    # of ORT runs in flight the service allows (2 here), the best of them
    assert set(mo["rates"]) == {1, 2} and all(r["calls"] > 0 for r in mo["rates"].values())
    assert mo["sustained_rps"] == max(r["rps"] for r in mo["rates"].values())
    single = din["single"][20]
    assert single["requests"] > 0 and single["errors"] == 0
    assert single["degraded"] == 0 and single["service_errors"] == 0
    assert single["check"] == "ok" or single["check"].startswith("suspect:")
    assert set(single["stages_ms"]) == {
        "parse",
        "redis_fetch",
        "feature_mapping",
        "inference",
        "serialization",
        "write",
    }
    assert all(v > 0 for v in single["stages_ms"].values())
    assert single["loop_cpu_ms"] > 0  # the service's event-loop CPU per request (/proc)
    # alone in flight on an idle worker, after the warm-up timed calls of this size: the
    # graph calls ran on the event loop thread (CTR_INLINE_MAX_MS, default 10 ms)
    assert 0 < single["inline_calls"] <= single["requests"]
    # open loop: every request of the schedule sent (0.3 s at 200 req/s), none before
    # its time, so the latency from the scheduled time is never below the one from the send
    (ol,) = din["open_loop"][20]
    assert ol["rate"] == 200 and ol["requests"] == 60 and ol["errors"] == 0
    assert ol["p50_ms"] >= ol["sent_p50_ms"] > 0 and ol["p99_ms"] >= ol["sent_p99_ms"]
    sweep = din["saturation"][20]
    assert set(sweep) == {1, 2}
    assert all(v["errors"] == 0 and v["degraded"] == 0 and v["ok_rps"] > 0 for v in sweep.values())
    # where the machine's CPU goes per request at each point: the service (all its
    # processes and threads, /proc), the benchmark client, and the model alone
    assert all(v["service_cpu_ms"] > 0 and v["client_cpu_ms"] > 0 for v in sweep.values())
    assert mo["cpu_ms"] > 0
    # --writes 0.5: an append before every other closed-loop request; tracking reads
    # after each and trusts the kept rows otherwise
    for w in [single, *sweep.values()]:
        assert w["writes_per_req"] == pytest.approx(0.5, abs=0.1)
        rows = w["user_rows"]
        tracked = rows.get("tracked", 0.0) / sum(rows.values())
        # a request after a write to its user reads; the others need not
        assert 0.1 < tracked <= 1 - w["writes_per_req"] + 0.05, rows
    table = render(res, "ctr bench --models din")
    assert "before 50% of the closed-loop requests the client appends" in table
    assert "timed on the histories read again after that window" in table
    assert "| inline calls | rows tracked |" in table
    assert "| din | 20 |" in table and "2 ORT run(s) in flight" in table
    assert "loop CPU ms/req" in table and "CPU ms/req: service" in table
    assert "| inline calls |" in table
    # latency, saturation and open loop
    assert table.count("| non-200 | degraded | service errors |") == 3
    assert f"| din | 20 | 200 | {ol['rps']:.0f} | {ol['p50_ms']:.2f} |" in table
    # achieved over the schedule's span at least: a service that keeps up reads as the
    # rate, not above it (the last reply came (total - 1) / rate plus a latency in)
    assert ol["rps"] <= 200
    # L is the bundle's own (--set max_seq_len, an existing bundle's), not always 50
    assert din["L"] == 50 and "L=50;" in table
    din["L"] = 10
    assert "L=10;" in render(res, "ctr bench --models din")
    din["L"] = 50
    assert "cycles 64 request bodies" in table and "Worst case, in no ratio" in table
    assert f"(n={single['requests']}, <1,000)" in table  # a p99 with its sample count
    assert "invalid:" not in table
    assert "1 uvicorn worker," in table
    # the machine line names the kernel release (a lent machine's sandbox shows in it)
    assert f"Linux {platform.release()}" in res["device"] and res["device"] in table
    assert (ROOT / "docs" / "benchmarks.md").read_text().count("ctr bench") >= 2


def _user_histories(config: Any, frame: Any) -> dict[str, int]:
    """Stored behaviours per user, as ``ctr load`` keeps them."""
    from service.loader import user_records

    return {u: min(len(ev), config.max_seq_len) for u, _, ev in user_records(config, frame)}


def test_baseline_feeds_are_what_the_service_scores(tmp_path: Path) -> None:
    """The model-only feeds: the same users and candidates as the request bodies, each
    user's stored history (not a full one), encoded as the service encodes them: the
    service's scores for a body equal the baseline model's on its feed; and the
    Redis-free reader (``ctr bench-gpu``) gives the same feeds as the store."""
    import httpx
    import orjson

    from service.loader import load_into_redis
    from service.precision import probe_feeds
    from training.bench_baseline import baseline_feeds, baseline_rates, load_baseline
    from training.bench_server import service_env, start_service
    from training.bench_util import frame_reader, request_feeds

    redis = RedisProcess().start()
    try:
        config, frame = make_bundle("din", tmp_path, 50)
        load_into_redis(config, frame, redis.url, progress=False)
        env = service_env(tmp_path, config.name, redis.url, 1)
        base = load_baseline(env)
        bodies = bodies_for(frame, 30, 16)
        feeds = baseline_feeds(base, bodies, redis.url)
        service, url = start_service(env, free_port())
        try:
            replies = [httpx.post(url + "/v1/score", content=b).json() for b in bodies[:4]]
        finally:
            service.terminate()
            service.wait(timeout=30)
    finally:
        redis.stop()
    stored = _user_histories(config, frame)
    lens = [int(f["hist_len"][0]) for f in feeds]
    assert lens == [stored[orjson.loads(b)["user_id"]] for b in bodies]
    assert len(set(lens)) > 1 and min(lens) < config.max_seq_len  # not all L
    for feed, body in zip(feeds, bodies, strict=True):
        assert feed["item_sparse"].shape[0] == len(orjson.loads(body)["candidates"])
    for feed, body, reply in zip(feeds, bodies, replies, strict=False):
        assert not reply["degraded"]
        probs = base.model.run(feed, False)[0]
        got = {x["item_id"]: x["probability"] for x in reply["items"]}
        ids = [c["item_id"] for c in orjson.loads(body)["candidates"]]
        assert max(abs(got[i] - float(p)) for i, p in zip(ids, probs, strict=True)) < 1e-6
    offline = request_feeds(base.model.bundle, base.settings, bodies, frame_reader(config, frame))
    for a, b in zip(feeds, offline, strict=True):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # what the model alone sustains includes the native runner's calls side by side
    # (CTR_NATIVE_PARALLEL_CALLS, on by default) where it runs them: above 64 candidates,
    # with two intra-op threads (a one-thread session beside the main one)
    assert base.side_by_side(65) == 1
    base = load_baseline(service_env(tmp_path, config.name, "redis://unused", 2))
    assert (base.side_by_side(64), base.side_by_side(65)) == (1, 2)
    assert list(baseline_rates(base, feeds, 30, 0.2)) == [1]
    large = [probe_feeds(base.model.bundle, 1, 200, k) for k in range(4)]
    rates = baseline_rates(base, large, 200, 0.2)
    assert list(rates) == [1, 2] and rates[2]["one-thread session"] and rates[2]["rps"] > 0
    np.testing.assert_array_equal(base.run_single(1, large[0])[0], base.run(0, large[0])[0])


def test_degraded_and_failed_replies_invalidate_a_row(tmp_path: Path) -> None:
    """With the store down the service still answers 200, degraded: every window counts
    those responses (and the service's errors) from /metrics, and the rendered rows say
    invalid instead of meeting a target; non-200 replies count too."""
    from service.loader import load_into_redis
    from training.bench_baseline import baseline_feeds, load_baseline
    from training.bench_measure import measure_n, service_single
    from training.bench_report import render
    from training.bench_server import service_env, start_service

    redis = RedisProcess().start()
    config, frame = make_bundle("din", tmp_path, 50)
    fast = {"CTR_REDIS_TIMEOUT_MS": "50"}
    try:
        load_into_redis(config, frame, redis.url, progress=False)
        env = service_env(tmp_path, config.name, redis.url, 1, 1, fast)
        base = load_baseline(env)
        bodies = bodies_for(frame, 20, 8)
        feeds = baseline_feeds(base, bodies, redis.url)
        service, url = start_service(env, free_port())
    finally:
        redis.stop()  # the store goes away: every request from here on is degraded
    try:
        plan = {"seconds": 0.3, "concurrency": [1], "rates": [], "reps": 16,
                "loop_cpu": False, "graphs": {"model_only": base.describe()}}  # fmt: skip
        got = measure_n(url, service.pid, base, bodies, feeds, plan)
        bad = service_single(url, service.pid, [b'{"user_id": "u", "candidates": []}'], 0.2, False)
    finally:
        service.terminate()
        service.wait(timeout=30)
    single, sweep = got["single"], got["saturation"][1]
    for window in (single, sweep):
        assert window["requests"] > 0 and window["errors"] == 0  # 200s, all of them
        assert window["degraded"] == window["requests"]
        assert window["errors_by_kind"].get("kind=redis", 0) >= window["requests"]
    assert bad["errors"] == bad["requests"] > 0  # 422s are not successes either
    per_model = {k: {20: v} for k, v in got.items()}
    res = {"threads": 1, "inflight": 1, "env": {}, "device": "test", "seconds": 0.3,
           "models": {"din": {**per_model, "graphs": plan["graphs"]}}}  # fmt: skip
    latency, _, saturation, points = _rows(render(res, "ctr bench"))
    assert f"| invalid: {single['degraded']:.0f} degraded, " in latency
    assert f"| invalid: {sweep['degraded']:.0f} degraded, " in saturation
    assert f" invalid: {sweep['degraded']:.0f} degraded, " in points
    assert all("| yes |" not in row for row in (latency, saturation))
    res["models"]["din"]["single"][20] = bad  # a window of 422s: shown, and invalid
    latency = _rows(render(res, "ctr bench"))[0]
    assert f"{bad['errors']} non-200" in latency and f"| {bad['errors']} |" in latency


def _rows(table: str) -> list[str]:
    """The table rows of model din at N=20: latency, worst case, saturation, sweep."""
    rows = [line for line in table.splitlines() if line.startswith("| din | 20 |")]
    assert len(rows) == 4
    return rows


def test_gpu_benchmark_matched_feeds_on_the_cpu(tmp_path: Path) -> None:
    """``ctr bench-gpu`` where only the CPU provider exists: the CUDA variants are
    skipped, the CPU ones timed on the service's feeds for real histories (full
    histories apart, as the worst case), and micro-batching's requests/s come from a
    timed window over distinct users."""
    from service.model import load_model
    from service.settings import Settings
    from training.bench_gpu import BATCH_N, _batched, _copied, bench_bundle, matched_feeds, render
    from training.bench_service import make_bundle

    name = make_bundle("din", tmp_path, 50)[0].name
    res = bench_bundle(tmp_path, name, [30], 8, [1, 2], rate_seconds=0.2)
    assert {"cpu", "cpu+fused"} <= set(res["variants"])
    assert 0 < res["mean_hist_len"][30] < 50
    cpu = res["variants"]["cpu"]
    assert cpu["n"][30]["samples"] == 8 and cpu["full_history"][30]["p50_ms"] > 0
    model = load_model(Settings(models_dir=str(tmp_path), model_name=name))
    feeds, _ = matched_feeds(tmp_path, name, [30])
    plan = {"users": [1, 2], "reps": 4, "rate_seconds": 0.2}
    res["batched"]["cpu"] = batched = _batched(model, feeds[BATCH_N], plan)
    assert all(b["req_s"] > 0 and b["window_s"] >= 0.2 for b in batched.values())
    res["copied"] = _copied(model, [30], 4)
    table = render({name: res}, "CPU", 8)
    assert "worst case (in no ratio)" in table and "Micro-batching, cpu" in table
    assert "History copied N times" in table and "timed window" in table


def test_service_cpu_counts_every_worker_process() -> None:
    """``tree_cpu_s`` walks a process's descendants (uvicorn's workers live through a
    measurement, so their time is never in the parent's reaped-children counters): a
    parent that only sleeps, with two live children that burned CPU, counts their time."""
    import subprocess
    import sys

    from training.bench_server import tree_cpu_s

    burn = (
        "import time\nt = time.process_time()\n"
        "while time.process_time() - t < 0.4: pass\ntime.sleep(60)"
    )
    code = (
        "import subprocess, sys, time\n"
        f"ps = [subprocess.Popen([sys.executable, '-c', {burn!r}]) for _ in range(2)]\n"
        "time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        deadline = time.time() + 20
        seen = 0.0
        while time.time() < deadline and seen < 0.8:
            time.sleep(0.2)
            seen = tree_cpu_s(parent.pid) or 0.0
    finally:
        os.killpg(parent.pid, 9)  # the children too
        parent.wait()
    assert seen >= 0.8  # both live children's 0.4 s each (the parent itself only sleeps)


def test_request_path_benchmark_runs_both_paths(tmp_path: Path) -> None:
    """``ctr bench-path`` at a tiny size: both ASGI paths answer 200 (asserted inside)
    and every figure of its table is there."""
    from training.bench_path import render, run
    from training.bench_service import make_bundle

    proc = RedisProcess().start()
    try:
        name = make_bundle("din", tmp_path, 20)[0].name
        res = run(tmp_path, name, [10], proc.url, rounds=1, reps=3)
    finally:
        proc.stop()
    r = res[10]
    assert set(r["request_ms"]) == {"fast path", "orjson", "FastAPI route", "in the stack"}
    assert set(r["check_us"]) == {"C-level check", "per-candidate check"}
    assert all(v > 0 for v in [*r["request_ms"].values(), *r["check_us"].values()])
    for st in (r["stage_ms"], r["stage_ms_orjson"]):
        assert set(st) == {"parse", "redis_fetch", "feature_mapping", "inference",
                           "serialization", "write", "outside", "total"}  # fmt: skip
        assert all(st[k] > 0 for k in ("parse", "redis_fetch", "serialization", "write",
                                       "total"))  # fmt: skip
        assert abs(sum(v for k, v in st.items() if k != "total") - st["total"]) < 1e-9
    import service.asgi

    assert service.asgi.STAGE_CLOCK is time.perf_counter  # restored after the run
    cold = r["cold_ms"]
    assert set(cold) == {"warm", "unseen items", "caches off"}
    for st in cold.values():
        assert all(st[k] > 0 for k in ("redis_fetch", "feature_mapping", "total"))
        assert abs(sum(v for k, v in st.items() if k != "total") - st["total"]) < 1e-9
    table = render(res, "ctr bench-path")
    assert "| 10 |" in table and "by the service's own stages" in table
    assert "| 10 | unseen items |" in table and "| 10 | caches off |" in table
    hand = r["handoff_ms"]
    assert set(hand) == {"back to back", "executor", "native", "back to back, work between",
                         "executor, work between", "native, work between"}  # fmt: skip
    assert all(v > 0 for v in hand.values())
    assert "| hand-off | native hand-off | work between |" in table
    assert "| 10 | native |" in table and "| 10 | orjson |" in table


def test_client_gc_off_restores_the_collector() -> None:
    from training.bench_client import client_gc_off
    from training.bench_server import loop_cpu_s

    assert gc.isenabled()
    frozen_before = gc.get_freeze_count()  # an earlier app's settle_heap may have frozen
    with pytest.raises(RuntimeError), client_gc_off():
        assert not gc.isenabled() and gc.get_freeze_count() > 0
        raise RuntimeError("the run failed")
    assert gc.isenabled()
    if frozen_before == 0:
        assert gc.get_freeze_count() == 0  # its own freeze undone
    else:
        assert gc.get_freeze_count() >= frozen_before  # a caller's freeze kept
    gc.disable()  # a caller that had the collector off keeps it off
    try:
        with client_gc_off():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
    cpu = loop_cpu_s(os.getpid())
    assert cpu is None or cpu > 0


def test_graph_profile_names_the_nodes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``ctr profile-graph``: per-node kernel times from ORT's profiler, highest first; the
    fused graph shows the attention unit as one node, the standard graph its pieces."""
    from ctr.cli import main
    from training.bench_service import make_bundle
    from training.profile_graph import profile

    name = make_bundle("din", tmp_path, 20)[0].name
    std = profile(tmp_path, name, 30, "standard", 1, 3)
    fused = profile(tmp_path, name, 30, "fused", 1, 3)
    for res in (std, fused):
        us = [x["us"] for x in res["nodes"]]
        assert us == sorted(us, reverse=True) and all(u >= 0 for u in us)
        assert abs(res["total_us"] - sum(us)) < 1e-6
    assert [x["op"] for x in fused["nodes"]].count("DinAttention") == 1
    assert "DinAttention" not in {x["op"] for x in std["nodes"]}
    assert len(fused["nodes"]) < len(std["nodes"])
    args = ["--models-dir", str(tmp_path), "--model", name, "--n", "30", "--graph", "fused"]
    rc = main(["profile-graph", *args, "--runs", "2", "--top", "3", "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert rc == 0 and "| /model/att.0/DinAttention | DinAttention |" in out
    assert (tmp_path / "o" / "profile_graph.json").is_file()


def test_a_failing_model_only_call_voids_the_timed_window() -> None:
    """A stream whose call raises must not leave a lower rate (and so a flattering
    ratio) behind: ``timed_rate`` raises."""
    from training.bench_util import timed_rate

    calls = [0]

    def call(stream: int, feed: dict) -> None:
        calls[0] += 1
        if calls[0] == 5:
            raise ValueError("boom")

    feeds = [{"x": np.zeros(1)}]
    with pytest.raises(RuntimeError, match="a model-only call failed: ValueError"):
        timed_rate(call, feeds, streams=2, seconds=0.5)
    ok = timed_rate(lambda s, f: None, feeds, streams=2, seconds=0.2)
    assert ok["calls"] > 0 and ok["rps"] == ok["calls"] / ok["seconds"]


def test_ctrl_c_in_a_timed_window_waits_for_its_calls() -> None:
    """Ctrl-C while ``ctr bench`` timed the model alone aborted the process (SIGABRT,
    exit 134, "terminate called without an active exception"; a CLI review): Python
    3.11's interrupted ``Thread.join`` marks a running thread stopped, and the
    interpreter finalized under a stream still inside ORT's run. The interrupt now ends
    the streams and waits for their calls before it goes on."""
    import signal
    import threading

    from training.bench_util import timed_rate

    calls = [0]
    main = threading.main_thread().ident
    assert main is not None

    def call(stream: int, feed: dict) -> None:
        calls[0] += 1
        if calls[0] == 3:  # in the window (two warm-up calls first): Ctrl-C
            signal.pthread_kill(main, signal.SIGINT)
        time.sleep(0.4)  # a graph call still running when the interrupt lands

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    before = threading.active_count()
    old = signal.signal(signal.SIGINT, interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            timed_rate(call, [{"x": np.zeros(1)}], streams=2, seconds=30)
        assert threading.active_count() == before  # no stream left running
    finally:
        signal.signal(signal.SIGINT, old)


def test_ctrl_c_waits_for_the_call_of_the_stream_being_joined() -> None:
    """Python 3.11's interrupted ``Thread.join`` marks the thread it joined stopped while
    it still runs, so ``is_alive()`` skipped exactly that stream (stream 0, the one the
    main thread joins first; the only one in the benchmark's first, one-stream window):
    the first fix still aborted (a review). Each stream says itself that it ended."""
    import signal
    import threading

    from training.bench_util import timed_rate

    main = threading.main_thread().ident
    assert main is not None
    calls, running = [0], set()

    def call(stream: int, feed: dict) -> None:
        calls[0] += 1
        running.add(stream)
        if calls[0] == 2:  # the first call in the window (one warm-up)
            threading.Timer(0.2, signal.pthread_kill, (main, signal.SIGINT)).start()
        time.sleep(0.8)
        running.discard(stream)

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGINT, interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            timed_rate(call, [{"x": np.zeros(1)}], streams=1, seconds=30)
        assert not running, "timed_rate returned with a call still running"
    finally:
        signal.signal(signal.SIGINT, old)


def test_a_stream_that_cannot_start_leaves_none_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream thread whose start failed left the started ones waiting at the gate for
    good, and the process hung at exit (a review). The window is called off and they
    end."""
    import threading

    from training.bench_util import timed_rate

    real = threading.Thread.start
    starts = [0]

    def start(self: threading.Thread) -> None:
        starts[0] += 1
        if starts[0] == 2:
            raise RuntimeError("can't start new thread")
        real(self)

    before = threading.active_count()
    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        timed_rate(lambda s, f: None, [{"x": np.zeros(1)}], streams=3, seconds=5)
    monkeypatch.undo()
    deadline = time.monotonic() + 5
    while threading.active_count() > before:
        assert time.monotonic() < deadline, "a started stream still waits"
        time.sleep(0.01)


def test_speed_check_flags_a_moved_machine_and_another_graph() -> None:
    from training.bench_baseline import speed_check

    graphs = {"service": {"graph": "fused"}, "model_only": {"graph": "fused"}}
    single = {"stages_ms": {"inference": 0.95}}
    assert speed_check(single, {"p50_ms": 1.0}, graphs) == "ok"
    moved = speed_check({"stages_ms": {"inference": 0.85}}, {"p50_ms": 1.0}, graphs)
    assert moved.startswith("suspect: machine speed moved (service inference 0.85 ms")
    other = {**graphs, "model_only": {"graph": "standard"}}
    assert speed_check(single, {"p50_ms": 1.0}, other) == (
        "suspect: model-only graph standard but the service serves fused"
    )


def test_pair_order_and_pairing() -> None:
    """Windows alternate A B B A, so a steady drift favours neither side, and B is read
    against A pair by pair."""
    from training.bench_pair import paired, run, window_order

    assert window_order(2) == [0, 1, 1, 0]
    assert window_order(4).count(0) == window_order(4).count(1) == 4
    with pytest.raises(ValueError, match="even number of rounds"):
        run("din", 20, 1, 3, 0.2, ({}, {}), "redis://127.0.0.1:1/0", (1, 2), 1, 1)
    # a steady drift (1 % more CPU per window) and no difference: even rounds split it
    drift = [1.0 + 0.01 * k for k in range(8)]
    sides: list[list[float]] = [[], []]
    for k, side in enumerate(window_order(4)):
        sides[side].append(drift[k])
    even = paired([{"c": x} for x in sides[0]], [{"c": x} for x in sides[1]], "c")
    assert even["median"] == pytest.approx(1.0, abs=1e-3) and even["b_lower"] == 2
    a = [{"cpu_ms": 1.0}, {"cpu_ms": 2.0}, {"cpu_ms": 1.0}]
    b = [{"cpu_ms": 0.9}, {"cpu_ms": 2.2}, {"cpu_ms": 0.5}]
    p = paired(a, b, "cpu_ms")
    assert p["ratios"] == pytest.approx([0.9, 1.1, 0.5])
    assert p["median"] == pytest.approx(0.9) and p["b_lower"] == 2 and p["pairs"] == 3


def test_a_pair_window_with_degraded_responses_is_void() -> None:
    """A degraded response is a 200 that skipped its Redis read: cheaper, so a window
    holding one would lower its side's CPU per request unseen. bench-pair voids it, as
    ``ctr bench`` does, and a service error too."""
    from training.bench_pair import void_window

    ok = {"errors": 0, "requests": 100}
    clean = {"degraded": 0.0, "service_errors": 0.0, "errors_by_kind": {}}
    assert void_window(ok, clean) is None
    assert "3 degraded responses" in str(void_window(ok, {**clean, "degraded": 3.0}))
    errs = {**clean, "service_errors": 2.0, "errors_by_kind": {"redis": 2.0}}
    assert "2 service errors {'redis': 2.0}" in str(void_window(ok, errs))
    assert "5 of 100 replies were not 200" in str(void_window({**ok, "errors": 5}, clean))
    assert "no request completed" in str(void_window({"errors": 0, "requests": 0}, clean))


def test_bench_pair_runs_two_settings_side_by_side() -> None:
    """`ctr bench-pair` end to end at a tiny size: two real services on one real Redis,
    each with its own settings (seen in its /v1/models), windows of each on its own
    process, and the table; a side whose replies are not 200 stops the run, naming it,
    and both services are stopped. With writes (`--writes`, `--other-writes`): half the
    requests follow an append to their user, so the tracking side serves about half of
    them without a read and hears the other users' writes; the side with tracking off
    tracks nothing and hears nothing; the other users' keys are gone afterwards."""
    import socket

    from training.bench_pair import render, run

    def two_ports() -> tuple[int, int]:
        a = free_port()
        while (b := free_port()) == a:
            pass
        return a, b

    proc = RedisProcess().start()
    try:
        envs = ({"CTR_NATIVE_JSON": "off", "CTR_USER_TRACKING": "false"}, {})
        # B's service started first: each side's windows still drive its own settings
        res = run("din", 20, 2, 2, 0.3, envs, proc.url, two_ports(), 1, 1, None, 0.5, 200,
                  b_first=True, item_writes=50)  # fmt: skip
        left = proc.client().keys("{u:bench-other-*")
        item_field = proc.client().hexists("ctr:item:cate_id", "bench-item-writer")
        bad = ({}, {"CTR_MAX_CANDIDATES": "10"})  # 20 candidates: every reply a 422
        ports = two_ports()
        with pytest.raises(RuntimeError, match=f"not 200 \\(http://127.0.0.1:{ports[1]}\\)"):
            run("din", 20, 1, 2, 0.2, bad, proc.url, ports, 1, 1)
    finally:
        proc.stop()
    for port in ports:  # both services of the failed run were stopped: the ports are free
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
    assert [s["json_encoder"] for s in res["served"]] == ["orjson", "native"]
    assert [len(w) for w in res["windows"]] == [2, 2]
    # each side's windows drove its own process, the one that answered its /v1/models
    pids = [s["worker_pid"] for s in res["served"]]
    assert pids[0] != pids[1]
    assert [{w["pid"] for w in side} for side in res["windows"]] == [{pids[0]}, {pids[1]}]
    for side in res["windows"]:
        assert all(w["rps"] > 0 and w["cpu_ms"] > 0 and w["p50_ms"] > 0 for w in side)
        assert all(w["idle_cores"] >= 0 for w in side)
    s = res["summary"]
    assert s["cpu_ms"]["pairs"] == 2
    ratios = [b["cpu_ms"] / a["cpu_ms"] for a, b in zip(*res["windows"], strict=True)]
    assert s["cpu_ms"]["ratios"] == pytest.approx(ratios)
    # the writes: every window, half its requests; tracking off (A) trusts no row and
    # hears nothing, tracking on (B) reads after each write and hears every user key
    off, on = res["windows"]
    for w in off + on:
        assert w["writes_per_req"] == pytest.approx(0.5, abs=0.1)
    assert all(w["tracked"] == 0 and w["invalidations_per_s"] == 0 for w in off)
    # never more tracked than requests with no write before them (a stale row served
    # would count as tracked); A's writes meanwhile can only make B read more
    assert all(w["tracked"] <= 1 - w["writes_per_req"] + 0.05 for w in on)
    assert max(w["tracked"] for w in on) > 0 and all(w["invalidations_per_s"] > 0 for w in on)
    assert res["other_writes_achieved"] > 0 and left == []
    # the item-feature writer wrote one field no candidate has, deleted afterwards
    assert res["item_writes_achieved"] > 0 and res["item_writes_key"] == "ctr:item:cate_id"
    assert not item_field
    table = render(res, "ctr bench-pair")
    assert "| A | `CTR_NATIVE_JSON=off` `CTR_USER_TRACKING=false` |" in table
    assert "| B | (the defaults) |" in table
    assert res["b_first"] and "; B's service started first;" in table
    assert "differs in json_encoder (A orjson, B native)" in table
    assert "before 50% of the requests the client appended a behaviour" in table
    assert "fields/s (asked: 50.0) of item-feature hash `ctr:item:cate_id`" in table
    assert f"| CPU ms/req | {s['cpu_ms']['median']:.3f} | " in table


def test_a_port_held_by_another_service_is_refused() -> None:
    """The benchmarks' service start (`ctr bench`, `bench-pair`, `soak`) takes a ready
    answer only from the process it started: a service an earlier run left on the port
    (here a stub naming another worker pid) stops the start instead of being measured."""
    import http.server
    import json
    import threading

    from training.bench_server import ServiceStartFailed, start_service

    class Stale(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the handler's name)
            body = json.dumps({"worker_pid": 1}).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", free_port()), Stale)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        # an OSError: `ctr bench` prints it as one line, status 2 (was a traceback)
        with pytest.raises(ServiceStartFailed, match="answers from process 1, not from the"):
            start_service(dict(os.environ), server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def test_model_only_benchmark_names_its_l_and_rough_p99() -> None:
    """``ctr bench-model`` printed ``--seq-len`` (50) where ``--set max_seq_len`` ran
    another L, and a p99 of 50 samples (the max) as if it were one."""
    from training.bench import run

    table = run(["din"], [8], threads=1, repeats=6, length=50, overrides={"max_seq_len": 7})
    assert "L=7, history fed once" in table
    assert "(n=6, <1,000)" in table and "| din | 8 |" in table


def test_a_soak_reads_every_workers_memory_and_sends_the_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With CTR_WORKERS=2 the soak read the parent's memory only (flat while a worker
    grew); with CTR_API_KEY exported every event was a 401. Both run as a deployment
    runs now: the RSS is the service's and its workers', the events carry the key."""
    from training.soak import rss_mb, run

    monkeypatch.setenv("CTR_WORKERS", "2")
    monkeypatch.setenv("CTR_API_KEY", "soak-key")
    proc = RedisProcess().start()
    try:
        code = run(6.0, 2, 1.0, 2.0, 500.0, proc.url, free_port(), 1)
    finally:
        proc.stop()
    out = capsys.readouterr().out
    assert code == 0, out
    assert "soak: PASS" in out and "401" not in out and "errors: 0 " in out
    start = float(re.search(r"server RSS MB \(the service and its workers\): start ([0-9.]+)",
                            out)[1])  # type: ignore[index]  # fmt: skip
    assert start > 150, out  # two workers with a model each, not the supervisor alone
    with pytest.raises(ValueError, match="must be longer than --warmup"):
        run(5.0, 2, 1.0, 30.0, 50.0, "redis://127.0.0.1:1/0", free_port(), 1)
    assert rss_mb(os.getpid()) > 0


def test_bench_path_outside_is_each_round_s_rest() -> None:
    """``outside`` was the median total less the stages' medians: medians do not add,
    so rounds that each spent 0.10 ms outside printed 0.15. The median of each round's
    own rest now."""
    from training.bench_path import _add_round, _stage_summary

    times: dict[str, list[float]] = {k: [] for k in (*STAGES, "total")}
    for inference, write in ((0.40, 0.03), (0.90, 0.08), (0.95, 0.03)):
        stages = dict(parse=0.05, redis_fetch=0.02, feature_mapping=0.06,
                      inference=inference, serialization=0.04, write=write)  # fmt: skip
        _add_round(times, sum(stages.values()) + 0.10, stages)
    assert _stage_summary(times)["outside"] == pytest.approx(0.10)


def test_bench_path_voids_a_round_of_degraded_answers(tmp_path: Path) -> None:
    """A degraded answer is a 200 that skipped the Redis read: cheaper. bench-path
    printed its tables from them (a Redis read past 50 ms on a loaded machine, or none
    at all) where ``ctr bench`` voids such windows."""
    from service.settings import Settings
    from training.bench_path import _stage_costs
    from training.bench_util import run_loop
    from training.data import load_frame

    config, _ = make_bundle("din", tmp_path, 20)
    bodies = bodies_for(load_frame(config), 10)
    dead = f"redis://127.0.0.1:{free_port()}/0"
    settings = Settings(models_dir=str(tmp_path), model_name=config.name, redis_url=dead,
                        redis_timeout_ms=100, intra_op_threads=1, log_level="error")  # fmt: skip
    with pytest.raises(RuntimeError, match=r"degraded answers .* is Redis slow or down"):
        run_loop(_stage_costs(settings, bodies, 1, 3))


def test_a_benchmark_load_cut_short_leaves_a_database_it_may_load_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database was marked as a benchmark's only after its load: a load cut short
    (Ctrl-C, a Redis error) left thousands of keys unmarked, and the rerun its message
    asked for was refused without --force. Marked before the first write now."""
    import redis

    import service.loader as loader
    import training.bench_path as bench_path
    from service.loader import BENCH_KEY, check_bench_db

    config, _ = make_bundle("din", tmp_path, 20)
    proc = RedisProcess().start()
    try:

        def cut_short(config: Any, frame: Any, url: str, **kw: Any) -> None:
            redis.Redis.from_url(url).rpush("{u:u1}:seq", "{}")  # part of the load
            raise KeyboardInterrupt

        monkeypatch.setattr(loader, "load_into_redis", cut_short)  # load_bench_db's
        with pytest.raises(KeyboardInterrupt):
            bench_path.run(tmp_path, config.name, [10], proc.url, rounds=1, reps=1)
        client = redis.Redis.from_url(proc.url)
        assert client.exists(BENCH_KEY) and client.exists("{u:u1}:seq")
        check_bench_db(proc.url)  # the rerun is not refused
    finally:
        proc.stop()
