"""The model store: ``models/<name>/<version>/{model.onnx, manifest.json}``.

The manifest is the only contract between training and serving: the feature spec,
the ID mapping, the sequence length, graph input/output names and shapes, the
opset, training metrics, a fingerprint of the training data and the creation time.
Torch-free.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from ctr.mapping import RESERVED, FeatureMapper
from ctr.spec import FeatureConfig, MappingSpec

log = logging.getLogger("ctr.bundle")

MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
FUSED_FILE = "model_fused.onnx"  # optional: the same model with ctr_ops fused nodes
# optional: for CUDA, only the ops with a CUDA kernel fused, where model_fused.onnx has others
FUSED_CUDA_FILE = "model_fused_cuda.onnx"
FORMAT_VERSION = 1


class BundleError(RuntimeError):
    """A bundle is missing, incomplete or corrupt. The message says which and where."""


@dataclass(frozen=True)
class GraphInput:
    name: str
    dtype: str  # "int64" | "float32"
    shape: tuple[str | int, ...]


def graph_inputs(config: FeatureConfig) -> list[GraphInput]:
    """The graph's inputs for a config, in order. Empty groups are left out.

    ``U`` (users in the call) and ``N`` (candidates) are dynamic; the rest are fixed.
    """
    s, length = len(config.sequences), config.max_seq_len
    out = []
    if config.user_sparse:
        out.append(GraphInput("user_sparse", "int64", ("U", len(config.user_sparse))))
    if config.user_dense:
        out.append(GraphInput("user_dense", "float32", ("U", len(config.user_dense))))
    if s:
        out.append(GraphInput("hist", "int64", ("U", s, length)))
    out.append(GraphInput("hist_len", "int64", ("U",)))
    out.append(GraphInput("item_sparse", "int64", ("N", len(config.item_sparse))))
    if config.item_dense:
        out.append(GraphInput("item_dense", "float32", ("N", len(config.item_dense))))
    out.append(GraphInput("user_idx", "int64", ("N",)))
    return out


def graph_outputs(config: FeatureConfig) -> list[GraphInput]:
    out = [GraphInput("logits", "float32", ("N",)), GraphInput("probs", "float32", ("N",))]
    if config.model.type in ("din", "multi_tower_din", "dien") and config.sequences:
        out.append(GraphInput("attention", "float32", ("N", config.max_seq_len)))
    return out


def random_inputs(
    config: FeatureConfig,
    sizes: dict[str, int],
    n_users: int,
    n_cand: int,
    hist_len: int | np.ndarray | None,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Valid random graph inputs (IDs within each table, dense values ~ N(0, 1), a random
    ``user_idx`` per candidate). ``hist_len``: one length for every user, one per user
    (``[U]``), or None to draw a length per user. Torch-free: export's parity gate and
    the service's fp16 check both use it."""
    length = config.max_seq_len

    def ids(feats: list, n: int) -> np.ndarray:
        cols = [rng.integers(0, sizes[config.table_of(f.name)], size=n) for f in feats]
        return np.stack(cols, axis=1).astype(np.int64) if cols else np.zeros((n, 0), np.int64)

    if hist_len is None:
        lens = rng.integers(0, length + 1, size=n_users).astype(np.int64)
    else:
        lens = np.broadcast_to(np.asarray(hist_len, np.int64), (n_users,)).copy()
    hist = np.zeros((n_users, len(config.sequences), length), dtype=np.int64)
    for s, f in enumerate(config.sequences):
        table = sizes[config.table_of(f.name)]
        for u in range(n_users):
            # OOV (1) included: unseen IDs reach the served graph too
            hist[u, s, : lens[u]] = rng.integers(1, table, size=lens[u]) if table > 1 else 1
    feed = {
        "user_sparse": ids(config.user_sparse, n_users),
        "user_dense": rng.normal(size=(n_users, len(config.user_dense))).astype(np.float32),
        "hist": hist,
        "hist_len": lens,
        "item_sparse": ids(config.item_sparse, n_cand),
        "item_dense": rng.normal(size=(n_cand, len(config.item_dense))).astype(np.float32),
        "user_idx": rng.integers(0, n_users, size=n_cand).astype(np.int64),
    }
    return {i.name: feed[i.name] for i in graph_inputs(config)}


