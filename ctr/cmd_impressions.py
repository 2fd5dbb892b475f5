"""``ctr impressions``: the impression log as labelled rows, and the served model's
online figures beside its offline ones."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.impression_read import ImpressionReader


def cmd_impressions(args: argparse.Namespace) -> int:
    import csv

    from service.impression_read import Impression, ImpressionReader, OnlineEval
    from service.settings import Settings
    from service.store import ping, redact, sync_client

    settings = Settings()
    url = args.redis_url or settings.redis_url
    cluster = args.cluster or settings.redis_cluster
    stream = args.stream or settings.impression_stream
    if not stream:
        raise ValueError("--stream: no stream named (nor CTR_IMPRESSION_STREAM set)")
    ping(url, cluster)
    client = sync_client(url, cluster, timeout_s=30)
    kind = client.type(stream)
    kind = kind.decode() if isinstance(kind, bytes) else kind
    if kind != "stream":  # a typo would otherwise read as "nothing was logged"
        client.close()
        what = "no such key" if kind == "none" else f"a {kind}, not a stream"
        raise ValueError(
            f"--stream {stream!r}: {what} in {redact(url)} (the service's "
            "CTR_IMPRESSION_STREAM; it is made at the first logged response)"
        )
    types = frozenset(t.strip() for t in args.types.split(",") if t.strip())
    models_dir = args.models_dir or settings.models_dir
    config, where = served_config(client, stream, models_dir)
    item_key = args.item_key or served_item_key(config, where, models_dir)
    # what the service keeps of a history (CTR_SEQUENCE_KEEP, 0: the model's L): a
    # history that long may have lost a click to trimming (None: not known, no check)
    # the model's L: the smallest over the model's versions in the store, for the service
    # trims a history to the L of the version loaded when each event came, which need
    # not be the first logged response's (erring low only censors more, never hides a
    # click)
    keep = (args.keep if args.keep is not None else settings.sequence_keep
            or smallest_history(models_dir, where, config)) or None  # fmt: skip
    seconds, micros = client.time()  # Redis's clock, once: a row scored after now - window
    now = seconds + micros / 1e6  # is pending, however long the read takes
    # a history expires CTR_SEQUENCE_TTL_S after its user's last event: a click older
    # than that may be gone with it (rows censored, not labelled 0)
    reader = ImpressionReader(client, stream, item_key, args.window_s, types, args.skew_s,
                              now=now, keep=keep, ttl_s=settings.sequence_ttl_s)  # fmt: skip
    online = OnlineEval()
    try:
        with contextlib.ExitStack() as stack:
            out = None
            if args.out:  # rows written as they are read: none held
                out = csv.writer(stack.enter_context(open(args.out, "w", newline="")))
                out.writerow(Impression.FIELDS)
            for row in reader:
                online.add(row)
                if out is not None:
                    out.writerow(row.row())
        trimmed = _stream_trimmed(client, stream)
    finally:
        client.close()
    figures = online.summary()
    for name, per_version in figures["by_version"].items():
        per_version["offline"] = offline_metrics(models_dir, name)
    figures["entries"] = reader.entries
    figures["duplicates"] = reader.duplicates
    figures["unreadable"] = reader.unreadable
    figures["now"] = now
    figures["pending"] = reader.pending
    figures["unreadable_histories"] = reader.unreadable_histories
    figures["unreadable_history_rows"] = reader.unreadable_history_rows
    figures["censored"] = reader.censored
    figures["censored_expired"] = reader.expired
    figures["sequence_ttl_s"] = settings.sequence_ttl_s
    figures["history_keep"] = keep
    figures["behaviours"] = reader.behaviours.to_dict()
    print(json.dumps(figures, indent=2))
    for line in reader.behaviours.warnings(item_key, types):
        print(f"warning: {line}", file=sys.stderr)
    for line in _impression_warnings(reader, now, trimmed):
        print(f"warning: {line}", file=sys.stderr)
    return 0


def _stream_trimmed(client: Any, stream: str) -> tuple[int, int] | None:
    """``(entries now, entries ever added)`` where the stream has lost some (trimmed
    by ``MAXLEN`` or deleted), from ``XINFO STREAM`` (``entries-added``: Redis 7); else
    None."""
    from redis.exceptions import ResponseError

    try:
        info = client.xinfo_stream(stream)
    except ResponseError:
        return None
    added = info.get("entries-added")
    length = info.get("length")
    if isinstance(added, int) and isinstance(length, int) and added > length:
        return length, added
    return None


def _impression_warnings(
    reader: ImpressionReader, now: float, trimmed: tuple[int, int] | None
) -> list[str]:
    """``ctr impressions``' lines for stderr beyond the behaviours': histories that
    could not be read, and a stream whose oldest entry's click window is still open
    (every row pending: no figures), and rows censored as their history may have expired."""
    out = []
    if reader.expired:
        out.append(f"{reader.expired} rows that would be labelled 0 are censored: their "
                   f"user's history may have expired since (CTR_SEQUENCE_TTL_S="
                   f"{reader.ttl_s:g}) and taken a click with it; read the log within the "
                   "TTL of the scoring")  # fmt: skip
    if reader.unreadable_histories:
        named = "; ".join(f"{user!r}: {error}" for user, error in reader.history_errors)
        out.append(f"{reader.unreadable_histories} user histories could not be read "
                   f"({named}): their {reader.unreadable_history_rows} rows have no label "
                   "and are left out of the figures")  # fmt: skip
    if reader.oldest_ts is not None and reader.oldest_ts + reader.window_s > now:
        age = max(now - reader.oldest_ts, 0.0)
        why = (f"it has lost {trimmed[1] - trimmed[0]} of the {trimmed[1]} entries added "
               "(trimmed to CTR_IMPRESSION_MAXLEN, or deleted): raise CTR_IMPRESSION_MAXLEN "
               "or read it with a shorter --window-s"
               if trimmed else "read it once the window has passed, or with a shorter "
               "--window-s")  # fmt: skip
        out.append(f"the stream's oldest entry was scored {age:.0f} s ago, within "
                   f"--window-s {reader.window_s:g}: every row is pending (a click may still "
                   f"come) and left out of the figures; {why}")  # fmt: skip
    return out


def served_config(client: Any, stream: str, models_dir: str) -> tuple[Any, str]:
    """The feature config (``ctr.spec.FeatureConfig``) of the model that served
    ``stream``'s first logged response, read from that bundle's manifest in
    ``models_dir``, or None where the entry or the manifest is not there or not
    readable; and that model's ``"<name>/<version>"`` (``none logged``)."""
    from ctr.bundle import MANIFEST, BundleError, read_checked_manifest, version_of
    from ctr.spec import FeatureConfig
    from service.impression_read import pages, parse_entry

    served = None
    for entry_id, fields in next(pages(client, stream, page=1), []):
        rows = parse_entry(entry_id, fields)
        if rows:
            served = (rows[0].model, rows[0].version)
    where = f"{served[0]}/{served[1]}" if served else "none logged"
    if served is not None and version_of(served[1]) is not None:
        path = Path(models_dir) / served[0] / served[1] / MANIFEST
        try:
            return FeatureConfig.model_validate(read_checked_manifest(path)["config"]), where
        except (BundleError, KeyError, ValueError):
            pass
    return None, where


