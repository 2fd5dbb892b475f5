"""``ctr bench`` end to end at a tiny size: it starts the real service on a real Redis,
drives it over HTTP and reports every figure the docs quote (no timing assertions)."""

from __future__ import annotations

import gc
import os
import platform
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.redis_proc import RedisProcess, free_port


def test_service_benchmark_reports_every_figure() -> None:
    from training.bench_service import render, run

    proc = RedisProcess().start()
    try:
        res = run(["din"], [20], [1, 2], 0.3, 1, proc.url, free_port(), inflight=2)
    finally:
        proc.stop()
    din = res["models"]["din"]
    mo = din["model_only"][20]
    assert mo["p50_ms"] > 0 and mo["parallel_rps"] > 0
    assert mo["sustained_rps"] == max(mo["single_rps"], mo["parallel_rps"])
    single = din["single"][20]
    assert single["requests"] > 0 and single["errors"] == 0
    assert set(single["stages_ms"]) == {
        "redis_fetch",
        "feature_mapping",
        "inference",
        "serialization",
    }
    assert all(v > 0 for v in single["stages_ms"].values())
    assert single["loop_cpu_ms"] > 0  # the service's event-loop CPU per request (/proc)
    sweep = din["saturation"][20]
    assert set(sweep) == {1, 2} and all(v["errors"] == 0 and v["rps"] > 0 for v in sweep.values())
    # where the machine's CPU goes per request at each point: the service (all its
    # processes and threads, /proc), the benchmark client, and the model alone
    assert all(v["service_cpu_ms"] > 0 and v["client_cpu_ms"] > 0 for v in sweep.values())
    assert mo["cpu_ms"] > 0
    table = render(res, "ctr bench --models din")
    assert "| din | 20 |" in table and "2 ORT run(s) in flight" in table
    assert "loop CPU ms/req" in table and "CPU ms/req: service" in table
    assert "1 uvicorn worker," in table
    # the machine line names the kernel release (a lent machine's sandbox shows in it)
    assert f"Linux {platform.release()}" in res["device"] and res["device"] in table
    assert (ROOT / "docs" / "benchmarks.md").read_text().count("ctr bench") >= 2


def test_service_cpu_counts_every_worker_process() -> None:
    """``tree_cpu_s`` walks a process's descendants (uvicorn's workers live through a
    measurement, so their time is never in the parent's reaped-children counters): a
    parent that only sleeps, with two live children that burned CPU, counts their time."""
    import subprocess
    import sys

    from training.bench_service import tree_cpu_s

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
    assert set(r["request_ms"]) == {"fast path", "FastAPI route"}
    assert set(r["check_us"]) == {"C-level check", "per-candidate check"}
    assert all(v > 0 for v in [*r["request_ms"].values(), *r["check_us"].values()])
    st = r["stage_ms"]
    assert set(st) == {"redis_fetch", "feature_mapping", "inference", "serialization",
                       "outside", "total"}  # fmt: skip
    assert all(st[k] > 0 for k in ("redis_fetch", "serialization", "total"))
    assert abs(sum(v for k, v in st.items() if k != "total") - st["total"]) < 1e-9
    import service.app

    assert service.app.STAGE_CLOCK is time.perf_counter  # restored after the run
    table = render(res, "ctr bench-path")
    assert "| 10 |" in table and "by the service's own stages" in table


def test_client_gc_off_restores_the_collector() -> None:
    from training.bench_service import client_gc_off, loop_cpu_s

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
