"""What a model load costs in the manifest, for a large vocabulary: read and check it
(:func:`ctr.bundle.load_bundle`) and its contract digest (the service computes it at
every load and reload, holding the GIL: serving pauses meanwhile).

Writes a bundle whose ``item_id`` vocabulary has ``--vocab`` entries (the synthetic DIN
config's feature spec; the model file is a placeholder: nothing here parses it), then
times, best of ``--repeat``:

* ``orjson.loads`` of the manifest: the floor any reader of it pays;
* ``load_bundle``, and the digest in each of its forms (``v2``: what exports write now,
  ``v1``: what they wrote before);
* the longest pause of a 1 ms ticker on an asyncio loop while the load and the digest
  run in a thread, as the service runs them: what a reload costs the requests in flight;
  and the same with the manifest read in a child process (``ctr.manifest_proc``, what
  the service does for a manifest of ``CTR_MANIFEST_CHILD_BYTES`` or more);
* with ``--against ROOT`` (an older checkout, e.g. ``git worktree add /tmp/old REV``),
  the same ``load_bundle``, digest and pause as that checkout's code computes them, in a child
  process, on the same files, rounds interleaved; ratios new / old;
* the memory of one load in a fresh process, the manifest read there or in a child: the
  process's peak and what it keeps, over its size before the load, and the child's peak.

Usage: .venv/bin/python scripts/bench_manifest.py [--vocab 1000000] [--repeat 3]
       [--rounds 2] [--against /tmp/old] [--long-ids]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# run in this checkout or, with --against, in the older one (its ctr on sys.path first)
CHILD = r"""
import json, sys, time
root, models, reps = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path.insert(0, root)
import ctr.bundle as b
def best(f):
    xs = []
    for _ in range(reps):
        t = time.perf_counter(); f(); xs.append(time.perf_counter() - t)
    return min(xs)
out = {"load_bundle": best(lambda: b.load_bundle(models, "din", 1))}
bundle = b.load_bundle(models, "din", 1)
m = bundle.manifest
out["digest"] = best(lambda: b.contract_digest(m["config"], m["mapping"]))

# the longest pause of a 1 ms ticker on an event loop while the load and the digest run
# in a thread, as the service runs them (the GIL held in C calls pauses the loop)
import asyncio, inspect
# a checkout whose load_bundle can read the manifest in a child process (ctr.manifest_proc)
child = "child_min_bytes" in inspect.signature(b.load_bundle).parameters
def load_and_digest(in_child=False):
    x = b.load_bundle(models, "din", 1, **({"child_min_bytes": 1} if in_child else {}))
    if getattr(x, "contract_v2", None) is None:  # as the service: the load's, if it made it
        b.contract_digest(x.manifest["config"], x.manifest["mapping"])
async def pause(in_child):
    loop = asyncio.get_running_loop()
    job = loop.run_in_executor(None, load_and_digest, in_child)
    last, worst = time.perf_counter(), 0.0
    while not job.done():
        await asyncio.sleep(0.001)
        now = time.perf_counter(); worst = max(worst, now - last); last = now
    await job
    return worst
out["pause"] = min(asyncio.run(pause(False)) for _ in range(reps))
if child:
    out["load_child"] = best(lambda: load_and_digest(True))
    out["pause_child"] = min(asyncio.run(pause(True)) for _ in range(reps))
print(json.dumps(out))
"""


# one load in a fresh process, the manifest read in it ("worker") or in a child process
# ("child"): its memory, from /proc/self/status (VmHWM: its peak resident size; VmRSS).
# The child's peak is ru_maxrss of the children: Linux carries a process's ru_maxrss
# across fork and exec, so it is this process's size at the fork if that was larger
MEMORY = r"""
import json, resource, sys
root, models, mode = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, root)
import ctr.bundle as b
def status_mb(field):
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024
before = status_mb("VmRSS")
kept = b.load_bundle(models, "din", 1, child_min_bytes=1 if mode == "child" else 0)
if kept.contract_v2 is None:
    b.contract_digest(kept.manifest["config"], kept.manifest["mapping"])
print(json.dumps({
    "peak": status_mb("VmHWM") - before,
    "kept": status_mb("VmRSS") - before,
    "child_peak": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
}))
"""


def run_script(script: str, root: Path, *args: str) -> dict[str, float]:
    """``script`` (:data:`CHILD`, :data:`MEMORY`) in a fresh Python on ``root``'s code,
    with ``root`` and ``args`` as its arguments; the JSON its last line prints."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [sys.executable, "-c", script, str(root), *args],
        env=env, capture_output=True, text=True, check=True, cwd=root,
    )  # fmt: skip
    return json.loads(res.stdout.splitlines()[-1])


