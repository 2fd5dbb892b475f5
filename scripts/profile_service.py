"""Where the service's CPU goes at saturation: `perf record` of the real service while a
closed loop drives it, split by thread and, for the event loop's thread, by library and
function, in µs per request.

    .venv/bin/python scripts/profile_service.py --model din --n 200 --concurrency 8

Needs Linux `perf` (Debian: `apt-get install linux-perf`) and a Redis (`--redis-url`).
It builds a bench bundle (random weights, the synthetic data), loads its users, starts
`ctr serve` as `ctr bench` does, warms it for 2 s, then samples every thread of the
service at 2 kHz (`-e cpu-clock`, which works where hardware counters do not) for
`--seconds`. Functions of libraries without symbols show as addresses.

    .venv/bin/python scripts/profile_service.py --model din --n 200 --sampler py-spy

samples the event loop's Python stacks instead (`py-spy record --nonblocking`, 400 Hz;
`pip install py-spy` into the venv): each Python function's share of the loop thread's
samples, on its own (self: the innermost Python frame, native code it calls included)
and with what it calls (inclusive), and its sampled time in µs per request (samples /
400 Hz / requests in the window). Sampled time is not CPU time: py-spy samples a thread
that is running, waiting for a core, or in a wait it does not recognise as idle (until
session 32 this script scaled the shares to the thread's CPU time from /proc, which
understated every function by the ratio of the two, about 1.75x, and put the surplus,
the loop's waits, in the line of the loop's own run, `Runner.run`). The header prints
both totals; `perf` (the default sampler, cpu-clock) gives CPU time."""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.loader import check_bench_db, load_bench_db  # noqa: E402
from training.bench_client import closed_loop  # noqa: E402
from training.bench_server import (  # noqa: E402
    loop_cpu_s,
    service_env,
    start_service,
    stop_service,
)
from training.bench_service import bundle_for  # noqa: E402
from training.bench_util import bodies_for, run_loop  # noqa: E402

HZ = 2000
PYSPY_HZ = 400


