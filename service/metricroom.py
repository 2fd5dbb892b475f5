"""Metric files whose room is reserved on the file system before it is written.

prometheus_client's multiprocess mode keeps each worker's values in files it maps into
memory (``PROMETHEUS_MULTIPROC_DIR``), made and doubled in size with ``truncate``: a
sparse file, whose blocks the file system allots only as a page is first written. On a
file system that filled up after the start (``ctr serve`` checks the room only then),
that first write is a SIGBUS that kills the worker, and its restart dies the same way.
Here each file's blocks are allotted (``posix_fallocate``) before the file is mapped or
grown, and a new file is made whole under another name, then renamed into place (a
0-byte file in the folder failed every worker's ``/metrics``). Where the file system has
no room for a new series, or for a new worker's file, the series is kept in the worker's
memory (counted and read as usual, but missing from ``/metrics``, which reads the files)
and a WARNING says so once; every series held so moves into its file with its value once
there is room, tried at most every :data:`RETRY_S` at the next metric write (each runs
under prometheus_client's lock). Requests never fail for it, nor does a worker's start.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import time
from typing import Any

from prometheus_client import mmap_dict, values

log = logging.getLogger("ctr.service")

_pack_two_doubles = getattr(mmap_dict, "_pack_two_doubles", None)
_unpack_two_doubles = getattr(mmap_dict, "_unpack_two_doubles", None)

NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT})  # the file system full, or the quota
RETRY_S = 1.0  # how often the series kept in memory try for room in their files again


def _entry_bytes(key: str) -> int:
    """What ``MmapedDict._init_value`` appends for ``key``: its length (4 bytes), the
    key padded to 8-byte alignment, and two doubles."""
    encoded = key.encode("utf-8")
    return 4 + len(encoded) + (8 - (len(encoded) + 4) % 8) + 16


# the dicts holding series in memory (no room in their files), and when to try again
_held: set[ReservedMmapedDict] = set()
_next_try = 0.0
_warned = False


def _make_file(filename: str) -> bool:
    """``filename`` exists with its first ``_INITIAL_MMAP_SIZE`` bytes allotted, made
    whole under another name and renamed into place where it was missing or empty;
    False where the file system has no room for it."""
    with contextlib.suppress(FileNotFoundError):
        if os.path.getsize(filename) > 0:
            return True
    folder, name = os.path.split(filename)
    tmp = os.path.join(folder, f".{name}.tmp")  # not a *.db: no reader looks at it
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            os.posix_fallocate(fd, 0, mmap_dict._INITIAL_MMAP_SIZE)
        finally:
            os.close(fd)
        os.replace(tmp, filename)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if exc.errno not in NO_ROOM:
            raise
        return False
    return True


def _hold(d: ReservedMmapedDict) -> None:
    """``d`` holds a series in memory: said once per process, filed by :func:`_sweep`."""
    global _warned, _next_try
    if not _held:
        _next_try = time.monotonic() + RETRY_S
    _held.add(d)
    if not _warned:
        _warned = True
        log.warning(
            "no room for metric files in PROMETHEUS_MULTIPROC_DIR (%s): new series are kept "
            "in this worker's memory, missing from /metrics, until there is room",
            os.path.dirname(d._fname),
        )


def _sweep() -> None:
    """Every series held in memory into its file, where there is room now (at most every
    :data:`RETRY_S`; called under prometheus_client's lock, by a metric write)."""
    global _next_try
    now = time.monotonic()
    if now < _next_try:
        return
    _next_try = now + RETRY_S
    for d in list(_held):
        if d._pid != os.getpid() or d._file_held():
            _held.discard(d)


class ReservedMmapedDict(mmap_dict.MmapedDict):
    """``MmapedDict`` with its file's blocks allotted before they are mapped, and the
    series it has no room for held in memory until it has."""

    def __init__(self, filename: str, read_mode: bool = False) -> None:
        # series the file had no room for: (value, timestamp), until it has
        self._unfiled: dict[str, tuple[float, float]] = {}
        self._fname = filename
        self._pid = os.getpid()  # a forked child makes dicts (and files) of its own
        if read_mode or _make_file(filename):
            super().__init__(filename, read_mode)
            return
        # no room for its first page: every series in memory, the file made later
        self._f: Any = None
        self._m: Any = None
        self._positions: dict[str, int] = {}
        self._capacity = self._used = 0
        _hold(self)

    def _init_value(self, key: str) -> None:
        capacity = self._capacity
        while self._used + _entry_bytes(key) > capacity:  # as the original doubles it
            capacity *= 2
        if capacity != self._capacity:
            # through a descriptor of its own: prometheus_client's is O_APPEND, which
            # glibc's fallback (a file system without fallocate: ext2, NFSv3) refuses;
            # the file this process has open, even where its name was deleted meanwhile
            fd = os.open(f"/proc/self/fd/{self._f.fileno()}", os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, capacity)
            finally:
                os.close(fd)
            # grown and mapped here at once (the original doubles a step at a time with
            # truncate, which would free the room allotted past its first step); the
            # capacity once mapped, so that a failed map is tried again
            self._m = mmap.mmap(self._f.fileno(), capacity)
            self._capacity = capacity
        super()._init_value(key)

    def _place(self, key: str, held: bool = False) -> int | None:
        """A new series' place in the file, made now; None where there is no room (the
        series held in memory). While any is held, a new one is held after it (``held``:
        one of those, filed in order): the file holds its keys in the order they were
        made, so a histogram series whose ``+Inf`` bucket (its last key) is in the file
        has all its keys there (a shorter key fitted where a longer one had not: some
        buckets missing under a +Inf, a _count short of its _sum)."""
        if self._f is not None and (held or not self._unfiled):
            try:
                self._init_value(key)
                return self._positions[key]
            except OSError as exc:
                if exc.errno not in NO_ROOM:
                    raise
        self._unfiled.setdefault(key, (0.0, 0.0))
        _hold(self)
        return None

    def _file_held(self) -> bool:
        """The series held in memory into the file (made first if it has none yet), each
        with its value; False where the room ran out first (the rest held on)."""
        if self._f is None:
            if not _make_file(self._fname):
                return False
            mmap_dict.MmapedDict.__init__(self, self._fname)
        for key, held in list(self._unfiled.items()):
            pos = self._place(key, True)  # None: still no room (it stays held)
            if pos is None:
                return False
            del self._unfiled[key]
            _pack_two_doubles(self._m, pos, *held)
        return True

    # every inc() and observe() writes: a series with its place, one look-up, as fast
    # as the original (which looks twice), and one test of the module's set
    def read_value(self, key: str) -> tuple[float, float]:
        pos = self._positions.get(key)
        if pos is None and key not in self._unfiled:
            pos = self._place(key)
        if pos is None:
            return self._unfiled[key]
        found: tuple[float, float] = _unpack_two_doubles(self._m, pos)
        return found

    def write_value(self, key: str, value: float, timestamp: float) -> None:
        pos = self._positions.get(key)
        if pos is None and key not in self._unfiled:
            pos = self._place(key)
        if pos is None:
            self._unfiled[key] = (value, timestamp)
        else:
            _pack_two_doubles(self._m, pos, value, timestamp)
        if _held:
            _sweep()


def _fits() -> bool:
    """The prometheus_client internals this relies on are there (0.20 to 0.26 at least)."""
    return (
        all(callable(getattr(mmap_dict.MmapedDict, name, None))
            for name in ("_init_value", "read_value", "write_value"))
        and isinstance(getattr(mmap_dict, "_INITIAL_MMAP_SIZE", None), int)
        and callable(_pack_two_doubles) and callable(_unpack_two_doubles)
        and getattr(values, "MmapedDict", None) is mmap_dict.MmapedDict
        and hasattr(os, "posix_fallocate")
        and os.path.isdir("/proc/self/fd")  # a grown file reopened by its descriptor
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
