"""Run the locust scenario headless for a bounded time and write a report.

    python loadtest/run.py --host http://127.0.0.1:8000 --duration 30s --users 20 \\
        --spawn-rate 10 --out loadtest/out

Writes into --out: locust's CSVs (``locust_stats.csv``, ``locust_stats_history.csv``,
``locust_failures.csv``, ...), ``locust.log``, ``report.md`` (p50/p95/p99, requests/s and
failures overall and per candidate-count bucket) and ``latency.png`` (latency over time
and latency by candidate count). Exit status: 0 when every request succeeded, 1 when
some failed (unless --allow-failures), 2 when locust produced no statistics, 3 when
more scores than LOCUST_MAX_COLD_START_SHARE were cold starts (the locustfile's check;
--allow-failures does not cover it).

With --from-csv, locust is not run: the report and chart are made from the CSVs (and
``locust_final.json``) that a locust run already wrote into --out with ``--csv
<out>/locust --csv-full-history --json-file <out>/locust_final`` (the compose
``loadtest`` profile's container in scripts/stack_smoke.sh); --host/--duration/--users/
--spawn-rate then only label the report, and --locust-exit-code is that run's status.

Traffic knobs (LOCUST_USERS_N, LOCUST_ZIPF_A, LOCUST_CANDIDATE_MIX, LOCUST_EVENT_SHARE,
...) are environment variables read by loadtest/locustfile.py.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
PREFIX = "locust"
JSON_STEM = "locust_final"  # locust appends .json
BUCKET_RE = re.compile(r"\[N=(\d+)\]")
PERCENTILES = ("50%", "95%", "99%")


COLD_START_EXIT = 3  # loadtest/locustfile.py COLD_START_EXIT
VERDICT = "locust_verdict.txt"  # the locustfile's FAIL line at exit (PREFIX + its VERDICT)
WINDOW = "locust_window.json"  # the run's start, written by the locustfile at exit


def parse_duration(text: str) -> float:
    """Locust-style durations: ``90``, ``30s``, ``2m``, ``1h30m``, ``1m30s`` -> seconds."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise argparse.ArgumentTypeError(f"bad duration {text!r} (use e.g. 30s, 2m, 1h30m)")
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0}
    return sum(float(n) * scale[u] for n, u in parts)


def _duration_arg(text: str) -> str:
    """argparse's check of --duration: a bad one is a usage error (exit 2), not a
    traceback with exit status 1, which says a request failed."""
    parse_duration(text)
    return text


def locust_command(args: argparse.Namespace, out: Path) -> list[str]:
    seconds = parse_duration(args.duration)
    return [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(args.locustfile),
        "--headless",
        "--host",
        args.host,
        "--users",
        str(args.users),
        "--spawn-rate",
        str(args.spawn_rate),
        "--run-time",
        f"{max(1, math.ceil(seconds))}s",
        "--stop-timeout",
        str(args.stop_timeout),
        "--csv",
        str(out / PREFIX),
        "--csv-full-history",
        "--only-summary",
        "--loglevel",
        args.loglevel,
        "--logfile",
        str(out / "locust.log"),
    ] + (["--json-file", str(out / JSON_STEM)] if json_supported() else [])


