"""Metric files whose room is reserved on the file system before it is written.

prometheus_client's multiprocess mode keeps each worker's values in files it maps into
memory (``PROMETHEUS_MULTIPROC_DIR``), made and doubled in size with ``truncate``: a
sparse file, whose blocks the file system allots only as a page is first written. On a
file system that filled up after the start (``ctr serve`` checks the room only then),
that first write is a SIGBUS that kills the worker, and its restart dies the same way.
Here each file's blocks are allotted (``posix_fallocate``) before the file is mapped or
grown. Where the file system has no room to grow a file for a new series, the series is
kept in the worker's memory (counted and read as usual, but missing from ``/metrics``,
which reads the files) and a WARNING says so once; it moves into the file once there is
room (tried at most every :data:`RETRY_S`). Requests never fail for it.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from typing import Any

from prometheus_client import mmap_dict, values

log = logging.getLogger("ctr.service")

_pack_two_doubles = getattr(mmap_dict, "_pack_two_doubles", None)
_unpack_two_doubles = getattr(mmap_dict, "_unpack_two_doubles", None)

RETRY_S = 1.0  # how often a series kept in memory tries for room in its file again


def _entry_bytes(key: str) -> int:
    """What ``MmapedDict._init_value`` appends for ``key``: its length (4 bytes), the
    key padded to 8-byte alignment, and two doubles."""
    encoded = key.encode("utf-8")
    return 4 + len(encoded) + (8 - (len(encoded) + 4) % 8) + 16


class ReservedMmapedDict(mmap_dict.MmapedDict):
    """``MmapedDict`` with its file's blocks allotted before they are mapped."""

    def __init__(self, filename: str, read_mode: bool = False) -> None:
        if not read_mode:
            with open(filename, "a+b") as f:
                if os.fstat(f.fileno()).st_size == 0:  # new: the size it is made with
                    os.posix_fallocate(f.fileno(), 0, mmap_dict._INITIAL_MMAP_SIZE)
        super().__init__(filename, read_mode)
        # series the file had no room for: (value, timestamp), until it has
        self._unfiled: dict[str, tuple[float, float]] = {}
        self._retry_at = 0.0

    def _init_value(self, key: str) -> None:
        capacity = self._capacity
        while self._used + _entry_bytes(key) > capacity:  # as the original doubles it
            capacity *= 2
        if capacity != self._capacity:  # before the original maps the larger file
            os.posix_fallocate(self._f.fileno(), 0, capacity)
        super()._init_value(key)

    def _filed(self, key: str) -> bool:
        """``key`` has its place in the file, made now where there is room; False while
        it is kept in memory (the file system full)."""
        if key in self._positions:
            return True
        if key in self._unfiled and time.monotonic() < self._retry_at:
            return False
        try:
            self._init_value(key)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            self._retry_at = time.monotonic() + RETRY_S
            if not self._unfiled:
                log.warning(
                    "no room for metric files in PROMETHEUS_MULTIPROC_DIR (%s): new series "
                    "are kept in this worker's memory, missing from /metrics, until there is",
                    os.path.dirname(self._fname),
                )
            self._unfiled.setdefault(key, (0.0, 0.0))
            return False
        held = self._unfiled.pop(key, None)
        if held is not None:  # room again: what it counted meanwhile goes to the file
            super().write_value(key, *held)
        return True

    # every inc() and observe() writes: the series with its place, one look-up, as fast
    # as the original (which looks twice)
    def read_value(self, key: str) -> tuple[float, float]:
        pos = self._positions.get(key)
        if pos is None and self._filed(key):
            pos = self._positions[key]
        if pos is None:
            return self._unfiled[key]
        found: tuple[float, float] = _unpack_two_doubles(self._m, pos)
        return found

    def write_value(self, key: str, value: float, timestamp: float) -> None:
        pos = self._positions.get(key)
        if pos is None and self._filed(key):
            pos = self._positions[key]
        if pos is None:
            self._unfiled[key] = (value, timestamp)
        else:
            _pack_two_doubles(self._m, pos, value, timestamp)


def _fits() -> bool:
    """The prometheus_client internals this relies on are there (0.20 to 0.26 at least)."""
    return (
        all(callable(getattr(mmap_dict.MmapedDict, name, None))
            for name in ("_init_value", "read_value", "write_value"))
        and isinstance(getattr(mmap_dict, "_INITIAL_MMAP_SIZE", None), int)
        and callable(_pack_two_doubles) and callable(_unpack_two_doubles)
        and getattr(values, "MmapedDict", None) is mmap_dict.MmapedDict
        and hasattr(os, "posix_fallocate")
    )


def install() -> bool:
    """Make the metric files prometheus_client opens from now on reserved ones (before
    the first metric is made). False, and the files as prometheus_client makes them,
    where its internals are not the ones known."""
    if getattr(values, "MmapedDict", None) is ReservedMmapedDict:
        return True
    if not _fits():
        log.warning(
            "metric files are not reserved: prometheus_client's internals are not the known "
            "ones (a file system that fills up may stop a worker with SIGBUS)"
        )
        return False
    target: Any = values
    target.MmapedDict = ReservedMmapedDict
    return True