def smallest_history(models_dir: str, where: str, config: Any) -> int:
    """The smallest history length (``max_seq_len``) among the versions in
    ``models_dir`` of the model ``where`` names (``"<name>/<version>"``), the served
    one's (``config``) included; 0 where none is known."""
    from ctr.bundle import MANIFEST, BundleError, list_versions, read_checked_manifest

    lengths = [config.max_seq_len] if config is not None else []
    name = where.rpartition("/")[0]
    try:
        versions = list_versions(models_dir, name) if name else []
    except BundleError:
        versions = []
    for v in versions:
        try:
            manifest = read_checked_manifest(Path(models_dir) / name / str(v) / MANIFEST)
            length = manifest["config"]["max_seq_len"]
        except (BundleError, KeyError, TypeError, ValueError):
            continue
        if isinstance(length, int) and not isinstance(length, bool) and length > 0:
            lengths.append(length)  # a broken version's (0, 1e400, text) is no length
    return min(lengths, default=0)


def served_item_key(config: Any, where: str, models_dir: str) -> str:
    """The field stored behaviours carry a candidate's ID under: the served model's
    (``config``, from :func:`served_config`) item key feature's source; ``item_id``
    (said on stderr) where its manifest was not found."""
    if config is not None:
        source: str = config.item_id_feature.source
        return source
    print(f"note: --item-key item_id (the served model's manifest was not found under "
          f"{models_dir} ({where}); name it with --item-key or --models-dir)",
          file=sys.stderr)  # fmt: skip
    return "item_id"


def offline_metrics(models_dir: str, served: str) -> dict[str, Any] | None:
    """The test-split figures the manifest of ``served`` (``"<name>/<version>"``, as the
    impression log names it) recorded at export, to set beside its online ones; None
    where that bundle is not in ``models_dir`` or recorded none."""
    from ctr.bundle import MANIFEST, version_of

    name, _, version = served.rpartition("/")
    if not name or version_of(version) is None:
        return None
    path = Path(models_dir) / name / version / MANIFEST
    try:
        test = json.loads(path.read_text()).get("metrics", {}).get("test")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(test, dict):
        return None
    keep = ("auc", "gauc", "logloss", "mean_pred", "observed_ctr", "calibration")
    return {k: test[k] for k in keep if k in test}
