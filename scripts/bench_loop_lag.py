"""What ``ctr_event_loop_lag_seconds`` shows for an idle event loop: the floor that is
the timer's own wake-up, not a stall. Runs ``service.metrics.watch_loop_lag`` alone on
uvloop (what ``ctr serve`` runs) and on asyncio's own loop, and prints the mean lag and
the histogram's buckets.

Usage: .venv/bin/python scripts/bench_loop_lag.py [--seconds 5] [--interval-ms 50]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def samples() -> dict[str, float]:
    from prometheus_client import REGISTRY

    out: dict[str, float] = {}
    for metric in REGISTRY.collect():
        if metric.name == "ctr_event_loop_lag_seconds":
            for s in metric.samples:
                le = f" le={s.labels['le']}" if "le" in s.labels else ""
                out[s.name.rsplit("_", 1)[1] + le] = s.value
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--interval-ms", type=int, default=50)
    args = ap.parse_args()

    import uvloop

    from service.metrics import watch_loop_lag

    async def idle() -> None:
        watcher = asyncio.create_task(watch_loop_lag(args.interval_ms / 1000))
        await asyncio.sleep(args.seconds)
        watcher.cancel()

    print(f"command: .venv/bin/python scripts/bench_loop_lag.py {' '.join(sys.argv[1:])}")
    print(f"an idle loop, a timer due every {args.interval_ms} ms, {args.seconds:.0f} s:")
    for name, run in (("uvloop", uvloop.run), ("asyncio", asyncio.run)):
        before = samples()
        run(idle())
        after = samples()
        diff = {k: after[k] - before.get(k, 0.0) for k in after}
        n = diff["count"]
        buckets = sorted(
            ((float(k.split("=")[1]), v) for k, v in diff.items() if k.startswith("bucket")),
        )
        shares = ", ".join(f"<= {le * 1e3:g} ms {v / n:.0%}" for le, v in buckets[:4])
        print(f"  {name:8s} {n:4.0f} timers, mean lag {diff['sum'] / n * 1e3:.2f} ms; {shares}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