def write_bundle(folder: Path, vocab: int, long_ids: bool = False) -> None:
    sys.path.insert(0, str(ROOT))
    from training.big_manifest import write_big_bundle

    write_big_bundle(folder, vocab, long_ids)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--against", type=Path, default=None, help="an older checkout's root")
    ap.add_argument(
        "--long-ids",
        action="store_true",
        help="vocabulary keys of 19 digits (64-bit IDs written as strings)",
    )
    args = ap.parse_args()

    import orjson

    from ctr.bundle import CONTRACT_KEY, CONTRACT_KEY_V2, MANIFEST, contract_digest

    with tempfile.TemporaryDirectory(prefix="bench-manifest-") as tmp:
        models = Path(tmp)
        write_bundle(models, args.vocab, args.long_ids)
        raw = (models / "din" / "1" / MANIFEST).read_bytes()
        doc = orjson.loads(raw)
        t0 = time.perf_counter()
        floor = min(_timed(lambda: orjson.loads(raw)) for _ in range(args.repeat))
        v1 = min(
            _timed(lambda: contract_digest(doc["config"], doc["mapping"], CONTRACT_KEY))
            for _ in range(args.repeat)
        )
        v2 = min(
            _timed(lambda: contract_digest(doc["config"], doc["mapping"], CONTRACT_KEY_V2))
            for _ in range(args.repeat)
        )
        new: list[dict[str, float]] = []
        old: list[dict[str, float]] = []
        mem: dict[str, list[dict[str, float]]] = {"worker": [], "child": []}
        for _ in range(args.rounds):
            new.append(run_script(CHILD, ROOT, str(models), str(args.repeat)))
            if args.against is not None:
                old.append(run_script(CHILD, args.against.resolve(), str(models), str(args.repeat)))
            for mode, runs in mem.items():
                runs.append(run_script(MEMORY, ROOT, str(models), mode))
        elapsed = time.perf_counter() - t0

    def best(runs: list[dict[str, float]], key: str) -> float:
        return min(r[key] for r in runs)

    ms = 1e3
    keys = "19-digit keys" if args.long_ids else "keys like item_id:123"
    print("command: .venv/bin/python scripts/bench_manifest.py " + " ".join(sys.argv[1:]))
    print(f"manifest: {len(raw) / 1e6:.1f} MB, item_id vocabulary {args.vocab:,} entries, {keys} "
          f"(best of {args.repeat}, {args.rounds} rounds, {elapsed:.0f} s)")  # fmt: skip
    print(f"  orjson.loads (the floor)        {floor * ms:8.0f} ms")
    print(f"  digest v1 (json, older exports) {v1 * ms:8.0f} ms")
    print(f"  digest v2 (orjson, exports now) {v2 * ms:8.0f} ms   v2/v1 {v2 / v1:.3f}")
    lb = best(new, "load_bundle")
    print(f"  load_bundle                     {lb * ms:8.0f} ms   /floor {lb / floor:.2f}")
    total = lb + best(new, "digest")
    print(f"  load_bundle + digest            {total * ms:8.0f} ms   /floor {total / floor:.2f}")
    pause = best(new, "pause")
    print(f"  longest event-loop pause        {pause * ms:8.0f} ms   (a 1 ms ticker, the load "
          "in a thread)")  # fmt: skip
    if "pause_child" in new[0]:
        lc, pc = best(new, "load_child"), best(new, "pause_child")
        print("read in a child process (load_bundle(..., child_min_bytes=1), as the service "
              "reads a manifest of CTR_MANIFEST_CHILD_BYTES or more):")  # fmt: skip
        print(f"  load_bundle + digest            {lc * ms:8.0f} ms   /in-process {lc / total:.2f}")
        print(f"  longest event-loop pause        {pc * ms:8.0f} ms   /in-process {pc / pause:.3f}")
    print("memory of one load in a fresh process (MB over its resident size before the load, "
          "peaks from VmHWM; the child's from ru_maxrss; the highest of the rounds):")  # fmt: skip
    for mode, runs in mem.items():
        peak, kept = max(r["peak"] for r in runs), max(r["kept"] for r in runs)
        line = f"  read in the {mode + ':':7s} the worker's peak +{peak:5.0f}, kept +{kept:5.0f}"
        if mode == "child":
            line += f", the child's own peak {max(r['child_peak'] for r in runs):5.0f}"
        print(line)
    if old:
        olb, otot = best(old, "load_bundle"), best(old, "load_bundle") + best(old, "digest")
        print(f"against {args.against}:")
        print(f"  load_bundle                     {olb * ms:8.0f} ms   new/old {lb / olb:.3f}")
        print(f"  load_bundle + digest            {otot * ms:8.0f} ms   new/old {total / otot:.3f}")
        opause = best(old, "pause")
        ratio = pause / opause
        print(f"  longest event-loop pause        {opause * ms:8.0f} ms   new/old {ratio:.3f}")
        if "pause_child" in old[0] and "pause_child" in new[0]:
            olc, opc = best(old, "load_child"), best(old, "pause_child")
            lc, pc = best(new, "load_child"), best(new, "pause_child")
            print("  read in a child process:")
            print(f"    load_bundle + digest          {olc * ms:8.0f} ms   new/old {lc / olc:.3f}")
            print(f"    longest event-loop pause      {opc * ms:8.0f} ms   new/old {pc / opc:.3f}")
    return 0


def _timed(f: Callable[[], object]) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


if __name__ == "__main__":
    raise SystemExit(main())
