"""The Grafana dashboard's PromQL, read for what it computes: the expressions taken from
deploy/grafana/dashboards/ctr.json and evaluated by ``promtool test rules`` on synthetic
series (where promtool is installed: Debian's ``prometheus``), and checked for their form
everywhere (so that a dashboard edit that brings a misreading back fails without it)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import promtool_or_skip

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "ctr.json"


def _panels() -> list[dict[str, Any]]:
    def walk(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for p in panels:
            out.append(p)
            out += walk(p.get("panels", []))
        return out

    return walk(json.loads(DASHBOARD.read_text())["panels"])


def panel_exprs(title: str) -> dict[str, str]:
    """The expressions of the panel titled ``title``, by legend."""
    [panel] = [p for p in _panels() if p.get("title") == title]
    return {t["legendFormat"]: t["expr"] for t in panel["targets"]}


def promtool_eval(
    tmp_path: Path, series: dict[str, str], checks: list[tuple[str, list[tuple[str, float]]]]
) -> None:
    """Each expression of ``checks`` evaluated at 5 minutes over ``series`` (promtool's
    notation, one sample a minute) gives the samples listed: (labels, value)."""
    promtool = promtool_or_skip()
    case = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in series.items()],
            "promql_expr_test": [
                {"expr": expr, "eval_time": "5m",
                 "exp_samples": [{"labels": labels, "value": value} for labels, value in want]}
                for expr, want in checks
            ],
        }],
    }  # fmt: skip
    path = tmp_path / "queries_test.yml"
    path.write_text(yaml.safe_dump(case, sort_keys=False))
    done = subprocess.run([promtool, "test", "rules", path.name], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


# -- whole-number histograms: quantiles read as whole numbers -----------------------------


def test_users_per_graph_call_quantiles_read_whole_users(tmp_path: Path) -> None:
    """Every graph call of one user (micro-batching off): p50 and p99 are 1. Unrounded,
    histogram_quantile spread the (0.5, 1.5] bucket's count over its width and read p99
    1.49, "above 1", which docs/api.md says means micro-batching merged requests; every
    call of 3 users read p99 3.49."""
    exprs = panel_exprs("Users per graph call (micro-batching)")
    for legend in ("p50", "p99"):
        assert exprs[legend].startswith("round(histogram_quantile("), exprs[legend]
    buckets = ("0.5", "1.5", "2.5", "3.5", "4.5", "+Inf")
    one = {f'ctr_batch_users_bucket{{le="{le}"}}': "0x10" if le == "0.5" else "0+60x10"
           for le in buckets}  # fmt: skip
    three = {f'ctr_batch_users_bucket{{le="{le}"}}': "0+60x10" if le in ("3.5", "4.5", "+Inf")
             else "0x10" for le in buckets}  # fmt: skip
    for series, users in ((one, 1), (three, 3)):
        promtool_eval(tmp_path, series, [(exprs[q], [("{}", users)]) for q in ("p50", "p99")])


def test_candidates_per_request_quantiles_read_whole_candidates(tmp_path: Path) -> None:
    """Every request of one candidate: p50 and p95 are 1 (unrounded, p95 read 1.475)."""
    exprs = panel_exprs("Candidates per request")
    for legend in ("p50", "p95"):
        assert exprs[legend].startswith("round(histogram_quantile("), exprs[legend]
    series = {f'ctr_candidates_per_request_bucket{{le="{le}"}}': "0x10" if le == "0.5"
              else "0+60x10" for le in ("0.5", "1.5", "9.5", "10.5", "+Inf")}  # fmt: skip
    promtool_eval(tmp_path, series, [(exprs[q], [("{}", 1)]) for q in ("p50", "p95")])


# -- shares of a worker's time: not summed over the workers -------------------------------


def test_gc_pause_share_is_per_worker(tmp_path: Path) -> None:
    """Two workers, each of whose event loop GC stopped 30 % of the time: the panel says
    30 % ("share of the time the event loop was stopped"). ctr_gc_pause_seconds pools the
    workers' pauses (multiprocess mode sums their files), and the plain rate read 60 %,
    with N workers up to N x 100 %."""
    [expr] = panel_exprs("GC pause time per second by generation").values()
    assert "count(ctr_worker_resident_memory_bytes)" in expr, expr
    series = {
        'ctr_gc_pause_seconds_sum{generation="2"}': "0+36x10",  # 0.6 s a second, pooled
        'ctr_worker_resident_memory_bytes{pid="11"}': "1e8x10",
        'ctr_worker_resident_memory_bytes{pid="12"}': "1e8x10",
    }
    promtool_eval(tmp_path, series, [(expr, [('{generation="2"}', 0.3)])])


# -- no errors reads 0, not "No data" ------------------------------------------------------


def test_error_panels_read_0_without_errors(tmp_path: Path) -> None:
    """A service that has answered no error yet exports no ctr_errors_total series and no
    non-2xx request series (they are made at their first use): the two error panels read
    0, as "5xx/s" does, not an empty "No data" that reads like a broken panel; with
    errors, one line per kind / route and status, and no 0 line beside them."""
    errors = panel_exprs("Errors/s by kind")["{{kind}}"]
    non_2xx = panel_exprs("Non-2xx responses/s")["{{route}} {{status}}"]
    for expr in (errors, non_2xx):
        assert expr.endswith(" or on() vector(0)"), expr
    healthy = {'ctr_request_duration_seconds_count{route="/v1/score", status="200"}': "0+60x10"}
    promtool_eval(tmp_path, healthy, [(errors, [("{}", 0)]), (non_2xx, [("{}", 0)])])
    failing = healthy | {
        'ctr_errors_total{kind="bad_request"}': "0+60x10",
        'ctr_request_duration_seconds_count{route="/v1/score", status="422"}': "0+60x10",
    }
    promtool_eval(tmp_path, failing, [
        (errors, [('{kind="bad_request"}', 1)]),
        (non_2xx, [('{route="/v1/score", status="422"}', 1)]),
    ])  # fmt: skip


# -- a ratio whose numerator is not 0 at idle: no value, not numerator / 1e-9 -------------


def test_cpu_per_request_reads_nothing_without_requests(tmp_path: Path) -> None:
    """The workers use CPU with no scoring request at all (the loop-lag timer, the
    tracking heartbeat, scrapes): clamp_min(requests/s, 1e-9) made an idle minute read
    that CPU over 1e-9, about 2e7 s a request (0.02 of a core), and the legend's max
    and mean with it. Without requests the panel has no value; with them, CPU / request."""
    [expr] = panel_exprs("CPU per scoring request").values()
    idle = {
        "ctr_worker_cpu_seconds_total": "0+1.2x10",  # 0.02 of a core
        'ctr_request_duration_seconds_count{route="/v1/score", status="200"}': "5x10",
    }
    busy = idle | {
        "ctr_worker_cpu_seconds_total": "0+60x10",  # one core
        'ctr_request_duration_seconds_count{route="/v1/score", status="200"}': "0+6000x10",
    }
    promtool_eval(tmp_path, idle, [(expr, [])])
    promtool_eval(tmp_path, busy, [(expr, [("{}", 0.01)])])
