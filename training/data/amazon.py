"""Amazon 2014 review sequences (S3-Rec release) built the way DIN/DIEN built Amazon data.

Source folder: ``amazon-s3rec-sequences`` under :func:`training.data.generic.data_root`
(or ``data.path``). See its ``PROVENANCE.md``: one line per user with the reviewed
items in time order, plus ``<name>_item2attributes.json`` (brand first when present,
then the category-path nodes below the top level). There are no timestamps and no
labels, so examples are built with the DIN/DIEN Amazon protocol:

* for each user, the targets are the last ``targets_per_user`` positions ``t`` that
  have at least ``min_history`` earlier items;
* each target yields a positive (the real item at ``t``, history = the items before
  ``t``, keeping the last ``max_seq_len``) and one negative (an item drawn uniformly,
  seeded, from the items the user never interacted with, with the SAME history);
* both rows of a pair get ``ts = t`` so a per-user split keeps them together.

Category rule (one ``cate_id`` per item, see :func:`category_map`): the most specific
category node of the item, i.e. the one shared by the fewest items, among nodes shared
by at least ``min_cate_items`` items.

``data.options`` (all optional):

* ``name``: ``Beauty`` (default), ``Sports_and_Outdoors`` or ``Toys_and_Games``;
* ``targets_per_user``: int, default 3 (``null`` or 0 = every eligible position);
* ``min_history``: int, default 2;
* ``min_cate_items``: int, default 10 (support floor of the category rule);
* ``seed``: int, default 7 (negative sampling).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctr.spec import FeatureConfig
from training.data.generic import DataError, check_integers, data_root, reading

FOLDER = "amazon-s3rec-sequences"
NAMES = ("Beauty", "Sports_and_Outdoors", "Toys_and_Games")
UNKNOWN_CATE = "unk"
COLUMNS = ["user_id", "item_id", "cate_id", "hist_item_id", "hist_cate_id", "label", "ts"]
DEFAULTS: dict[str, Any] = {
    "name": "Beauty",
    "targets_per_user": 3,
    "min_history": 2,
    "min_cate_items": 10,
    "seed": 7,
}


def _options(config: FeatureConfig) -> dict[str, Any]:
    """``data.options`` merged over :data:`DEFAULTS`; unknown keys are an error."""
    unknown = sorted(set(config.data.options) - set(DEFAULTS))
    if unknown:
        raise DataError(f"unknown amazon data.options {unknown}; known: {sorted(DEFAULTS)}")
    opts = {**DEFAULTS, **config.data.options}
    rules = {"targets_per_user": (0, True), "min_history": (1, False),
             "min_cate_items": (1, False), "seed": (None, False)}  # fmt: skip
    check_integers("amazon", opts, rules)
    return opts


def dataset_dir(config: FeatureConfig) -> Path:
    """``data.path`` if set, else ``<data_root>/amazon-s3rec-sequences``."""
    return Path(config.data.path) if config.data.path else data_root() / FOLDER


def data_files(config: FeatureConfig) -> list[Path]:
    """The files :func:`load_amazon` reads for ``config`` (its category's sequences and
    item attributes)."""
    name = _category(config)
    folder = dataset_dir(config)
    return [folder / f"{name}.txt", folder / f"{name}_item2attributes.json"]


def _category(config: FeatureConfig) -> str:
    name = str(_options(config)["name"])
    if name not in NAMES:
        raise DataError(f"amazon data.options.name must be one of {NAMES}, not {name!r}")
    return name


def read_sequences(path: Path) -> list[tuple[str, list[str]]]:
    """``(user_id, items oldest first)`` per line of ``<name>.txt``."""
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    out: list[tuple[str, list[str]]] = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            parts = line.split()
            if parts:
                out.append((parts[0], parts[1:]))
    return out


def category_map(attributes: Mapping[str, Sequence[Any]], min_items: int = 10) -> dict[str, str]:
    """One category per item from its attribute list (brand first, then category nodes).

    The rule, deterministic and documented in ``docs/datasets.md``:

    1. An attribute is a *category node* if it occurs at a non-first position of some
       item's list. S3-Rec writes the brand first, so a brand never occurs later; the
       first attribute of an item is dropped as its brand unless it is a category node.
    2. ``support(a)`` = the number of items whose list contains ``a``. Along a category
       path a child's items are a subset of its parent's, so a smaller support means a
       more specific node.
    3. The item's category is its category node with the smallest support among those
       with ``support >= min_items`` (ties: the later one in the list, i.e. deeper in its
       path, then the smaller id). Nodes shared by fewer items are too sparse to learn;
       if every node is below the floor, the node with the largest support is used.
    4. An item with no category node gets ``"unk"``.

    Near-universal nodes (e.g. id 2 in every Sports/Toys item) are never chosen while a
    more specific node exists, so they do not collapse all items into one category.
    """
    lists = {str(k): [str(a) for a in v] for k, v in attributes.items()}
    category_nodes = {a for attrs in lists.values() for a in attrs[1:]}
    support: Counter[str] = Counter(a for attrs in lists.values() for a in set(attrs))
    out: dict[str, str] = {}
    for item, attrs in lists.items():
        nodes = attrs if attrs and attrs[0] in category_nodes else attrs[1:]
        if not nodes:
            out[item] = UNKNOWN_CATE
            continue
        depth = {a: i for i, a in enumerate(nodes)}  # last position of each node
        eligible = [a for a in depth if support[a] >= min_items]
        if eligible:
            out[item] = min(eligible, key=lambda a: (support[a], -depth[a], _id_key(a)))
        else:
            out[item] = min(depth, key=lambda a: (-support[a], _id_key(a)))
    return out


def _id_key(token: str) -> tuple[int, int | str]:
    """Sort numeric ids numerically, anything else after them as text."""
    return (0, int(token)) if token.isdigit() else (1, token)


def build_examples(
    sequences: Sequence[tuple[str, Sequence[str]]],
    item_cate: Mapping[str, str],
    max_seq_len: int,
    targets_per_user: int | None = 3,
    min_history: int = 2,
    seed: int = 7,
) -> pd.DataFrame:
    """Positive/negative pairs per user in the generic layout (see the module docstring).

    Negatives are drawn uniformly from every item that occurs in ``sequences`` minus the
    user's own items, with ``numpy.random.default_rng(seed)``, in input order.
    """
    if min_history < 1:
        raise DataError("amazon min_history must be >= 1")
    universe = np.array(sorted({i for _, seq in sequences for i in seq}, key=_id_key))
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    for user, seq in sequences:
        seen = set(seq)
        if len(seen) >= len(universe):
            raise DataError(f"user {user!r} interacted with every item; no negative exists")
        first = min_history
        if targets_per_user:
            first = max(first, len(seq) - targets_per_user)
        for t in range(first, len(seq)):
            hist = list(seq[max(0, t - max_seq_len) : t])
            hist_cate = [item_cate.get(i, UNKNOWN_CATE) for i in hist]
            negative = str(universe[rng.integers(len(universe))])
            while negative in seen:
                negative = str(universe[rng.integers(len(universe))])
            for item, label in ((seq[t], 1), (negative, 0)):
                rows.append(
                    {
                        "user_id": user,
                        "item_id": item,
                        "cate_id": item_cate.get(item, UNKNOWN_CATE),
                        "hist_item_id": hist,
                        "hist_cate_id": hist_cate,
                        "label": label,
                        "ts": t,
                    }
                )
    return pd.DataFrame(rows, columns=COLUMNS)


def load_amazon(config: FeatureConfig) -> pd.DataFrame:
    """Raw Amazon examples (generic layout) for ``data.options.name``."""
    opts = _options(config)
    seq_path, attr_path = data_files(config)
    sequences = read_sequences(seq_path)
    if not attr_path.exists():
        raise DataError(f"data file not found: {attr_path}")
    with reading(attr_path):
        attributes = json.loads(attr_path.read_text(encoding="utf-8"))
        if not isinstance(attributes, dict):
            raise DataError(f"{attr_path} is malformed: an object of item -> attribute "
                            f"lists, not a {type(attributes).__name__}")  # fmt: skip
        item_cate = category_map(attributes, int(opts["min_cate_items"]))
    targets = opts["targets_per_user"]
    return build_examples(
        sequences,
        item_cate,
        config.max_seq_len,
        targets_per_user=int(targets) if targets else None,
        min_history=int(opts["min_history"]),
        seed=int(opts["seed"]),
    )
