"""Time ``ItemCache.put`` as the service calls it: each request stores the values of
``--features`` features for ``--n`` candidates it had to read, all new (a catalogue far
larger than the cache), into a cache of ``--size`` entries. For each eviction slice in
``--divisors`` (a full cache drops 1/divisor of its size at a time: 32 is the service's,
2 what it did before session 36), interleaved over ``--rounds``, prints the puts' p50,
p99, max and mean per request, so that an eviction's pause on the event loop shows.

    .venv/bin/python scripts/bench_item_cache.py --size 200000 --n 500 --requests 3000
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import service.itemcache as itemcache


def run(size: int, n: int, features: int, requests: int) -> np.ndarray:
    """Milliseconds of puts per request."""
    cache = itemcache.ItemCache(ttl_s=60.0, size=size)
    values: list[str | None] = ["v"] * n
    out = np.empty(requests)
    for r in range(requests):
        ids = [f"i{r * n + k}" for k in range(n)]
        t = time.perf_counter()
        for f in range(features):
            cache.put(f"f{f}", ids, values, time.monotonic())
        out[r] = (time.perf_counter() - t) * 1e3
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=200_000, help="CTR_ITEM_CACHE_SIZE")
    ap.add_argument("--n", type=int, default=500, help="new candidates per request")
    ap.add_argument("--features", type=int, default=2, help="item features read")
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--divisors", default="2,32")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    divisors = [int(d) for d in args.divisors.split(",")]
    got: dict[int, list[np.ndarray]] = {d: [] for d in divisors}
    for _ in range(args.rounds):
        for d in divisors:
            itemcache.EVICT_DIVISOR = d
            got[d].append(run(args.size, args.n, args.features, args.requests))
    print(f"size {args.size}, {args.features} features x {args.n} new items per request, "
          f"{args.requests} requests x {args.rounds} rounds (interleaved)")
    for d in divisors:
        ms = np.concatenate(got[d])
        print(f"  evict 1/{d:<3} puts per request: p50 {np.percentile(ms, 50):.3f} ms, p99 "
              f"{np.percentile(ms, 99):.3f} ms, max {ms.max():.2f} ms, mean {ms.mean():.3f} ms")


if __name__ == "__main__":
    main()
