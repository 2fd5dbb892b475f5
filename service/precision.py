"""fp16 serving: the bundle's graph converted at load time, kept only within tolerance.

The conversion runs where the model is served, and so does the parity check: fp16
error depends on the provider's kernels, so a check on another device would prove
nothing. Graph inputs and outputs stay fp32 (``keep_io_types``), so feeds, the runners
and the response code do not change.
"""

from __future__ import annotations

import numpy as np

from ctr.bundle import Bundle, random_inputs

FP16_TOLERANCE = 1e-3  # max |p_fp16 - p_fp32| over the probe feeds


class PrecisionError(RuntimeError):
    """The fp16 graph could not be built, loaded or did not match fp32."""


def fp16_bytes(data: bytes, keep_fp32: tuple[str, ...] = ()) -> bytes:
    """The ONNX model ``data`` with float32 weights and activations in float16; ops named
    in ``keep_fp32`` (custom ops with fp32 kernels only) stay fp32 behind casts."""
    try:
        import onnx
        from onnxruntime.transformers.float16 import (
            DEFAULT_OP_BLOCK_LIST,
            convert_float_to_float16,
        )
    except ImportError as exc:  # the onnx package is needed only for this
        raise PrecisionError(f"fp16 conversion needs the onnx package: {exc}") from exc
    try:
        model = convert_float_to_float16(
            onnx.load_from_string(data),
            keep_io_types=True,
            op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(keep_fp32),
        )
    except Exception as exc:  # the converter raises assorted types on odd graphs
        raise PrecisionError(f"fp16 conversion failed: {exc!r}") from exc
    return model.SerializeToString()


def probe_feeds(bundle: Bundle, users: int, n: int, seed: int) -> dict[str, np.ndarray]:
    """Random valid graph inputs for ``users`` users and ``n`` candidates
    (:func:`ctr.bundle.random_inputs`); the first user has a full history and, with
    several users, the second an empty one."""
    c = bundle.config
    rng = np.random.default_rng(seed)
    lens = rng.integers(0, c.max_seq_len + 1, size=users)
    lens[0] = c.max_seq_len
    if users > 1:
        lens[1] = 0
    return random_inputs(c, bundle.mapper.table_sizes(), users, n, lens, rng)
