"""Raw ID -> embedding index. Torch-free; training and serving both call this module.

Index 0 is padding (only ever produced for empty sequence slots) and index 1 is
out-of-vocabulary. Any raw value, including ``None`` or odd unicode, maps to a
valid index: an unknown ID is OOV, never an exception.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from decimal import Decimal
from itertools import repeat
from typing import Any

import numpy as np

from ctr.spec import FeatureConfig, MappingSpec

PAD = 0
OOV = 1
RESERVED = 2


def normalize(raw: Any) -> str | None:
    """Canonical string form of a raw ID: ``13``, ``13.0``, ``"13"``, ``b"13"`` (a
    Parquet BINARY column's value) and ``Decimal("13.00")`` (a DECIMAL column's) agree.

    Returns ``None`` for a missing value (None, NaN, pandas' NA / NaT or the empty
    string).
    """
    if raw is None:
        return None
    if isinstance(raw, bool | np.bool_):  # numpy's too: a Parquet bool cell read by pandas
        return str(int(raw))
    if isinstance(raw, float | np.floating):
        if math.isnan(raw) or math.isinf(raw):
            return None
        if float(raw).is_integer():
            return str(int(raw))
        return repr(float(raw))
    if isinstance(raw, int | np.integer):
        return str(int(raw))
    if isinstance(raw, Decimal):  # a Parquet DECIMAL column's: 3.00 is 3, 7.50 is 7.5
        if not raw.is_finite():
            return None
        if raw == raw.to_integral_value():
            return str(int(raw))  # exact, as a request's integer (38 digits too)
        return normalize(float(raw))  # as a request's number (1e16 + 0.5 is whole)
    if type(raw).__name__ in _MISSING_TYPES:  # pandas' NA / NaT (nullable columns)
        return None
    if isinstance(raw, bytes | bytearray):  # a Parquet BINARY column's: its text, not b'…'
        raw = raw.decode("utf-8", "backslashreplace")  # a byte that is not UTF-8: \\xff
    s = str(raw)
    return s if s != "" else None


_STR = frozenset({str})

# pandas' missing-value scalars, by type name (no pandas import in the serving path)
_MISSING_TYPES = frozenset({"NAType", "NaTType"})


def stable_hash(token: str) -> int:
    """Process-independent 32-bit hash (CRC32 of UTF-8, surrogates escaped)."""
    return zlib.crc32(token.encode("utf-8", "surrogatepass"))


class IdMapper:
    """Maps raw IDs of one embedding table to indices in ``[0, size)``."""

    def __init__(
        self, spec: MappingSpec, vocab: dict[str, int] | None = None, own: bool = False
    ) -> None:
        """``own``: keep ``vocab`` itself rather than a copy (the caller hands it over)."""
        self.spec = spec
        if spec.type == "vocab":
            self.vocab: dict[str, int] = vocab if own and vocab is not None else dict(vocab or {})
            self.size = RESERVED + len(self.vocab)
        else:
            assert spec.buckets is not None
            self.vocab = {}
            self.size = RESERVED + spec.buckets

    def map_one(self, raw: Any) -> int:
        token = normalize(raw)
        if token is None:
            return OOV
        if self.spec.type == "vocab":
            return self.vocab.get(token, OOV)
        assert self.spec.buckets is not None
        return RESERVED + stable_hash(token) % self.spec.buckets

    def map_many(self, raws: Iterable[Any]) -> np.ndarray:
        """Vectorised form of :meth:`map_one`; returns int64 ``[n]``."""
        if self.spec.type == "vocab":
            get = self.vocab.get
            if type(raws) is list and "" not in self.vocab and _STR.issuperset(map(type, raws)):
                # all text: a string is its own canonical form, and "" (missing) is in
                # no vocabulary, so it gets OOV from the same lookup
                return np.fromiter(map(get, raws, repeat(OOV)), np.int64, len(raws))
            # non-empty strings are already canonical: skip normalize() for them
            out = [
                get(r, OOV) if type(r) is str and r else
                (OOV if (t := normalize(r)) is None else get(t, OOV))
                for r in raws
            ]  # fmt: skip
        else:
            b = self.spec.buckets or 1
            out = [
                OOV if (t := normalize(r)) is None else RESERVED + stable_hash(t) % b for r in raws
            ]
        return np.asarray(out, dtype=np.int64)

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.spec.model_dump(), "vocab": self.vocab}

    @classmethod
    def from_json(cls, data: dict[str, Any], own: bool = False) -> IdMapper:
        """``own``: the mapper keeps ``data``'s vocab dict itself (no copy)."""
        return cls(MappingSpec.model_validate(data["spec"]), data.get("vocab") or {}, own)


def build_vocab(tokens: Iterable[Any], spec: MappingSpec) -> dict[str, int]:
    """Most frequent first (ties by token) so the vocabulary is deterministic."""
    counts: Counter[str] = Counter(t for r in tokens if (t := normalize(r)) is not None)
    items = [(tok, c) for tok, c in counts.items() if c >= spec.min_count]
    items.sort(key=lambda x: (-x[1], x[0]))
    if spec.max_size is not None:
        items = items[: spec.max_size]
    return {tok: RESERVED + i for i, (tok, _) in enumerate(items)}


class FeatureMapper:
    """All tables of a config: ``mapper_for(feature)`` resolves shared tables."""

    def __init__(self, config: FeatureConfig, tables: dict[str, IdMapper]) -> None:
        self.config = config
        self.tables = tables

    def mapper_for(self, feature: str) -> IdMapper:
        return self.tables[self.config.table_of(feature)]

    def table_sizes(self) -> dict[str, int]:
        return {name: m.size for name, m in self.tables.items()}

    def empty_vocabularies(self) -> list[str]:
        """Tables mapped by a vocabulary that kept no token (every value, seen in
        training or not, maps to OOV: the feature carries nothing)."""
        return [n for n, m in self.tables.items() if m.spec.type == "vocab" and not m.vocab]

    @classmethod
    def fit(cls, config: FeatureConfig, columns: dict[str, Sequence[Any]]) -> FeatureMapper:
        """Fit vocabularies from raw training columns.

        ``columns`` maps a feature name to its raw values; sequence features give a
        flat iterable of their elements. A sequence's tokens count towards the
        table it shares, so ``hist_item_id`` and ``item_id`` get one vocabulary.
        """
        tables: dict[str, IdMapper] = {}
        for t in config.tables:
            tokens: list[Any] = list(columns.get(t.name, []))
            for s in config.sequences:
                if s.shared_with == t.name:
                    tokens.extend(columns.get(s.name, []))
            vocab = build_vocab(tokens, t.mapping) if t.mapping.type == "vocab" else None
            tables[t.name] = IdMapper(t.mapping, vocab)
        return cls(config, tables)

    def to_json(self) -> dict[str, Any]:
        return {name: m.to_json() for name, m in self.tables.items()}

    @classmethod
    def from_json(
        cls, config: FeatureConfig, data: dict[str, Any], own: bool = False
    ) -> FeatureMapper:
        """``own``: the tables keep ``data``'s vocab dicts themselves (no copies)."""
        return cls(config, {name: IdMapper.from_json(d, own) for name, d in data.items()})
