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


def same_data(value: dict[str, Any] | None, config: FeatureConfig) -> bool | None:
    """True where ``value`` (:func:`record`) names the data set ``config`` reads; None
    where there is no record."""
    if value is None:
        return None
    held_path = value.get("path")
    value = {**value, "path": os.path.basename(os.path.normpath(held_path)) if held_path else None}
    want = described(config)
    return all(value.get(k) == want.get(k) for k in SAME)
