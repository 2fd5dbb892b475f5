"""The loaded model: bundle + ONNX Runtime session, swapped atomically on reload."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from ctr.bundle import Bundle, BundleError, load_bundle
from service.rowcache import ItemRowCache
from service.settings import Settings

log = logging.getLogger("ctr.model")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class ProviderError(RuntimeError):
    """The requested execution provider is not available."""


def choose_providers(setting: str) -> list[str]:
    available = ort.get_available_providers()
    if setting == "cpu":
        return [CPU]
    if setting == "cuda":
        if CUDA not in available:
            raise ProviderError(f"CTR_PROVIDER=cuda but ORT offers only {available}")
        return [CUDA, CPU]
    return [CUDA, CPU] if CUDA in available else [CPU]


@dataclass
class LoadedModel:
    bundle: Bundle
    session: ort.InferenceSession
    provider: str
    outputs: list[str]
    rows: ItemRowCache  # encoded candidate rows; they depend on this bundle's mapping

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def version(self) -> str:
        return str(self.bundle.version)

    @property
    def has_attention(self) -> bool:
        return "attention" in self.outputs

    def run(self, feeds: dict[str, np.ndarray], explain: bool) -> list[np.ndarray]:
        """``probs [N]`` and, with ``explain``, ``attention [N, L]``."""
        names = ["probs", "attention"] if explain and self.has_attention else ["probs"]
        return self.session.run(names, feeds)


def load_model(settings: Settings, version: str | None = None) -> LoadedModel:
    """Load, check and warm up a bundle. Raises ``BundleError`` / ``ProviderError``."""
    bundle = load_bundle(
        settings.models_dir, settings.model_name, version or settings.model_version
    )
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if settings.intra_op_threads:
        so.intra_op_num_threads = settings.intra_op_threads
    so.inter_op_num_threads = 1
    # Pool threads that keep spinning after a run burn the core the event loop needs for
    # the next request; never spinning slows the run's own parallel sections. "run" spins
    # inside a run only (measured in docs/benchmarks.md).
    spin = settings.intra_op_spin
    so.add_session_config_entry("session.intra_op.allow_spinning", "0" if spin == "never" else "1")
    if spin == "run":
        so.add_session_config_entry("session.force_spinning_stop", "1")
    providers = choose_providers(settings.provider)
    try:
        session = ort.InferenceSession(str(bundle.model_path), so, providers=providers)
    except Exception as exc:  # ORT raises its own exception types for bad graphs
        raise BundleError(f"ONNX Runtime cannot load {bundle.model_path}: {exc}") from exc
    provider = session.get_providers()[0]
    if settings.require_gpu and provider != CUDA:
        raise ProviderError(f"CTR_REQUIRE_GPU=1 but the session runs on {provider}")
    c = bundle.config
    rows = ItemRowCache(
        settings.item_cache_ttl_s, settings.item_cache_size, len(c.item_sparse), len(c.item_dense)
    )
    model = LoadedModel(bundle, session, provider, [o.name for o in session.get_outputs()], rows)
    graph_in = [i.name for i in session.get_inputs()]
    if graph_in != bundle.input_names:
        raise BundleError(
            f"{bundle.model_path}: graph inputs {graph_in} differ from the manifest's "
            f"{bundle.input_names}"
        )
    try:
        warm_up(model)
    except Exception as exc:  # ORT raises its own types for shape/type mismatches
        raise BundleError(f"{bundle.model_path}: warm-up run failed: {exc}") from exc
    log.info(
        "model loaded name=%s version=%s provider=%s path=%s",
        model.name,
        model.version,
        provider,
        bundle.path,
    )
    return model


def warm_up(model: LoadedModel) -> None:
    """Run the graph at a few batch sizes so first requests do not pay for allocation."""
    c = model.bundle.config
    length = c.max_seq_len
    for n in (1, 64, 512):
        feeds = {
            "user_sparse": np.ones((1, len(c.user_sparse)), np.int64),
            "user_dense": np.zeros((1, len(c.user_dense)), np.float32),
            "hist": np.ones((1, len(c.sequences), length), np.int64),
            "hist_len": np.array([length], np.int64),
            "item_sparse": np.ones((n, len(c.item_sparse)), np.int64),
            "item_dense": np.zeros((n, len(c.item_dense)), np.float32),
            "user_idx": np.zeros(n, np.int64),
        }
        model.run({k: feeds[k] for k in model.bundle.input_names}, explain=False)
