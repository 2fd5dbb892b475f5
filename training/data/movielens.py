"""MovieLens-100k ratings as click examples with a rated-movie history.

Source folder: ``movielens-100k`` under :func:`training.data.generic.data_root` (or
``data.path``); the original GroupLens files, see its ``PROVENANCE.md``.

* Each user's ratings are sorted by ``(timestamp, item_id)`` (timestamps tie often,
  the item id makes the order deterministic); ``t`` is the position in that order.
* Every rating at a position ``t >= min_history`` is one example: label 1 if the
  rating is >= 4 (a "click"), else 0. The history is every movie before position
  ``t`` (whatever its rating), the last ``max_seq_len`` of them, with their genres:
  the movies of earlier seconds and, of the target's own second, those with a smaller
  item id (their real order within the second is unknown; 51 % of the examples hold
  at least one, 2.5 % of history positions). ``ctr load`` stores the newest example's
  history and movie, so a user's stored history holds every rated movie.
* ``cate_id`` of a movie is the name of its first set genre flag in ``u.genre`` order
  (``u.item`` is latin-1); a movie with no flag would get ``unknown``.
* User features from ``u.user``: ``age_bucket`` (decade, e.g. ``"20s"``), ``gender``
  and ``occupation``.
* ``ts`` is the position ``t``; ``rating`` and ``timestamp`` are kept as extra columns.

``data.options`` (all optional):

* ``min_history``: int, default 5;
* ``max_examples_per_user``: int or null (default, all); keeps each user's LAST ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from ctr.spec import FeatureConfig
from training.data.generic import DataError, check_integers, data_root, reading

FOLDER = "movielens-100k"
CLICK_RATING = 4
NO_GENRE = "unknown"
COLUMNS = [
    "user_id",
    "gender",
    "age_bucket",
    "occupation",
    "item_id",
    "cate_id",
    "hist_item_id",
    "hist_cate_id",
    "label",
    "ts",
    "rating",
    "timestamp",
]
DEFAULTS: dict[str, Any] = {"min_history": 5, "max_examples_per_user": None}


def _options(config: FeatureConfig) -> dict[str, Any]:
    """``data.options`` merged over :data:`DEFAULTS`; unknown keys are an error."""
    unknown = sorted(set(config.data.options) - set(DEFAULTS))
    if unknown:
        raise DataError(f"unknown movielens data.options {unknown}; known: {sorted(DEFAULTS)}")
    opts = {**DEFAULTS, **config.data.options}
    check_integers("movielens", opts, {"min_history": (0, False),
                                       "max_examples_per_user": (1, True)})  # fmt: skip
    return opts


def dataset_dir(config: FeatureConfig) -> Path:
    """``data.path`` if set, else ``<data_root>/movielens-100k``."""
    return Path(config.data.path) if config.data.path else data_root() / FOLDER


def data_files(config: FeatureConfig) -> list[Path]:
    """The files :func:`load_movielens` reads."""
    return [dataset_dir(config) / f for f in ("u.data", "u.genre", "u.item", "u.user")]


def _require(path: Path) -> Path:
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    return path


def read_ratings(folder: Path) -> pd.DataFrame:
    """``u.data`` as ints, sorted by ``(user_id, timestamp, item_id)``."""
    path = _require(folder / "u.data")
    with reading(path):
        ratings = pd.read_csv(
            path, sep="\t", header=None, names=["user_id", "item_id", "rating", "timestamp"],
            dtype="int64",
        )  # fmt: skip
    return ratings.sort_values(["user_id", "timestamp", "item_id"], kind="mergesort")


def read_genres(folder: Path) -> dict[int, str]:
    """Movie id -> name of its first set genre flag (``u.genre`` order)."""
    genre_names: list[str] = []
    for line in _require(folder / "u.genre").read_text(encoding="latin-1").splitlines():
        if line.strip():
            genre_names.append(line.rsplit("|", 1)[0])
    path = _require(folder / "u.item")
    with reading(path):
        items = pd.read_csv(path, sep="|", header=None, encoding="latin-1", dtype=str)
        n_flags = len(genre_names)
        if items.shape[1] != 5 + n_flags:
            raise DataError(f"u.item has {items.shape[1]} columns, expected {5 + n_flags}")
        flags = items.iloc[:, 5:].astype(int).to_numpy()
        out: dict[int, str] = {}
        for movie, row in zip(items[0].astype(int), flags, strict=True):
            set_flags = row.nonzero()[0]
            out[int(movie)] = genre_names[int(set_flags[0])] if len(set_flags) else NO_GENRE
    return out


def age_bucket(age: int) -> str:
    """Decade string: 24 -> ``"20s"``, 7 -> ``"0s"``."""
    return f"{age // 10 * 10}s"


def read_users(folder: Path) -> dict[int, dict[str, str]]:
    """User id -> ``{gender, age_bucket, occupation}`` from ``u.user``."""
    path = _require(folder / "u.user")
    with reading(path):
        users = pd.read_csv(
            path,
            sep="|",
            header=None,
            names=["user_id", "age", "gender", "occupation", "zip"],
            dtype={
                "user_id": "int64",
                "age": "int64",
                "gender": str,
                "occupation": str,
                "zip": str,
            },  # fmt: skip
            encoding="latin-1",
        )
        return {
            int(u): {"gender": g, "age_bucket": age_bucket(int(a)), "occupation": o}
            for u, a, g, o in zip(
                users["user_id"], users["age"], users["gender"], users["occupation"], strict=True
            )
        }


def item_catalog(config: FeatureConfig) -> pd.DataFrame:
    """Every movie of ``u.item`` with its genre (``item_id``, ``cate_id``), as the
    examples carry them: ``ctr load`` stores the genre of movies no example holds, so a
    request naming one by ID scores with its genre, not an unknown one."""
    genre = read_genres(dataset_dir(config))
    return pd.DataFrame({"item_id": [str(m) for m in genre], "cate_id": list(genre.values())})


def load_movielens(config: FeatureConfig) -> pd.DataFrame:
    """Raw MovieLens-100k examples in the generic layout (see the module docstring)."""
    opts = _options(config)
    min_history = int(opts["min_history"])
    cap = opts["max_examples_per_user"]
    cap = int(cap) if cap is not None else None
    if min_history < 0 or (cap is not None and cap < 1):
        raise DataError("movielens min_history must be >= 0 and max_examples_per_user >= 1")
    folder = dataset_dir(config)
    ratings = read_ratings(folder)
    genre = read_genres(folder)
    users = read_users(folder)
    max_len = config.max_seq_len
    rows: list[dict[str, Any]] = []
    for user, group in ratings.groupby("user_id", sort=True):
        uid = int(user)
        profile = users.get(uid)
        if profile is None:
            raise DataError(f"user {uid} of u.data is missing from u.user")
        items = [str(i) for i in group["item_id"]]
        cates = [genre.get(int(i), NO_GENRE) for i in group["item_id"]]
        scores = group["rating"].tolist()
        stamps = group["timestamp"].tolist()
        first = min_history if cap is None else max(min_history, len(items) - cap)
        for t in range(first, len(items)):
            lo = max(0, t - max_len)
            rows.append(
                {
                    "user_id": str(uid),
                    **profile,
                    "item_id": items[t],
                    "cate_id": cates[t],
                    "hist_item_id": items[lo:t],
                    "hist_cate_id": cates[lo:t],
                    "label": int(scores[t] >= CLICK_RATING),
                    "ts": t,
                    "rating": int(scores[t]),
                    "timestamp": int(stamps[t]),
                }
            )
    return pd.DataFrame(rows, columns=COLUMNS)
