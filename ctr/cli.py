"""``ctr``: one entry point for every command of the product.

Torch is imported only by the commands that need it (train, export, bench-model),
so ``ctr serve`` and ``ctr load`` run in the torch-free runtime image.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def _overrides(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from ctr.spec import load_config
    from training.train import train

    config = load_config(args.config, _overrides(args.set))
    out = Path(args.out or f"runs/{config.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    metrics = train(config, out, progress=not args.quiet)
    t = metrics["test"]
    print(
        f"trained {config.model.type} -> {out}  test auc {t['auc']:.4f} gauc {t['gauc']:.4f} "
        f"logloss {t['logloss']:.4f} calibration {t['calibration']:.3f}"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from training.export import export_bundle
    from training.train import load_run

    config, mapper, model, metrics = load_run(args.run)
    version, path, report = export_bundle(
        model, config, mapper, metrics, args.models_dir, args.name
    )
    print(
        f"exported {path} (version {version}); parity max |ORT - torch| = "
        f"{report.max_abs_diff:.2e} over {len(report.cases)} cases"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctr", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a YAML feature config")
    t.add_argument("--config", required=True)
    t.add_argument("--out", help="run folder (default runs/<name>-<time>)")
    t.add_argument("--set", action="append", default=[], help="override, e.g. train.epochs=2")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("export", help="export a training run to the model store")
    e.add_argument("--run", required=True, help="training run folder")
    e.add_argument("--models-dir", default="models")
    e.add_argument("--name", help="model name (default: the config's name)")
    e.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
