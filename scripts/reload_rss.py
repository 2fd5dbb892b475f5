"""A worker's resident memory over many reloads of one bundle: the app (``create_app``,
its lifespan under ``TestClient``) reloads ``--reloads`` times after 20 to warm up, and
prints the growth of VmRSS at each quarter. ``--no-trim``: without the heap trim after
each swap (``service.heaptrim``), to compare in one sitting.

Builds a DIN bundle (L=50) in a temporary folder. Redis is only connected to, not
written (``--redis-url``; an unreachable one serves degraded, which reloads ignore).

Usage: .venv/bin/python scripts/reload_rss.py [--reloads 200] [--no-trim]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reloads", type=int, default=200)
    ap.add_argument("--no-trim", action="store_true")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    args = ap.parse_args()

    from fastapi.testclient import TestClient

    from service import heaptrim
    from service.app import create_app
    from service.settings import Settings
    from training.bench_service import make_bundle

    if args.no_trim:
        heaptrim.MALLOC_TRIM = None
    heaptrim.TRIM_DELAY_S = 0.05  # each reload's trim before the next reload
    print(f"command: {' '.join(sys.argv)}")
    with tempfile.TemporaryDirectory(prefix="reload-rss-") as tmp:
        make_bundle("din", Path(tmp), 50)
        settings = Settings(models_dir=tmp, model_name="bench-din", api_key="k",
                            redis_url=args.redis_url, reload_channel="")  # fmt: skip
        with TestClient(create_app(settings)) as c:
            state = c.app.state.ctr  # type: ignore[attr-defined]

            def reload() -> None:
                r = c.post("/admin/reload", json={}, headers={"X-API-Key": "k"})
                assert r.status_code == 200, r.text
                time.sleep(0.1)  # the trim's wait, and the trim

            for _ in range(20):
                reload()
            time.sleep(0.5)
            base = rss_mb()
            marks = []
            for k in range(args.reloads):
                reload()
                if (k + 1) % max(args.reloads // 4, 1) == 0:
                    time.sleep(0.3)
                    marks.append(f"{rss_mb() - base:+.1f}")
            print(f"trim={'off' if args.no_trim else 'on'} reloads={args.reloads} "
                  f"(trims run: {state.heap_trims}) RSS after warm-up {base:.1f} MB; "
                  f"growth at each quarter: {', '.join(marks)} MB")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
