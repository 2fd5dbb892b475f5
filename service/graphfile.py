"""A graph's bytes handed to ONNX Runtime as a file, so that a reload does not stop the
event loop.

``ort.InferenceSession(model_bytes)`` copies the bytes (into a ``std::string``, then an
``istringstream``) while it holds the GIL: with a 64 MB table, about 30 ms during which
the worker's event loop answers nothing, once for every session a load makes
(``scripts/bench_reload_pause.py``). Given a path, ONNX Runtime reads and parses the
file with the GIL released.

So a graph of at least :data:`FILE_MIN_BYTES` is written, exactly as the loader checked
it, into an anonymous in-memory file (``memfd_create``), and the session is made from
that file's ``/proc/self/fd`` path; the descriptor is closed once the session exists.
The file has no name in any folder: nobody else can swap it or plant files beside it,
and nothing is left behind when a worker dies mid-load. Nothing reads the bundle's own
file again, so what is served is what was checked.

The bytes are given as before where that file cannot be made (no ``memfd_create`` or
``/proc``, as off Linux, or a file made so does not read back through its path:
:func:`supported`; no memory for it: the log says why), and for a graph that may
name external data files (ONNX Runtime resolves those against the graph's folder, which
would be ``/proc/self/fd``; given bytes, it refuses them as it always did).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger("ctr.model")

# the GIL-held copies cost about 0.5 ms per MB here: 4 MB pauses the loop for about 2 ms
FILE_MIN_BYTES = 4 << 20
FD_PATH = "/proc/self/fd/"
# TensorProto.external_data's entries are StringStringEntryProto: key (field 1) "location"
EXTERNAL_MARK = b"\x0a\x08location"


def _memmem() -> Callable[[bytes, int, bytes, int], int | None] | None:
    """libc's ``memmem``, called without the GIL (a ``CDLL`` function); None without it
    (or without ``memfd_create``, where it would not be used)."""
    if not hasattr(os, "memfd_create"):
        return None
    try:
        find = ctypes.CDLL(None).memmem
    except Exception:  # OSError, AttributeError; a platform whose CDLL(None) fails otherwise
        return None
    find.restype = ctypes.c_void_p
    find.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]
    return find  # type: ignore[no-any-return]


_MEMMEM = _memmem()


@functools.cache
def supported() -> bool:
    """Whether graphs can reach ONNX Runtime as in-memory files here: ``memfd_create``
    and ``memmem`` exist, and a file made so reads back through its ``/proc/self/fd``
    path (a sandbox may refuse that). Probed once per process."""
    if _MEMMEM is None:
        return False
    try:
        fd = _written(b"ctr")
    except OSError:
        return False
    try:
        with open(f"{FD_PATH}{fd}", "rb") as f:
            return f.read() == b"ctr"
    except OSError:
        return False
    finally:
        os.close(fd)


@contextmanager
def graph_source(data: bytes, as_file: bool = True) -> Iterator[bytes | str]:
    """What to give ``ort.InferenceSession``: the ``/proc/self/fd`` path of an in-memory
    file holding ``data``, closed when the block ends; ``data`` itself where ``as_file``
    is false, below :data:`FILE_MIN_BYTES`, where :func:`supported` is not, where
    ``data`` may name external data, or where the file cannot be made."""
    if not as_file or len(data) < FILE_MIN_BYTES or not supported():
        yield data
        return
    if may_name_external_data(data):
        log.info("graph given to ONNX Runtime as bytes: it may name external data files")
        yield data
        return
    try:
        fd = _written(data)
    except OSError as exc:
        log.warning("graph given to ONNX Runtime as bytes (the event loop pauses): %s", exc)
        yield data
        return
    try:
        yield f"{FD_PATH}{fd}"
    finally:
        os.close(fd)


def may_name_external_data(data: bytes) -> bool:
    """Whether ``data`` holds the bytes every external-data tensor holds (a ``location``
    entry); other bytes may hold them too, by chance (then: a pause, never a wrong
    load). A search without the GIL: about 10 ms for 64 MB here."""
    assert _MEMMEM is not None
    return _MEMMEM(data, len(data), EXTERNAL_MARK, len(EXTERNAL_MARK)) is not None


def _written(data: bytes) -> int:
    """A new in-memory file holding ``data``; its descriptor. Raises ``OSError``."""
    fd = os.memfd_create("ctr-graph", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:  # os.write releases the GIL; a short write is retried
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        raise
    return fd


def loaded_from(message: str, source: bytes | str, shown: str) -> str:
    """ONNX Runtime's error ``message`` about a graph given as ``source``, with an
    in-memory file's path shown as ``shown`` (the bundle's own file): the file the
    operator knows."""
    return message.replace(source, shown) if isinstance(source, str) else message
