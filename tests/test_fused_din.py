"""``ctr_ops.DinAttention``, the fused DIN activation unit (native/din_attention.h):
a DINAttention module exported with the op, run by ONNX Runtime with the CPU kernel,
against the same module in torch (unfused), over activations, layer widths, softmax,
several users and every kind of history length."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import Tensor, nn

from ctr import native
from training.export import CUSTOM_OPSETS
from training.modules import DINAttention, din_unit, sequence_mask


class Unit(nn.Module):
    """The unit as a graph: ``hist_len [U]`` in, the mask built inside as DIN does."""

    def __init__(self, att: DINAttention, steps: int) -> None:
        super().__init__()
        self.att, self.steps = att, steps

    def forward(self, q: Tensor, keys: Tensor, user_idx: Tensor, hist_len: Tensor) -> tuple:
        return self.att(q, keys, user_idx, sequence_mask(hist_len, self.steps))


def unit(dim: int, widths: list[int], act: str, softmax: bool, seed: int) -> DINAttention:
    """A unit with torch's random initial weights, and random Dice statistics and
    slopes (not the defaults, which would hide a wrong packing order)."""
    torch.manual_seed(seed)
    att = DINAttention(dim, widths, act, softmax)
    with torch.no_grad():
        for m in att.modules():
            if isinstance(m, nn.BatchNorm1d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.2, 2.0)
        for name, p in att.named_parameters():
            if name.endswith("alpha") or (name.endswith("weight") and p.dim() == 1):
                p.uniform_(-0.5, 0.8)  # Dice alpha, PReLU slopes
    return att.eval()


def fused_session(att: DINAttention, steps: int, tmp: Path, lib: native.OpsLibrary) -> bytes:
    model = Unit(att, steps).eval()
    args = feeds(users=2, n=5, steps=steps, dim=att.dim, seed=0)
    path = tmp / "unit.onnx"
    att.fused = True
    try:
        with torch.no_grad():
            torch.onnx.export(
                model,
                tuple(torch.from_numpy(v) for v in args.values()),
                str(path),
                input_names=list(args),
                output_names=["pooled", "weights"],
                dynamic_axes={
                    "q": {0: "N"},
                    "keys": {0: "U"},
                    "user_idx": {0: "N"},
                    "hist_len": {0: "U"},
                },  # fmt: skip
                opset_version=17,
                dynamo=False,
                custom_opsets=CUSTOM_OPSETS,
            )
    finally:
        att.fused = False
    return path.read_bytes()


def session(data: bytes, lib: native.OpsLibrary) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(lib.path))
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def feeds(users: int, n: int, steps: int, dim: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "q": rng.normal(size=(n, dim)).astype(np.float32),
        "keys": rng.normal(size=(users, steps, dim)).astype(np.float32),
        "user_idx": rng.integers(0, users, size=n).astype(np.int64),
        "hist_len": rng.integers(0, steps + 1, size=users).astype(np.int64),
    }


def torch_unit(att: DINAttention, steps: int, f: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        out = Unit(att, steps)(*(torch.from_numpy(v) for v in f.values()))
    return [t.numpy() for t in out]


CASES = [  # dim, widths, act, softmax, steps
    (16, [80, 40], "dice", False, 50),  # the DIN default
    (16, [80, 40], "sigmoid", True, 20),  # DIEN-style
    (5, [7], "prelu", False, 3),  # one layer, widths not multiples of 8
    (12, [33, 17, 5], "dice", True, 37),  # three layers, L not a multiple of the lanes
    (8, [16, 8], "prelu", True, 1),
]


@pytest.mark.parametrize(("dim", "widths", "act", "softmax", "steps"), CASES)
def test_the_op_matches_the_unit_in_torch(
    lib: native.OpsLibrary, tmp_path: Path, dim: int, widths: list[int], act: str,
    softmax: bool, steps: int,
) -> None:  # fmt: skip
    att = unit(dim, widths, act, softmax, seed=dim + steps)
    sess = session(fused_session(att, steps, tmp_path, lib), lib)
    nodes = onnx.load_from_string(fused_session(att, steps, tmp_path, lib)).graph.node
    assert [n.op_type for n in nodes if n.domain == "ctr_ops"] == ["DinAttention"]
    for users, n, seed in ((1, 300, 1), (3, 61, 2), (4, 1, 3)):
        f = feeds(users, n, steps, dim, seed)
        f["hist_len"][0] = steps  # a full history; the others are random, 0 included
        if users > 2:
            f["hist_len"][1:3] = (0, 1)
        pooled, weights = sess.run(["pooled", "weights"], f)
        want_pooled, want_weights = torch_unit(att, steps, f)
        np.testing.assert_allclose(weights, want_weights, rtol=1e-5, atol=2e-6)
        np.testing.assert_allclose(pooled, want_pooled, rtol=1e-5, atol=2e-6)
        pad = sequence_mask(torch.from_numpy(f["hist_len"]), steps).numpy()[f["user_idx"]]
        assert np.all(weights[~pad] == 0.0)  # padding: exactly 0
        if softmax:
            full = pad.any(axis=1)
            np.testing.assert_allclose(weights[full].sum(axis=1), 1.0, atol=1e-5)


def test_every_shipped_cpu_level_matches_torch(ops_levels: Path, tmp_path: Path) -> None:
    """The op built for each x86-64 level this CPU runs (the runtime image ships them:
    AVX-512, AVX2 and SSE vector widths, and each width's reciprocal estimate)."""
    att = unit(16, [80, 40], "dice", True, seed=11)
    for level in native.supported_levels():
        lib = native.OpsLibrary(ops_levels / level / native.LIB_NAME, False, level)
        sess = session(fused_session(att, 50, tmp_path, lib), lib)
        f = feeds(2, 97, 50, 16, seed=12)
        f["hist_len"][:] = (50, 37)  # full vectors and a tail, at every width
        got = sess.run(["pooled", "weights"], f)
        for g, w in zip(got, torch_unit(att, 50, f), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=2e-6, err_msg=level)


def test_hist_len_outside_the_sequence_is_clamped(lib: native.OpsLibrary, tmp_path: Path) -> None:
    att = unit(8, [16, 8], "dice", True, seed=3)
    sess = session(fused_session(att, 6, tmp_path, lib), lib)
    f = feeds(3, 20, 6, 8, seed=4)
    f["hist_len"][:] = (9, -2, 6)  # longer than L, negative, exactly L
    got = sess.run(["pooled", "weights"], f)
    want = torch_unit(att, 6, f)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=2e-6)


