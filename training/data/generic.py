"""The generic raw-example layout and the one loading path every adapter feeds.

A raw frame has one row per (user, candidate) example:

* one column per feature, named by the feature's ``source`` (``column`` or name);
* sequence columns hold lists, or strings joined by ``data.seq_delimiter``,
  oldest behaviour first;
* ``data.label`` (0/1), ``data.user_key`` (for GAUC and the split) and, when the
  split is time based, ``data.time_column``.

A user's own logs come in as CSV or Parquet (``data.source: csv|parquet``) and go
through exactly the same checks, split and encoding as the built-in datasets.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctr.spec import DataSpec, FeatureConfig

DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def data_root() -> Path:
    """Root of the shared datasets: ``$CTR_DATA_ROOT`` or ``../shared/data``."""
    return Path(os.environ.get("CTR_DATA_ROOT", str(DEFAULT_DATA_ROOT))).resolve()


def reads_data_root(spec: DataSpec) -> bool:
    """``spec`` reads a shared dataset under :func:`data_root` (no ``data.path`` of its
    own, and a source that is neither generated nor a file of the user's)."""
    return spec.source not in ("synthetic", "csv", "parquet") and not spec.path


class DataError(ValueError):
    """The data does not match the feature config."""


def read_table(path: str | Path, kind: str) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if kind == "parquet":
        import pyarrow.parquet as pq

        # an integer column with a null stays integers (Python ints and None), not
        # float64, which would round IDs above 2**53 (serving maps them exactly)
        return pq.read_table(path).to_pandas(integer_object_nulls=True)
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except UnicodeDecodeError as exc:
        raise DataError(
            f"data file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}): "
            "re-encode it, e.g. iconv -f latin1 -t utf-8"
        ) from None


_INT = r"-?[0-9]+(?:\.0+)?"  # an integer, as digits or as pandas writes it in a float column
# as pandas writes them (True), and Spark, Java, JS (true) and R, Excel (TRUE)
_BOOL = r"(?:True|False|true|false|TRUE|FALSE)"


def _tokens_match(col: pd.Series, token: str, delim: str | None) -> bool:
    """Every value of ``col`` (text) is empty or, split at ``delim`` (a history), made
    of ``token``s and empty tokens; checked by one regular expression per value, with
    no per-token strings made."""
    if delim is None:
        pattern = f"(?:{token})?"
    else:
        d = re.escape(delim)
        pattern = f"(?:{token})?(?:{d}(?:{token})?)*"
    return bool(col.str.fullmatch(pattern).all())


def _digits(col: pd.Series, delim: str | None) -> pd.Series:
    """``col``'s float-written integers (``7.0``, ``-0.0``) as digits (``7``, ``0``)."""
    end = "$" if delim is None else f"(?={re.escape(delim)}|$)"
    start = "^" if delim is None else f"(^|{re.escape(delim)})"
    out = col.str.replace(f"\\.0+{end}", "", regex=True)
    return out.str.replace(f"{start}-0{end}", "\\g<1>0" if delim else "0", regex=True)


def _booleans(col: pd.Series, delim: str | None) -> pd.Series:
    """``col``'s ``True``/``False`` tokens (any of :data:`_BOOL`'s cases) as ``1``/``0``:
    a request's JSON ``true`` maps ``"1"``. The column is known to hold only those."""
    out = col
    for word, digit in (("True", "1"), ("true", "1"), ("TRUE", "1"),
                        ("False", "0"), ("false", "0"), ("FALSE", "0")):  # fmt: skip
        out = out.str.replace(word, digit, regex=False)
    return out


def canonical_csv_ids(config: FeatureConfig, frame: pd.DataFrame) -> pd.DataFrame:
    """A CSV's ID columns as the service reads the same values from JSON: pandas writes
    an integer column that has a missing value as ``1.0``, ``3.0``, and ``True``/``False``
    for booleans; read as text those became the tokens "1.0" and "True", where a request
    sending the number 1 or ``true`` maps "1" (ctr.mapping.normalize): out of the
    vocabulary. An ID column (a sparse feature's, or the user key's) and the history
    columns that share its table are decided together: where every value and history
    token is an integer, as digits or float-written, the float-written ones become
    digits (exactly: the text is cut, never parsed as a float); where every one is a
    boolean, they become 1 and 0. A note says so. (pandas writes integers from 1e16 on in
    exponent form, already rounded: such a column is left as it is.)"""
    delim = config.data.seq_delimiter
    groups: dict[str, set[str]] = {config.data.user_key: set()}
    for f in config.features:
        if f.kind == "sparse":
            shared = {q.source for q in config.sequences if q.shared_with == f.name}
            groups.setdefault(f.source, set()).update(shared)
    out = frame
    for col, seqs in groups.items():
        if col not in frame.columns:
            continue
        hists = sorted(q for q in seqs if q in frame.columns)
        values = frame[col].astype(str)
        for token, fix in ((_INT, _digits), (_BOOL, _booleans)):
            # the candidates' column first: most ID columns rule themselves out there
            if not _tokens_match(values, token, None):
                continue
            texts = [frame[q].astype(str) for q in hists]
            if not all(_tokens_match(t, token, delim) for t in texts):
                continue
            fixed = [fix(values, None), *(fix(t, delim) for t in texts)]
            changed = [n for n, a, b in zip([col, *hists], [values, *texts], fixed, strict=True)
                       if not a.equals(b)]  # fmt: skip
            if not changed:
                break
            if out is frame:
                out = frame.copy()
            for name, new in zip([col, *hists], fixed, strict=True):
                out[name] = new
            print(f"[data] {', '.join(map(repr, changed))}: integers written as floats or "
                  "booleans (e.g. 7.0, True) read as digits, as the service maps the same "
                  "value sent as a JSON number")  # fmt: skip
            break
    return out


def validate_frame(config: FeatureConfig, frame: pd.DataFrame) -> pd.DataFrame:
    """Check the frame carries what the config names; coerce label to float32."""
    spec = config.data
    missing = [c for c in (spec.label, spec.user_key) if c not in frame.columns]
    # a dense feature's too: a misspelt column trained as its default, a constant
    missing += [f.source for f in config.features if f.source not in frame.columns]
    if missing:
        raise DataError(f"columns missing from the data: {sorted(set(missing))}")
    frame = frame.copy()
    label = frame[spec.label]
    if label.dtype == object or pd.api.types.is_string_dtype(label):
        # a CSV of a bool column: True / False, read as IDs are
        label = label.replace({"True": "1", "False": "0", "true": "1", "false": "0",
                               "TRUE": "1", "FALSE": "0"})  # fmt: skip
    try:
        frame[spec.label] = pd.to_numeric(label, errors="raise").astype(np.float32)
    except (ValueError, TypeError) as exc:
        raise DataError(f"label column {spec.label!r} must hold 0/1 numbers: {exc}") from exc
    bad = ~frame[spec.label].isin([0.0, 1.0])
    if bad.any():
        raise DataError(f"label column {spec.label!r} must be 0/1 ({int(bad.sum())} rows "
                        f"are not; first: {_first(bad, frame[spec.label])})")  # fmt: skip
    keys = frame[spec.user_key]
    bad = keys.isna() | (keys.astype(str) == "")
    if bad.any():  # every example is some user's; pandas' split dropped these, then failed
        raise DataError(f"{int(bad.sum())} rows have no {spec.user_key!r} (data.user_key; "
                        f"first: {_first(bad, keys)})")  # fmt: skip
    for name in dict.fromkeys([spec.user_key, *(f.source for f in config.features
                                                 if f.kind == "sparse")]):  # fmt: skip
        _check_scalars(frame[name], name)
    for f in config.features:
        if f.kind == "dense":
            _check_dense(frame[f.source], f.source)
        elif f.kind == "sequence":
            _check_history(frame[f.source], f.source, spec.seq_delimiter)
            _check_nested_history(frame[f.source], f.source)
            items = config.feature(f.shared_with or "").source
            _check_delimiter(frame[f.source], f.source, frame[items], spec.seq_delimiter)
    return frame.reset_index(drop=True)


def _first(bad: pd.Series, col: pd.Series) -> str:
    """The first flagged row of ``col``: its position and value."""
    row = int(np.flatnonzero(bad.to_numpy())[0])
    return f"row {row}, {str(col.iloc[row])[:80]!r}"


# text a CSV writes for a missing value: the feature's default, as a blank is
_MISSING_TEXT = frozenset({"", "na", "n/a", "nan", "null", "none"})


def _check_dense(col: pd.Series, name: str) -> None:
    """A dense column's values are numbers or missing: text that is neither (``19,74``
    with a decimal comma, ``$5``) trained silently as the feature's default, and so did
    a Parquet timestamp, duration or period column (pandas reads those as integers,
    ``float`` refuses each value)."""
    if (pd.api.types.is_datetime64_any_dtype(col) or pd.api.types.is_timedelta64_dtype(col)
            or isinstance(col.dtype, pd.PeriodDtype | pd.IntervalDtype)):
        raise DataError(f"dense feature {name!r} holds {col.dtype} values, not numbers: "
                        "convert them in the data (e.g. to epoch seconds or days)")  # fmt: skip
    if pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
        return
    text = col.astype(str).str.strip().str.lower()
    maybe = pd.to_numeric(col, errors="coerce").isna() & col.notna() & ~text.isin(_MISSING_TEXT)
    bad = pd.Series(False, index=col.index)  # what to_numeric refused, looked at in full
    for i in np.flatnonzero(maybe.to_numpy()):
        v = col.iloc[i]
        if isinstance(v, str) and v.strip().lower() in _MISSING_TEXT:
            continue
        try:
            float(v)
        except (TypeError, ValueError, OverflowError):
            bad.iloc[i] = True
    if bad.any():
        raise DataError(f"dense feature {name!r}: {int(bad.sum())} values are not numbers "
                        f"(first: {_first(bad, col)}); a missing value is a blank")  # fmt: skip


_NESTED = (list, tuple, np.ndarray, dict, set)  # a Parquet list, struct or map value
_NESTED_SAMPLE = 20_000  # history cells whose first behaviour is looked at


def _check_scalars(col: pd.Series, name: str) -> None:
    """An ID column's cells are single values: a Parquet list, struct or map column
    trained silently as the text of each cell (``['i0']``), which no request names."""
    if col.dtype != object:
        return
    bad = col.map(lambda v: isinstance(v, _NESTED)).astype(bool)
    if bad.any():
        raise DataError(f"column {name!r} holds lists, structs or maps ({_first(bad, col)}): "
                        "an ID or category is one value per row (a history is a sequence "
                        "feature)")  # fmt: skip


def _check_nested_history(col: pd.Series, name: str) -> None:
    """A history's behaviours are single values: a list of lists (Parquet
    ``list<list<...>>``) failed with a TypeError's traceback, and ``ctr load`` stored
    each inner list's text. The first behaviour of each of the first
    ``_NESTED_SAMPLE`` histories is looked at (a file's type is one for every row)."""
    if col.dtype != object:
        return
    lists = (list, tuple, np.ndarray)
    for row, cell in enumerate(col.iloc[:_NESTED_SAMPLE]):
        if isinstance(cell, lists) and len(cell) and isinstance(cell[0], _NESTED):
            raise DataError(f"history column {name!r} holds lists of lists (row {row}, "
                            f"{str(cell)[:80]!r}): each behaviour is one value")  # fmt: skip


# a list written as text: pandas' repr (['i1', 'i2'], [np.str_('i1')], [1, 2]), JSON
# (["i1"], []); a token that is only bracketed ([UNK], [a]|[b]) is not one
_LISTED = re.compile(r"\s*\[\s*(?:\]|(?:['\"]|np\.|[-+]?[0-9.]+\s*,).*\])\s*", re.S)


def _check_history(col: pd.Series, name: str, delimiter: str) -> None:
    """A history written as text must be tokens joined by ``data.seq_delimiter``: a list
    written to a CSV by pandas (``['i1', 'i2']``) or JSON text trained as one token per
    row, silently."""
    if not (pd.api.types.is_string_dtype(col) or col.dtype == object):
        return
    bad = col.str.fullmatch(_LISTED).eq(True)  # NaN where a cell is not text
    if bad.any():
        first = _first(bad, col)
        raise DataError(
            f"history column {name!r} holds a list written as text ({first}): write each "
            f"history as its tokens joined by data.seq_delimiter ({delimiter!r}), or as a "
            "Parquet list column"
        )


# delimiters a history is often joined by; a CSV's own comma is quoted around it
_OTHER_DELIMITERS = ("|", ",", ";", " ", "\t", "#", ":", "^")
_DELIMITER_SAMPLE = 20_000  # non-empty history cells looked at


def _check_delimiter(col: pd.Series, name: str, items: pd.Series, delimiter: str) -> None:
    """A history joined by another delimiter than ``data.seq_delimiter`` (``1,2,3`` for
    ``1|2|3``) trained silently as one token per row, none of them an item: refused
    where no sampled history holds the configured delimiter, most hold one other, and
    split at that one their tokens are mostly the candidates' item IDs while, unsplit,
    they are not (an ID that holds a comma is left alone)."""
    if not (pd.api.types.is_string_dtype(col) or col.dtype == object):
        return
    text = col[col.map(lambda v: isinstance(v, str) and v != "")]
    if text.empty:
        return
    if len(text) > _DELIMITER_SAMPLE:
        text = text.sample(_DELIMITER_SAMPLE, random_state=0)
    if text.str.contains(delimiter, regex=False).any():
        return
    known = set(items.dropna().astype(str).unique())
    if not known:
        return
    whole = text.isin(known).mean()
    for other in _OTHER_DELIMITERS:
        if other == delimiter:
            continue
        holds = text.str.contains(other, regex=False)
        if holds.mean() < 0.5:
            continue
        tokens = text[holds].str.split(other, regex=False).explode()
        tokens = tokens[tokens != ""]
        if tokens.empty or tokens.isin(known).mean() < 0.5 or whole >= 0.5:
            continue
        example = str(text[holds].iloc[0])[:80]
        raise DataError(
            f"history column {name!r} looks joined by {other!r}, not data.seq_delimiter "
            f"({delimiter!r}): {example!r} would train as one token; set "
            f"data.seq_delimiter: {other!r} in the config"
        )


def _cell_text(v: object) -> str:
    """A cell in full: a list or array (Parquet's list cells) element by element; numpy's
    own text of an array elides the middle past 1,000 elements."""
    if isinstance(v, np.ndarray):
        v = v.tolist()
    return "|".join(map(str, v)) if isinstance(v, list) else str(v)


def fingerprint(frame: pd.DataFrame) -> str:
    """SHA-256 over every cell of the training frame (lists joined), order-sensitive:
    the manifest's ``data_fingerprint``, which ``ctr load --bundle`` checks the data
    against (torch-free, as ``ctr load`` runs in the runtime image)."""
    h = hashlib.sha256()
    for col in sorted(frame.columns):
        h.update(col.encode())
        vals = frame[col].map(_cell_text)
        h.update("\x1e".join(vals.tolist()).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def check_integers(
    source: str, opts: dict[str, Any], rules: dict[str, tuple[int | None, bool]]
) -> None:
    """``opts``' integer options by ``rules`` (key -> (minimum or None, None allowed)):
    a value of the wrong kind (``2.7``, ``"ten"``) or out of range (``-1``) is a
    DataError naming the option; it was rounded down silently, failed in ``int()``
    naming no option, or left the data empty."""
    for key, (minimum, nullable) in rules.items():
        value = opts.get(key)
        if value is None and nullable:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            kind = "an integer or null" if nullable else "an integer"
            raise DataError(f"{source} data.options.{key} must be {kind}, not {value!r}")
        if minimum is not None and value < minimum:
            raise DataError(f"{source} data.options.{key} must be at least {minimum}, "
                            f"not {value!r}")  # fmt: skip


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """A malformed data file's parse error as a DataError naming the file: a rating
    that is no number, a short line, truncated JSON were one-line errors naming neither
    the file nor the row, or a traceback."""
    try:
        yield
    except DataError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise DataError(f"{path} is malformed: {type(exc).__name__}: {exc}") from None


def load_catalog(config: FeatureConfig) -> pd.DataFrame | None:
    """The source's item table, where it has one beyond the examples (MovieLens'
    ``u.item``): one row per item, its ID and item-side features; None otherwise."""
    if config.data.source == "movielens":
        from training.data.movielens import item_catalog

        return item_catalog(config)
    return None


def data_files(config: FeatureConfig) -> list[Path]:
    """The files a load of ``config`` reads (none for the synthetic generator)."""
    spec = config.data
    if spec.source in ("csv", "parquet"):
        return [Path(spec.path)] if spec.path else []
    if spec.source in ("amazon", "movielens", "alimama"):
        from importlib import import_module

        return import_module(f"training.data.{spec.source}").data_files(config)  # type: ignore[no-any-return]
    return []


def load_frame(config: FeatureConfig) -> pd.DataFrame:
    """Dispatch on ``data.source`` to an adapter; all return the generic layout."""
    spec = config.data
    if spec.source == "synthetic":
        from training.data.synthetic import check_options, generate

        frame = generate(config, **check_options(config))
    elif spec.source in ("csv", "parquet"):
        if not spec.path:
            raise DataError("data.path is required for csv/parquet")
        frame = read_table(spec.path, spec.source)
        if spec.source == "csv":
            frame = canonical_csv_ids(config, frame)
    elif spec.source == "amazon":
        from training.data.amazon import load_amazon

        frame = load_amazon(config)
    elif spec.source == "movielens":
        from training.data.movielens import load_movielens

        frame = load_movielens(config)
    elif spec.source == "alimama":
        from training.data.alimama import load_alimama

        frame = load_alimama(config)
    else:  # pragma: no cover - guarded by the Literal type
        raise DataError(f"unknown data.source {spec.source!r}")
    return validate_frame(config, frame)


def time_values(col: pd.Series, name: str) -> pd.Series:
    """A time column as numbers (:func:`ctr.times.time_numbers`, as service.loader reads
    them): numbers (a CSV's ``"9"`` < ``"11"``), or datetimes, dates and ISO 8601 text
    (int64 counts of their unit), missing ones (NaN, NaT, blanks) as NaN. A value that
    is neither is a :class:`DataError` naming the column and the first such row."""
    from ctr.times import time_numbers

    out = time_numbers(col)
    if out is None:
        numbers = pd.to_numeric(col, errors="coerce")
        text = col.astype(str)
        times = pd.to_datetime(text, utc=True, format="ISO8601", errors="coerce")
        bad = numbers.isna() & times.isna() & ~(col.isna() | (text.str.strip() == ""))
        if not bad.any():  # each is one or the other: numbers and ISO times mixed
            first = int(np.flatnonzero(numbers.notna().to_numpy())[0])
            other = int(np.flatnonzero(times.notna().to_numpy() & numbers.isna().to_numpy())[0])
            raise DataError(
                f"data.time_column {name!r} mixes numbers (row {first}: "
                f"{str(col.iloc[first])[:80]!r}) and ISO 8601 times (row {other}: "
                f"{str(col.iloc[other])[:80]!r}): write every time in one form"
            )
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"data.time_column {name!r} must hold numbers, datetimes or ISO 8601 times "
            f"(e.g. 2024-01-02T03:04:05Z): row {row} holds {str(col.iloc[row])[:80]!r}"
        )
    return out


# the adapters' columns that order a user's examples without being times: Amazon's
# sequences and the generator's have no time, MovieLens keeps its own as ``timestamp``
POSITION_COLUMNS = {"amazon": "ts", "movielens": "ts", "synthetic": "ts"}


def split_frame(
    frame: pd.DataFrame, spec: DataSpec, seed: int = 0, trained: bool = False
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Train / validation / test with no test interaction leaking into training.

    * ``last_per_user``: per user ordered by time, the last ``test_steps`` example
      times go to test, the ``val_steps`` before them to validation, the rest to train
      (all rows sharing a time, e.g. a positive and its sampled negative, stay together).
    * ``time``: global time cut at the (1 - val - test) and (1 - test) quantiles.
    * ``random``: a seeded row shuffle (only for data without time).

    A time-based split on a frame without its time column is an error, never a silent
    shuffle: a shuffle puts a user's later rows (whose histories hold the test targets)
    into training. So is a ``time`` split that leaves a part empty (ties at a cut), and
    a time-based split of rows without a time (a time cut would drop them silently).
    """
    if spec.split != "random" and (spec.time_column is None or spec.time_column not in frame):
        raise DataError(
            f"data.split is {spec.split!r} but the frame has no time column "
            f"(data.time_column: {spec.time_column!r}); add it, or set data.split: random "
            "for data without time"
        )
    if spec.split == "random":
        rng = np.random.default_rng(seed)
        idx = rng.permutation(len(frame))
        n_test = int(len(frame) * spec.test_fraction)
        n_val = int(len(frame) * spec.val_fraction)
        te, va, tr = idx[:n_test], idx[n_test : n_test + n_val], idx[n_test + n_val :]
        return frame.iloc[tr], frame.iloc[va], frame.iloc[te]
    t = time_values(frame[spec.time_column], spec.time_column)
    missing = int(t.isna().sum())
    if missing:  # in no part of a time cut; ``ctr load`` would count them as the oldest
        raise DataError(
            f"data.split {spec.split!r}: {missing} of {len(frame)} rows have no "
            f"{spec.time_column!r} (drop or fill them, or set data.split: random)"
        )
    if spec.split == "time":
        # (``trained``: a bundle's split, made before this was refused, is read back)
        if spec.time_column == POSITION_COLUMNS.get(spec.source) and not trained:
            # a cut at the positions' quantiles is no time cut: the test set became the
            # heavy users' late examples, every one older than training's newest
            also = " or data.time_column: timestamp (the ratings' times)"
            raise DataError(
                f"data.split 'time' on {spec.source}'s {spec.time_column!r}, each example's "
                "position in its user's sequence, not a time: use data.split: last_per_user"
                + (also if spec.source == "movielens" else "")
            )
        q_val = t.quantile(1 - spec.val_fraction - spec.test_fraction)
        q_test = t.quantile(1 - spec.test_fraction)
        parts = frame[t <= q_val], frame[(t > q_val) & (t <= q_test)], frame[t > q_test]
        wanted = (1.0, spec.val_fraction, spec.test_fraction)
        names = ("train", "validation", "test")
        empty = [n for n, part, w in zip(names, parts, wanted, strict=True) if part.empty and w]
        if empty:
            raise DataError(
                f"data.split 'time' leaves {', '.join(empty)} empty: too few distinct "
                f"values of {spec.time_column!r} for cuts at the quantiles "
                f"{1 - spec.val_fraction - spec.test_fraction:g} and "
                f"{1 - spec.test_fraction:g} (rows sharing a time stay together)"
            )
        return parts
    # last_per_user: rank distinct times within each user, newest = 0
    key = frame[spec.user_key].astype(str)
    tmp = pd.DataFrame({"k": key, "t": t})
    rank = tmp.groupby("k")["t"].rank(method="dense", ascending=False).astype(int) - 1
    te, va = spec.test_steps, spec.val_steps
    return frame[rank >= te + va], frame[(rank >= te) & (rank < te + va)], frame[rank < te]
