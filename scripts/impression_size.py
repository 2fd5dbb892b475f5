"""How much Redis memory one impression-log entry takes (``CTR_IMPRESSION_STREAM``).

    .venv/bin/python scripts/impression_size.py --models-dir models --name din \\
        --redis-url redis://127.0.0.1:6379/15 [--requests 500] [--n 200] [--top-k 100]

Serves ``--requests`` scoring requests of ``--n`` candidates (``top_k`` ``--top-k``) for
the users ``u0``, ``u1``, ... through the real app (in process) with the impression log
on, into a fresh stream of that Redis database, then prints the mean response body and
the stream's ``MEMORY USAGE`` (all of it sampled) per entry. Items are ``i0``... as the
synthetic generator names them. The stream is deleted afterwards.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from fastapi.testclient import TestClient
from redis import Redis

from service.app import create_app
from service.settings import Settings

STREAM = "impression-size:probe"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models-dir", required=True)
    p.add_argument("--name", default="din")
    p.add_argument("--redis-url", required=True)
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--items", type=int, default=1200, help="item IDs i0..i{items-1}")
    args = p.parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    redis = Redis.from_url(args.redis_url)
    redis.delete(STREAM)
    settings = Settings(
        models_dir=args.models_dir,
        model_name=args.name,
        redis_url=args.redis_url,
        impression_stream=STREAM,
    )
    sizes = []
    with TestClient(create_app(settings)) as c:
        for k in range(args.requests):
            items = [f"i{(k * 7 + j) % args.items}" for j in range(args.n)]
            body = {"user_id": f"u{k}", "candidates": [{"item_id": i} for i in items],
                    "top_k": args.top_k}  # fmt: skip
            r = c.post("/v1/score", json=body)
            if r.status_code != 200:
                print(f"request {k}: {r.status_code} {r.text[:200]}", file=sys.stderr)
                return 1
            sizes.append(len(r.content))
        deadline = time.monotonic() + 30
        while redis.xlen(STREAM) < args.requests and time.monotonic() < deadline:
            time.sleep(0.1)
    n = redis.xlen(STREAM)
    usage = int(redis.memory_usage(STREAM, samples=0) or 0)
    redis.delete(STREAM)
    mean_body = sum(sizes) / len(sizes)
    print(
        f"{n} entries (N = {args.n}, top_k = {args.top_k}): response body {mean_body:,.0f} "
        f"bytes on average; the stream {usage:,} bytes, {usage / max(n, 1):,.0f} per entry"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
