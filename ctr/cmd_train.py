"""``ctr train``, ``ctr export`` and ``ctr load``, and the checks ``load --bundle`` makes
of the data against the bundle's manifest."""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Any

from ctr.cli_args import _overrides


def cmd_train(args: argparse.Namespace) -> int:
    from ctr.spec import load_config
    from training.train import leave_distributed, train

    config = load_config(args.config, _overrides(args.set))
    out = Path(args.out or f"runs/{config.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        metrics = train(config, out, progress=not args.quiet)
    except KeyboardInterrupt as exc:
        exc.ctr_left = _train_left(out)  # type: ignore[attr-defined]
        raise
    leave_distributed()  # under torchrun: every rank done before any leaves
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 reports (its run folder)
        return 0
    t = metrics["test"]
    print(
        f"trained {config.model.type} -> {out}  test auc {t['auc']:.4f} gauc {t['gauc']:.4f} "
        f"logloss {t['logloss']:.4f} calibration {t['calibration']:.3f}"
    )
    return 0


def _train_left(out: Path) -> str:
    """What an interrupted ``ctr train`` left in its run folder ``out``: a previous
    run's files go only once the data is ready and training begins."""
    from training.train import RUN_FILES

    if all((out / name).is_file() for name in RUN_FILES):
        return f"{out} still holds the finished run it held before (this one was not saved)"
    return f"{out} holds no finished run: train it again"


def cmd_export(args: argparse.Namespace) -> int:
    from training.export import export_bundle
    from training.train import load_run

    if args.name is not None and not args.name.strip():
        raise ValueError("--name: empty (leave it out for the config's name)")
    config, mapper, model, metrics = load_run(args.run)
    version, path, report = export_bundle(
        model, config, mapper, metrics, args.models_dir, args.name
    )
    print(
        f"exported {path} (version {version}); parity max |ORT - torch| = "
        f"{report.max_abs_diff:.2e} over {len(report.cases)} cases"
    )
    return 0


def bundle_config(path: Path, overrides: dict[str, Any]) -> Any:
    """The feature config a bundle was trained with (its manifest's), ``overrides``
    applied: ``path`` is a version folder (``models/din/3``) or a model's folder
    (``models/din``: its newest version, the one ``CTR_MODEL_VERSION=latest`` serves)."""
    from ctr.bundle import MANIFEST, BundleError, list_versions, load_bundle, version_of
    from ctr.spec import FeatureConfig, apply_overrides

    # a version folder holds a manifest (a model may be named with digits too)
    if version_of(path.name) is not None and (path / MANIFEST).is_file():
        bundle = load_bundle(path.parent.parent, path.parent.name, path.name)
    elif version_of(path.name) is not None and not path.exists() and path.parent.is_dir():
        have = list_versions(path.parent.parent, path.parent.name)
        if have:  # models/din/9 where models/din holds versions: a version, not a model
            raise BundleError(f"{path.parent} has no version {path.name} (have {have})")
        bundle = load_bundle(path.parent, path.name, "latest")
    else:
        bundle = load_bundle(path.parent, path.name, "latest")
    raw = apply_overrides(copy.deepcopy(bundle.manifest["config"]), overrides)
    return FeatureConfig.model_validate(raw), bundle.manifest


# what a training split's fingerprint depends on: the rows the adapter makes of the data
DATA_PARTS = ("data", "features", "max_seq_len", "item_key")


def data_changed(plain: Any, config: Any) -> bool:
    """``config`` (a bundle's, with ``--set`` overrides) reads other data than ``plain``
    (the bundle's own): an override of another key leaves the data as it was."""
    a, b = plain.model_dump(mode="json"), config.model_dump(mode="json")
    return any(a.get(k) != b.get(k) for k in DATA_PARTS)


def check_trained_on(config: Any, frame: Any, manifest: dict[str, Any], bundle: str) -> None:
    """``ctr load --bundle``: the data read now (``CTR_DATA_ROOT``, the config's files) is
    the data the bundle was trained on: its training split's fingerprint is the
    manifest's. Another data set in its place (another category's files, a shorter
    file) loaded silently, and the model served histories it was never trained on.
    Nothing is checked for a bundle without a fingerprint, or with a random split whose
    seed it did not record (exports before session 37: the manifest's config leaves
    ``data.split_seed`` out)."""
    from training.data import split_frame
    from training.data.generic import DataError, data_root, fingerprint, reads_data_root

    expected = manifest.get("data_fingerprint")
    seed = manifest.get("data_split_seed")
    if not isinstance(expected, str):
        return
    if not isinstance(seed, int) or isinstance(seed, bool):
        if config.data.split == "random":
            return
        seed = config.data.split_seed
    train, _, _ = split_frame(frame, config.data, seed=seed, trained=True)
    got = fingerprint(train)
    if got != expected:
        where = (f"data.path {config.data.path}" if config.data.path
                 else f"CTR_DATA_ROOT={data_root()}" if reads_data_root(config.data)
                 else f"the {config.data.source} source's options")  # fmt: skip
        raise DataError(
            f"the data read from {where} is not the data {bundle} was trained on (its "
            f"training split's fingerprint {got[:12]}, the manifest's {expected[:12]}): "
            "point at that data, retrain, or --force to load it anyway"
        )


def cmd_load(args: argparse.Namespace) -> int:
    from ctr.spec import FeatureConfig, load_config
    from service.loader import load_identity, load_into_redis, loaded_identity
    from service.settings import Settings
    from service.store import ping, redact
    from training.data import load_catalog, load_frame, split_frame

    trained_on = None  # the bundle's manifest, whose data_fingerprint is checked
    as_trained = False  # the config's data is a bundle's own, not changed by a --set
    if args.bundle:  # the data the served model was trained on, by its own config
        config, trained_on = bundle_config(Path(args.bundle), _overrides(args.set))
        plain = FeatureConfig.model_validate(trained_on["config"])  # without the --set
        as_trained = not data_changed(plain, config)
        if args.force or not as_trained:
            trained_on = None  # other data on purpose
    else:
        config = load_config(args.config, _overrides(args.set))
    settings = Settings()
    url = args.redis_url or settings.redis_url
    cluster = args.cluster or settings.redis_cluster
    ping(url, cluster)  # before the data is read: that can take minutes
    replay = args.replay_split
    if replay and config.data.split == "random":
        raise ValueError(
            "--replay-split needs a time split (data.split last_per_user or time): a "
            "random split's examples have no time order to replay them in"
        )
    if replay and args.once:
        # the record cannot see the events a replay posted since: a second replay over
        # them had its events answered "duplicate" and scored on the first one's
        raise ValueError("--once with --replay-split: a replay starts from a fresh load")
    if args.once and loaded_identity(url, cluster) == load_identity(config):  # no replay
        print(f"{redact(url)} holds this data already (ctr:loaded): not loading")
        return 0
    frame = load_frame(config)
    if trained_on:
        check_trained_on(config, frame, trained_on, args.bundle)
    users = None
    if replay:
        # a bundle's split as it was trained (one trained before a split was refused);
        # a --set of the data (data.split=time) is checked as a --config's is
        _, val, test = split_frame(frame, config.data, seed=config.data.split_seed,
                                   trained=as_trained)  # fmt: skip
        users = test if replay == "test" else val
    counts = load_into_redis(config, frame, url, progress=not args.quiet, cluster=cluster,
                             catalog=load_catalog(config),
                             sequence_ttl_s=settings.sequence_ttl_s,
                             max_id_length=settings.max_id_length, user_frame=users,
                             replay=replay)  # fmt: skip
    print(f"loaded {counts['users']} users and {counts['items']} items into {redact(url)}")
    for what in ("users", "items"):
        n, first = counts[f"unreachable_{what}"]
        if n:
            print(f"warning: {n} {what} have IDs no request can name (empty, longer than "
                  f"CTR_MAX_ID_LENGTH={settings.max_id_length}, or control characters; "
                  f"first: {first[:80]!r}): the API refuses them", file=sys.stderr)  # fmt: skip
    before = counts.get("replaced")
    if before:
        print(f"warning: {redact(url)} held another data set (config {before.get('name')!r}, "
              f"source {before.get('source')!r}, path {before.get('path')!r}; "
              f"{counts.get('replaced_differs')}): its item "
              "features were replaced (those this data lacks deleted), and users both "
              "hold too; "
              "serve two data sets from two Redis databases (CTR_REDIS_URL .../<db>)",
              file=sys.stderr)  # fmt: skip
    return 0
