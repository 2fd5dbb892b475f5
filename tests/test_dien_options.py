"""DIEN's two attention forms (official activation unit, paper's bilinear) both mask
padding, let the auxiliary loss train the GRU, and pass the export parity gate."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from ctr.bundle import random_inputs
from ctr.spec import FeatureConfig
from training.export import export_bundle
from training.models import build_model
from training.train import train


@pytest.mark.parametrize("kind", ["mlp", "bilinear"])
def test_dien_attention_kinds(
    kind: str, tiny_config: Callable[..., FeatureConfig], tiny_prep: object, tmp_path: Path
) -> None:
    config = tiny_config("dien", model__dien_attention=kind)
    assert config.model.dien_attention == kind
    metrics = train(config, tmp_path / "run", prep=tiny_prep, progress=False)  # type: ignore[arg-type]
    assert metrics["test"]["auc"] == metrics["test"]["auc"]  # not NaN
    sizes = tiny_prep.mapper.table_sizes()  # type: ignore[attr-defined]
    model = build_model(config, sizes).eval()
    feed = random_inputs(config, sizes, 3, 9, None, np.random.default_rng(1))
    x = {k: torch.from_numpy(v) for k, v in feed.items()}
    base = model(x)
    # padded positions: change their IDs, nothing moves
    hist = x["hist"].clone()
    for u in range(hist.shape[0]):
        hist[u, :, int(x["hist_len"][u]) :] = 3
    moved = model({**x, "hist": hist})
    assert torch.equal(base["logits"], moved["logits"])
    assert torch.all(base["attention"][x["hist_len"][x["user_idx"]] == 0] == 0)
    _, _, report = export_bundle(model, config, tiny_prep.mapper, metrics, tmp_path / "models")  # type: ignore[attr-defined]
    assert report.ok and report.max_abs_diff <= 1e-5


@pytest.mark.parametrize("model_type", ["din", "dien"])
def test_sigmoid_attention_activation(
    model_type: str, tiny_config: Callable[..., FeatureConfig], tiny_prep: object, tmp_path: Path
) -> None:
    """``attention_activation: sigmoid`` (the official DIN/DIEN code's choice) reaches the
    attention MLP only, trains, and passes the export parity gate."""
    config = tiny_config(model_type, model__attention_activation="sigmoid")
    sizes = tiny_prep.mapper.table_sizes()  # type: ignore[attr-defined]
    model = build_model(config, sizes)
    att = model.att if model_type == "dien" else model.att[0]  # type: ignore[index]
    assert isinstance(att.first_act, torch.nn.Sigmoid)
    assert any(isinstance(m, torch.nn.Sigmoid) for m in att.rest.modules())
    assert not any(isinstance(m, torch.nn.Sigmoid) for m in model.mlp.modules())  # type: ignore[union-attr]
    metrics = train(config, tmp_path / "run", prep=tiny_prep, progress=False)  # type: ignore[arg-type]
    assert metrics["test"]["auc"] == metrics["test"]["auc"]  # not NaN
    from training.train import load_run

    # the trained weights go through the parity gate (a fresh model's would too)
    _, mapper, trained, _ = load_run(tmp_path / "run")
    fresh = build_model(config, sizes).state_dict()
    assert any(not torch.equal(v, fresh[k]) for k, v in trained.state_dict().items())
    _, _, report = export_bundle(trained.eval(), config, mapper, metrics, tmp_path / "models")
    assert report.ok and report.max_abs_diff <= 1e-5


def test_aux_hidden_round_trips_through_the_manifest(
    tiny_config: Callable[..., FeatureConfig], tiny_prep: object, tmp_path: Path
) -> None:
    """``model.aux_hidden`` reaches the manifest and comes back from it; a manifest
    written before the key existed still loads, with the official widths it was built
    with ([100, 50])."""
    import json

    from ctr.bundle import MANIFEST, load_bundle

    config = tiny_config("dien", model__aux_hidden=[16, 8])
    sizes = tiny_prep.mapper.table_sizes()  # type: ignore[attr-defined]
    model = build_model(config, sizes).eval()
    _, path, report = export_bundle(model, config, tiny_prep.mapper, {}, tmp_path / "m")  # type: ignore[attr-defined]
    assert report.ok
    bundle = load_bundle(tmp_path / "m", config.name)
    assert bundle.config.model.aux_hidden == [16, 8] and bundle.config == config
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["config"]["model"]["aux_hidden"] == [16, 8]  # not at its default: kept
    del manifest["config"]["model"]["aux_hidden"]  # as an older export wrote it
    (path / MANIFEST).write_text(json.dumps(manifest))
    assert load_bundle(tmp_path / "m", config.name).config.model.aux_hidden == [100, 50]


@pytest.mark.parametrize("interaction", [True, False])
def test_dien_final_mlp_reads_candidate_times_history_sum(
    interaction: bool, tiny_config: Callable[..., FeatureConfig], tiny_prep: object
) -> None:
    """The official DIEN feeds its final MLP [uid, item, his_sum, item * his_sum, final];
    this model fed the candidate's embedding a second time where item * his_sum belongs
    (a review against the reference code). ``dien_interaction: false`` keeps that for
    runs trained before the fix."""
    config = tiny_config("dien", model__dien_interaction=interaction)
    sizes = tiny_prep.mapper.table_sizes()  # type: ignore[attr-defined]
    model = build_model(config, sizes).eval()
    feed = random_inputs(config, sizes, 3, 9, None, np.random.default_rng(2))
    x = {k: torch.from_numpy(v) for k, v in feed.items()}
    seen: list[torch.Tensor] = []
    model.mlp.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    model(x)
    idx = x["user_idx"]
    e = model.emb.sequence(model.group, x["hist"])
    mask = model.mask(x).unsqueeze(-1).to(e.dtype)
    pooled = (e * mask).sum(1).index_select(0, idx)
    q = model.emb.query(model.group, x["item_sparse"])
    d = q.shape[1]
    start = model.user_width + model.item_width
    slot = seen[0][:, start : start + d]
    torch.testing.assert_close(slot, q * pooled if interaction else q)
    torch.testing.assert_close(seen[0][:, -d:], pooled)


@pytest.mark.parametrize(
    ("model_type", "key"),
    [
        ("dien", "dien_interaction"),
        ("deepfm", "deepfm_sequence_first_order"),
        ("din", "din_interaction"),
    ],
)
def test_a_run_from_before_the_fix_loads_as_trained(
    model_type: str,
    key: str,
    tiny_config: Callable[..., FeatureConfig],
    tiny_prep: object,
    tmp_path: Path,
) -> None:
    """A run folder whose config.json lacks ``key`` (trained before it existed) loads
    with it off: the weights score as they did; the manifest never holds the key (the
    service does not read it; the graph computes it)."""
    import json

    from ctr.spec import manifest_config
    from training.train import load_run

    config = tiny_config(model_type, **{f"model__{key}": False})
    run = tmp_path / "run"
    train(config, run, prep=tiny_prep, progress=False)  # type: ignore[arg-type]
    raw = json.loads((run / "config.json").read_text())
    del raw["model"][key]
    (run / "config.json").write_text(json.dumps(raw))
    loaded, _, model, _ = load_run(run)
    assert getattr(loaded.model, key) is False and getattr(model.config.model, key) is False
    assert key not in manifest_config(tiny_config(model_type))["model"]
    assert getattr(tiny_config(model_type).model, key) is True  # new runs: on


@pytest.mark.parametrize("kind", ["mlp", "bilinear"])
def test_every_dien_parameter_reaches_the_loss(
    kind: str, tiny_config: Callable[..., FeatureConfig], tiny_prep: object
) -> None:
    """With ``gru_dim`` unlike the embedding width, every parameter of both attention
    forms gets a gradient from the click and auxiliary losses: the bilinear form built
    the MLP form's query projection and never used it. An older bilinear checkpoint
    that holds that weight still loads."""
    config = tiny_config("dien", model__dien_attention=kind)
    sizes = tiny_prep.mapper.table_sizes()  # type: ignore[attr-defined]
    model = build_model(config, sizes).train()
    assert model.seq_width(model.group) != config.model.gru_dim  # the case in question
    feed = random_inputs(config, sizes, 3, 9, None, np.random.default_rng(3))
    x = {k: torch.from_numpy(v) for k, v in feed.items()}
    x["hist_len"] = torch.full_like(x["hist_len"], config.max_seq_len)  # every step real
    x["neg_hist"] = x["hist"].flip(-1)
    out = model(x)
    (out["logits"].sum() + out["aux_loss"]).backward()
    idle = [n for n, p in model.named_parameters() if p.grad is None]
    assert idle == [], idle
    if kind == "bilinear":
        state = model.state_dict()
        d = model.seq_width(model.group)
        old = {**state, "query_proj.weight": torch.zeros(config.model.gru_dim, d)}
        fresh = build_model(config, sizes)
        fresh.load_state_dict(old)  # strict: the stale key is dropped, nothing else
        assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in state.items())
