"""The command line's argument types, shared help texts and defaults (``ctr.cli``'s
parser and the commands).

Standard library only: the Docker image's ops-build stage builds ``ctr.cli``'s parser
with this module, ``ctr/__init__.py`` and ``ctr/native.py`` alone, and no packages."""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from typing import Any


def _setting(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` (a service setting for ``--a`` / ``--b``)."""
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, e.g. CTR_X=1 (got {text!r})")
    return key, value


def _number(
    kind: Callable[[str], Any], ok: Callable[[Any], bool], must: str
) -> Callable[[str], Any]:
    """An argparse type: ``kind(text)``, for which ``ok`` must hold (else "must be
    ``must``")."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {must} (got {text})")
        return value

    return parse


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type: ``kind(text)``, which must be above 0 and finite (``inf`` would
    never end a wait or a loop)."""
    return _number(kind, lambda v: v > 0 and math.isfinite(v), "above 0")


def _non_negative(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type: ``kind(text)``, which must be 0 or more, and finite."""
    return _number(kind, lambda v: v >= 0 and math.isfinite(v), "0 or more, and finite")


THREADS_HELP = "ORT intra-op threads (CTR_INTRA_OP_THREADS; 0: ORT's default)"


def _counts(text: str) -> str:
    """An argparse type: a comma-separated list of whole numbers above 0 (``50,200``),
    returned as given (each command splits it)."""
    try:
        ok = bool(text.strip()) and all(int(part) > 0 for part in text.split(","))
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(
            f"must be whole numbers above 0, comma-separated (got {text!r})"
        )
    return text


def _share(text: str) -> float:
    """An argparse type: a share between 0 and 1."""
    value = _non_negative(float)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"a share is at most 1 (got {text})")
    return value


SET_HELP = (
    "KEY=VALUE config override, repeatable (train.epochs=2); VALUE is read as JSON where it "
    "parses, so digits meant as text need JSON quotes: 'name=\"2024\"'"
)


def _overrides(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:  # `--set name`: the value forgotten, not an empty one
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _store_default() -> str:
    """The model store a command writes or reads by default: ``CTR_MODELS_DIR``, as the
    service reads it (``ctr export`` wrote to ``models`` whatever it said, and the
    service, told where the store is, did not find the bundle: an API review)."""
    return os.environ.get("CTR_MODELS_DIR") or "models"


BENCH_REDIS = "redis://127.0.0.1:6379/14"
BENCH_REDIS_HELP = (
    "the benchmark's own Redis database, not $CTR_REDIS_URL: it loads users and replaces "
    "the ctr:item:* hashes there; one holding keys no benchmark wrote is refused unless "
    "--force (default: %(default)s)"
)
BENCH_FORCE_HELP = "load into --redis-url even where it holds keys no benchmark wrote"
