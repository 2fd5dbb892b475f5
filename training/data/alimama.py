"""Taobao display-ad impressions (Alimama, DMR preprocessing) with real click labels.

Source folder: ``alimama-display-ad-dmr`` under :func:`training.data.generic.data_root`
(or ``data.path``); see its ``PROVENANCE.md``. Each row of the 267-column CSV is one
impression joined with the user's 50-step behaviour history (behaviour type,
category, brand), the user profile and the ad features:

===========  =====================================================================
columns      meaning
===========  =====================================================================
0-49         ``cont_btag``: behaviour type (1..4 = pv/cart/fav/buy, 0 = padding)
50-99        ``his_cate``: history category ids (same id space as ``cate_id``)
100-149      ``his_brand``: history brand ids (same id space as ``brand``)
150-199      ``mask``: 1 = real history position, 0 = padding
200-249      ``match_mask`` (not used, see ``docs/datasets.md``)
250-258      uid, cms_segid, cms_group_id, final_gender_code, age_level,
             pvalue_level, shopping_level, occupation, new_user_class_level
259-265      mid (ad id), cate_id, campaign_id, customer, brand, price, pid
266          target: 1 = clicked
===========  =====================================================================

Output columns (raw strings unless noted): ``user_id`` (uid), the profile fields
(``final_gender_code`` renamed ``gender``), ``item_id`` (mid), ``cate_id``,
``campaign_id``, ``customer``, ``brand``, ``price`` (float), ``pid``, the sequences
``hist_cate_id``, ``hist_brand``, ``hist_btag`` (lists, padding dropped, file order
kept = assumed oldest first, last ``max_seq_len`` kept), ``label`` (int) and ``row``
(0-based row in the file). There is no time column, so configs use ``split: random``.

``data.options`` (all optional):

* ``file``: ``paddlerec`` (default; ``alimama_sampled_train.txt``, 500 rows, no header)
  or ``deepctr`` (``alimama_sample_deepctr_with_header.txt``, 99 rows, header line).
* ``keep_duplicates`` (default false): keep rows that repeat an earlier row exactly.
  The PaddleRec file holds 14 rows 15 times each (its 210 clicks are those 14, each
  repeated: up-sampled positives), and a random split then puts copies of one
  impression in train and in test, where the model is scored on rows it was trained on.
  By default each distinct row is kept once (``row`` is its first line's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctr.spec import FeatureConfig
from training.data.generic import DataError, data_root

FOLDER = "alimama-display-ad-dmr"
FILES = {
    "paddlerec": "alimama_sampled_train.txt",
    "deepctr": "alimama_sample_deepctr_with_header.txt",
}
HIST_STEPS = 50
N_COLUMNS = 267
PROFILE = [
    ("user_id", "uid"),
    ("cms_segid", "cms_segid"),
    ("cms_group_id", "cms_group_id"),
    ("gender", "final_gender_code"),
    ("age_level", "age_level"),
    ("pvalue_level", "pvalue_level"),
    ("shopping_level", "shopping_level"),
    ("occupation", "occupation"),
    ("new_user_class_level", "new_user_class_level"),
]
AD = [
    ("item_id", "mid"),
    ("cate_id", "cate_id"),
    ("campaign_id", "campaign_id"),
    ("customer", "customer"),
    ("brand", "brand"),
    ("price", "price"),
    ("pid", "pid"),
]
# (output column, header name, block start) of the 50-wide history blocks
HISTORY = [
    ("hist_btag", "cont_btag", 0),
    ("hist_cate_id", "his_cate", 50),
    ("hist_brand", "his_brand", 100),
]
MASK_START = 150
PROFILE_START = 250
AD_START = 259
LABEL_COL = 266
DEFAULTS: dict[str, Any] = {"file": "paddlerec", "keep_duplicates": False}


def _options(config: FeatureConfig) -> dict[str, Any]:
    """``data.options`` merged over :data:`DEFAULTS`; unknown keys are an error."""
    unknown = sorted(set(config.data.options) - set(DEFAULTS))
    if unknown:
        raise DataError(f"unknown alimama data.options {unknown}; known: {sorted(DEFAULTS)}")
    return {**DEFAULTS, **config.data.options}


def dataset_dir(config: FeatureConfig) -> Path:
    """``data.path`` if set, else ``<data_root>/alimama-display-ad-dmr``."""
    return Path(config.data.path) if config.data.path else data_root() / FOLDER


def data_files(config: FeatureConfig) -> list[Path]:
    """The file :func:`load_alimama` reads (``data.options.file``'s)."""
    return [dataset_dir(config) / FILES[_file_key(config)]]


def _file_key(config: FeatureConfig) -> str:
    key = str(_options(config)["file"])
    if key not in FILES:
        raise DataError(f"alimama data.options.file must be one of {sorted(FILES)}, not {key!r}")
    return key


def expected_header() -> list[str]:
    """The 267 column names of the DeepCTR file's header line (pandas-style, no suffixes)."""
    names = ["cont_btag"] * 50 + ["his_cate"] * 50 + ["his_brand"] * 50
    names += ["mask"] * 50 + ["match_mask"] * 50
    names += [src for _, src in PROFILE] + [src for _, src in AD] + ["target"]
    return names


def read_raw(path: Path) -> pd.DataFrame:
    """The CSV as strings with integer column positions; a header line is checked, dropped."""
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    raw = pd.read_csv(path, header=None, dtype=str, keep_default_na=False)
    if raw.shape[1] != N_COLUMNS:
        raise DataError(f"{path.name}: {raw.shape[1]} columns, expected {N_COLUMNS}")
    if len(raw) and not raw.iat[0, 0].strip().isdigit():
        header = [str(h).strip() for h in raw.iloc[0]]
        if header != expected_header():
            raise DataError(f"{path.name}: unexpected header line")
        raw = raw.iloc[1:].reset_index(drop=True)
    return raw


def to_frame(raw: pd.DataFrame, max_seq_len: int) -> pd.DataFrame:
    """The 267 positional columns -> the generic layout (see the module docstring)."""
    try:
        mask = raw.iloc[:, MASK_START : MASK_START + HIST_STEPS].astype(int).to_numpy() == 1
        labels = raw.iloc[:, LABEL_COL].astype(int)
        price = raw.iloc[:, AD_START + 5].astype(float)
    except ValueError as exc:
        raise DataError(f"non-numeric mask/label/price value: {exc}") from exc
    out = pd.DataFrame(
        {name: raw.iloc[:, PROFILE_START + j].str.strip() for j, (name, _) in enumerate(PROFILE)}
    )
    for j, (name, _) in enumerate(AD):
        out[name] = raw.iloc[:, AD_START + j].str.strip()
    out["price"] = price.to_numpy(dtype=np.float64)
    for name, _, start in HISTORY:
        block = raw.iloc[:, start : start + HIST_STEPS].to_numpy()
        out[name] = [
            [str(v).strip() for v in values[keep]][-max_seq_len:]
            for values, keep in zip(block, mask, strict=True)
        ]
    out["label"] = labels.to_numpy()
    out["row"] = raw.index.to_numpy()  # the data row in the file (read_raw numbers them)
    return out.reset_index(drop=True)


def load_alimama(config: FeatureConfig) -> pd.DataFrame:
    """Raw Alimama examples in the generic layout for ``data.options.file``."""
    opts = _options(config)
    raw = read_raw(dataset_dir(config) / FILES[_file_key(config)])
    keep = opts["keep_duplicates"]
    if not isinstance(keep, bool):
        raise DataError(f"alimama data.options.keep_duplicates must be true or false, not {keep!r}")
    if not keep:
        raw = raw[~raw.duplicated()]
    return to_frame(raw, config.max_seq_len)
