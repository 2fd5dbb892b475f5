"""From a config to encoded train/val/test tensors, the fitted mapping and a fingerprint."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ctr.encode import Encoded, check_item_key, encode_frame, raw_columns_for_fit
from ctr.mapping import FeatureMapper
from ctr.spec import FeatureConfig
from training.data import load_frame, split_frame
from training.data.generic import DataError, fingerprint


@dataclass
class Split:
    """Encoded examples (one user row per example) plus labels and user keys."""

    enc: Encoded
    label: np.ndarray
    users: np.ndarray

    def __len__(self) -> int:
        return len(self.label)

    def batch(self, idx: np.ndarray) -> dict[str, Tensor]:
        """Rows ``idx`` as the model's input dict (U == N, ``user_idx = arange``)."""
        e = self.enc
        return {
            "user_sparse": torch.from_numpy(e.user_sparse[idx]),
            "user_dense": torch.from_numpy(e.user_dense[idx]),
            "hist": torch.from_numpy(e.hist[idx]),
            "hist_len": torch.from_numpy(e.hist_len[idx]),
            "item_sparse": torch.from_numpy(e.item_sparse[idx]),
            "item_dense": torch.from_numpy(e.item_dense[idx]),
            "user_idx": torch.arange(len(idx), dtype=torch.int64),
        }


@dataclass
class Prepared:
    config: FeatureConfig
    mapper: FeatureMapper
    train: Split
    val: Split
    test: Split
    fingerprint: str
    item_pool: np.ndarray  # [I, S] table indices of items, one column per sequence field
    frames: dict[str, pd.DataFrame]


def _split(config: FeatureConfig, mapper: FeatureMapper, frame: pd.DataFrame) -> Split:
    enc = encode_frame(config, mapper, frame, config.data.seq_delimiter)
    return Split(
        enc,
        frame[config.data.label].to_numpy(np.float32),
        frame[config.data.user_key].astype(str).to_numpy(),
    )


def item_pool(config: FeatureConfig, mapper: FeatureMapper, frame: pd.DataFrame) -> np.ndarray:
    """Distinct training candidates as ``[I, S]``: for each sequence field, the index of
    the item's value in that field's shared table (negative sampling for DIEN).

    Distinct as the model sees them: rows whose :func:`negative_key` fields map to the
    same indices are one row (the first), so the items a vocabulary's ``min_count`` or
    ``max_size`` leaves out (all OOV, index 1) or a hash's buckets join are drawn as one
    item, not once each: where the vocabulary kept a tenth of the items, nine in ten
    negatives had been the OOV row (a models review, session 46)."""
    seqs = config.sequences
    cols = [t.source for t in config.sequence_targets]
    if not seqs:
        return np.zeros((0, 0), dtype=np.int64)
    unique = list(dict.fromkeys(cols))  # two sequences may share one target column
    # one row per item ID (per distinct row where no sequence reads the item ID)
    key = config.item_id_feature.source
    items = frame[unique].drop_duplicates(subset=[key] if key in unique else unique)
    out = np.stack(
        [
            mapper.mapper_for(s.name).map_many(items[c].tolist())
            for s, c in zip(seqs, cols, strict=True)
        ],
        axis=1,
    ).astype(np.int64)
    if len(out):
        _, first = np.unique(out[:, list(negative_key(config))], axis=0, return_index=True)
        out = out[np.sort(first)]  # the first of each, in the frame's order
    return out


def prepare(config: FeatureConfig, frame: pd.DataFrame | None = None) -> Prepared:
    frame = load_frame(config) if frame is None else frame
    check_item_key(config, frame)
    tr, va, te = split_frame(frame, config.data, seed=config.data.split_seed)
    classes = tr[config.data.label].nunique() if len(tr) else 0
    if classes < 2:  # nothing to learn from: no step, or one label only
        raise DataError(
            f"data.split {config.data.split!r} leaves the training split "
            + (f"with one label only ({len(tr)} rows)" if len(tr) else "empty")
            + f" of {len(frame)} rows (validation {len(va)}, test {len(te)}): more rows "
            "per user, fewer held-out steps or a smaller held-out fraction"
        )
    mapper = FeatureMapper.fit(config, raw_columns_for_fit(config, tr, config.data.seq_delimiter))
    return Prepared(
        config=config,
        mapper=mapper,
        train=_split(config, mapper, tr),
        val=_split(config, mapper, va),
        test=_split(config, mapper, te),
        fingerprint=fingerprint(tr),
        item_pool=item_pool(config, mapper, tr),
        frames={"train": tr, "val": va, "test": te},
    )


def negative_key(config: FeatureConfig) -> tuple[int, ...]:
    """The sequence fields on which a DIEN negative is compared with the behaviour it
    stands against: the one that holds the item ID (``config.item_id_feature``, wherever
    the sequences list it), or all of them where none does (Alimama's histories hold
    categories and brands only)."""
    targets = [t.name for t in config.sequence_targets]
    key = config.item_id_feature.name
    return (targets.index(key),) if key in targets else tuple(range(len(targets)))


def sample_negatives(
    pool: np.ndarray,
    hist: np.ndarray,
    hist_len: np.ndarray,
    length: int,
    rng: np.random.Generator,
    *,
    key: tuple[int, ...],
) -> np.ndarray:
    """``[B, S, L]`` random items from ``pool [I, S]`` at real positions, 0 at padding.

    A negative is never the behaviour it stands against (``hist [B, S, L]``, compared on
    the fields ``key`` names, :func:`negative_key`: the item ID's, so another item of
    the same category may be drawn): a draw that hits it takes the next pool item
    instead (the official DIEN code redraws; the shift slightly favours the item after a
    clicked one, at a rate of about 1 / pool size). It uses no extra random draws, so
    every other draw stays what the seed gives. A pool with no other item (one row, or
    every row keyed as the behaviour) has none to give: training warns of that
    (:func:`training.train.setting_warnings`)."""
    b = len(hist_len)
    k = rng.integers(0, len(pool), size=(b, length))  # [B, L]
    if len(pool) > 1:
        keyed = pool[:, list(key)]  # [I, K]
        real = hist[:, list(key), :length].transpose(0, 2, 1)  # [B, L, K]
        for _ in range(len(pool)):
            hit = np.all(keyed[k] == real, axis=-1)  # [B, L]
            if not hit.any():
                break
            k = np.where(hit, (k + 1) % len(pool), k)
    picks = pool[k]  # [B, L, S]
    neg = np.ascontiguousarray(picks.transpose(0, 2, 1))
    mask = np.arange(length)[None, :] < hist_len[:, None]
    return neg * mask[:, None, :]