def test_packed_params_are_what_the_reference_reads() -> None:
    """din_unit (the op's torch twin, from the packed inputs) equals the module."""
    att = unit(6, [10, 4], "dice", False, seed=5)
    f = {k: torch.from_numpy(v) for k, v in feeds(2, 9, 7, 6, seed=6).items()}
    with torch.no_grad():
        q_part, k_part, wp = att.split_first(f["q"], f["keys"])
        got = din_unit(
            q_part, k_part, f["q"], f["keys"], f["user_idx"], f["hist_len"], wp.t(),
            att.packed_params(), att.widths, native.DIN_ACTS["dice"], 0,
        )  # fmt: skip
        want = att(f["q"], f["keys"], f["user_idx"], sequence_mask(f["hist_len"], 7))
    for g, wt in zip(got, want, strict=True):
        torch.testing.assert_close(g, wt, rtol=1e-5, atol=1e-6)


def test_a_candidate_does_not_depend_on_the_others(lib: native.OpsLibrary, tmp_path: Path) -> None:
    att = unit(16, [80, 40], "dice", False, seed=7)
    sess = session(fused_session(att, 20, tmp_path, lib), lib)
    f = feeds(3, 40, 20, 16, seed=8)
    whole = sess.run(["pooled", "weights"], f)
    for rows in (np.arange(0, 40, 3), np.arange(5, 6), np.arange(39, 4, -7)):
        part = dict(f, q=f["q"][rows], user_idx=f["user_idx"][rows])
        for got, all_rows in zip(sess.run(["pooled", "weights"], part), whole, strict=True):
            np.testing.assert_array_equal(got, all_rows[rows])


