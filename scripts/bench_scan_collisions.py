"""The candidate scan's duplicate check against IDs crafted to collide.

The C scan (``native/codec.cc``, ``ctr_scan_candidates``) checks a request's item IDs for
duplicates in an open-addressing table keyed by an FNV-1a hash. Until session 26 that
hash was unseeded, and its low bits, which pick the slot, depend only on the low bits
of the bytes before: anyone could make 2,000 IDs that all land in one slot, and the
check became quadratic on the event loop. This writes such IDs (for the unseeded hash
and the 4,096-slot table of 2,000 IDs) and times one request's parse, in the same run:

* random IDs of the same length (the baseline) and the crafted ones;
* through the C scan (``CTR_NATIVE_JSON``, the default) and through the Python parse.

The ratio crafted / random of the C scan is the figure: about 1 once the hash is seeded.

Usage: .venv/bin/python scripts/bench_scan_collisions.py [--n 2000] [--repeat 20]
       [--library PATH] (default: the project's custom-op library, built if need be)
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import string
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FNV_BASIS = 1469598103934665603  # the unseeded basis the scan used
FNV_PRIME = 1099511628211


def crafted_ids(n: int, prefix: str, bits: int) -> list[str]:
    """``n`` IDs ``prefix + 5 letters`` whose unseeded FNV-1a hashes share their low
    ``bits`` bits (the slot in a table of 2^bits)."""
    h = FNV_BASIS
    for ch in prefix.encode():
        h = ((h ^ ch) * FNV_PRIME) % (1 << 64)
    letters = np.frombuffer(string.ascii_lowercase.encode(), np.uint8).astype(np.uint64)
    mask = np.uint64((1 << bits) - 1)
    state = np.array([h & ((1 << bits) - 1)], np.uint64)
    for _ in range(5):  # every 5-letter suffix, the low bits only (they need no others)
        state = ((state[:, None] ^ letters[None, :]) * np.uint64(FNV_PRIME)) & mask
        state = state.reshape(-1)
    target = np.bincount(state.astype(np.int64)).argmax()
    hits = np.flatnonzero(state == target)[:n]
    if len(hits) < n:
        raise SystemExit(f"only {len(hits)} colliding IDs of 5 letters; ask for fewer")
    out = []
    for index in hits.tolist():
        digits = []
        for _ in range(5):
            index, d = divmod(index, 26)
            digits.append(string.ascii_lowercase[d])
        out.append(prefix + "".join(reversed(digits)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--library", default=None)
    args = ap.parse_args()

    from ctr import native
    from service.codec import NativeCodec
    from service.validate import score_input

    codec = NativeCodec(str(args.library or native.library(None).path))
    cap = 16
    while cap < 2 * args.n:
        cap <<= 1
    prefix = "A" * 248
    rng = random.Random(7)
    bodies = {}
    for name, ids in (
        ("random", [prefix + "".join(rng.choices(string.ascii_lowercase, k=5))
                    for _ in range(args.n)]),
        ("crafted", crafted_ids(args.n, prefix, cap.bit_length() - 1)),
    ):  # fmt: skip
        assert len(set(ids)) == len(ids)
        body = {"user_id": "u", "candidates": [{"item_id": i} for i in ids]}
        bodies[name] = json.dumps(body, separators=(",", ":")).encode()
    times: dict[tuple[str, str], float] = {}
    for (name, body), (label, scan) in itertools.product(
        bodies.items(), (("C scan", codec), ("Python parse", None))
    ):
        best = float("inf")
        for _ in range(args.repeat):
            t = time.perf_counter()
            parsed = score_input(body, args.n, 256, scan)
            best = min(best, time.perf_counter() - t)
        assert len(parsed.item_ids) == args.n
        times[(name, label)] = best
    print(f"{args.n} candidates of 253 bytes, body {len(bodies['random']):,} B; best of "
          f"{args.repeat}; library {codec.path}")  # fmt: skip
    for label in ("C scan", "Python parse"):
        r, c = times[("random", label)], times[("crafted", label)]
        print(f"  {label:13s} random {r * 1e3:6.2f} ms   crafted {c * 1e3:6.2f} ms   "
              f"crafted / random {c / r:5.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
