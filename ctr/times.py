"""A time column's order as numbers, one reading for training's split and ``ctr load``
(pandas imported on first use: nothing on the serving path reads times this way)."""

from __future__ import annotations

from typing import Any


def time_numbers(col: Any) -> Any:
    """``col`` (a pandas Series) as numbers (NaN where missing: NaN, NaT, a blank), or
    None where some value is neither a number nor a time.

    Numbers stay numbers (a CSV's text ``"9"`` < ``"11"``); datetimes (naive ones read
    as UTC), dates and ISO 8601 text (a CSV cannot hold datetimes: ``2024-01-02T03:04Z``,
    ``2024-01-02``) become int64 counts of the column's unit since the epoch, so a
    column compares with itself exactly."""
    import numpy as np
    import pandas as pd

    if pd.api.types.is_datetime64_any_dtype(col):
        missing = col.isna()
        naive = col.dt.tz_convert(None) if col.dt.tz is not None else col
        if missing.any():  # NaT would become the smallest int64: the oldest row
            filled = naive.fillna(naive[~missing].min() if (~missing).any() else pd.Timestamp(0))
            return pd.Series(np.where(missing, np.nan, filled.astype("int64")), index=col.index)
        return naive.astype("int64")
    blank = col.isna() | (col.astype(str).str.strip() == "")
    try:  # a blank of spaces, or NaT among numbers, is missing as NaN is
        return pd.to_numeric(col.where(~blank) if blank.any() else col)
    except (ValueError, TypeError):
        pass
    try:
        times = pd.to_datetime(col.where(~blank), utc=True, format="ISO8601", errors="coerce")
    except (ValueError, TypeError):  # objects to_datetime cannot take at all
        return None
    if (times.isna() & ~blank).any():
        return None
    return time_numbers(times)
