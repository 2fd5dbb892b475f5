"""The multiprocess metric folder's files (``PROMETHEUS_MULTIPROC_DIR``), without
importing the metrics: a process that imports :mod:`service.metrics` writes files of its
own there (its gauges' values), which ``ctr serve``'s parent must not."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _dead_writer(path: Path) -> int | None:
    """The pid that wrote a metric file (``<kind>_<pid>.db``), where that process has
    ended; None for a live one's or a name without a pid."""
    tail = path.stem.rsplit("_", 1)[-1]
    if tail.isascii() and tail.isdigit() and not pid_alive(int(tail)):
        return int(tail)
    return None


def wipe_stale(folder: str) -> int:
    """Before a deployment's workers start: delete the metric files in ``folder`` that
    processes no longer running wrote (a previous run's: prometheus_client wants the
    folder wiped between runs; left there, they add an old run's counts to every scrape
    and slow it). A live process's files, another deployment's sharing the folder, stay.
    Returns how many were deleted."""
    wiped = 0
    root = Path(folder)
    stale = [p for p in root.glob("*.db") if _dead_writer(p) is not None]
    # and a file service.metricroom was making (``.<kind>_<pid>.db.tmp``) when its
    # process died, before it was renamed into place
    stale += [p for p in root.glob(".*.db.tmp") if _dead_writer(p.with_name(p.name[1:-4]))]
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            wiped += 1
    return wiped


def forget_dead(folder: str) -> list[int]:
    """Drop the live gauges (``gauge_live*``) of processes that are gone, as
    ``prometheus_client.multiprocess.mark_process_dead`` does, without importing the
    metrics (``ctr serve``'s parent, after a SIGHUP restart it gave up: the new worker
    it killed had written its gauges, and no worker start came after to drop them).
    Returns the pids dropped."""
    from prometheus_client import multiprocess

    dead = {pid for p in Path(folder).glob("gauge_live*_*.db") if (pid := _dead_writer(p))}
    for pid in sorted(dead):
        with contextlib.suppress(FileNotFoundError):
            multiprocess.mark_process_dead(pid, folder)
    return sorted(dead)
