"""The scoring request's candidate list read and its ranked items written in C
(``native/codec.cc``, ``CTR_NATIVE_JSON``), with the same outcome as orjson's.

* :meth:`NativeCodec.encode`: the Python way builds one dict per candidate
  (``{"item_id", "probability", "rank"}``) and lets orjson write them. This hands the
  IDs (one UTF-8 buffer, NUL-separated), the float32 scores and the ranking order to one
  C function and splices its output, orjson's exact bytes, into the body with
  ``orjson.Fragment``. It declines (returns None) what it was not written for, and the
  caller takes the Python way: IDs that do not encode as UTF-8 or hold a NUL, scores
  that are not float32 or lie outside [0, 1].
* :meth:`NativeCodec.scan`: finds a plain candidate list (``[{"item_id": "..."}, ...]``)
  in the body's bytes and hands back the IDs and the body without it, in place of N
  dicts from orjson and their checks (``service.validate.score_input``); any other body
  is parsed whole, as without it.
* :meth:`NativeCodec.duplicate_key`: the first key that an object of the body repeats,
  by its path, in one pass over the bytes (``service.validate.check_duplicate_keys``,
  which looks in Python where this cannot tell).

``ctr bench-path`` compares the two ways (N = 500: 0.4–1.0 ms of event-loop CPU less
per request on this project's 2-core machine, docs/benchmarks.md "Session 14").
:func:`load` checks the library against orjson on a fixed set of awkward IDs, scores and
bodies before it is used; a library without the functions (a prebuilt one older than
them) or one that disagrees is not used, and the service says so once.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from typing import Any

import numpy as np
import orjson

from ctr import native
from service.errors import BadRequest
from service.settings import Settings
from service.validate import Scanned, score_input

log = logging.getLogger("ctr.service")

_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p


def items_python(ids: list[str], probs: np.ndarray, order: np.ndarray) -> list[dict[str, Any]]:
    """``[{"item_id", "probability", "rank"}]`` in rank order (``order [K]``: request
    positions, rank 1 first; ``probs [N]``)."""
    p = probs.tolist()  # python floats/ints: no numpy scalars per item
    return [{"item_id": ids[i], "probability": p[i], "rank": r}
            for r, i in enumerate(order.tolist(), 1)]  # fmt: skip


class NativeCodec:
    """``ctr_encode_items`` and ``ctr_scan_candidates`` from the library at ``path``
    (raises ``OSError`` or ``AttributeError`` when it cannot be loaded or lacks them),
    and ``ctr_rank`` and ``ctr_duplicate_key`` where it has them.

    Arrays go to C as bytes (``tobytes``: a copy of a few KB costs less than numpy's
    ``.ctypes`` pointer, ~1.5 µs each), and the output buffer is kept per thread.

    The library is loaded as a ``PyDLL``: its calls (a few µs) keep the GIL. Through
    ``CDLL`` each call let go of it, and the ORT thread, waiting for it with a finished
    graph call, could take it then while the event loop waited to get it back
    (docs/benchmarks.md, "Session 21")."""

    def __init__(self, path: str) -> None:
        lib = ctypes.PyDLL(path)
        c_bytes = ctypes.c_char_p
        self._encode = lib.ctr_encode_items
        self._encode.restype = _I64
        self._encode.argtypes = [c_bytes, _I64, _I64, c_bytes, c_bytes, _I64, _PTR, _I64]
        self._bound = lib.ctr_items_bound
        self._bound.restype = _I64
        self._bound.argtypes = [_I64, _I64]
        self._scan = lib.ctr_scan_candidates
        self._scan.restype = _I64
        self._scan.argtypes = [c_bytes, _I64, _I64, _I64, _PTR, _I64, _PTR]
        # a library built before the ranking still encodes and scans (numpy ranks then)
        self._rank = getattr(lib, "ctr_rank", None)
        if self._rank is not None:
            self._rank.restype = _I64
            self._rank.argtypes = [c_bytes, _I64, _I64, _PTR]
        # and before the check for repeated keys (validate.check_duplicate_keys looks then)
        self._dup = getattr(lib, "ctr_duplicate_key", None)
        if self._dup is not None:
            self._dup.restype = _I64
            self._dup.argtypes = [c_bytes, _I64, _PTR, _I64]
        self._local = threading.local()
        self.path = path

    def _buffer(self, size: int) -> ctypes.Array[ctypes.c_char]:
        """This thread's output buffer, at least ``size`` bytes."""
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < size:
            buf = self._local.buf = ctypes.create_string_buffer(max(size, 1 << 16))
        return buf

    def scan(self, body: bytes, max_id_len: int, max_n: int) -> Scanned | None:
        """For a scoring body whose candidate list is the plain kind (every candidate
        ``{"item_id": <ID>}``, IDs of 1 to ``max_id_len`` printable ASCII characters
        without escapes, distinct, 1 to ``max_n`` of them): the body with that list
        replaced by ``[]``, the IDs, and the IDs as one NUL-separated buffer (what
        :meth:`encode` takes). None for any other body, which the caller then parses
        and checks whole (so its errors are the ones it always gave). The C side checks
        that the IDs are distinct."""
        buf = self._buffer(len(body))  # the IDs take fewer bytes than the body
        where = (_I64 * 3)()
        n = self._scan(body, len(body), max_id_len, max_n, buf, len(buf), where)
        if n <= 0:
            return None
        start, end, length = where
        raw = ctypes.string_at(buf, length)
        ids = raw.decode("ascii").split("\0")
        if len(ids) != n:
            return None
        return Scanned(body[:start] + b"[]" + body[end:], ids, raw)

    def duplicate_key(self, body: bytes) -> str | None:
        """The path of the first key (in document order) in ``body`` (JSON the caller
        has parsed) that repeats an earlier key of its object, e.g. ``context.age``;
        "" when none repeats; None when the C walk cannot tell or the library predates
        it (``service.validate.check_duplicate_keys`` then looks in Python)."""
        if self._dup is None:
            return None
        buf = self._buffer(len(body) * 3 // 2 + 64)  # a path takes at most 1.5 bytes a byte
        n = self._dup(body, len(body), buf, len(buf))
        if n < 0:
            return None
        if not n:
            return ""
        try:
            return ctypes.string_at(buf, n).decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:  # bytes that did not parse: let the Python walk say
            return None

    def rank(self, probs: np.ndarray, top_k: int | None) -> np.ndarray | None:
        """``order [K]``: the positions of the ``top_k`` (all when None) highest of
        ``probs [N]`` (float32), highest first, equal scores in request order, as
        ``np.argsort(-probs, kind="stable")[:top_k]``; None where it does not apply (another
        dtype or shape, a score that is not finite)."""
        if self._rank is None or probs.dtype != np.float32 or probs.ndim != 1:
            return None
        n = probs.shape[0]
        k = n if top_k is None else min(top_k, n)
        buf = self._buffer(8 * k)  # this thread's buffer, as the other two calls use
        if self._rank(probs.tobytes(), n, k, buf) != k:
            return None
        return np.frombuffer(buf, np.int64, k).copy()  # encode() reuses the buffer

    def encode(
        self, ids: list[str], probs: np.ndarray, order: np.ndarray, raw: bytes | None = None
    ) -> bytes | None:
        """The JSON array of :func:`items_python`'s items, or None where this encoder
        does not apply (the caller then uses :func:`items_python`). ``raw``: ``ids`` as
        one UTF-8 buffer, NUL-separated, where the caller has it (:meth:`scan`)."""
        n = len(ids)
        if probs.dtype != np.float32 or probs.shape != (n,) or order.ndim != 1:
            return None
        if raw is None:
            try:  # IDs never hold a NUL (control characters are refused): the separator
                raw = "\0".join(ids).encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate: orjson refuses it too
                return None
        k = len(order)
        size = self._bound(k, len(raw))
        if size < 0:  # past what the C side sizes (never a real body's): orjson's path
            return None
        buf = self._buffer(size)
        ranks = order.astype(np.int64, copy=False).tobytes()
        written = self._encode(raw, len(raw), n, probs.tobytes(), ranks, k, buf, size)
        if written < 0:
            return None
        return ctypes.string_at(buf, written)


# IDs and scores the check at load covers: escapes, control characters, DEL, non-ASCII,
# both ends of [0, 1], the switch to exponent notation below 1e-5, float32 extremes
_CHECK_IDS = ['a"b', "back\\slash", "tab\there", "nl\n", "\x01\x1f\x7f", "é€😀", "x", "", "9"]
_CHECK_PROBS = np.array([0.0, 1.0, 0.5, 1e-5, 9.99e-6, 1.5e-7, 1e-45, 0.1, 0.99999994], np.float32)


# bodies the check at load scans: accepted ones (whitespace, other keys around the
# list) and declined ones, each of which must come out as the whole-body parse has it
_CHECK_BODIES = [
    b'{"user_id":"u","candidates":[{"item_id":"a"},{"item_id":"b c"}],"top_k":1}',
    b' {\n "candidates" : [ { "item_id" : "x" } ] ,\t"context":{"k":[1,{"c":"]"}]},'
    b' "user_id" : "u" } ',
    b'{"user_id":"u","candidates":[{"item_id":"a"},{"item_id":"a"}]}',
    b'{"user_id":"u","candidates":[{"item_id":"\\u0041"}]}',
    b'{"user_id":"u","candidates":[{"item_id":"a"}],"candidates":[{"item_id":"b"}]}',
    b'{"user_id":"u","candidates":[{"item_id":"a"}]}x',
    b'{"user_id":"u","candidates":[{"item_id":"a"}],"top_k":}',
    b'{"user_id":"u","candidates":[]}',
    # repeated keys, refused alike on either path (the scan's rest, or the whole body)
    b'{"user_id":"a","candidates":[{"item_id":"x"}],"user_id":"b"}',
    b'{"user_id":1,"user_id":"a","candidates":[{"item_id":"x"}]}',
    b'{"user_id":"u","candidates":[{"item_id":"x"}],"context":{"k":[{"a":1,"a":2}]}}',
    b'{"user_id":"u","candidates":[{"item_id":"x"},{"item_id":"x","item_id":"y"}]}',
    b'{"user_id":"u","candidates":[{"item_id":"x","features":{"p":1,"q":2,"p":3}}]}',
    b'{"user_id":"u","user\\u005fid":"v","candidates":[{"item_id":"x"}]}',
    b'{"user_id":"\\"user_id\\"","candidates":[{"item_id":"x","features":{"\\ud83d\\ude00":1,'
    b'"\xf0\x9f\x98\x80":2}}]}',
    b'{"":1,"":2}',
]


def _outcome(body: bytes, scanner: NativeCodec | None) -> object:
    try:
        return score_input(body, 50, 16, scanner)
    except BadRequest as exc:
        return type(exc).__name__, exc.message, exc.field


def self_check(enc: NativeCodec) -> str | None:
    """None when ``enc`` writes orjson's bytes for the check set and for random scores,
    and scans the check bodies to what the whole-body parse makes of them; else what
    differs."""
    for body in _CHECK_BODIES:
        got, want = _outcome(body, enc), _outcome(body, None)
        if got != want:
            return f"scanning {body!r}: {got!r} != {want!r}"
        raw = getattr(got, "raw_ids", None)
        if raw is not None and raw != "\0".join(got.item_ids).encode():  # type: ignore[attr-defined]
            return f"scanning {body!r}: IDs {raw!r}"
    rng = np.random.default_rng(0)
    cases = [(_CHECK_IDS, _CHECK_PROBS, np.argsort(-_CHECK_PROBS, kind="stable"))]
    probs = rng.random(300).astype(np.float32) ** 8  # down to ~1e-20
    ids = [f"item-{k}" for k in range(300)]
    cases.append((ids, probs, np.argsort(-probs, kind="stable")[:100]))
    ties = np.array([0.5, 0.25, 0.5, 1.0, 0.0, -0.0, 0.25, 0.5], np.float32)
    for scores in (_CHECK_PROBS, probs, ties, np.round(probs * 4) / 4):
        for top_k in (None, 1, 3, len(scores) + 1):
            want = np.argsort(-scores, kind="stable")[:top_k]
            got = enc.rank(scores, top_k)
            if got is not None and not np.array_equal(got, want):  # None: numpy ranks
                return f"ranking {scores[:8]!r}… (top_k {top_k}): {got!r} != {want!r}"
    # the service checks scores for NaN and infinities only where the ranking declines
    for bad in (np.nan, np.inf, -np.inf):
        if enc.rank(np.array([0.5, bad, 0.25], np.float32), None) is not None:
            return f"ranking accepted a score of {bad}"
    for ids, probs, order in cases:
        want = orjson.dumps(items_python(ids, probs, order))
        for raw in (None, "\0".join(ids).encode()):  # the IDs joined here, or by the scan
            got = enc.encode(ids, probs, order, raw)
            if got != want:
                return f"native {got[:120]!r}... != orjson {want[:120]!r}..."
    return None


def load(settings: Settings) -> NativeCodec | None:
    """The native encoder when ``CTR_NATIVE_JSON`` allows it and the custom-op library
    builds, loads, has it and passes :func:`self_check`; else None (logged)."""
    if settings.native_json == "off":
        return None
    try:
        lib = native.library(settings.ops_library or None)
        enc = NativeCodec(str(lib.path))
    except (native.NativeError, OSError, AttributeError) as exc:
        log.warning("native JSON codec not used (orjson instead): %s", exc)
        return None
    if (why := self_check(enc)) is not None:
        log.warning("native JSON codec not used (orjson instead): %s", why)
        return None
    log.info("native JSON codec: %s", enc.path)
    return enc