# the graph's metadata keys (ModelProto.metadata_props) for contract_digest: exports
# write CONTRACT_KEY_V2; graphs exported before it carry CONTRACT_KEY, still checked
CONTRACT_KEY = "ctr_contract_sha256"
CONTRACT_KEY_V2 = "ctr_contract_v2_sha256"
# the dense ranges a graph clamps its inputs to (the manifest's dense_range), as
# dense_range_text writes them; graphs exported before session 34 carry none
DENSE_RANGE_KEY = "ctr_dense_range"


def finite(value: Any) -> Any:
    """``value`` (JSON-like) with every non-finite float as None: a metric a split could
    not give (an empty or one-class split's AUC) is ``null`` in the JSON written, not
    the bare ``NaN`` that ``json.dumps`` writes and strict readers (JavaScript's
    ``JSON.parse``) refuse."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def dense_range_text(ranges: dict[str, list[float]]) -> str:
    """``{feature: [lo, hi]}`` as one canonical text (keys sorted, no spaces; floats as
    Python's ``repr``, which reads back exactly)."""
    return json.dumps(ranges, sort_keys=True, separators=(",", ":"))


def contract_digest(config: Any, mapping: Any, key: str = CONTRACT_KEY_V2) -> str:
    """sha256 of what a graph was exported for: the manifest's ``config`` and ``mapping``
    entries (the feature spec and the ID mapping) as canonical JSON, as the manifest
    stores them, so that no later code's reading of them changes it. The export writes
    it into the graph's metadata (so ``onnx_sha256`` covers it) and the service compares
    the manifest's with it: a manifest edited after the export (hash buckets, table
    sizes, a vocabulary) cannot feed the graph rows it was not trained with.

    ``key`` names the canonical form: :data:`CONTRACT_KEY_V2` is orjson's compact,
    key-sorted form (about 4x faster than ``json``'s: 0.12 s against 0.47 s for a
    million-entry vocabulary, ``scripts/bench_manifest.py``), :data:`CONTRACT_KEY` the
    ``json`` module's, which earlier exports wrote."""
    doc = {"config": config, "mapping": mapping}
    if key == CONTRACT_KEY:
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(text.encode()).hexdigest()
    if key != CONTRACT_KEY_V2:
        raise ValueError(f"unknown contract key {key!r}")
    return hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).hexdigest()


def contract_of(config: Any, mapping: Any) -> tuple[str, str]:
    """The metadata key and digest an export stamps: :data:`CONTRACT_KEY_V2`'s form, or
    :data:`CONTRACT_KEY`'s where orjson refuses the text (a lone surrogate in an ID:
    orjson writes UTF-8 only)."""
    try:
        return CONTRACT_KEY_V2, contract_digest(config, mapping, CONTRACT_KEY_V2)
    except TypeError:
        return CONTRACT_KEY, contract_digest(config, mapping, CONTRACT_KEY)


def read_manifest(path: Path) -> Any:
    """The parsed JSON at ``path`` (a manifest). Raises OSError (unreadable), ValueError
    (not UTF-8, not JSON, or an integer outside the 64-bit range, which ``/v1/models``
    could not write back) or RecursionError (nested too deep).

    orjson parses first (twice as fast as ``json``). It reads an integer outside
    [-2**63, 2**64) as a float, losing its digits, so a parse that holds a float of
    that size (:func:`_big_float`; a real one is rare in a manifest) is done again by
    ``json``, exactly, and checked for long integers (:func:`_long_int`); so is a text
    orjson refuses (``NaN``, which ``json.dumps`` writes for a NaN metric; lone surrogate
    escapes; a real fault)."""
    data = path.read_bytes()
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    else:
        if not _big_float(value):
            return value
    value = json.loads(data.decode("utf-8"))  # UnicodeDecodeError is a ValueError
    where = _long_int(value, "")
    if where is not None:
        raise ValueError(f"{where} is an integer outside the 64-bit range")
    return value


