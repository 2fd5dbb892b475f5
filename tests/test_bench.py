"""``ctr bench`` end to end at a tiny size: it starts the real service on a real Redis,
drives it over HTTP and reports every figure the docs quote (no timing assertions)."""

from __future__ import annotations

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
    sweep = din["saturation"][20]
    assert set(sweep) == {1, 2} and all(v["errors"] == 0 and v["rps"] > 0 for v in sweep.values())
    table = render(res, "ctr bench --models din")
    assert "| din | 20 |" in table and "2 ORT run(s) in flight" in table
    assert (ROOT / "docs" / "benchmarks.md").read_text().count("ctr bench") >= 2