def samples(data: Path, names: dict[int, str]) -> list[tuple[int, str, str]]:
    """``(thread, function, library)`` of each sample's innermost frame; ``names`` gets
    each thread's name."""
    out = subprocess.run(
        ["perf", "script", "-i", str(data), "-F", "comm,tid,ip,sym,dso"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    got: list[tuple[int, str, str]] = []
    tid, first = None, False
    for line in out.splitlines():
        if not line.strip():
            tid = None
        elif not line.startswith("\t"):
            comm, _, rest = line.strip().rpartition(" ")
            tid, first = int(rest), True
            names[tid] = comm.strip()
        elif first and tid is not None:
            ip, _, rest = line.strip().partition(" ")
            sym, _, dso = rest.rpartition(" (")
            if sym in ("", "[unknown]"):
                sym = ip
            got.append((tid, sym[:90], dso.rstrip(")").rsplit("/", 1)[-1]))
            first = False
    return got


def py_stacks(raw: Path) -> tuple[collections.Counter, collections.Counter, int]:
    """Self and inclusive sample counts per Python function of the main thread's stacks
    in py-spy's raw (collapsed) output, and the main thread's total."""
    own: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, k = line.rpartition(" ")
        frames = stack.split(";")
        if "MainThread" not in frames[0] or len(frames) < 2:
            continue
        total += int(k)
        own[frames[-1]] += int(k)
        for f in set(frames[1:]):
            incl[f] += int(k)
    return own, incl, total


def py_spy_profile(args: argparse.Namespace, proc: subprocess.Popen, url: str,
                   bodies: list[bytes], tmp: str) -> int:  # fmt: skip
    raw = Path(tmp) / "pyspy.raw"
    window = max(args.seconds - 1.0, 1.0)
    spy_bin = Path(sys.executable).with_name("py-spy")
    spy = subprocess.Popen(
        [str(spy_bin), "record", "--nonblocking", "-r", str(PYSPY_HZ), "-d", str(int(window)),
         "-p", str(proc.pid), "-f", "raw", "-o", str(raw), "--threads"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    cpu0 = loop_cpu_s(proc.pid)
    r = run_loop(closed_loop(url, bodies, args.concurrency, args.seconds))
    cpu1 = loop_cpu_s(proc.pid)
    spy.wait()
    own, incl, total = py_stacks(raw)
    if not total or cpu0 is None or cpu1 is None:
        print("no samples of the event loop's thread (is py-spy installed, may it attach?)")
        return 1
    per_req = (cpu1 - cpu0) / r["requests"] * 1e6  # the loop's CPU, µs per request
    in_window = r["rps"] * int(window)  # requests while py-spy sampled
    us = 1e6 / PYSPY_HZ / in_window  # µs per request one sample stands for
    sampled = total * us
    print(f"{args.model} N = {args.n}, concurrency {args.concurrency}: {r['rps']:,.0f} req/s; "
          f"event loop thread {per_req:.0f} µs of CPU per request (/proc), {sampled:.0f} µs "
          f"sampled ({total} samples at {PYSPY_HZ} Hz over {int(window)} s)")  # fmt: skip
    if sampled > 1.1 * per_req:
        print(f"(the samples exceed the CPU time by {sampled - per_req:.0f} µs per request: "
              "waits py-spy did not see as idle, and time waiting for a core; a wait in "
              "the loop itself lands in the line of its own run, Runner.run)")  # fmt: skip
    # the entry chain (runpy, uvicorn.run, the loop's run) is in the most stacks of all
    chain = max(incl.values(), default=0)
    incl = collections.Counter({f: k for f, k in incl.items() if k < chain})
    for title, counts in (
        ("on its own (self)", own),
        ("with what it calls (the entry chain, in every stack of the loop, left out)", incl),
    ):
        print(f"\nPython functions of the event loop, {title}:\n")
        print("| share of samples | µs sampled per request | function |\n|---:|---:|---|")
        for f, k in counts.most_common(args.top):
            print(f"| {k / total:.1%} | {k * us:.0f} | `{f}` |")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="din", help="din or dien")
    ap.add_argument("--n", type=int, default=200, help="candidates per request")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--top", type=int, default=25, help="functions listed")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    ap.add_argument("--force", action="store_true",
                    help="load into --redis-url even where it holds keys no benchmark wrote")
    ap.add_argument("--port", type=int, default=8390)
    ap.add_argument("--env", action="append", default=[], help="service setting, KEY=VALUE")
    ap.add_argument("--sampler", choices=("perf", "py-spy"), default="perf",
                    help="perf: every thread, native frames; py-spy: the event loop's "
                    "Python functions")  # fmt: skip
    args = ap.parse_args()
    try:  # a database of its own, as `ctr bench`'s: checked before anything is built
        check_bench_db(args.redis_url, args.force)
    except ValueError as exc:
        raise SystemExit(f"{ap.prog}: {exc}") from None
    extra = dict(e.split("=", 1) for e in args.env)
    with tempfile.TemporaryDirectory() as tmp:
        where, config, frame = bundle_for(args.model, None, tmp, None)
        load_bench_db(config, frame, args.redis_url)
        bodies = bodies_for(frame, args.n)
        env = service_env(where, config.name, args.redis_url, 2, 1, extra)
        proc, url = start_service(env, args.port)
        data = Path(tmp) / "perf.data"
        try:
            run_loop(closed_loop(url, bodies, args.concurrency, 2.0))
            if args.sampler == "py-spy":
                return py_spy_profile(args, proc, url, bodies, tmp)
            window = max(args.seconds - 1.0, 1.0)  # recorded inside the driven window
            perf = subprocess.Popen(
                ["perf", "record", "-e", "cpu-clock", "-F", str(HZ), "-g", "-o", str(data),
                 "-p", str(proc.pid), "--", "sleep", str(window)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            r = run_loop(closed_loop(url, bodies, args.concurrency, args.seconds))
            perf.wait()
        finally:
            stop_service(proc)
        names: dict[int, str] = {}
        got = samples(data, names)
    reqs = r["rps"] * window
    per_req = 1e6 / HZ / reqs  # µs of CPU per request that one sample stands for
    print(f"{args.model} N = {args.n}, concurrency {args.concurrency}: {r['rps']:,.0f} req/s, "
          f"{len(got)} samples over {window:g} s")  # fmt: skip
    by_thread = collections.Counter(t for t, _, _ in got)
    loop = proc.pid  # the event loop runs on the process's main thread
    print("\n| thread (name) | share of a core | µs per request |\n|---|---:|---:|")
    for t, k in by_thread.most_common(6):
        label = "event loop" if t == loop else f"{names.get(t, '?')} ({t})"
        print(f"| {label} | {k / HZ / window:.0%} | {k * per_req:.0f} |")
    mine = [(s, d) for t, s, d in got if t == loop]
    print("\nEvent loop thread by library (µs per request):\n")
    for d, k in collections.Counter(d for _, d in mine).most_common(10):
        print(f"  {k * per_req:7.1f}  {d}")
    print("\nEvent loop thread by function (µs per request):\n")
    for s, k in collections.Counter(s for s, _ in mine).most_common(args.top):
        print(f"  {k * per_req:7.1f}  {s}")
    print("\nEvery thread by library (µs per request):\n")
    for d, k in collections.Counter(d for _, _, d in got).most_common(10):
        print(f"  {k * per_req:7.1f}  {d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
