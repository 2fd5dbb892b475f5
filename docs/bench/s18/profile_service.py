"""Session 18's profile of ``ctr serve`` at saturation (ad hoc; docs/benchmarks.md,
"Session 18"). Builds a random-weight bundle, loads its users into Redis, starts the
service, drives it closed-loop and records it for 8 s with ``perf`` (by shared object:
where the service's CPU goes, Python and kernel included) or ``py-spy`` (Python frames).

    python docs/bench/s18/profile_service.py perf din 50 2 out.perf [REDIS_URL]
    perf report -i out.perf --no-children --sort pid,dso -g none --stdio
    python docs/bench/s18/profile_service.py py-spy din 50 2 out.txt [REDIS_URL]

``perf`` comes from Debian's ``linux-perf``; ``py-spy`` from PyPI (``PYSPY`` names the
binary, default ``py-spy``). Both slow the service down: read shares, not rates.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import training.bench_client as bc  # noqa: E402
import training.bench_server as bsv  # noqa: E402
import training.bench_service as bs  # noqa: E402
from service.loader import load_into_redis  # noqa: E402
from training.bench_util import bodies_for  # noqa: E402


def main() -> None:
    tool, mt, n, c, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    redis = sys.argv[6] if len(sys.argv) > 6 else "redis://127.0.0.1:6379/12"
    with tempfile.TemporaryDirectory() as tmp:
        config, frame = bs.make_bundle(mt, Path(tmp), 50)
        load_into_redis(config, frame, redis, progress=False)
        env = bsv.service_env(Path(tmp), config.name, redis, 2, 1, {})
        proc, url = bsv.start_service(env, 8413)
        try:
            bodies = bodies_for(frame, n)
            asyncio.run(bc.closed_loop(url, bodies, c, 2))  # warm
            pid = str(proc.pid)
            if tool == "perf":
                cmd = ["perf", "record", "-e", "cpu-clock", "-F", "999", "--call-graph", "fp",
                       "-p", pid, "-o", out, "--", "sleep", "8"]  # fmt: skip
            else:
                spy = os.environ.get("PYSPY", "py-spy")
                cmd = [spy, "record", "-p", pid, "-d", "8", "-r", "500", "-f", "raw",
                       "-o", out, "--threads", "--nonblocking"]  # fmt: skip
            rec = subprocess.Popen(cmd)
            r = asyncio.run(bc.closed_loop(url, bodies, c, 9))
            rec.wait()
            print(f"while recorded: {r['rps']:.0f} req/s, p50 {r['p50_ms']:.2f} ms")
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
