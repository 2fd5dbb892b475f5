"""``ctr bench``'s report: the Markdown tables (latency, worst case, saturation, every
sweep point, open loop) with the header that says how they were measured, and the
plots."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from training.bench_client import SEND_SPIN_S
from training.bench_measure import BODIES


def workers(res: dict[str, Any]) -> int:
    return int(res.get("env", {}).get("CTR_WORKERS", os.environ.get("CTR_WORKERS", "1")))


def _workers_text(res: dict[str, Any]) -> str:
    w = workers(res)
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
