"""Raw rows -> index/float arrays, the exact layout the models and the graph take.

Training (whole DataFrames) and serving (one request) both go through
:func:`encode_user_rows` and :func:`encode_item_rows`, so there is one code path
from raw values to indices.

Layout (U users, N candidates, S sequence fields, L = max_seq_len):

* ``user_sparse`` int64 ``[U, Fu]`` (user + context sparse features)
* ``user_dense`` float32 ``[U, Du]``
* ``hist`` int64 ``[U, S, L]``, oldest first, left aligned, 0-padded on the right
* ``hist_len`` int64 ``[U]``
* ``item_sparse`` int64 ``[N, Fi]``, ``item_dense`` float32 ``[N, Di]``
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import numpy as np

from ctr.mapping import PAD, FeatureMapper, normalize
from ctr.spec import FeatureConfig, FeatureSpec


@dataclass
class Encoded:
    """Arrays for U users and N candidates (in training U == N, one user per row)."""

    user_sparse: np.ndarray
    user_dense: np.ndarray
    hist: np.ndarray
    hist_len: np.ndarray
    item_sparse: np.ndarray
    item_dense: np.ndarray

    def __len__(self) -> int:
        return int(self.item_sparse.shape[0])


def split_sequence(raw: Any, delimiter: str) -> list[Any]:
    """A sequence cell as a list: list/array as-is, a delimited string split, missing -> []."""
    if raw is None:
        return []
    if isinstance(raw, float) and math.isnan(raw):
        return []
    if isinstance(raw, str):
        # an empty token is a missing value (OOV), kept so parallel fields stay aligned
        return [t if t != "" else None for t in raw.split(delimiter)] if raw else []
    return list(raw)


# the largest float32: a dense value beyond it would become inf in the graph's feed
F32_MAX = float(np.finfo(np.float32).max)


def parse_dense(raw: Any) -> float | None:
    """A raw dense value as a finite float, or None where :func:`to_float` takes the
    feature's default: missing (None, ``""``), not a number, NaN or inf."""
    try:
        v = float(raw) if raw is not None and raw != "" else None
    except (TypeError, ValueError, OverflowError):
        return None
    return None if v is None or math.isnan(v) or math.isinf(v) else v


def to_float(raw: Any, spec: FeatureSpec) -> float:
    """Dense value: missing/NaN/inf -> default; ``log1p`` applied to non-negatives; a
    result outside float32's range (e.g. ``1e39``) -> default, as inf is."""
    if type(raw) is float and -F32_MAX <= raw <= F32_MAX:  # the common case (not NaN)
        return math.log1p(max(raw, 0.0)) if spec.log1p else raw
    v = parse_dense(raw)
    if v is None:
        v = spec.default
    if spec.log1p:
        v = math.log1p(max(v, 0.0))
    if not -F32_MAX <= v <= F32_MAX:
        v = spec.default
    return v


def encode_sparse(
    mapper: FeatureMapper,
    feats: Sequence[FeatureSpec],
    columns: Mapping[str, Sequence[Any]],
    n: int,
) -> np.ndarray:
    out = np.empty((n, len(feats)), dtype=np.int64)
    for j, f in enumerate(feats):
        col = columns.get(f.source)
        out[:, j] = mapper.mapper_for(f.name).map_many(col if col is not None else [None] * n)
    return out


def dense_column(vals: Sequence[Any], spec: FeatureSpec) -> list[float]:
    """``[to_float(v, spec) for v in vals]``, bit for bit, in a few C-level passes where
    every value converts with ``float()`` (floats, or strings such as Redis returns);
    only the values outside float32's range, NaN and inf go through :func:`to_float`
    one by one (and every value, where one does not convert)."""
    try:
        floats = list(map(float, vals))  # what to_float parses each of these to
    except (TypeError, ValueError, OverflowError):
        return [to_float(v, spec) for v in vals]
    arr = np.asarray(floats, dtype=np.float64)
    bad = np.flatnonzero(~(np.abs(arr) <= F32_MAX))  # NaN, inf, beyond float32
    out = list(map(math.log1p, map(max, floats, repeat(0.0)))) if spec.log1p else floats
    for k in bad.tolist():
        out[k] = to_float(vals[k], spec)
    return out


