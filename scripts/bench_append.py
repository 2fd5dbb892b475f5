"""What an event append costs Redis: this release's script against the previous one's.

    .venv/bin/python scripts/bench_append.py --redis-url redis://127.0.0.1:16400/14

Runs ``APPEND_EVENT`` (service/store.py; with ``CTR_EVENT_LEGACY_IDS`` on, the default,
and off) and the previous release's script (tests/data/append_event_s26.lua) on the
same Redis, rounds interleaved, each round on users of its own, each first given
``--window`` events (its list keeps ``--keep``), then timed: in-order appends, plus a
share of late ones (``--late``) that go in before the newest. Prints Redis's own time
per call (``INFO commandstats``, ``evalsha``'s usec_per_call: the script's work, no
client or network time) and the memory of one user's keys (``MEMORY USAGE ... SAMPLES
0``: every element counted), each with the ratio to the previous release's. The
database given is emptied.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

import orjson
from redis import Redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.store import APPEND_EVENT, event_keys  # noqa: E402

LEGACY = ROOT / "tests" / "data" / "append_event_s26.lua"


def usec_per_call(r: Redis) -> float:
    stats = r.info("commandstats").get("cmdstat_evalsha", {})
    return float(stats.get("usec_per_call", 0.0))


def keys_of(which: str, user: str) -> list[str]:
    """The script's keys: the previous release's take the list and ``:events`` only."""
    keys = event_keys(user)
    return [keys[0], keys[2]] if which == "old" else keys


def one_round(r: Redis, which: str, k: int, args: argparse.Namespace) -> tuple[float, int]:
    """Redis µs per append and the bytes of one user's keys after the round."""
    script = r.register_script(LEGACY.read_text() if which == "old" else APPEND_EVENT)
    flag = int(which == "new")  # "new-off": CTR_EVENT_LEGACY_IDS=false
    rng = random.Random(k)
    users = [f"bench-append-{which}-{k}-{u}" for u in range(args.users)]

    def append(user: str, eid: str, ts: float) -> None:
        keys = keys_of(which, user)
        payload = orjson.dumps({"item_id": eid, "ts": ts})
        script(keys=keys, args=[eid, ts, payload, args.keep, args.window, 0, flag])

    clock = dict.fromkeys(users, 1_764_000_000.0)
    for user in users:  # filled to the list's length, and the window's IDs
        for e in range(args.window):
            clock[user] += 1.0
            append(user, f"f{e}", clock[user])
    r.config_resetstat()
    for e in range(args.appends):
        user = rng.choice(users)
        if rng.random() < args.late:
            ts = clock[user] - rng.uniform(0.1, args.keep / 2)  # late: lands inside the list
        else:
            clock[user] += 1.0
            ts = clock[user]
        append(user, f"a{e}", ts)
    used = usec_per_call(r)
    # SAMPLES 0: every element counted
    memory = sum(int(r.memory_usage(k, samples=0) or 0) for k in keys_of(which, users[0]))
    return used, memory


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--redis-url", default="redis://127.0.0.1:16400/14")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--users", type=int, default=50)
    ap.add_argument("--appends", type=int, default=5000, help="timed appends per round")
    ap.add_argument("--keep", type=int, default=50, help="behaviours kept per user")
    ap.add_argument("--window", type=int, default=1000, help="CTR_EVENT_DEDUP_WINDOW")
    ap.add_argument("--late", type=float, default=0.1, help="share of late events")
    args = ap.parse_args()
    r = Redis.from_url(args.redis_url)
    r.flushdb()
    print(f"command: scripts/bench_append.py {' '.join(sys.argv[1:])}".strip())
    order = ("old", "new", "new-off")
    results: dict[str, list[tuple[float, int]]] = {w: [] for w in order}
    for k in range(args.rounds):
        for which in order if k % 2 == 0 else order[::-1]:
            results[which].append(one_round(r, which, k, args))
        r.flushdb()
    us = {w: statistics.median(u for u, _ in results[w]) for w in order}
    mem = {w: results[w][-1][1] for w in order}
    print(f"{args.rounds} rounds interleaved, {args.appends} appends each, {args.users} users, "
          f"keep {args.keep}, window {args.window}, {args.late:.0%} late")  # fmt: skip
    print("| script | Redis µs per append (median of rounds) | bytes of one user's keys "
          "| µs, / previous | bytes, / previous |")  # fmt: skip
    print("|---|---:|---:|---:|---:|")
    names = {
        "old": "previous release (:seq, :events)",
        "new": "this release, CTR_EVENT_LEGACY_IDS=true (:seq, :event_ids, :events)",
        "new-off": "this release, CTR_EVENT_LEGACY_IDS=false (:seq, :event_ids)",
    }
    for w in order:
        ratios = f"{us[w] / us['old']:.2f}x | {mem[w] / mem['old']:.2f}x"
        print(f"| {names[w]} | {us[w]:.1f} | {mem[w]:,} | {ratios} |")
    r.flushdb()
    return 0


if __name__ == "__main__":
    sys.exit(main())
