"""The scoring response's ranked items as JSON: natively (``native/codec.cc``) or with
orjson, the same bytes either way.

The Python way builds one dict per candidate (``{"item_id", "probability", "rank"}``)
and lets orjson write them: about 0.3 µs per candidate on the event loop (0.15 ms at
N = 500, ``ctr bench-path``). :class:`ItemsEncoder` hands the IDs (one UTF-8 buffer,
NUL-separated), the float32 scores and the ranking order to one C function in the
custom-op library and splices its output into the body with ``orjson.Fragment``. It
declines (returns None) whatever it was not written for, and the caller then takes the
Python way: IDs that do not encode as UTF-8 or hold a NUL, scores that are not float32
or lie outside [0, 1].

:func:`load` checks the library's output against orjson's on a fixed set of awkward
IDs and scores before it is used; a library without the function (a prebuilt one
older than it) or one that disagrees is not used, and the service says so once.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

import numpy as np
import orjson

from ctr import native
from service.settings import Settings

log = logging.getLogger("ctr.service")

_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p


def items_python(ids: list[str], probs: np.ndarray, order: np.ndarray) -> list[dict[str, Any]]:
    """``[{"item_id", "probability", "rank"}]`` in rank order (``order [K]``: request
    positions, rank 1 first; ``probs [N]``)."""
    p = probs.tolist()  # python floats/ints: no numpy scalars per item
    return [{"item_id": ids[i], "probability": p[i], "rank": r}
            for r, i in enumerate(order.tolist(), 1)]  # fmt: skip


class ItemsEncoder:
    """``ctr_encode_items`` from the library at ``path`` (raises ``OSError`` or
    ``AttributeError`` when it cannot be loaded or lacks the function)."""

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        self._encode = lib.ctr_encode_items
        self._encode.restype = _I64
        self._encode.argtypes = [ctypes.c_char_p, _I64, _I64, _PTR, _PTR, _I64, _PTR, _I64]
        self._bound = lib.ctr_items_bound
        self._bound.restype = _I64
        self._bound.argtypes = [_I64, _I64]
        self.path = path

    def encode(self, ids: list[str], probs: np.ndarray, order: np.ndarray) -> bytes | None:
        """The JSON array of :func:`items_python`'s items, or None where this encoder
        does not apply (the caller then uses :func:`items_python`)."""
        n = len(ids)
        if probs.dtype != np.float32 or probs.shape != (n,):
            return None
        try:  # IDs never hold a NUL (control characters are refused): the separator
            raw = "\0".join(ids).encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: orjson refuses it too
            return None
        probs = np.ascontiguousarray(probs)
        order = np.ascontiguousarray(order, np.int64)
        k = int(order.shape[0])
        out = np.empty(self._bound(k, len(raw)), np.uint8)
        written = self._encode(raw, len(raw), n, probs.ctypes.data, order.ctypes.data, k,
                               out.ctypes.data, out.nbytes)  # fmt: skip
        if written < 0:
            return None
        return out[:written].tobytes()


# IDs and scores the check at load covers: escapes, control characters, DEL, non-ASCII,
# both ends of [0, 1], the switch to exponent notation below 1e-5, float32 extremes
_CHECK_IDS = ['a"b', "back\\slash", "tab\there", "nl\n", "\x01\x1f\x7f", "é€😀", "x", "", "9"]
_CHECK_PROBS = np.array([0.0, 1.0, 0.5, 1e-5, 9.99e-6, 1.5e-7, 1e-45, 0.1, 0.99999994], np.float32)


def self_check(enc: ItemsEncoder) -> str | None:
    """None when ``enc`` writes orjson's bytes for the check set and for random scores;
    else what differs."""
    rng = np.random.default_rng(0)
    cases = [(_CHECK_IDS, _CHECK_PROBS, np.argsort(-_CHECK_PROBS, kind="stable"))]
    probs = rng.random(300).astype(np.float32) ** 8  # down to ~1e-20
    ids = [f"item-{k}" for k in range(300)]
    cases.append((ids, probs, np.argsort(-probs, kind="stable")[:100]))
    for ids, probs, order in cases:
        got = enc.encode(ids, probs, order)
        want = orjson.dumps(items_python(ids, probs, order))
        if got != want:
            return f"native {got[:120]!r}... != orjson {want[:120]!r}..."
    return None


def load(settings: Settings) -> ItemsEncoder | None:
    """The native encoder when ``CTR_NATIVE_JSON`` allows it and the custom-op library
    builds, loads, has it and passes :func:`self_check`; else None (logged)."""
    if settings.native_json == "off":
        return None
    try:
        lib = native.library(settings.ops_library or None)
        enc = ItemsEncoder(str(lib.path))
    except (native.NativeError, OSError, AttributeError) as exc:
        log.warning("native JSON encoder not used (orjson instead): %s", exc)
        return None
    if (why := self_check(enc)) is not None:
        log.warning("native JSON encoder not used (orjson instead): %s", why)
        return None
    log.info("native JSON encoder: %s", enc.path)
    return enc
