"""The model store: ``models/<name>/<version>/{model.onnx, manifest.json}``.

The manifest is the only contract between training and serving: the feature spec,
the ID mapping, the sequence length, graph input/output names and shapes, the
opset, training metrics, a fingerprint of the training data and the creation time.
Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctr.mapping import FeatureMapper
from ctr.spec import FeatureConfig

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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def list_versions(models_dir: str | Path, name: str) -> list[int]:
    """Complete versions (a manifest present), ascending."""
    root = Path(models_dir) / name
    if not root.is_dir():
        return []
    return sorted(
        int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / MANIFEST).is_file()
    )


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


def publish(models_dir: str | Path, name: str, staged: Path) -> tuple[int, Path]:
    """Move a staged bundle folder in as the next version. Never overwrites: the rename
    fails if another exporter took the number first, and then the next one is tried."""
    root = Path(models_dir) / name
    root.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        existing = [int(p.name) for p in root.iterdir() if p.name.isdigit()]
        version = max(existing, default=0) + 1
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
        return version, target
    raise BundleError("could not allocate a model version")


def staging_dir(models_dir: str | Path) -> Path:
    root = Path(models_dir)
    root.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    path.chmod(0o755)
    return path


@dataclass
class Bundle:
    """A loaded bundle: manifest, typed config and mapper, and the ONNX path."""

    name: str
    version: int
    path: Path
    manifest: dict[str, Any]
    config: FeatureConfig
    mapper: FeatureMapper

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def input_names(self) -> list[str]:
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

    def fused_bytes(self, cuda: bool = False) -> bytes:
        """The fused graph (``cuda``: the CUDA variant), checked against the manifest's
        sha256. Raises :class:`BundleError` if the bundle has none, or it is missing or
        altered."""
        entry = self.fused_cuda if cuda else self.fused
        if entry is None:
            what = "CUDA variant of the fused graph" if cuda else "fused graph"
            raise BundleError(f"{self.path}: the bundle has no {what}")
        path = self.path / str(entry.get("file", FUSED_CUDA_FILE if cuda else FUSED_FILE))
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BundleError(f"fused graph unreadable: {exc}") from exc
        if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            raise BundleError(f"fused graph {path} is corrupt: sha256 does not match the manifest")
        return data


def load_bundle(models_dir: str | Path, name: str, version: str | int = "latest") -> Bundle:
    """Resolve and validate a bundle. Raises :class:`BundleError` with a clear message if
    the folder, the manifest or the model file is missing, unreadable or altered."""
    v = resolve_version(models_dir, name, version)
    path = Path(models_dir) / name / str(v)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as exc:  # ValueError: bad JSON and bytes that are not UTF-8
        raise BundleError(f"unreadable manifest {path / MANIFEST}: {exc}") from exc
    if not isinstance(manifest, dict):
        kind = type(manifest).__name__
        raise BundleError(f"unreadable manifest {path / MANIFEST}: a JSON {kind}, not an object")
    if manifest.get("format") != FORMAT_VERSION:
        raise BundleError(f"{path / MANIFEST}: unsupported format {manifest.get('format')!r}")
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
    try:
        config = FeatureConfig.model_validate(manifest["config"])
        mapper = FeatureMapper.from_json(config, manifest["mapping"])
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise BundleError(f"{path / MANIFEST}: invalid feature spec or mapping: {exc!r}") from exc
    return Bundle(name, v, path, manifest, config, mapper)


def remove_staging(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
