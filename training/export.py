"""ONNX export with user-once / candidates-N inputs, and the parity gate.

The TorchScript-based exporter (``dynamo=False``) is pinned: the dynamo exporter has
been reported to export ``nn.GRU`` wrongly without an error (pytorch#189225). The
parity gate below checks every model type, DIEN's GRU included, and export fails
unless ORT and torch agree.
"""

from __future__ import annotations

import errno
import json
import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from ctr import native
from ctr.bundle import (
    DENSE_RANGE_KEY,
    FORMAT_VERSION,
    FUSED_CUDA_FILE,
    FUSED_FILE,
    MANIFEST,
    MODEL_FILE,
    contract_of,
    dense_range_text,
    finite,
    graph_inputs,
    graph_outputs,
    publish,
    random_inputs,
    remove_staging,
    sha256_file,
    staging_dir,
)
from ctr.mapping import FeatureMapper
from ctr.spec import FeatureConfig, is_model_name, manifest_config
from training.models import AttentionalGRU, CTRModel
from training.modules import DINAttention

OPSET = 17
PARITY_TOL = 1e-5
CUSTOM_OPSETS = {native.DOMAIN: 1}
log = logging.getLogger("ctr.export")


class ExportWrapper(nn.Module):
    """Positional graph inputs -> ``(logits [N], probs [N][, attention [N, L]])``.

    The sigmoid lives here, not in the model.
    """

    def __init__(self, model: CTRModel) -> None:
        super().__init__()
        self.model = model
        self.names = [i.name for i in graph_inputs(model.config)]
        self.outputs = [o.name for o in graph_outputs(model.config)]

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        x = dict(zip(self.names, args, strict=True))
        c = self.model.config
        n_users = x["hist_len"].shape[0]
        if "user_sparse" not in x:
            x["user_sparse"] = torch.zeros(n_users, 0, dtype=torch.int64)
        if "user_dense" not in x:
            x["user_dense"] = torch.zeros(n_users, 0)
        if "item_dense" not in x:
            x["item_dense"] = torch.zeros(x["item_sparse"].shape[0], 0)
        if "hist" not in x:
            x["hist"] = torch.zeros(n_users, 0, c.max_seq_len, dtype=torch.int64)
        out = self.model(x)
        logits = out["logits"]
        if not c.sequences:
            # no model reads hist_len then, and the exporter drops an unread input: the
            # graph would lack the input the manifest names and the service feeds (it
            # counts the call's users by it); a zero made of it keeps it
            tie = x["hist_len"].index_select(0, x["user_idx"]).mul(0).to(logits.dtype)
            logits = logits + tie
        res = [logits, torch.sigmoid(logits)]
        if "attention" in self.outputs:
            res.append(out["attention"])
        return tuple(res)


FUSABLE = (AttentionalGRU, DINAttention)


def fusable_ops(model: CTRModel) -> set[str]:
    """The custom ops (``native.OPS`` names) the model's fusable parts would export as:
    ``AttentionalGRU`` for DIEN's AUGRU recurrence, ``DinAttention`` per DIN unit."""
    return {m.op for m in model.modules() if isinstance(m, FUSABLE) and m.can_fuse}


def fusable(model: CTRModel) -> bool:
    """True if the model has a part the custom-op library can run as one node."""
    return bool(fusable_ops(model))


@contextmanager
def fused_ops(model: CTRModel, on: bool, only: frozenset[str] | None = None) -> Iterator[None]:
    """Export the model's AUGRU as ``ctr_ops.AttentionalGRU`` nodes and its DIN units as
    ``ctr_ops.DinAttention`` nodes while inside (``only``: just the parts whose op is in
    it)."""
    layers = [m for m in model.modules() if isinstance(m, FUSABLE)]
    for m in layers:
        m.fused = on and (only is None or m.op in only)
    try:
        yield
    finally:
        for m in layers:
            m.fused = False


def export_onnx(
    model: CTRModel,
    path: Path,
    sample_n: int = 7,
    fused: bool = False,
    only: frozenset[str] | None = None,
) -> None:
    """Trace with U=2 users and ``sample_n`` candidates; U and N stay dynamic. With
    ``fused``, the AUGRU recurrence and each DIN activation unit are one custom node each
    (domain ``ctr_ops``; ``only``: just the parts whose op is in it)."""
    model.eval()
    # a fresh module starts in train mode, and the exporter restores the mode it found
    wrapper = ExportWrapper(model).eval()
    sizes = {name: emb.num_embeddings for name, emb in model.emb.tables.items()}
    feed = random_inputs(model.config, sizes, 2, sample_n, None, np.random.default_rng(0))
    args = tuple(torch.from_numpy(v) for v in feed.values())
    dyn: dict[str, dict[int, str]] = {}
    for gi in graph_inputs(model.config):
        dyn[gi.name] = {k: str(d) for k, d in enumerate(gi.shape) if isinstance(d, str)}
    for go in graph_outputs(model.config):
        dyn[go.name] = {0: "N"}
    with torch.no_grad(), fused_ops(model, fused, only), warnings.catch_warnings():
        # torch's caution about GRUs exported with a batch of 2: the parity gate runs
        # the graph at several batch sizes and sequence lengths, so it is checked here
        warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size")
        torch.onnx.export(
            wrapper,
            args,
            str(path),
            input_names=list(feed),
            output_names=wrapper.outputs,
            dynamic_axes=dyn,
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
            custom_opsets=CUSTOM_OPSETS if fused else None,
        )


