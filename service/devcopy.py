"""Copies between host arrays and a CUDA-graph runner's fixed device buffers.

ORT's Python binding holds the GIL through ``OrtValue.update_inplace`` (host to device)
and ``OrtValue.numpy()`` (device to host): both are synchronous CUDA copies, and while
one waits on the driver the event loop cannot run. Session 5 traced p99s of 34-246 ms
on an H100 to event-loop stalls of that shape (docs/benchmarks.md, 3.4); this module is
the fix it proposed, still to be measured on a GPU.

* :class:`OrtCopier` (``CTR_GPU_COPY=ort``, the default): ORT's own calls.
* :class:`DirectCopier` (``CTR_GPU_COPY=direct``): ``cudaMemcpy`` from the CUDA runtime
  that ORT's CUDA provider has loaded, called through :mod:`ctypes`, which releases the
  GIL for the length of every foreign call. On the CPU provider, ``memmove`` (also a
  :mod:`ctypes` foreign call), so the same code path runs in the CPU tests.

:func:`make_copier` checks a direct copier on the real buffers with a round trip
against ORT's own copies before it is used; any error or mismatch falls back to
:class:`OrtCopier` with the reason (``note``), so a wrong guess cannot corrupt scores.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

log = logging.getLogger("ctr.devcopy")

CUDA_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: direction from unified virtual addresses
ORT_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64}


class Copier(Protocol):
    kind: str

    def to_device(self, value: Any, host: np.ndarray) -> None:
        """Copy C-contiguous ``host`` into the start of OrtValue ``value``'s buffer."""
        ...

    def landed(self) -> None:
        """Wait until every :meth:`to_device` copy so far has reached the device."""
        ...

    def to_host(self, value: Any, rows: int) -> np.ndarray:
        """A new host array with the first ``rows`` rows of ``value``."""
        ...


class OrtCopier:
    kind = "ort"

    def to_device(self, value: Any, host: np.ndarray) -> None:
        value.update_inplace(host)

    def landed(self) -> None:
        pass  # ORT's copy synchronizes itself

    def to_host(self, value: Any, rows: int) -> np.ndarray:
        # a copy: a CPU OrtValue's numpy() is a view the next replay overwrites
        return value.numpy()[:rows].copy()


class DirectCopier:
    """Raw copies by pointer: ``copy(dst, src, nbytes)`` is a :mod:`ctypes` foreign
    function (the GIL is released while it runs); ``sync`` waits for the copy to land
    (pageable host-to-device copies may still be in flight when ``cudaMemcpy`` returns)."""

    kind = "direct"

    def __init__(
        self, copy: Callable[[int, int, int], None], sync: Callable[[], None] | None = None
    ) -> None:
        self.copy = copy
        self.sync = sync

    def to_device(self, value: Any, host: np.ndarray) -> None:
        _check_fits(value, host)
        self.copy(value.data_ptr(), host.ctypes.data, host.nbytes)

    def landed(self) -> None:
        # one sync for all of a call's copies (each foreign call gives the GIL up and
        # must take it back): they run in order on the legacy stream
        if self.sync is not None:
            self.sync()

    def to_host(self, value: Any, rows: int) -> np.ndarray:
        shape = value.shape()
        out = np.empty((rows, *shape[1:]), dtype=ORT_TYPES[value.data_type()])
        _check_fits(value, out)
        self.copy(out.ctypes.data, value.data_ptr(), out.nbytes)
        return out


def _check_fits(value: Any, host: np.ndarray) -> None:
    if not host.flags.c_contiguous:
        raise ValueError("direct copies need C-contiguous host arrays")
    dtype = np.dtype(ORT_TYPES[value.data_type()])
    if host.dtype != dtype:
        raise ValueError(f"a {host.dtype} array for a device buffer of {dtype}")
    size = int(np.prod(value.shape())) * dtype.itemsize
    if host.nbytes > size:
        raise ValueError(f"{host.nbytes} bytes do not fit a device buffer of {size}")


def memmove_copier() -> DirectCopier:
    """Host buffers (the CPU provider): ``ctypes.memmove``."""

    def copy(dst: int, src: int, nbytes: int) -> None:
        ctypes.memmove(dst, src, nbytes)

    return DirectCopier(copy)


def loaded_cudart() -> Path | None:
    """The CUDA runtime library this process has loaded (ORT's CUDA provider links it
    dynamically), from ``/proc/self/maps``; None if there is none."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        parts = line.split(maxsplit=5)  # address perms offset dev inode [path]
        if len(parts) == 6 and "/libcudart.so" in parts[5]:
            return Path(parts[5].strip())
    return None


def cuda_copier() -> DirectCopier:
    """``cudaMemcpy`` (+ ``cudaStreamSynchronize`` of the legacy stream after host to
    device, as ORT's own copy does) from the already loaded CUDA runtime: the same
    library ORT uses, never a second runtime in the process."""
    path = loaded_cudart()
    if path is None:
        raise OSError("no CUDA runtime (libcudart.so) is loaded in this process")
    lib = ctypes.CDLL(str(path))
    memcpy = lib.cudaMemcpy
    memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    memcpy.restype = ctypes.c_int
    stream_sync = lib.cudaStreamSynchronize
    stream_sync.argtypes = [ctypes.c_void_p]
    stream_sync.restype = ctypes.c_int

    def copy(dst: int, src: int, nbytes: int) -> None:
        err = memcpy(dst, src, nbytes, CUDA_MEMCPY_DEFAULT)
        if err:
            raise RuntimeError(f"cudaMemcpy failed with CUDA error {err}")

    def sync() -> None:
        err = stream_sync(None)
        if err:
            raise RuntimeError(f"cudaStreamSynchronize failed with CUDA error {err}")

    return DirectCopier(copy, sync)


def self_check(copier: Copier, values: dict[str, Any], host: dict[str, np.ndarray]) -> None:
    """Round trips on real buffers, judged by ORT's own copies: a pattern written with
    ``copier`` must read back through ``numpy()``, and one written with
    ``update_inplace`` must read back through ``copier``. Leaves the buffers zeroed."""
    rng = np.random.default_rng(7)
    kept = []  # every array stays alive: a fresh np.empty must not reuse a pattern's memory
    try:
        for name, value in values.items():
            buf = host[name]
            pattern = rng.integers(1, 100, size=buf.shape).astype(buf.dtype)
            copier.to_device(value, pattern)
            copier.landed()
            if not np.array_equal(value.numpy(), pattern):
                raise RuntimeError(f"{name}: host-to-device copy read back wrong")
            other = np.ascontiguousarray(pattern[::-1] + 1)
            value.update_inplace(other)
            rows = max(1, buf.shape[0] - 1)  # a prefix of rows, as replies are sliced
            back = copier.to_host(value, rows)
            kept += [pattern, other, back]
            if not np.array_equal(back, other[:rows]):
                raise RuntimeError(f"{name}: device-to-host copy read back wrong")
    finally:
        for name, value in values.items():
            value.update_inplace(np.zeros_like(host[name]))


def make_copier(kind: str, device: str) -> tuple[Copier, str]:
    """The copier for ``CTR_GPU_COPY=kind`` on ``device`` and a note: why a direct
    copier was not built (empty when it was, or when ``kind`` is ``ort``)."""
    if kind == "ort":
        return OrtCopier(), ""
    try:
        return (memmove_copier() if device == "cpu" else cuda_copier()), ""
    except Exception as exc:  # a missing or odd runtime: ORT's copies still work
        note = f"direct copies unavailable ({exc}); using ORT's"
        log.warning(note)
        return OrtCopier(), note
