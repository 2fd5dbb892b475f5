"""fp16 serving: the bundle's graph converted at load time, kept only within tolerance.

The conversion runs where the model is served, and so does the parity check: fp16
error depends on the provider's kernels, so a check on another device would prove
nothing. Graph inputs and outputs stay fp32 (``keep_io_types``), so feeds, the runners
and the response code do not change.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ctr.bundle import Bundle

FP16_TOLERANCE = 1e-3  # max |p_fp16 - p_fp32| over the probe feeds


class PrecisionError(RuntimeError):
    """The fp16 graph could not be built, loaded or did not match fp32."""


def fp16_bytes(path: Path) -> bytes:
    """The ONNX model at ``path`` with float32 weights and activations in float16."""
    try:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as exc:  # the onnx package is needed only for this
        raise PrecisionError(f"fp16 conversion needs the onnx package: {exc}") from exc
    try:
        model = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
    except Exception as exc:  # the converter raises assorted types on odd graphs
        raise PrecisionError(f"fp16 conversion failed: {exc!r}") from exc
    return model.SerializeToString()


def probe_feeds(bundle: Bundle, users: int, n: int, seed: int) -> dict[str, np.ndarray]:
    """Random valid graph inputs for ``users`` users and ``n`` candidates: IDs drawn from
    each table's range, dense values ~ N(0, 1), random history lengths (0 and L included)
    and a random ``user_idx`` per candidate."""
    c = bundle.config
    rng = np.random.default_rng(seed)
    sizes = bundle.mapper.table_sizes()
    length = c.max_seq_len

    def ids(feats: list, rows: int) -> np.ndarray:
        cols = [rng.integers(0, sizes[c.table_of(f.name)], size=rows) for f in feats]
        return np.stack(cols, axis=1).astype(np.int64) if cols else np.zeros((rows, 0), np.int64)

    lens = rng.integers(0, length + 1, size=users).astype(np.int64)
    lens[0] = length
    if users > 1:
        lens[1] = 0
    hist = np.zeros((users, len(c.sequences), length), np.int64)
    for s, f in enumerate(c.sequences):
        table = sizes[c.table_of(f.name)]
        for u in range(users):
            hist[u, s, : lens[u]] = rng.integers(2, max(table, 3), size=lens[u]) % table
    feeds = {
        "user_sparse": ids(c.user_sparse, users),
        "user_dense": rng.normal(size=(users, len(c.user_dense))).astype(np.float32),
        "hist": hist,
        "hist_len": lens,
        "item_sparse": ids(c.item_sparse, n),
        "item_dense": rng.normal(size=(n, len(c.item_dense))).astype(np.float32),
        "user_idx": rng.integers(0, users, size=n).astype(np.int64),
    }
    return {k: feeds[k] for k in bundle.input_names}
