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
FP16_MAX = 65504.0  # the largest finite fp16: a dense input past it is inf in the graph
# what a log1p feature is fed at most: log1p(max(v, 0)) of the largest finite value
# a request or the store can send (a float64: ctr.encode.to_float applies log1p before
# its float32 range check, so 1e300 is fed as 690.8)
LOG1P_MAX = float(np.log1p(np.finfo(np.float64).max))


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


def dense_problem(bundle: Bundle) -> str | None:
    """Why the bundle's dense inputs could overflow an fp16 graph, or None. The graph
    casts each fp32 input to fp16 before it clamps it to the manifest's
    ``dense_range``: a value past :data:`FP16_MAX` is then inf, and the clamp keeps it
    only within a bound that fp16 holds. A dense feature without a bound
    (``train.clip_dense: false``, or a bundle exported before the bounds) takes any
    value a request or the store sends, unless it is a ``log1p`` feature (fed as
    ``log1p(max(v, 0))``: at most :data:`LOG1P_MAX`, about 709.8)."""
    ranges = bundle.manifest.get("dense_range") or {}
    c = bundle.config
    for f in (*c.user_dense, *c.item_dense):
        bound = ranges.get(f.name)
        if bound is None and f.log1p:
            continue  # fed as log1p(max(v, 0)): within [0, LOG1P_MAX] whatever is sent
        if bound is None:
            return (f"dense feature {f.name!r} has no bound in the manifest's dense_range "
                    "(train.clip_dense: false, or an older export): a value past "
                    f"{FP16_MAX:g} would be inf in fp16")  # fmt: skip
        if max(abs(float(bound[0])), abs(float(bound[1]))) > FP16_MAX:
            return (f"dense feature {f.name!r} ranges over [{bound[0]:g}, {bound[1]:g}], "
                    f"past fp16's largest value {FP16_MAX:g}")  # fmt: skip
    return None


def range_feeds(bundle: Bundle, users: int, n: int, seed: int) -> dict[str, np.ndarray]:
    """:func:`probe_feeds` with every dense input drawn from its ``dense_range``: the
    first user and the first third of the candidates at the upper bounds, the second
    user and the next third at the lower bounds, the rest uniform between them (the
    edges are where fp16 loses the most: its step at 60,000 is 32)."""
    feeds = probe_feeds(bundle, users, n, seed)
    rng = np.random.default_rng(seed + 1)
    c = bundle.config
    for side, name in (("user", "user_dense"), ("item", "item_dense")):
        feats = c.user_dense if side == "user" else c.item_dense
        if name not in feeds or not feats:
            continue
        bounds = bundle.dense_bounds.get(side)
        inf = np.full(len(feats), np.inf, np.float32)
        lo, hi = (-inf, inf) if bounds is None else (bounds.lo, bounds.hi)
        # a log1p feature without a bound: what it can be fed, [0, LOG1P_MAX]
        logged = np.array([f.log1p for f in feats])
        lo = np.where(np.isfinite(lo), lo, np.where(logged, 0.0, -1.0)).astype(np.float32)
        hi = np.where(np.isfinite(hi), hi, np.where(logged, LOG1P_MAX, 1.0)).astype(np.float32)
        rows = feeds[name].shape[0]
        values = (lo + (hi - lo) * rng.random((rows, lo.size))).astype(np.float32)
        third = max(1, rows // 3)
        values[:third] = hi
        values[third : 2 * third] = lo
        feeds[name] = values
    return feeds