def graph_stamps(contract: tuple[str, str], model: CTRModel) -> dict[str, str]:
    """What an export writes into each graph's metadata: the contract (its key and
    digest, :func:`ctr.bundle.contract_of`) and, where dense inputs are clamped, the
    ranges the graph clamps them to (:data:`ctr.bundle.DENSE_RANGE_KEY`), so that a
    manifest's ``dense_range`` edited after the export is caught at load."""
    key, digest = contract
    # "{}" where nothing is clamped: a dense_range added to its manifest does not load
    return {key: digest, DENSE_RANGE_KEY: dense_range_text(model.dense_range())}


def stamp_graph(path: Path, stamps: dict[str, str]) -> None:
    """Write ``stamps`` (:func:`graph_stamps`) into the graph's metadata, keeping any
    other entry."""
    graph = onnx.load(str(path))
    props = {p.key: p.value for p in graph.metadata_props}
    props.update(stamps)
    onnx.helper.set_model_props(graph, props)
    onnx.save(graph, str(path))


def export_fused(
    model: CTRModel, staged: Path, cuda: bool = False, contract: dict[str, str] | None = None
) -> dict[str, Any] | None:
    """Export ``model_fused.onnx`` next to ``model.onnx`` and gate it like the main graph,
    with the custom-op library's CPU kernels. Its manifest entry, or None when the model
    has nothing to fuse, the library cannot be built here or the fused graph fails its
    gate (logged; the service then serves ``model.onnx``, which every bundle has).

    ``cuda``: ``model_fused_cuda.onnx`` instead, with only the ops that have a CUDA kernel
    fused; None unless ``model_fused.onnx`` has ops without one and ops with one (DIEN:
    its AUGRU, not its attention unit), since otherwise the fused graph serves CUDA or
    there is nothing to fuse for it."""
    ops = fusable_ops(model)
    only = None
    if cuda:
        only = frozenset(native.CUDA_OPS)
        if not (ops - only and ops & only):
            return None
    if not ops:
        return None
    name = FUSED_CUDA_FILE if cuda else FUSED_FILE
    path = staged / name
    try:
        lib = native.library()
        export_onnx(model, path, fused=True, only=only)
        if contract is not None:
            stamp_graph(path, contract)
        report = parity_gate(model, path, ops_library=lib.path)
        if not report.ok:
            raise ParityError(f"parity gate: max |ORT - torch| = {report.max_abs_diff:.2e}")
    except Exception as exc:  # the fused graph is optional: model.onnx passed its gate
        if isinstance(exc, OSError) and exc.errno in STORE_FAULTS:
            # not the graph's fault but the store's: published without it, the bundle
            # would serve the slower graph though the machine builds the fused one
            path.unlink(missing_ok=True)
            raise
        log.warning("no %s in this bundle: %s", name, exc)
        path.unlink(missing_ok=True)
        return None
    return {
        "file": name,
        "ops": custom_ops(path),
        "sha256": sha256_file(path),
        "parity": {"max_abs_diff": report.max_abs_diff, "tolerance": PARITY_TOL},
    }


# a full disk, a quota, an I/O error, a read-only file system: the export fails (exit 2,
# nothing published) instead of publishing a bundle without its fused graph
STORE_FAULTS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})


def custom_ops(path: Path) -> list[str]:
    """The custom ops a graph uses, as ``domain.op``, sorted."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return sorted({f"{n.domain}.{n.op_type}" for n in graph.node if n.domain == native.DOMAIN})


@dataclass
class ParityReport:
    max_abs_diff: float
    cases: list[dict[str, Any]]

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= PARITY_TOL


class ParityError(RuntimeError):
    pass


def torch_outputs(model: CTRModel, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The export wrapper's outputs, in ``graph_outputs`` order: ``logits [N]``,
    ``probs [N]`` and, where the graph has it, ``attention [N, L]``."""
    wrapper = ExportWrapper(model).eval()
    with torch.no_grad():
        out = wrapper(*(torch.from_numpy(v) for v in feed.values()))
    return [t.numpy() for t in out]


