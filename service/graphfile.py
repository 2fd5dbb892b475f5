"""A graph's bytes handed to ONNX Runtime as a file, so that a reload does not stop the
event loop.

``ort.InferenceSession(model_bytes)`` copies the bytes twice while it holds the GIL
(into a ``std::string``, then an ``istringstream``) and parses them there too: with a
64 MB table, about 30 ms during which the worker's event loop answers nothing, once for
every session a load makes (``scripts/bench_reload_pause.py``). Given a path, ONNX
Runtime reads and parses the file in ``initialize_session``, with the GIL released.

So a graph of at least :data:`FILE_MIN_BYTES` is written, exactly as checked, to a
private temporary file (``tempfile.mkstemp``: mode 0600, a fresh name, in ``TMPDIR``),
the session is made from its path, and the file is removed as soon as the session
exists. Nothing reads the bundle's own file again, so what is served is what the
loader checked. Where the file cannot be written (no space, a read-only ``TMPDIR``),
the session is made from the bytes, as before, and the log says why.

A worker killed while it makes a session (the OOM killer during a large reload) leaves
its file behind. The file's name carries the worker's PID, and every load first removes
such files (:func:`sweep`) whose process is gone and that are at least
:data:`ORPHAN_AGE_S` old (a process of another PID namespace sharing ``TMPDIR`` would
look gone; no session takes that long to make from its file).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("ctr.model")

# the GIL-held copies cost about 0.5 ms per MB here: 4 MB pauses the loop for about 2 ms
FILE_MIN_BYTES = 4 << 20
PREFIX = "ctr-graph-"
ORPHAN_AGE_S = 120.0


@contextmanager
def graph_source(data: bytes, as_file: bool = True) -> Iterator[bytes | str]:
    """What to give ``ort.InferenceSession``: the path of a temporary file holding
    ``data``, removed when the block ends; ``data`` itself where ``as_file`` is false,
    below :data:`FILE_MIN_BYTES`, or where the file cannot be written."""
    if not as_file or len(data) < FILE_MIN_BYTES:
        yield data
        return
    try:
        path = _written(data)
    except OSError as exc:
        log.warning("graph given to ONNX Runtime as bytes (the event loop pauses): %s", exc)
        yield data
        return
    try:
        yield path
    finally:
        try:
            os.unlink(path)
        except OSError as exc:  # removed by someone else: nothing left to do
            log.warning("temporary graph file %s: %s", path, exc)


def _written(data: bytes) -> str:
    """A new temporary file holding ``data``; its path. Raises ``OSError``."""
    fd, path = tempfile.mkstemp(prefix=f"{PREFIX}{os.getpid()}-", suffix=".onnx")
    try:
        view = memoryview(data)
        while view:  # os.write releases the GIL; a short write is retried
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return path


def loaded_from(message: str, source: bytes | str, shown: str) -> str:
    """ONNX Runtime's error ``message`` about a graph given as ``source``, with a
    temporary file's path shown as ``shown`` (the bundle's own file): the file the
    operator knows, not one that is gone."""
    return message.replace(source, shown) if isinstance(source, str) else message


def sweep(now: float | None = None) -> int:
    """Remove the temporary graph files in ``TMPDIR`` left by processes that are gone,
    of :data:`ORPHAN_AGE_S` or more; how many. Never raises."""
    now = time.time() if now is None else now
    removed = 0
    try:
        with os.scandir(tempfile.gettempdir()) as entries:
            for entry in entries:
                if _orphan(entry, now):
                    try:
                        os.unlink(entry.path)
                        removed += 1
                    except OSError:  # gone meanwhile, or not ours to remove
                        pass
    except OSError as exc:
        log.warning("temporary graph files not swept: %s", exc)
    if removed:
        log.warning("removed %d temporary graph file(s) left by a process that died", removed)
    return removed


def _orphan(entry: os.DirEntry[str], now: float) -> bool:
    if not entry.name.startswith(PREFIX) or not entry.name.endswith(".onnx"):
        return False
    pid_text = entry.name[len(PREFIX) :].partition("-")[0]
    if not pid_text.isdigit() or int(pid_text) == os.getpid():
        return False
    try:
        if not entry.is_file(follow_symlinks=False):
            return False
        if now - entry.stat(follow_symlinks=False).st_mtime < ORPHAN_AGE_S:
            return False
    except OSError:
        return False
    return not _alive(int(pid_text))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; a PID out of range
        return True
    return True