def din_op_only(lib: native.OpsLibrary, widths: list[int], act: int) -> ort.InferenceSession:
    """A graph of the one node with every input fed, so the op's own checks run."""
    from onnx import TensorProto, helper

    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    names = ["q_part", "k_part", "q", "keys", "user_idx", "hist_len", "w_p", "params"]
    node = helper.make_node("DinAttention", names, ["pooled", "weights"], domain="ctr_ops",
                            widths=widths, act=act, softmax=1)  # fmt: skip
    types = [f, f, f, f, i64, i64, f, f]
    graph = helper.make_graph(
        [node],
        "op",
        [helper.make_tensor_value_info(n, t, None) for n, t in zip(names, types, strict=True)],
        [helper.make_tensor_value_info(n, f, None) for n in ("pooled", "weights")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ctr_ops", 1)]
    )
    return session(model.SerializeToString(), lib)


def op_inputs(users: int = 2, n: int = 5, steps: int = 4, dim: int = 3) -> dict[str, np.ndarray]:
    """Inputs for widths [6, 4] with sigmoid: params = W2 (24) + b2 (4) + out (4 + 1)."""
    rng = np.random.default_rng(0)
    return {
        "q_part": rng.normal(size=(n, 6)).astype(np.float32),
        "k_part": rng.normal(size=(users, steps, 6)).astype(np.float32),
        "q": rng.normal(size=(n, dim)).astype(np.float32),
        "keys": rng.normal(size=(users, steps, dim)).astype(np.float32),
        "user_idx": np.arange(n, dtype=np.int64) % users,
        "hist_len": np.full(users, steps, dtype=np.int64),
        "w_p": rng.normal(size=(dim, 6)).astype(np.float32),
        "params": rng.normal(size=33).astype(np.float32),
    }


def test_the_op_rejects_bad_inputs(lib: native.OpsLibrary) -> None:
    sess = din_op_only(lib, [6, 4], native.DIN_ACTS["sigmoid"])
    good = op_inputs()
    out = sess.run(None, good)
    assert out[0].shape == (5, 3) and out[1].shape == (5, 4)
    bad = {
        "user_idx out of range": dict(good, user_idx=np.array([0, 1, 2, 0, 1], np.int64)),
        r"params must hold 33 floats": dict(good, params=good["params"][:30]),
        r"q_part must be \[N, H1\]": dict(good, q_part=good["q_part"][:, :5]),
        r"k_part must be \[U, L, H1\]": dict(good, k_part=good["k_part"][:, :3]),
        r"hist_len must be \[U\]": dict(good, hist_len=good["hist_len"][:1]),
        r"w_p must be \[D, H1\]": dict(good, w_p=good["w_p"][:2]),
        r"q must be \[N, D\]": dict(good, q=good["q"][:, :2]),
    }
    for message, f in bad.items():
        with pytest.raises(Exception, match=message):
            sess.run(None, f)
    # a bad attribute fails the session's creation, naming the attribute and its value
    for widths, act, message in (
        ([6, 300], 0, r"widths must be in \[1, 256\] .*got widths \[6, 300\], act 0"),
        ([0], 0, r"got widths \[0\], act 0"),
        ([6, 4], 9, r"act one of 0, 1, 2 \(got widths \[6, 4\], act 9\)"),
        ([4] * 9, 0, "widths must list 1 to 8 layers"),
    ):
        with pytest.raises(Exception, match=message):
            din_op_only(lib, widths, act)