def scaled_diff(got: np.ndarray, want: np.ndarray) -> float:
    """``max |got - want| / max(1, |want|)``: the absolute difference where values are at
    most 1 in size (probabilities, attention weights), relative beyond (large logits)."""
    if got.size == 0:
        return 0.0
    if not (np.isfinite(got).all() and np.isfinite(want).all()):
        return float("inf")  # NaN would drop out of max() and pass the gate
    return float(np.max(np.abs(got - want) / np.maximum(1.0, np.abs(want))))


def parity_gate(
    model: CTRModel,
    onnx_path: Path,
    n_values: tuple[int, ...] = (1, 7, 500),
    seed: int = 0,
    ops_library: Path | None = None,
) -> ParityReport:
    """ORT vs torch for N in ``n_values`` x history lengths {0, 1, max}, one user per call,
    plus multi-user calls through ``user_idx``. Every output is compared: probabilities,
    logits (a logit error where the sigmoid is flat barely moves the probability) and
    the attention weights the service returns as explanations, each by
    :func:`scaled_diff`. Histories include OOV IDs. Also runs
    ``onnx.checker`` and loads the graph with every ORT optimization enabled. A fused
    graph needs the custom-op library (``ops_library``); the checker then skips the
    shape inference that cannot know the custom node."""
    onnx.checker.check_model(onnx.load(str(onnx_path)), full_check=ops_library is None)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if ops_library is not None:
        so.register_custom_ops_library(str(ops_library))
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    model.eval()
    c = model.config
    sizes = {name: emb.num_embeddings for name, emb in model.emb.tables.items()}
    rng = np.random.default_rng(seed)
    cases = []
    worst = 0.0
    shapes = [(1, n, h) for n in n_values for h in (0, 1, c.max_seq_len)]
    shapes += [(3, max(n_values), None), (5, 11, None)]
    names = [o.name for o in graph_outputs(c)]
    for n_users, n, h in shapes:
        feed = random_inputs(c, sizes, n_users, n, h, rng)
        got = sess.run(names, feed)
        want = torch_outputs(model, feed)
        case: dict[str, Any] = {"users": n_users, "n": n, "hist_len": h}
        for name, g, w in zip(names, got, want, strict=True):
            if g.shape != w.shape:
                raise ParityError(f"ORT returned {name} of shape {g.shape} for {w.shape}")
            case[f"{name}_diff"] = scaled_diff(g, w)
        case["max_abs_diff"] = max(case[f"{name}_diff"] for name in names)
        worst = max(worst, case["max_abs_diff"])
        cases.append(case)
    return ParityReport(worst, cases)


def export_bundle(
    model: CTRModel,
    config: FeatureConfig,
    mapper: FeatureMapper,
    metrics: dict[str, Any],
    models_dir: str | Path,
    name: str | None = None,
) -> tuple[int, Path, ParityReport]:
    """Export, gate, write the manifest and publish as the next version of ``name``."""
    name = name or config.name
    if not is_model_name(name):
        raise ValueError(f"model name {name!r}: a folder of the model store (letters, "
                         "digits, _ . -; no path)")  # fmt: skip
    staged = staging_dir(models_dir)
    try:
        onnx_path = staged / MODEL_FILE
        export_onnx(model, onnx_path)
        contract = graph_stamps(contract_of(manifest_config(config), mapper.to_json()), model)
        stamp_graph(onnx_path, contract)
        report = parity_gate(model, onnx_path)
        if not report.ok:
            raise ParityError(
                f"parity gate failed: max |ORT - torch| = {report.max_abs_diff:.2e} > "
                f"{PARITY_TOL:.0e}; cases: {report.cases}"
            )
        manifest = {
            "format": FORMAT_VERSION,
            "name": name,
            "version": None,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model_type": config.model.type,
            "max_seq_len": config.max_seq_len,
            "opset": OPSET,
            "exporter": f"torch {torch.__version__} torchscript (dynamo=False)",
            "inputs": [i.__dict__ for i in graph_inputs(config)],
            "outputs": [o.__dict__ for o in graph_outputs(config)],
            "config": manifest_config(config),
            "mapping": mapper.to_json(),
            # {feature: [lo, hi]}: the encoded range the graph clamps each dense input to
            "dense_range": model.dense_range(),
            # null for a figure a split could not give (NaN is not JSON)
            "metrics": finite({k: metrics.get(k) for k in ("val", "test", "best_epoch", "rows")}),
            "data_fingerprint": metrics.get("data_fingerprint"),
            # the split the fingerprint is of (the config above leaves the seed out):
            # `ctr load --bundle` checks the data against it
            "data_split_seed": config.data.split_seed,
            "parity": {"max_abs_diff": report.max_abs_diff, "tolerance": PARITY_TOL},
            "onnx_sha256": sha256_file(onnx_path),
            "fused": export_fused(model, staged, contract=contract),
            "fused_cuda": export_fused(model, staged, cuda=True, contract=contract),
        }
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=2))
        version, path = publish(models_dir, name, staged)
    except BaseException:
        remove_staging(staged)
        raise
    return version, path, report