def _big_float(value: Any) -> bool:
    """Whether a parsed JSON ``value`` holds a float of magnitude 2**63 or more (what
    orjson makes of an integer outside the 64-bit range). A container's values are
    sorted by type in C first: a vocabulary (integers only) costs no Python loop."""
    if isinstance(value, float):
        return abs(value) >= 2.0**63
    values = value.values() if isinstance(value, dict) else value if isinstance(
        value, list) else ()  # fmt: skip
    kinds = set(map(type, values))
    if float in kinds and any(type(v) is float and abs(v) >= 2.0**63 for v in values):
        return True
    if dict in kinds or list in kinds:
        return any(_big_float(v) for v in values if isinstance(v, dict | list))
    return False


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def version_of(folder: str) -> int | None:
    """The version a folder's name is: a decimal number as ``str(int)`` writes it
    (ASCII digits, no leading zero), so that the version names its folder back; None
    for any other name (``02``, ``²``, ``٣``, ``.staging-…``)."""
    # past 4,300 digits int() refuses a string (Python's limit): no version then
    if folder.isascii() and folder.isdigit() and len(folder) <= 4300 and str(int(folder)) == folder:
        return int(folder)
    return None


def list_versions(models_dir: str | Path, name: str) -> list[int]:
    """Complete versions (a manifest present), ascending. A version folder that cannot
    be looked into (its permissions) is listed: loading it fails and says why, as for
    any broken bundle, instead of every load failing. :class:`BundleError` where the
    model's own folder cannot be read."""
    root = Path(models_dir) / name
    try:
        if not root.is_dir():
            return []
        found = [(version_of(p.name), p) for p in root.iterdir()]
    except OSError as exc:
        raise BundleError(f"cannot read the model store's folder {root}: {exc}") from None
    return sorted(v for v, p in found if v is not None and _has_manifest(p))


def _has_manifest(version_dir: Path) -> bool:
    try:
        return (version_dir / MANIFEST).is_file()
    except OSError:  # e.g. EACCES: a version whose load will say what is wrong
        return True


def resolve_version(models_dir: str | Path, name: str, version: str | int = "latest") -> int:
    versions = list_versions(models_dir, name)
    if str(version) == "latest":
        if not versions:
            raise BundleError(f"no versions of model {name!r} under {Path(models_dir).resolve()}")
        return versions[-1]
    try:
        v = int(version)
    except (TypeError, ValueError):
        raise BundleError(
            f"model {name!r}: version must be a number or 'latest', got {version!r}"
        ) from None
    if v not in versions:
        raise BundleError(f"model {name!r} has no version {v} (have {versions})")
    return v


# the highest version a model's folder has held, kept beside its versions
LAST_VERSION_FILE = ".last_version"


def _last_version(root: Path) -> int:
    """The highest version published under ``root`` (0: none recorded, or unreadable:
    a folder, bytes that are not text, text that is not a version; a file this process
    may not read is logged, as numbers of deleted versions may be given again)."""
    path = root / LAST_VERSION_FILE
    try:
        return version_of(path.read_text().strip()) or 0
    except PermissionError as exc:
        log.warning("cannot read %s (%s): a deleted version's number may be given again",
                    path, exc)  # fmt: skip
        return 0
    except (OSError, ValueError):
        return 0


def _note_version(root: Path, version: int) -> None:
    """Raise ``root``'s high-water mark to ``version`` (atomic rename of a file of its
    own, under :func:`publish`'s lock; never lowers it). Best effort: the version is
    published already, and a mark that cannot be written is logged, not raised."""
    if _last_version(root) >= version:
        return
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{LAST_VERSION_FILE}.", dir=root)
        os.fchmod(fd, 0o644)  # as the bundles: every exporter reads it (mkstemp: 0600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{version}\n")
        os.replace(tmp, root / LAST_VERSION_FILE)
        tmp = None
    except OSError as exc:
        log.warning("version %d published; its number not recorded in %s: %s",
                    version, root / LAST_VERSION_FILE, exc)  # fmt: skip
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def publish(models_dir: str | Path, name: str, staged: Path) -> tuple[int, Path]:
    """Move a staged bundle folder in as the next version. Never overwrites: the rename
    fails if another exporter took the number first, and then the next one is tried.
    A number is never given twice, even after its folder was deleted (``.last_version``
    keeps the highest): workers that served the old bundle under that number would
    take the new one for what they serve."""
    root = Path(models_dir) / name
    root.mkdir(parents=True, exist_ok=True)
    # the staged folder stays locked until it is renamed: an exporter killed while it
    # waits for the publish lock or writes the manifest leaves a folder the next sweeps
    # (its lock file had gone first: such a folder stayed in the store for good)
    with _publish_lock(root):  # the number, the rename and the mark, one exporter at a time
        for _ in range(100):
            versions = {v: p for p in root.iterdir() if (v := version_of(p.name)) is not None}
            _drop_leftover_locks(versions.values())
            version = max(max(versions, default=0), _last_version(root)) + 1
            manifest_path = staged / MANIFEST
            manifest = json.loads(manifest_path.read_text())
            manifest["version"] = version
            manifest_path.write_text(json.dumps(manifest, indent=2))
            target = root / str(version)
            try:
                os.rename(staged, target)  # atomic; fails if target exists and is non-empty
            except OSError:
                if target.exists():
                    continue
                raise
            _release_staging(staged, target)  # the lock file, now in the version, goes
            _note_version(root, version)
            return version, target
    raise BundleError("could not allocate a model version")