def json_supported() -> bool:
    """Whether this locust writes its final statistics with --json-file (2.33+)."""
    try:
        help_text = subprocess.run(
            [sys.executable, "-m", "locust", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--json-file" in help_text


def run_locust(args: argparse.Namespace, out: Path) -> int:
    """Run locust; never longer than duration + stop timeout + a grace period."""
    cmd = locust_command(args, out)
    limit = parse_duration(args.duration) + args.stop_timeout + args.grace
    print("running:", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd)
    try:
        return proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        print(f"locust still running after {limit:.0f}s: stopping it", file=sys.stderr)
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return 124


def bucket_of(name: str) -> int | None:
    match = BUCKET_RE.search(str(name))
    return int(match.group(1)) if match else None


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def load_stats(out: Path) -> pd.DataFrame:
    """locust_stats.csv, one row per request name plus the 'Aggregated' row."""
    stats = pd.read_csv(out / f"{PREFIX}_stats.csv")
    stats["Name"] = stats["Name"].astype(str)
    stats["bucket"] = stats["Name"].map(bucket_of)
    return stats


def percentile(response_times: dict[float, int], fraction: float) -> float:
    """Locust's percentile over its rounded response-time histogram (ms -> count)."""
    total = sum(response_times.values())
    if total == 0:
        return float("nan")
    wanted = int(total * fraction)
    processed = 0
    for rt in sorted(response_times, reverse=True):
        processed += response_times[rt]
        if total - processed <= wanted:
            return float(rt)
    return 0.0


def _window(entries: list[dict], run_start: float | None = None) -> float:
    """The run's window over every entry, as locust's own CSV divides each row by: from
    the run's start (``run_start``, the locustfile's ``locust_window.json``) to its last
    answer. An entry starts at its name's first answer, so a rare name's own span was a
    few microseconds (one request read as 100,000 req/s), and without ``run_start`` the
    earliest entry still starts one latency into the run (a service answering in 3 s
    read 1.74 req/s for about 1.3)."""
    start = min(float(e["start_time"]) for e in entries)
    if run_start is not None:
        start = min(start, run_start)
    last = max(float(e["last_request_timestamp"] or start) for e in entries)
    return max(last - start, 1e-9)


def _json_row(name: str, method: str, entries: list[dict], window: float) -> dict:
    times: dict[float, int] = {}
    for e in entries:
        for rt, count in e["response_times"].items():
            times[float(rt)] = times.get(float(rt), 0) + int(count)
    requests = sum(int(e["num_requests"]) for e in entries)
    total_rt = sum(float(e["total_response_time"]) for e in entries)
    return {
        "Type": method,
        "Name": name,
        "Request Count": requests,
        "Failure Count": sum(int(e["num_failures"]) for e in entries),
        "Average Response Time": total_rt / requests if requests else float("nan"),
        "Max Response Time": max(float(e["max_response_time"] or 0) for e in entries),
        "Requests/s": requests / window,
        **{f"{round(q * 100)}%": percentile(times, q) for q in (0.5, 0.95, 0.99)},
    }


def _run_start(out: Path) -> float | None:
    """When the run started (locust's ``stats.start_time``), from the locustfile's
    ``locust_window.json``; None where it is missing (a locustfile of before)."""
    import json

    try:
        return float(json.loads((out / WINDOW).read_text())["start_time"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def stats_from_json(path: Path, run_start: float | None = None) -> pd.DataFrame:
    """Final per-request statistics from locust's --json-file (exact at shutdown, whereas
    the stats CSV is rewritten once a second and can miss the last second)."""
    import json

    entries = json.loads(path.read_text())
    window = _window(entries, run_start) if entries else 1.0
    rows = [_json_row(e["name"], e["method"], [e], window) for e in entries]
    if entries:
        rows.append(_json_row("Aggregated", "", entries, window))
    stats = pd.DataFrame(rows)
    if not stats.empty:
        stats["bucket"] = stats["Name"].map(bucket_of)
    return stats


def load_history(out: Path) -> pd.DataFrame:
    path = out / f"{PREFIX}_stats_history.csv"
    if not path.exists():
        return pd.DataFrame()
    hist = pd.read_csv(path)
    for col in hist.columns:
        if col not in ("Type", "Name"):
            hist[col] = pd.to_numeric(hist[col], errors="coerce")
    hist["Name"] = hist["Name"].astype(str)
    if not hist.empty:
        hist["elapsed_s"] = hist["Timestamp"] - hist["Timestamp"].min()
    return hist


def _row_summary(row: pd.Series, seconds: float) -> dict:
    requests = int(row["Request Count"])
    failures = int(row["Failure Count"])
    return {
        "requests": requests,
        "failures": failures,
        "failure_pct": 100.0 * failures / requests if requests else 0.0,
        # locust's own Requests/s divides by the whole run, including the spawn ramp
        "rps": _num(row["Requests/s"]) if "Requests/s" in row else requests / seconds,
        "avg_ms": _num(row["Average Response Time"]),
        "p50_ms": _num(row["50%"]),
        "p95_ms": _num(row["95%"]),
        "p99_ms": _num(row["99%"]),
        "max_ms": _num(row["Max Response Time"]),
    }


def summarize(stats: pd.DataFrame, seconds: float) -> tuple[dict, list[tuple[str, dict]]]:
    agg = stats[stats["Name"] == "Aggregated"]
    if agg.empty:
        raise ValueError("no Aggregated row in the stats CSV")
    overall = _row_summary(agg.iloc[0], seconds)
    rows = stats[stats["Name"] != "Aggregated"].copy()
    rows["order"] = rows["bucket"].fillna(math.inf)
    per_name = [
        (r["Name"], _row_summary(r, seconds)) for _, r in rows.sort_values("order").iterrows()
    ]
    return overall, per_name


def _fmt(value: float, digits: int = 1) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else (f"{value:.{digits}f}")
    )


def _without_password(url: str) -> str:
    """``url`` with any ``user:password@`` taken out (the report is shared)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def _shown(name: str, value: str) -> str:
    """An environment value as the report may show it: a key, token, password or secret
    never (the report is shared)."""
    secret = any(w in name.upper() for w in ("KEY", "TOKEN", "PASSWORD", "SECRET"))
    if secret and value:
        return "***"
    return _without_password(value) if "://" in value else value


def write_report(
    out: Path,
    args: argparse.Namespace,
    overall: dict,
    per_name: list[tuple[str, dict]],
    failures: pd.DataFrame,
    exit_code: int,
    plot: Path | None,
) -> Path:
    header = (
        "| request | requests | failures | fail % | req/s | avg ms | p50 ms | p95 ms | "
        "p99 ms | max ms |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )

    def line(name: str, s: dict) -> str:
        return (
            f"| {name} | {s['requests']} | {s['failures']} | {_fmt(s['failure_pct'], 2)} | "
            f"{_fmt(s['rps'], 2)} | {_fmt(s['avg_ms'])} | {_fmt(s['p50_ms'])} | "
            f"{_fmt(s['p95_ms'])} | {_fmt(s['p99_ms'])} | {_fmt(s['max_ms'])} |\n"
        )

    env_keys = sorted(k for k in os.environ if k.startswith("LOCUST_"))
    text = [
        "# Load test report\n\n",
        f"- host: `{_without_password(args.host)}`\n",
        f"- duration: {args.duration}, users: {args.users}, spawn rate: {args.spawn_rate}/s\n",
        f"- finished: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, locust exit code {exit_code}\n",
    ]
    if env_keys:
        shown = [f"`{k}={_shown(k, os.environ[k])}`" for k in env_keys]
        text.append("- traffic: " + ", ".join(shown) + "\n")
    text += [
        "\n## Overall\n\n",
        f"- requests: {overall['requests']}, failures: {overall['failures']} "
        f"({_fmt(overall['failure_pct'], 2)}%)\n",
        f"- throughput: {_fmt(overall['rps'], 2)} requests/s\n",
        f"- latency: p50 {_fmt(overall['p50_ms'])} ms, p95 {_fmt(overall['p95_ms'])} ms, "
        f"p99 {_fmt(overall['p99_ms'])} ms\n",
        "\n## By candidate count\n\n",
        header,
        *(line(name, s) for name, s in per_name),
        line("**all**", overall),
    ]
    if not failures.empty:
        text.append("\n## Failures\n\n| method | name | error | occurrences |\n")
        text.append("|---|---|---|---:|\n")
        for _, f in failures.iterrows():
            error = str(f.get("Error", "")).replace("|", "\\|").replace("\n", " ")[:300]
            text.append(
                f"| {f.get('Method', '')} | {f.get('Name', '')} | {error} | "
                f"{f.get('Occurrences', '')} |\n"
            )
    verdict = out / VERDICT
    if verdict.exists():
        text.append(f"\n## Verdict\n\n{verdict.read_text().strip()}\n")
    if plot is not None:
        text.append(f"\n## Charts\n\n![latency]({plot.name})\n")
    path = out / "report.md"
    path.write_text("".join(text))
    return path


def plot_latency(out: Path, history: pd.DataFrame, per_name: list[tuple[str, dict]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_n) = plt.subplots(1, 2, figsize=(14, 5))
    agg = history[history["Name"] == "Aggregated"] if not history.empty else history
    if "Total Request Count" in agg:
        agg = agg[agg["Total Request Count"] > 0]  # before the first response: no latency
    # locust's current percentiles are over a trailing window, empty at first: 0 there
    # is no latency, not a fast one
    known = [p for p in PERCENTILES if p in agg]
    if known:
        agg = agg[(agg[known].fillna(0) > 0).any(axis=1)]
    if not agg.empty:
        for pct, style in zip(PERCENTILES, ("-", "--", ":"), strict=True):
            ax_time.plot(agg["elapsed_s"], agg[pct], style, label=f"p{pct.rstrip('%')}")
        ax_rps = ax_time.twinx()
        ax_rps.plot(agg["elapsed_s"], agg["Requests/s"], color="grey", alpha=0.4, label="req/s")
        ax_rps.set_ylabel("requests/s")
        ax_rps.legend(loc="upper right")
    ax_time.set_title("Latency over time (all requests)")
    ax_time.set_xlabel("seconds since start")
    ax_time.set_ylabel("ms")
    ax_time.legend(loc="upper left")
    ax_time.grid(alpha=0.3)

    buckets = sorted((bucket_of(name), s) for name, s in per_name if bucket_of(name) is not None)
    if buckets:
        xs = [b for b, _ in buckets]
        for key, label, marker in (
            ("p50_ms", "p50", "o"),
            ("p95_ms", "p95", "s"),
            ("p99_ms", "p99", "^"),
        ):
            ax_n.plot(xs, [s[key] for _, s in buckets], marker=marker, label=label)
        ax_n.set_xticks(xs)
    ax_n.set_title("Score latency by candidate count")
    ax_n.set_xlabel("candidates per request (N)")
    ax_n.set_ylabel("ms")
    ax_n.legend(loc="upper left")
    ax_n.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--host", default="http://127.0.0.1:8000")
    p.add_argument("--duration", default="30s", type=_duration_arg, help="run time, e.g. 30s, 2m")
    p.add_argument("--users", type=int, default=20, help="concurrent simulated users")
    p.add_argument("--spawn-rate", type=float, default=10, help="users started per second")
    p.add_argument("--out", type=Path, default=HERE / "out")
    p.add_argument("--locustfile", type=Path, default=HERE / "locustfile.py")
    p.add_argument("--allow-failures", action="store_true", help="exit 0 even with failures")
    p.add_argument("--stop-timeout", type=int, default=10, help="seconds for users to finish")
    p.add_argument("--grace", type=float, default=60.0, help="extra seconds before killing")
    p.add_argument("--loglevel", default="WARNING")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument(
        "--from-csv",
        action="store_true",
        help="do not run locust: report on the locust CSVs/JSON already in --out",
    )
    p.add_argument(
        "--locust-exit-code", type=int, default=0, help="with --from-csv: locust's exit status"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    seconds = parse_duration(args.duration)
    out: Path = args.out.resolve()
    args.locustfile = args.locustfile.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.from_csv:
        code = args.locust_exit_code
    else:
        # a previous run's files: a run that fails before writing its own left them as
        # if they were its (the report, the chart)
        leftovers = [out / f"{JSON_STEM}.json", out / VERDICT, out / WINDOW,
                     out / "report.md", out / "latency.png"]  # fmt: skip
        for old in [*out.glob(f"{PREFIX}_*.csv"), *leftovers]:
            old.unlink(missing_ok=True)
        code = run_locust(args, out)
    json_path = out / f"{JSON_STEM}.json"
    if json_path.exists():
        stats = stats_from_json(json_path, _run_start(out))
    elif (out / f"{PREFIX}_stats.csv").exists():
        stats = load_stats(out)
    else:
        stats = pd.DataFrame()
    if stats.empty:  # no file, or one without a request (every user died at its start)
        log = out / "locust.log"
        where = log if log.exists() and log.stat().st_size else "locust's output above"
        print(f"locust exited {code} without statistics (no request was recorded); see {where}",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        overall, per_name = summarize(stats, seconds)
    except ValueError as exc:
        print(f"unusable statistics: {exc}", file=sys.stderr)
        return 2
    # the table the locustfile wrote at exit; locust's own is up to a second old
    failures_path = out / f"{PREFIX}_failures_final.csv"
    if not failures_path.exists():
        failures_path = out / f"{PREFIX}_failures.csv"
    failures = pd.read_csv(failures_path) if failures_path.exists() else pd.DataFrame()
    plot = None if args.no_plot else plot_latency(out, load_history(out), per_name)
    report = write_report(out, args, overall, per_name, failures, code, plot)

    print(report.read_text())
    if overall["requests"] == 0:
        print("no requests were made", file=sys.stderr)
        return 2
    # locust itself exits 1 when any request failed, which hides the cold-start verdict's
    # status: the verdict file is the locustfile's own record of it (--from-csv too)
    if code == COLD_START_EXIT or (out / VERDICT).exists():
        print("too many cold starts: see the locust output's FAIL line", file=sys.stderr)
        return COLD_START_EXIT
    if (overall["failures"] or code == 1) and not args.allow_failures:
        print(
            f"{overall['failures']} failed requests (use --allow-failures to accept)",
            file=sys.stderr,
        )
        return 1
    if code not in (0, 1):
        print(f"locust exited {code}; see {out / 'locust.log'}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
