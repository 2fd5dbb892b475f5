"""A graph's large weights, read from its ONNX bytes so that every session of a model can
share one copy (``CTR_SHARE_WEIGHTS_MIN_BYTES``).

A served model has up to four ONNX Runtime sessions of one graph: the main one and the
one-thread one for small calls, each twice (Python binding and native runner). Each
deserializes its own copy of every initializer, so an embedding table of 1 GB costs
4 GB. ONNX Runtime takes initializers from the caller instead (``AddInitializer``:
"ORT will use this initializer instance instead of deserializing one from the model
file"; on the CPU it uses the caller's buffer and does not copy it). This reads the large
ones out of the graph's bytes once, into aligned numpy arrays that every session is
given.

The ONNX package is not a serving dependency, so this reads the few protobuf fields it
needs itself: ``ModelProto.graph`` (7), ``GraphProto.initializer`` (5) and the
``TensorProto`` fields ``dims`` (1), ``data_type`` (2), ``name`` (8), ``raw_data`` (9)
and ``data_location`` (14). An initializer held any other way (typed fields, external
data) is left to ONNX Runtime.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

# TensorProto.DataType -> numpy dtype, for the element types a raw_data tensor may hold
DTYPES: dict[int, np.dtype] = {
    1: np.dtype(np.float32),
    2: np.dtype(np.uint8),
    3: np.dtype(np.int8),
    4: np.dtype(np.uint16),
    5: np.dtype(np.int16),
    6: np.dtype(np.int32),
    7: np.dtype(np.int64),
    10: np.dtype(np.float16),
    11: np.dtype(np.float64),
    12: np.dtype(np.uint32),
    13: np.dtype(np.uint64),
}
VARINT, I64, LEN, I32 = 0, 1, 2, 5  # protobuf wire types


class ProtoError(ValueError):
    """The bytes are not the protobuf this reader expects."""


@dataclass(frozen=True)
class Weight:
    """One initializer: its name, ONNX element type and ``array`` (C-contiguous,
    aligned, read-only)."""

    name: str
    onnx_type: int
    array: np.ndarray


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ProtoError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def fields(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """``(field, wire type, value, end)`` for each field of the message in
    ``buf[start:end]``: for a varint ``value`` is the number; for a length-delimited
    field it is where the bytes begin (they end at ``end``); fixed-width fields are
    skipped over with ``value`` their offset."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == VARINT:
            value, pos = _varint(buf, pos)
            yield field, wire, value, pos
        elif wire == LEN:
            size, pos = _varint(buf, pos)
            if pos + size > end:
                raise ProtoError(f"field {field} runs past its message")
            yield field, wire, pos, pos + size
            pos += size
        elif wire in (I64, I32):
            width = 8 if wire == I64 else 4
            if pos + width > end:
                raise ProtoError(f"field {field} runs past its message")
            yield field, wire, pos, pos + width
            pos += width
        else:  # groups (3, 4) are not used by ONNX
            raise ProtoError(f"wire type {wire} in field {field}")
    if pos != end:
        raise ProtoError("a field runs past its message")


def _tensor(buf: bytes, start: int, end: int, read: bool) -> tuple[str | None, Weight | None]:
    """The name of the initializer in ``buf[start:end]`` and (``read``) the initializer
    as a :class:`Weight`: None where it is not a dense raw_data tensor of a known element
    type (or not ``read``). One pass over its fields; its payloads are not copied unless
    it is read."""
    dims: list[int] = []
    onnx_type = location = 0
    name = None
    raw: tuple[int, int] | None = None
    for field, wire, value, stop in fields(buf, start, end):
        if field == 1 and wire == VARINT:
            dims.append(value)
        elif field == 1 and wire == LEN:  # packed
            pos = value
            while pos < stop:
                d, pos = _varint(buf, pos)
                dims.append(d)
        elif field == 2 and wire == VARINT:
            onnx_type = value
        elif field == 8 and wire == LEN:
            name = _name(buf, value, stop)
        elif field == 9 and wire == LEN:
            raw = (value, stop)
        elif field == 14 and wire == VARINT:
            location = value
    dtype = DTYPES.get(onnx_type)
    if not read or name is None or raw is None or dtype is None or location != 0:
        return name, None
    if any(d >= 1 << 62 for d in dims):  # a negative dim, as protobuf writes it
        return name, None
    shape = tuple(dims)
    if math.prod(shape) * dtype.itemsize != raw[1] - raw[0]:  # exact: no int64 to overflow
        return name, None
    # a copy: aligned (raw_data may start anywhere) and independent of the graph's bytes
    # ONNX raw_data is little-endian: read as such, copied in this machine's order
    little = np.frombuffer(buf, np.uint8, raw[1] - raw[0], raw[0]).view(dtype.newbyteorder("<"))
    array = little.reshape(shape).astype(dtype, copy=True)
    array.flags.writeable = False
    return name, Weight(name, onnx_type, array)


def _name(buf: bytes, start: int, end: int) -> str:
    try:
        return buf[start:end].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtoError(f"an initializer's name is not UTF-8: {exc}") from exc


def large_weights(model: bytes, min_bytes: int) -> list[Weight]:
    """The main graph's initializers of at least ``min_bytes`` bytes that are held as
    raw data (:func:`_tensor`), in graph order. Raises :class:`ProtoError` where the
    bytes do not parse as a model, or where two initializers share a name (which copy
    ONNX Runtime would use is not for this reader to guess)."""
    out: list[Weight] = []
    names: set[str | None] = set()
    for field, wire, start, end in fields(model, 0, len(model)):
        if field != 7 or wire != LEN:
            continue
        for gfield, gwire, tstart, tend in fields(model, start, end):
            if gfield != 5 or gwire != LEN:
                continue
            name, weight = _tensor(model, tstart, tend, read=tend - tstart >= min_bytes)
            if name is not None and name in names:
                raise ProtoError(f"two initializers are named {name!r}")
            names.add(name)
            if weight is not None and weight.array.nbytes >= min_bytes:
                out.append(weight)
    return out