def _drop_leftover_locks(folders: Iterable[Path]) -> None:
    """Under the publish lock, no exporter is between its rename and its unlink: a
    version folder holding the staging lock file is one whose exporter was killed
    there, and the file goes (nothing reads it; it stayed in the version for good)."""
    for folder in folders:
        with contextlib.suppress(OSError):
            (folder / STAGING_LOCK).unlink()


PUBLISH_LOCK_FILE = ".publish.lock"


@contextlib.contextmanager
def _publish_lock(root: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``root/.publish.lock`` while a version is published:
    without it, two exporters could each check the high-water mark and the slower one
    write its lower number over the other's (a deleted version's number was then given
    again). Where the lock file cannot be made (a store this user may not write
    beside), publishing goes on unlocked, as the rename still never overwrites."""
    path = root / PUBLISH_LOCK_FILE
    fd = None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except PermissionError:  # another user's lock file: flock needs only a descriptor
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
    except OSError:
        pass
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:  # e.g. ENOLCK: an NFS store without its lock service
            log.warning("publishing without the lock %s: %s", path, exc)
            os.close(fd)
            fd = None
    else:
        log.warning("publishing without the lock %s: it cannot be opened", path)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


STAGING_PREFIX = ".staging-"
STAGING_LOCK = ".lock"
# this process's staging folders -> the descriptor holding their lock
_STAGING_LOCKS: dict[Path, int] = {}


def staging_dir(models_dir: str | Path) -> Path:
    """A new folder to write a bundle into before :func:`publish` renames it into place
    (``.staging-<random>`` in the store). This process holds an exclusive ``flock`` on
    its ``.lock`` file until it publishes or removes the folder, so that the next export
    removes a folder whose exporter died before cleaning up (killed, its container
    stopped, the machine restarted: :func:`sweep_staging`); the kernel drops the lock of
    a process that ends, however it ends, and a lock is the same to every machine,
    container and process namespace that shares the store."""
    root = Path(models_dir)
    root.mkdir(parents=True, exist_ok=True)
    sweep_staging(root)
    path = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root))
    path.chmod(0o755)
    try:
        fd = os.open(path / STAGING_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return path  # not sweepable: left alone by every sweep, as an older name is
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # no locks on this file system: the folder is left alone too
        os.close(fd)
        with contextlib.suppress(OSError):
            (path / STAGING_LOCK).unlink()
        return path
    _STAGING_LOCKS[path] = fd
    return path


def _release_staging(path: Path, now: Path | None = None) -> None:
    """Drop staging folder ``path``'s lock file (from ``now``, where the folder has been
    renamed to, a version) and then its lock."""
    fd = _STAGING_LOCKS.pop(path, None)
    with contextlib.suppress(OSError):
        ((now or path) / STAGING_LOCK).unlink()
    if fd is not None:
        os.close(fd)


def sweep_staging(root: Path) -> list[Path]:
    """Remove the staging folders in ``root`` whose exporter has ended: those whose
    ``.lock`` this process can lock (a live exporter holds it, until its folder has
    been renamed into a version); returns them. A folder without a lock file (an older
    name, one whose exporter died while making it) is left alone, as is one whose lock
    cannot be tried."""
    removed = []
    try:
        entries = [p for p in root.iterdir() if p.name.startswith(STAGING_PREFIX)]
    except OSError:
        return removed
    for path in entries:
        if path in _STAGING_LOCKS:
            continue
        try:
            fd = os.open(path / STAGING_LOCK, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # still the folder's lock file: a publish renames the folder into place,
            # then unlinks the file and releases its lock; a lock taken on the file
            # opened before the rename is no sign of a dead exporter (the stat fails)
            if os.fstat(fd).st_ino != os.stat(path / STAGING_LOCK).st_ino:
                raise BlockingIOError
        except OSError:  # held: an export runs, or is publishing (or no locks here)
            os.close(fd)
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    if removed:
        log.info("removed %d staging folders of exports that ended without cleaning up: %s",
                 len(removed), ", ".join(p.name for p in removed))  # fmt: skip
    return removed


@dataclass(frozen=True)
class DenseBounds:
    """One side's dense columns' bounds: ``lo [D]``, ``hi [D]`` (float32, as the graph
    holds them; ±inf for a column without one) and the features' ``names``."""

    lo: np.ndarray
    hi: np.ndarray
    names: tuple[str, ...]

    def outside(self, values: np.ndarray) -> dict[str, int]:
        """How many of ``values [B, D]`` lie outside the bounds, per feature (only those
        with any)."""
        out = (values < self.lo) | (values > self.hi)
        if not out.any():
            return {}
        counts = out.sum(axis=0)
        return {self.names[j]: int(counts[j]) for j in np.flatnonzero(counts).tolist()}


