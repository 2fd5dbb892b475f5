"""External (GIL-free) stall sampler for a running service process.

Every ~1 ms reads /proc/PID/task/*/{stat,syscall} and finds episodes where the MAIN
thread (uvicorn's event loop) sat in futex (nr 202: waiting for the GIL, or a lock) for
longer than MIN_MS. For each episode it prints which other threads ran meanwhile, their
CPU time and the syscalls they were in (16 ioctl = CUDA driver call on /dev/nvidia*,
230 clock_nanosleep, 202 futex, 'running' = user space). Also reports main-thread
episodes in D state or outside any syscall while not on CPU (page faults, mmap_lock).

Usage: python3 scripts/stall_sampler.py PID SECONDS [MIN_MS=15] (Linux only; run it beside
an open-loop `ctr bench` against the service's PID, as docs/benchmarks.md 3.4 says).
"""

from __future__ import annotations

import collections
import os
import sys
import time

pid, seconds = int(sys.argv[1]), float(sys.argv[2])
min_ms = float(sys.argv[3]) if len(sys.argv) > 3 else 15.0
base = f"/proc/{pid}/task"


def read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def sample() -> dict[int, tuple[str, int, str]]:
    out: dict[int, tuple[str, int, str]] = {}
    try:
        tids = os.listdir(base)
    except FileNotFoundError:  # the process ended: the loop below stops
        return out
    for tid in tids:
        st = read(f"{base}/{tid}/stat")
        if not st:
            continue
        rest = st[st.rindex(")") + 2 :].split()
        state, cpu = rest[0], int(rest[11]) + int(rest[12])
        sc = read(f"{base}/{tid}/syscall").split(" ", 1)[0].strip() or "?"
        out[int(tid)] = (state, cpu, sc)
    return out


names = {int(t): read(f"{base}/{t}/comm").strip() for t in os.listdir(base)}
end = time.perf_counter() + seconds
episode: list[tuple[float, dict]] = []
kind = None
found = 0
gap: list = []
while time.perf_counter() < end:
    now = time.perf_counter()
    s = sample()
    main = s.get(pid)
    if main is None:
        break
    state, _, sc = main
    k = None
    if sc == "202":
        k = "main in futex (GIL/lock wait)"
    elif state == "D":
        k = "main in D state"
    if k is None and kind is not None and episode and now - episode[-1][0] < 0.003:
        gap.append((now, s))  # the GIL waiter wakes each switch interval: bridge short gaps
        continue
    if k is not None and (kind is None or k == kind):
        kind = k
        episode.extend(gap)
        gap.clear()
        episode.append((now, s))
    else:
        gap.clear()
        if episode and (episode[-1][0] - episode[0][0]) * 1000 >= min_ms:
            found += 1
            t0, s0 = episode[0]
            t1, s1 = episode[-1]
            print(f"[{found}] {kind}: {(t1 - t0) * 1000:.1f} ms, {len(episode)} samples")
            for tid, (_, cpu1, _) in sorted(s1.items()):
                if tid == pid or tid not in s0:
                    continue
                cpu_ms = (cpu1 - s0[tid][1]) * 1000 / os.sysconf("SC_CLK_TCK")
                calls = collections.Counter(x[1][tid][2] for x in episode if tid in x[1])
                states = collections.Counter(x[1][tid][0] for x in episode if tid in x[1])
                print(
                    f"    tid {tid} {names.get(tid, '?')}: cpu {cpu_ms:.0f} ms, "
                    f"states {dict(states)}, syscalls {dict(calls.most_common(4))}"
                )
        episode, kind = ([(now, s)], k) if k is not None else ([], None)
    time.sleep(0.0005)
print(f"done: {found} episodes >= {min_ms} ms")
