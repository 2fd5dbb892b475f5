"""Session 17's open-loop probes (ad hoc; the figures in docs/benchmarks.md, "Session 17").

    python docs/bench/s17/open-loop/probe.py client din 100   # plain sleep vs clock watch
    python docs/bench/s17/open-loop/probe.py stages din       # service stages: closed vs open
    python docs/bench/s17/open-loop/probe.py warm din         # with two nice-19 spinners

Each builds a random-weight bundle, loads its users into Redis (``REDIS``, a private
instance: ``redis-server --port 16400 --save '' --appendonly no``), starts ``ctr serve``
and prints one JSON line per window.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))

import training.bench_client as bc  # noqa: E402
import training.bench_metrics as bm  # noqa: E402
import training.bench_server as bsv  # noqa: E402
import training.bench_service as bs  # noqa: E402
from service.loader import load_into_redis  # noqa: E402
from training.bench_util import bodies_for  # noqa: E402

REDIS = "redis://127.0.0.1:16400/12"


def client(url: str, bodies: list[bytes], n: int, rate: float) -> None:
    for spin in (0.0, 0.0015, 0.0015, 0.0):  # interleaved: off, on, on, off
        bc.SEND_SPIN_S = spin
        o = asyncio.run(bc.open_loop(url, bodies, rate, 5))
        keys = ("rps", "p50_ms", "p99_ms", "sent_p50_ms", "sent_p99_ms")
        print(json.dumps({"n": n, "spin_ms": spin * 1000, **{k: round(o[k], 2) for k in keys}}))


def stages(url: str, bodies: list[bytes], n: int) -> None:
    for kind in ("closed", "open", "closed", "open"):
        before = httpx.get(url + "/metrics").text
        if kind == "open":
            p50 = asyncio.run(bc.open_loop(url, bodies, 100, 5))["sent_p50_ms"]
        else:
            p50 = asyncio.run(bc.closed_loop(url, bodies, 1, 3))["p50_ms"]
        st = bm.stage_means(before, httpx.get(url + "/metrics").text)
        ms = {k: round(v * 1000, 3) for k, v in st.items()}
        print(json.dumps({"n": n, "kind": kind, "client_p50": round(p50, 2), **ms}))


def warm(url: str, bodies: list[bytes], n: int) -> None:
    spinner = [sys.executable, "-c", "while 1: pass"]
    for spin in (False, True, False, True):
        procs = [subprocess.Popen(["nice", "-n", "19", *spinner]) for _ in range(2 * spin)]
        time.sleep(0.3)
        try:
            o = asyncio.run(bc.open_loop(url, bodies, 100, 5))
            c = asyncio.run(bc.closed_loop(url, bodies, 1, 3))
        finally:
            for p in procs:
                p.kill()
        row = {
            "n": n,
            "spinners": spin,
            "open_p50": o["p50_ms"],
            "open_p99": o["p99_ms"],
            "sent_p50": o["sent_p50_ms"],
            "c1_p50": c["p50_ms"],
            "c1_p99": c["p99_ms"],
        }
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}))


def main() -> None:
    what, mt = sys.argv[1], sys.argv[2]
    with tempfile.TemporaryDirectory() as tmp:
        config, frame = bs.make_bundle(mt, Path(tmp), 50)
        load_into_redis(config, frame, REDIS, progress=False)
        env = bsv.service_env(Path(tmp), config.name, REDIS, 2, 1, {})
        proc, url = bsv.start_service(env, 8413)
        try:
            for n in (50, 500):
                bodies = bodies_for(frame, n)
                asyncio.run(bc.closed_loop(url, bodies, 1, 2))  # warm
                if what == "client":
                    client(url, bodies, n, float(sys.argv[3]))
                elif what == "stages":
                    stages(url, bodies, n)
                else:
                    warm(url, bodies, n)
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