@dataclass
class Bundle:
    """A loaded bundle: manifest, typed config and mapper, and the ONNX path."""

    name: str
    version: int
    path: Path
    manifest: dict[str, Any]
    config: FeatureConfig
    mapper: FeatureMapper
    # contract_digest(config, mapping, CONTRACT_KEY_V2), where the load computed it (a
    # manifest read in a child process): not again here, holding the GIL
    contract_v2: str | None = None

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @functools.cached_property
    def input_names(self) -> list[str]:
        """The graph's input names in order (computed once: the scoring path reads them
        per request; callers must not change the list)."""
        return [i.name for i in graph_inputs(self.config)]

    @property
    def fused(self) -> dict[str, Any] | None:
        """The manifest's entry for the fused graph (``model_fused.onnx``), if exported."""
        entry = self.manifest.get("fused")
        return entry if isinstance(entry, dict) else None

    @property
    def fused_cuda(self) -> dict[str, Any] | None:
        """The entry for the CUDA variant (``model_fused_cuda.onnx``): exported only when
        ``model_fused.onnx`` has ops without a CUDA kernel and others with one."""
        entry = self.manifest.get("fused_cuda")
        return entry if isinstance(entry, dict) else None

    @functools.cached_property
    def dense_bounds(self) -> dict[str, DenseBounds]:
        """The manifest's ``dense_range`` per side (``"user"``, ``"item"``), for the sides
        with a bound: what the graph clamps those dense inputs to. Empty for a bundle
        exported before the bounds existed, or with ``train.clip_dense: false``."""
        ranges = self.manifest.get("dense_range") or {}
        out: dict[str, DenseBounds] = {}
        c = self.config
        for side, feats in (("user", c.user_dense), ("item", c.item_dense)):
            if not any(f.name in ranges for f in feats):
                continue
            pairs = [ranges.get(f.name, [-math.inf, math.inf]) for f in feats]
            out[side] = DenseBounds(
                np.array([p[0] for p in pairs], np.float32),
                np.array([p[1] for p in pairs], np.float32),
                tuple(f.name for f in feats),
            )
        return out

    def fused_bytes(self, cuda: bool = False) -> bytes:
        """The fused graph (``cuda``: the CUDA variant), checked against the manifest's
        sha256. Raises :class:`BundleError` if the bundle has none, or it is missing or
        altered."""
        entry = self.fused_cuda if cuda else self.fused
        if entry is None:
            what = "CUDA variant of the fused graph" if cuda else "fused graph"
            raise BundleError(f"{self.path}: the bundle has no {what}")
        name = str(entry.get("file", FUSED_CUDA_FILE if cuda else FUSED_FILE))
        if Path(name).name != name or name in ("", ".", ".."):
            # a plain file name in the bundle's folder, never a path out of it
            raise BundleError(f"{self.path}: the fused graph's file {name[:200]!r} is not a "
                              "file name in the bundle's folder")  # fmt: skip
        path = self.path / name
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BundleError(f"fused graph unreadable: {exc}") from exc
        if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            raise BundleError(f"fused graph {path} is corrupt: sha256 does not match the manifest")
        return data