def encode_dense(
    feats: Sequence[FeatureSpec], columns: Mapping[str, Sequence[Any]], n: int
) -> np.ndarray:
    out = np.empty((n, len(feats)), dtype=np.float32)
    for j, f in enumerate(feats):
        col = columns.get(f.source)
        out[:, j] = dense_column(col, f) if col is not None else to_float(None, f)
    return out


def encode_sequences(
    config: FeatureConfig,
    mapper: FeatureMapper,
    seqs: Mapping[str, Sequence[Sequence[Any]]],
    n: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``seqs[name][u]`` is user u's raw list for sequence feature ``name`` (oldest first).

    Keeps the most recent ``max_seq_len`` entries. All fields of a user must have
    the same length; the shortest wins if they do not.
    """
    seq_feats = config.sequences
    length = config.max_seq_len
    hist = np.full((n, len(seq_feats), length), PAD, dtype=np.int64)
    lens = np.zeros(n, dtype=np.int64)
    if not seq_feats:
        return hist, lens
    lists = [seqs.get(f.source) or [[]] * n for f in seq_feats]
    for u in range(n):
        k = min(len(lst[u]) for lst in lists)
        k = min(k, length)
        lens[u] = k
        if k == 0:
            continue
        for s, f in enumerate(seq_feats):
            tail = list(lists[s][u])[len(lists[s][u]) - k :]
            hist[u, s, :k] = mapper.mapper_for(f.name).map_many(tail)
    return hist, lens


def encode_user_rows(
    config: FeatureConfig,
    mapper: FeatureMapper,
    columns: Mapping[str, Sequence[Any]],
    seqs: Mapping[str, Sequence[Sequence[Any]]],
    n: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """User side: ``(user_sparse [n,Fu], user_dense [n,Du], hist [n,S,L], hist_len [n])``."""
    us = encode_sparse(mapper, config.user_sparse, columns, n)
    ud = encode_dense(config.user_dense, columns, n)
    hist, lens = encode_sequences(config, mapper, seqs, n)
    return us, ud, hist, lens


def encode_item_rows(
    config: FeatureConfig, mapper: FeatureMapper, columns: Mapping[str, Sequence[Any]], n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Candidate side: ``(item_sparse [n,Fi], item_dense [n,Di])``."""
    return (
        encode_sparse(mapper, config.item_sparse, columns, n),
        encode_dense(config.item_dense, columns, n),
    )


def encode_frame(
    config: FeatureConfig, mapper: FeatureMapper, frame: Any, delimiter: str = "|"
) -> Encoded:
    """Encode a pandas DataFrame with one (user, candidate) example per row."""
    n = len(frame)
    columns = {c: frame[c].tolist() for c in frame.columns}
    seqs = {
        f.source: [split_sequence(v, delimiter) for v in columns.get(f.source, [None] * n)]
        for f in config.sequences
    }
    us, ud, hist, lens = encode_user_rows(config, mapper, columns, seqs, n)
    its, itd = encode_item_rows(config, mapper, columns, n)
    return Encoded(us, ud, hist, lens, its, itd)


def raw_columns_for_fit(config: FeatureConfig, frame: Any, delimiter: str = "|") -> dict[str, list]:
    """Columns keyed by feature name, sequences flattened, for ``FeatureMapper.fit``.

    A sparse column counts once per row (one impression). A sequence counts each user's
    behaviours once, not once per row: a user's rows repeat the same history (every
    prefix of it, or one history shared by a positive and its negatives), so a token
    enters the flat list as often as it appears in that user's fullest row, the most
    times any one of the user's rows holds it. Without a ``data.user_key`` column every
    row is its own user. Only the behaviours of a row that :func:`encode_sequences`
    keeps count (the last ``max_seq_len``, or fewer where the row's sequence fields
    differ in length): a token seen only before them would get a row that training
    never updates, where an unknown token gets the OOV row. This is what
    ``min_count`` and ``max_size`` compare against.
    """
    out: dict[str, list] = {}
    key = config.data.user_key
    users = frame[key].tolist() if key in frame.columns else None
    n = len(frame)
    # each row's sequence fields, split, and how many of their last entries encoding
    # keeps: the shortest field's length, at most max_seq_len (encode_sequences; a
    # field missing from the frame keeps none)
    split = {
        f.source: [split_sequence(v, delimiter) for v in frame[f.source].tolist()]
        if f.source in frame.columns else [[]] * n
        for f in config.sequences
    }  # fmt: skip
    kept = [min([config.max_seq_len, *(len(c[i]) for c in split.values())]) for i in range(n)]
    for f in config.features:
        if f.source not in frame.columns:
            continue
        if f.kind == "sequence":
            rows = [s[len(s) - k :] for s, k in zip(split[f.source], kept, strict=True)]
            out[f.name] = _behaviour_tokens(rows, users)
        elif f.kind == "sparse":
            out[f.name] = frame[f.source].tolist()
    return out


def _behaviour_tokens(rows: list[list[Any]], users: list[Any] | None) -> list[Any]:
    """Each user's tokens (``rows``: each row's, as encoding keeps them), each as many
    times as the user's fullest row holds it."""
    if users is None:
        return [tok for tokens in rows for tok in tokens]
    most: dict[Any, Counter[Any]] = {}
    seen: set[tuple[Any, Any]] = set()
    for user, tokens in zip(users, rows, strict=True):
        ident = (user, tuple(tokens))
        if ident in seen:  # a negative sharing its positive's history, say
            continue
        seen.add(ident)
        row = Counter(tokens)
        have = most.setdefault(user, Counter())
        for tok, c in row.items():
            if c > have[tok]:
                have[tok] = c
    return [tok for have in most.values() for tok in have.elements()]


def check_item_key(config: FeatureConfig, columns: Any) -> None:
    """Raise ``ValueError`` when the configured item key (``config.item_id_feature``)
    does not identify an item in the data: more than ``data.item_key_tolerance`` of its
    values carry two or more values of another item-side sparse feature (an item has one
    category, one brand, ...). Stored item features are keyed by it (``ctr load``) and
    requests name candidates by it, so a coarser key (the category, where the histories
    hold no item IDs) would serve every item of a category the features of one.
    ``columns``: a DataFrame, or a mapping of column name to values."""
    key = config.item_id_feature
    if key.source not in columns:
        return
    ids = [normalize(v) for v in columns[key.source]]
    for other in config.item_sparse:
        if other is key or other.source not in columns:
            continue
        seen: dict[str, set[str]] = {}
        for i, v in zip(ids, columns[other.source], strict=True):
            nv = normalize(v)
            if i is not None and nv is not None:
                seen.setdefault(i, set()).add(nv)
        bad = [i for i, values in seen.items() if len(values) > 1]
        if seen and len(bad) > config.data.item_key_tolerance * len(seen):
            example = sorted(seen[bad[0]])[:3]
            raise ValueError(
                f"item key {key.name!r} does not identify an item: {len(bad)} of its "
                f"{len(seen)} values carry more than one {other.name} (e.g. {key.name}="
                f"{bad[0]!r}: {example}); name the item's ID feature in the config's "
                f"item_key (or, where items change {other.name}, "
                + (f"raise data.item_key_tolerance above {share})"
                   if (share := f"{len(bad) / len(seen):.3f}") != "1.000"
                   else "data.item_key_tolerance: 1 turns the check off)")  # fmt: skip
            )
