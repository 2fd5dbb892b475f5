"""Which data set a Redis database holds (``ctr:loaded:data``, written by ``ctr load``)
against the one the served bundle was trained on: a service pointed at another data
set's database scores real-looking users and items of that data (numeric IDs of two
data sets collide, so nothing reads as out of vocabulary), answering 200 and not
degraded. The worker logs a warning and ``/v1/models`` says so (``redis_data``)."""

from __future__ import annotations

import os
from typing import Any

import orjson

from ctr.spec import FeatureConfig

# which data set the database holds, kept across loads (``service.loader`` writes it)
DATA_KEY = "ctr:loaded:data"
# what names a data set: a config's name, history length or features may differ between
# models that serve the same data (DIN and DIEN side by side)
SAME = ("source", "path", "options")


def described(config: FeatureConfig) -> dict[str, Any]:
    """The data set a load of ``config`` reads (its file by name only: the loading
    machine's path need not be this one's)."""
    spec = config.data
    return {
        "name": config.name,
        "source": spec.source,
        "path": os.path.basename(os.path.normpath(spec.path)) if spec.path else None,
        "options": spec.options,
    }


def record(held: Any) -> dict[str, Any] | None:
    """``DATA_KEY``'s value (bytes or text) as the record ``ctr load`` wrote; None where
    there is none (never loaded) or it is not one."""
    if held is None:
        return None
    try:
        value = orjson.loads(held)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def comparable(value: dict[str, Any]) -> dict[str, Any]:
    """A record as :func:`described` writes one: the file by its name only."""
    held_path = value.get("path")
    return {**value, "path": os.path.basename(os.path.normpath(held_path)) if held_path else None}


def differences(held: dict[str, Any], want: dict[str, Any], keys: tuple[str, ...] = SAME) -> str:
    """What of ``keys`` differs between two data set records, for a warning: ``name held
    (wanted: ...)``, each value cut to 120 characters (records that share a config name
    and source differ in their options, e.g. another seed or user count)."""

    def text(v: Any) -> str:
        out = repr(v)
        return out if len(out) <= 120 else out[:119] + "…"

    return "; ".join(f"{k} {text(held.get(k))} (this one's: {text(want.get(k))})"
                     for k in keys if held.get(k) != want.get(k))  # fmt: skip