def _long_int(value: Any, where: str) -> str | None:
    """Where in a parsed JSON ``value`` an integer lies outside the 64-bit range (JSON
    writers, orjson among them, refuse it), or None. A container of integers only (a
    vocabulary) is checked by its bounds, in C; others one entry at a time."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (where or "the manifest") if not -(2**63) <= value < 2**64 else None
    if isinstance(value, dict):
        values: Any = value.values()
        items: Any = value.items()
    elif isinstance(value, list):
        values, items = value, enumerate(value)
    else:
        return None
    if values and set(map(type, values)) == {int} and -(2**63) <= min(values) and max(
            values) < 2**64:  # fmt: skip
        return None
    for k, v in items:
        found = _long_int(v, f"{where}.{k}" if isinstance(k, str) else f"{where}[{k}]")
        if found is not None:
            return found
    return None


def load_bundle(
    models_dir: str | Path,
    name: str,
    version: str | int = "latest",
    child_min_bytes: int = 0,
) -> Bundle:
    """Resolve and validate a bundle. Raises :class:`BundleError` with a clear message if
    the folder, the manifest or the model file is missing, unreadable or altered.

    ``child_min_bytes`` > 0: a manifest of at least that size is read, checked and
    digested in a child process (:mod:`ctr.manifest_proc`), so that this process's
    other threads run meanwhile; the answer is the same."""
    v = resolve_version(models_dir, name, version)
    path = Path(models_dir) / name / str(v)
    checked = None
    if child_min_bytes > 0 and _size(path / MANIFEST) >= child_min_bytes:
        from ctr import manifest_proc

        checked = manifest_proc.read(path / MANIFEST)
    if checked is None:
        manifest = read_checked_manifest(path / MANIFEST)
        check_model_file(path, manifest)
        config = check_manifest(manifest, path / MANIFEST)
        own, digest = False, None
    else:
        if checked.error is not None and checked.error_first:
            raise BundleError(checked.error)
        manifest = checked.manifest
        check_model_file(path, manifest)  # before the checks' error, as above
        if checked.error is not None:
            raise BundleError(checked.error)
        config = FeatureConfig.model_validate(manifest["config"])  # the child checked it
        own, digest = True, checked.contract_v2
    try:
        mapper = FeatureMapper.from_json(config, manifest["mapping"], own=own)
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise BundleError(f"{path / MANIFEST}: invalid feature spec or mapping: {exc!r}") from exc
    return Bundle(name, v, path, manifest, config, mapper, digest)


def _size(path: Path) -> int:
    """A file's size; -1 when it cannot be read (read_manifest then says why)."""
    try:
        return path.stat().st_size
    except OSError:
        return -1


def read_checked_manifest(path: Path) -> dict[str, Any]:
    """The manifest at ``path``, parsed, an object of this format. Raises
    :class:`BundleError` otherwise (load_bundle's first checks)."""
    try:
        manifest = read_manifest(path)
    except (OSError, ValueError, RecursionError) as exc:
        # ValueError: bad JSON, bytes that are not UTF-8, an integer past 64 bits;
        # RecursionError: nested too deep
        raise BundleError(f"unreadable manifest {path}: {exc!r}") from exc
    if not isinstance(manifest, dict):
        kind = type(manifest).__name__
        raise BundleError(f"unreadable manifest {path}: a JSON {kind}, not an object")
    if manifest.get("format") != FORMAT_VERSION:
        raise BundleError(f"{path}: unsupported format {manifest.get('format')!r}")
    return manifest


def check_model_file(path: Path, manifest: dict[str, Any]) -> None:
    """The bundle's model file at ``path`` is there and is the manifest's (its sha256)."""
    model = path / MODEL_FILE
    if not model.is_file():
        raise BundleError(f"model file missing: {model}")
    try:
        digest = sha256_file(model)
    except OSError as exc:  # unreadable (permissions, I/O error, removed meanwhile)
        raise BundleError(f"model file {model} is unreadable: {exc}") from exc
    if digest != manifest.get("onnx_sha256"):
        raise BundleError(
            f"model file {model} is corrupt: sha256 {digest[:12]}… does not match the manifest"
        )


