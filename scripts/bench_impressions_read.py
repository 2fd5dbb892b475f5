"""What ``ctr impressions`` costs to read a large impression log: time and peak memory.

    .venv/bin/python scripts/bench_impressions_read.py --redis-url redis://127.0.0.1:6379/15 \\
        --entries 20000 --items 100 --users 5000 [--keep]
    /usr/bin/time -v .venv/bin/ctr impressions --redis-url ... --stream bench:impressions-read

Fills ``bench:impressions-read`` with ``--entries`` logged responses of ``--items``
ranked items each (bodies shaped as the service writes them), spread over ``--users``
users, each with a history of 20 stored behaviours of which a few are clicks on items it
was served; then times ``ctr impressions`` on it in a child process and prints its wall
time and peak resident memory (``ru_maxrss``). The keys are deleted afterwards unless
``--keep``. The figures depend on this stream's shape only: no service runs.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import orjson
from redis import Redis

from service.store import user_key

STREAM = "bench:impressions-read"
# its own users: the synthetic data's and locust's are u0, u1..., whose histories it
# deleted before and after the run
USER = "bench-imp-u"


def fill(redis: Redis, entries: int, items: int, users: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    now = time.time() - 2 * 3600  # the default 3600 s click window has closed: none pending
    pipe = redis.pipeline(transaction=False)
    for u in range(users):
        events = [
            orjson.dumps({"item_id": f"i{rng.randrange(items * 4)}", "ts": now + rng.random() * 600,
                          "type": "click" if rng.random() < 0.3 else "view"})  # fmt: skip
            for _ in range(20)
        ]
        pipe.rpush(user_key(f"{USER}{u}", "seq"), *events)
        if u % 500 == 499:
            pipe.execute()
    for e in range(entries):
        ranked = rng.sample(range(items * 4), items)
        body = {
            "model": {"name": "din", "version": "1"},
            "request_id": f"{e:032x}",
            "degraded": False,
            "cold_start": False,
            "items": [
                {"item_id": f"i{i}", "rank": r + 1, "probability": rng.random()}
                for r, i in enumerate(ranked)
            ],
        }
        fields = {"ts": repr(now + rng.random() * 300), "user_id": f"{USER}{rng.randrange(users)}",
                  "context": b"{}", "response": orjson.dumps(body)}  # fmt: skip
        pipe.xadd(STREAM, fields)  # type: ignore[arg-type]
        if e % 500 == 499:
            pipe.execute()
    pipe.execute()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--redis-url", required=True)
    p.add_argument("--entries", type=int, default=20000)
    p.add_argument("--items", type=int, default=100)
    p.add_argument("--users", type=int, default=5000)
    p.add_argument("--keep", action="store_true", help="leave the stream and histories")
    p.add_argument("--ctr", default=str(Path(sys.executable).with_name("ctr")),
                   help="the ctr command to time (another checkout's, to compare)")  # fmt: skip
    args = p.parse_args(argv)
    redis = Redis.from_url(args.redis_url)
    redis.delete(STREAM, *[user_key(f"{USER}{u}", "seq") for u in range(args.users)])
    t = time.perf_counter()
    fill(redis, args.entries, args.items, args.users)
    print(f"filled {args.entries} entries x {args.items} items in {time.perf_counter() - t:.1f} s")
    cmd = [args.ctr, "impressions", "--redis-url", args.redis_url, "--stream", STREAM]
    try:
        t = time.perf_counter()
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        wall = time.perf_counter() - t
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        figures = json.loads(out)
        print(f"{' '.join(cmd)}")
        rows = figures["rows"]
        auc = figures.get("auc")
        print(f"rows {rows}  auc {auc}  wall {wall:.1f} s  peak RSS {peak_mb:.0f} MB")
    finally:
        if not args.keep:
            redis.delete(STREAM, *[user_key(f"{USER}{u}", "seq") for u in range(args.users)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
