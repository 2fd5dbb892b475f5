"""``ctr results``: Base vs DeepFM vs DIN vs DIEN on the real datasets, mean ± std over
seeds, written to ``--out`` (default ``runs/results.md``) with the command that produced it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ctr.spec import load_config
from training.data.generic import DataError, data_files, data_root

ROOT = Path(__file__).resolve().parents[1]

# name -> (config, the shared-data folder it needs or None, overrides of the config)
DATASETS: dict[str, tuple[str, str | None, dict[str, Any]]] = {
    "amazon_beauty": ("configs/amazon_beauty_din.yaml", "amazon-s3rec-sequences", {}),
    # the same protocol on the other two S3-Rec categories
    "amazon_sports": (
        "configs/amazon_beauty_din.yaml",
        "amazon-s3rec-sequences",
        {"name": "din_amazon_sports", "data.options.name": "Sports_and_Outdoors"},
    ),
    "amazon_toys": (
        "configs/amazon_beauty_din.yaml",
        "amazon-s3rec-sequences",
        {"name": "din_amazon_toys", "data.options.name": "Toys_and_Games"},
    ),
    "movielens": ("configs/movielens_din.yaml", "movielens-100k", {}),
    "synthetic": ("configs/synthetic_din.yaml", None, {}),
}


def run(
    datasets: list[str],
    models: list[str],
    seeds: list[int],
    overrides: dict[str, Any],
    out_dir: Path,
) -> dict[str, Any]:
    from training.dataset import prepare
    from training.train import train

    unknown = [ds for ds in datasets if ds not in DATASETS]
    if unknown:  # before anything trains
        raise ValueError(f"unknown datasets {unknown}; known: {sorted(DATASETS)}")
    absent = [
        f"{ds} ({data_root() / folder})"
        for ds in datasets
        if (folder := DATASETS[ds][1]) is not None and not (data_root() / folder).is_dir()
    ]
    if absent:  # before anything trains: a table without them would pass for a result
        raise DataError(
            f"data not found for {', '.join(absent)}: set CTR_DATA_ROOT to the folder that "
            "holds the datasets (default ../shared/data beside the checkout), or leave "
            "them out of --datasets"
        )
    missing: list[str] = []
    for ds in datasets:  # every config first: a typo in --models failed after hours
        cfg, _, base = DATASETS[ds]
        for mt in models:
            for seed in seeds:
                config = load_config(ROOT / cfg, {**base, "model.type": mt, "train.seed": seed,
                                                  **overrides})  # fmt: skip
                missing += [f"{ds} ({p})" for p in data_files(config) if not p.is_file()]
    if missing:  # a second category's missing file failed after the first had trained
        raise DataError(f"data file not found for {', '.join(dict.fromkeys(missing))}")
    results: dict[str, Any] = {}
    for ds in datasets:
        cfg, _, base = DATASETS[ds]
        prepared = None
        for mt in models:
            for seed in seeds:
                over = {**base, "model.type": mt, "train.seed": seed, **overrides}
                config = load_config(ROOT / cfg, over)
                if prepared is None:  # the data split does not depend on the model seed
                    prepared = prepare(config)
                else:
                    prepared.config = config
                t = time.time()
                m = train(config, out_dir / f"{ds}-{mt}-{seed}", prep=prepared, progress=False)
                row = {
                    "auc": m["test"]["auc"],
                    "gauc": m["test"]["gauc"],
                    "logloss": m["test"]["logloss"],
                    "best_epoch": m["best_epoch"],
                    "seconds": round(time.time() - t, 1),
                }
                results.setdefault(ds, {}).setdefault(mt, []).append(row)
                print(f"[results] {ds} {mt} seed {seed}: {json.dumps(row)}", flush=True)
    return results


def split_note(ds: str, overrides: dict[str, Any]) -> str:
    """What a dataset's test split is, with these overrides (docs/datasets.md)."""
    cfg, _, base = DATASETS[ds]
    d = load_config(ROOT / cfg, {**base, **overrides}).data
    if d.split == "last_per_user":
        return (f"each user's last {d.test_steps} example time(s) on `{d.time_column}` "
                "(leave-last-out, not a calendar cut)")  # fmt: skip
    if d.split == "time":
        return f"a calendar cut: the newest {d.test_fraction:.0%} of examples by `{d.time_column}`"
    return f"a random {d.test_fraction:.0%} of the examples"


def render(results: dict[str, Any], command: str, overrides: dict[str, Any]) -> str:
    lines = [
        "# Offline results",
        "",
        f"Command: `{command}`",
        "",
        "Test split per dataset below (docs/datasets.md); mean ± sample standard deviation "
        "(n - 1) over seeds (n/a for one seed).",
        "",
    ]
    for ds, by_model in results.items():
        lines += [
            f"## {ds}",
            "",
            f"Test split: {split_note(ds, overrides)}.",
            "",
            "| model | AUC | GAUC | logloss | best epoch | seconds/run |",
            "|---|---|---|---|---|---|",
        ]
        for mt, runs in by_model.items():

            def ms(key: str, r: list[dict[str, Any]] = runs) -> str:
                v = np.array([x[key] for x in r], dtype=float)
                spread = f"{v.std(ddof=1):.4f}" if len(v) > 1 else "n/a"
                return f"{v.mean():.4f} ± {spread}"

            epochs = ",".join(str(x["best_epoch"]) for x in runs)
            secs = np.mean([x["seconds"] for x in runs])
            lines.append(
                f"| {mt} | {ms('auc')} | {ms('gauc')} | {ms('logloss')} | {epochs} | {secs:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)