def check_manifest(manifest: dict[str, Any], path: Path) -> FeatureConfig:
    """The manifest's feature spec, validated, and its mapping and other entries checked
    against it (:func:`validate_manifest`). Raises :class:`BundleError` naming ``path``."""
    try:
        config = FeatureConfig.model_validate(manifest["config"])
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise BundleError(f"{path}: invalid feature spec or mapping: {exc!r}") from exc
    validate_manifest(manifest, config, path)
    return config


def _kind(value: object) -> str:
    """A value's JSON-ish type, for messages."""
    return "null" if value is None else type(value).__name__


def _vocab_key(key: object) -> str:
    """A vocab key as the message shows it: ``"i307"`` for a string (JSON-escaped, so odd
    unicode prints safely), the repr otherwise."""
    return json.dumps(key) if isinstance(key, str) else repr(key)


def _check_vocab(
    where: str, vocab: dict[Any, Any], fail: Callable[[str, str], BundleError]
) -> None:
    """Keys are strings and the values are exactly ``RESERVED .. RESERVED + len - 1``, each
    once. The usual, valid case runs in C (type sets, then numpy: range and a seen-mask);
    only a bad vocab takes one Python pass to name its first bad entry."""
    n = len(vocab)
    values = vocab.values()
    # bool is a subclass of int, but not an index here: compare exact types
    if set(map(type, vocab)) <= {str} and set(map(type, values)) <= {int}:
        if n == 0:
            return
        try:
            idx = np.fromiter(values, dtype=np.int64, count=n)
        except OverflowError:  # beyond int64: out of range, named below
            idx = None
        if idx is not None and idx.min() == RESERVED and idx.max() == RESERVED + n - 1:
            seen_mask = np.zeros(n, dtype=bool)
            seen_mask[idx - RESERVED] = True
            if seen_mask.all():  # n values in a range of n, none missing: each once
                return
    hi = RESERVED + n
    seen: dict[int, Any] = {}
    for key, index in vocab.items():
        if type(key) is str and type(index) is int and RESERVED <= index < hi:
            if index not in seen:
                seen[index] = key
                continue
        at = f"{where}[{_vocab_key(key)}]"
        if type(key) is not str:
            raise fail(at, f"the key is a {_kind(key)}, not a string")
        if type(index) is not int:
            raise fail(at, f"index {index!r} is a {_kind(index)}, not an integer")
        if not RESERVED <= index < hi:
            raise fail(
                at,
                f"index {index} is outside [{RESERVED}, {hi}) (0 is padding, 1 is OOV; "
                f"the vocab has {n} entries)",
            )
        raise fail(at, f"index {index} is also the index of {where}[{_vocab_key(seen[index])}]")
    # n distinct ints in [RESERVED, RESERVED + n) are exactly that range: nothing is left
    raise fail(where, "inconsistent vocab")  # pragma: no cover (the fast path accepted it)


def _check_table(
    name: str, entry: Any, want: MappingSpec, fail: Callable[[str, str], BundleError]
) -> None:
    """One table's ``{"spec": ..., "vocab": ...}`` against the config's mapping ``want``."""
    where = f"mapping.{name}"
    if not isinstance(entry, dict):
        raise fail(where, f"must be an object with spec and vocab, not a {_kind(entry)}")
    if "spec" not in entry:
        raise fail(f"{where}.spec", "missing")
    try:
        spec = MappingSpec.model_validate(entry["spec"])
    except ValueError as exc:  # pydantic's ValidationError
        raise fail(f"{where}.spec", f"invalid: {exc}") from exc
    if spec != want:
        raise fail(
            f"{where}.spec",
            f"{spec.model_dump()} differs from the config's mapping for {name!r}: "
            f"{want.model_dump()}",
        )
    vocab = entry.get("vocab")
    if spec.type == "hash":
        if not (vocab is None or (isinstance(vocab, dict) and not vocab)):
            size = f"{len(vocab)} entries" if isinstance(vocab, dict) else f"a {_kind(vocab)}"
            raise fail(f"{where}.vocab", f"a hash table has no vocab, found {size}")
        return  # buckets > 0: MappingSpec ensures it
    if not isinstance(vocab, dict):
        raise fail(f"{where}.vocab", f"must be an object of raw ID -> index, not {_kind(vocab)}")
    if spec.max_size is not None and len(vocab) > spec.max_size:
        raise fail(f"{where}.vocab", f"{len(vocab)} entries, over max_size {spec.max_size}")
    _check_vocab(f"{where}.vocab", vocab, fail)


def validate_manifest(manifest: dict[str, Any], config: FeatureConfig, path: Path) -> None:
    """Check a manifest's mapping and optional entries against its (validated) config.

    Raises :class:`BundleError` naming ``path`` (the manifest) and the bad key, e.g.
    ``mapping.item_id.vocab["i307"]``, when:

    * ``mapping`` lacks a table the config owns (one per sparse feature; a sequence shares
      its ``shared_with`` table) or has one the config does not know;
    * a table's ``spec`` differs from the config's ``mapping`` for that feature;
    * a vocab table's vocab is not an object of string keys whose values are ints (not
      bools), unique and exactly ``[RESERVED, RESERVED + len(vocab))``, or exceeds
      ``max_size``; a hash table has a non-empty vocab;
    * ``metrics`` is present but not an object (``/v1/models`` reads ``metrics.test``);
      ``fused`` / ``fused_cuda`` are present but neither an object nor null; ``inputs`` /
      ``outputs`` are present but not lists of objects.

    The manifest records no table sizes: the sizes follow from the mapping checked here.
    Linear in the vocab sizes, mostly in C: it runs at every load and reload.
    """

    def mapping_error(key: str, why: str) -> BundleError:
        return BundleError(f"{path}: invalid feature spec or mapping: {key}: {why}")

    def manifest_error(key: str, why: str) -> BundleError:
        return BundleError(f"{path}: invalid manifest: {key}: {why}")

    mapping = manifest.get("mapping")
    if not isinstance(mapping, dict):
        why = "missing" if "mapping" not in manifest else f"a {_kind(mapping)}, not an object"
        raise mapping_error("mapping", why)
    owned = {t.name: t.mapping for t in config.tables}
    for name in mapping:
        if name not in owned:
            raise mapping_error(
                f"mapping.{name}", f"not a table of the config (its tables: {sorted(owned)})"
            )
    for name, want in owned.items():
        if name not in mapping:
            raise mapping_error(f"mapping.{name}", "missing (a sparse feature of the config)")
        _check_table(name, mapping[name], want, mapping_error)

    if "metrics" in manifest and not isinstance(manifest["metrics"], dict):
        raise manifest_error("metrics", f"a {_kind(manifest['metrics'])}, not an object")
    for key in ("fused", "fused_cuda"):
        value = manifest.get(key)
        if value is not None and not isinstance(value, dict):
            raise manifest_error(key, f"a {_kind(value)}, not an object or null")
    _check_dense_range(manifest, config, manifest_error)
    for key in ("inputs", "outputs"):
        if key not in manifest:
            continue
        value = manifest[key]
        if not isinstance(value, list):
            raise manifest_error(key, f"a {_kind(value)}, not a list")
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise manifest_error(f"{key}[{i}]", f"a {_kind(item)}, not an object")


def _check_dense_range(
    manifest: dict[str, Any], config: FeatureConfig, fail: Callable[[str, str], BundleError]
) -> None:
    """``dense_range`` (absent in bundles exported before it): an object mapping dense
    features of the config to ``[lo, hi]``, two finite numbers with ``lo <= hi``."""
    if "dense_range" not in manifest:
        return
    ranges = manifest["dense_range"]
    if not isinstance(ranges, dict):
        raise fail("dense_range", f"a {_kind(ranges)}, not an object")
    dense = {f.name for f in config.user_dense + config.item_dense}
    for name, pair in ranges.items():
        where = f"dense_range.{name}"
        if name not in dense:
            raise fail(where, f"not a dense feature of the config (those: {sorted(dense)})")
        if not (
            isinstance(pair, list)
            and len(pair) == 2
            and all(type(v) in (int, float) and math.isfinite(v) for v in pair)
            and pair[0] <= pair[1]
        ):
            raise fail(where, f"{pair!r} is not [lo, hi], two finite numbers with lo <= hi")


def remove_staging(path: Path) -> None:
    _release_staging(path)
    shutil.rmtree(path, ignore_errors=True)
