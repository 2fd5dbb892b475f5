"""Model contracts: masking, order invariance, user_idx broadcasting, DIEN's auxiliary
loss and evolution variants, attention at padding, overfitting a tiny batch, and the
mini-batch aware L2 term. Every model runs on real encoded synthetic data."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ctr.bundle import random_inputs
from ctr.spec import FeatureConfig, load_config
from training.dataset import Prepared, negative_key, sample_negatives
from training.metrics import auc
from training.models import AttentionalGRU, CTRModel, build_model
from training.train import mba_l2, table_counts, train

MODEL_TYPES = ["base", "deepfm", "din", "multi_tower_din", "dien"]
ACTIVATIONS = ["dice", "prelu"]
ATTENTION_TYPES = ["din", "multi_tower_din"]
Batch = dict[str, torch.Tensor]
Config = Callable[..., FeatureConfig]


def make_model(config: FeatureConfig, prep: Prepared, seed: int = 0) -> CTRModel:
    """A model with non-trivial weights and BatchNorm statistics, in eval mode.

    Fresh weights are small, so every parameter gets noise (embedding row 0, the
    padding row, stays zero) and a few train-mode passes move Dice's running stats.
    """
    torch.manual_seed(seed)
    model = build_model(config, prep.mapper.table_sizes())
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
        for emb in model.emb.tables.values():
            emb.weight[0].zero_()
        model.train()
        for start in (0, 64, 128):
            model(prep.train.batch(np.arange(start, start + 64)))
    return model.eval()


def make_batch(prep: Prepared, n: int = 48, seed: int = 0) -> Batch:
    """Real rows with history lengths redrawn over [0, L] (0, 1 and L included), IDs
    0 past the length and valid IDs (>= 2) at every real position."""
    rng = np.random.default_rng(seed)
    b = prep.train.batch(np.arange(n))
    hist = b["hist"].numpy().copy()
    length = hist.shape[-1]
    lens = rng.integers(0, length + 1, size=n)
    lens[:3] = [0, 1, length]
    sizes = [prep.mapper.mapper_for(f.name).size for f in prep.config.sequences]
    for s, size in enumerate(sizes):
        fill = rng.integers(2, size, size=hist[:, s].shape)
        hist[:, s] = np.where(hist[:, s] == 0, fill, hist[:, s])
    hist *= (np.arange(length)[None, :] < lens[:, None])[:, None, :]
    b["hist"] = torch.from_numpy(hist)
    b["hist_len"] = torch.from_numpy(lens.astype(np.int64))
    return b


def padded(batch: Batch) -> torch.Tensor:
    """bool ``[U, L]``: True at padded positions."""
    length = batch["hist"].shape[-1]
    return torch.arange(length)[None, :] >= batch["hist_len"][:, None]


def forward(model: CTRModel, batch: Batch) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return model(batch)


# ---- masking -------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize(
    "model_type,evolution",
    [(t, "augru") for t in MODEL_TYPES] + [("dien", "agru"), ("dien", "aigru")],
)
def test_padded_positions_do_not_change_logits(
    tiny_config: Config, tiny_prep: Prepared, model_type: str, evolution: str, activation: str
) -> None:
    cfg = tiny_config(model_type, model__activation=activation, model__evolution=evolution)
    model = make_model(cfg, tiny_prep)
    batch = make_batch(tiny_prep)
    base = forward(model, batch)

    rng = np.random.default_rng(1)
    changed = dict(batch)
    hist = batch["hist"].clone()
    pad = padded(batch)
    for s, f in enumerate(cfg.sequences):
        size = tiny_prep.mapper.mapper_for(f.name).size
        noise = torch.from_numpy(rng.integers(1, size, size=hist[:, s].shape))
        hist[:, s] = torch.where(pad, noise, hist[:, s])
    assert (hist[:, 0][pad] != 0).all()
    changed["hist"] = hist
    out = forward(model, changed)
    assert torch.equal(out["logits"], base["logits"])
    if "attention" in base:
        assert torch.equal(out["attention"], base["attention"])

    # control: a real position does move the logits, so the comparison above can fail
    real = batch["hist"].clone()
    last = (batch["hist_len"] - 1).clamp(min=0)
    rows = torch.nonzero(batch["hist_len"] > 0).squeeze(1)
    real[rows, 0, last[rows]] = 2 + (real[rows, 0, last[rows]] - 1) % 7
    moved = forward(model, {**batch, "hist": real})
    assert not torch.equal(moved["logits"], base["logits"])


def _dice_stats(model: CTRModel) -> list[torch.Tensor]:
    from training.modules import Dice

    return [t.clone() for mod in model.modules() if isinstance(mod, Dice)
            for t in (mod.bn.running_mean, mod.bn.running_var) if t is not None]  # fmt: skip


@pytest.mark.parametrize("model_type", ATTENTION_TYPES)
def test_padding_does_not_reach_dice_statistics_in_training(
    tiny_config: Config, tiny_prep: Prepared, model_type: str
) -> None:
    """In training, Dice in the attention unit takes its batch statistics (and updates the
    running ones, which the served graph uses) from real history positions only: IDs past
    ``hist_len`` change neither the train-mode logits nor any running statistic. Before,
    they moved both (Dice normalised over all N*L positions, mostly padding on real data).
    DIEN's attention is the same unit, fed the same mask; its padded interest states are
    zero whatever the IDs, so this check cannot tell there (the unit test below does)."""
    cfg = tiny_config(model_type, model__activation="dice", model__attention_activation="dice")
    batch = make_batch(tiny_prep)
    hist = batch["hist"].clone()
    rng = np.random.default_rng(2)
    for s, f in enumerate(cfg.sequences):
        size = tiny_prep.mapper.mapper_for(f.name).size
        noise = torch.from_numpy(rng.integers(2, size, size=hist[:, s].shape))
        hist[:, s] = torch.where(padded(batch), noise, hist[:, s])
    runs = []
    for b in (batch, {**batch, "hist": hist}):
        model = make_model(cfg, tiny_prep).train()
        torch.manual_seed(5)  # the same dropout draws
        logits = model(b)["logits"]
        runs.append((logits.detach(), _dice_stats(model)))
    (base, base_stats), *others = runs
    assert len(base_stats) >= 4  # the attention unit's Dice layers are there
    for logits, stats in others:
        torch.testing.assert_close(logits, base, rtol=0, atol=1e-6)
        for a, b in zip(base_stats, stats, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_dice_with_a_mask_counts_only_real_rows() -> None:
    """Masked Dice in training equals plain Dice run on the real rows alone (outputs and
    running statistics); fewer than two real rows fall back to the running statistics."""
    from training.modules import Dice

    torch.manual_seed(4)
    x = torch.randn(6, 9, 16) * 2.0 + 0.5
    mask = torch.rand(6, 9) < 0.4
    masked, plain = Dice(16), Dice(16)
    with torch.no_grad():
        masked.alpha.uniform_(-0.5, 0.5)
        plain.alpha.copy_(masked.alpha)
    masked.train(), plain.train()
    got = masked(x, mask)[mask]
    want = plain(x[mask])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(masked.bn.running_mean, plain.bn.running_mean)
    torch.testing.assert_close(masked.bn.running_var, plain.bn.running_var)
    one = torch.zeros(6, 9, dtype=torch.bool)
    one[0, 0] = True
    before = masked.bn.running_mean.clone()
    out = masked(x, one)
    assert torch.isfinite(out).all() and torch.equal(masked.bn.running_mean, before)
    torch.testing.assert_close(out, masked.eval()(x))


# ---- order of the history -----------------------------------------------------------


def permute_real(batch: Batch, seed: int = 0) -> tuple[Batch, np.ndarray]:
    """Shuffle each user's real positions (same permutation for every field)."""
    rng = np.random.default_rng(seed)
    hist = batch["hist"].numpy().copy()
    length = hist.shape[-1]
    perms = np.tile(np.arange(length), (hist.shape[0], 1))
    for u, n in enumerate(batch["hist_len"].tolist()):
        perms[u, :n] = rng.permutation(n)
        hist[u] = hist[u][:, perms[u]]
    return {**batch, "hist": torch.from_numpy(hist)}, perms


@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("model_type", ATTENTION_TYPES)
def test_din_ignores_history_order(
    tiny_config: Config, tiny_prep: Prepared, model_type: str, activation: str, softmax: bool
) -> None:
    cfg = tiny_config(model_type, model__activation=activation, model__attention_softmax=softmax)
    model = make_model(cfg, tiny_prep)
    batch = make_batch(tiny_prep)
    shuffled, perms = permute_real(batch)
    assert not torch.equal(shuffled["hist"], batch["hist"])
    a, b = forward(model, batch), forward(model, shuffled)
    torch.testing.assert_close(b["logits"], a["logits"], rtol=0, atol=1e-6)
    # the weights move with their behaviours
    want = np.take_along_axis(a["attention"].numpy(), perms, axis=1)
    np.testing.assert_allclose(b["attention"].numpy(), want, rtol=0, atol=1e-6)


def test_dien_depends_on_history_order(tiny_config: Config, tiny_prep: Prepared) -> None:
    """Control for the test above: the same shuffle does change an order-aware model."""
    model = make_model(tiny_config("dien"), tiny_prep)
    batch = make_batch(tiny_prep)
    shuffled, _ = permute_real(batch)
    diff = (forward(model, batch)["logits"] - forward(model, shuffled)["logits"]).abs()
    assert float(diff.max()) > 1e-4


# ---- attention at padding -------------------------------------------------------------


@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("model_type", [*ATTENTION_TYPES, "dien"])
def test_attention_is_exactly_zero_at_padding(
    tiny_config: Config, tiny_prep: Prepared, model_type: str, activation: str, softmax: bool
) -> None:
    cfg = tiny_config(model_type, model__activation=activation, model__attention_softmax=softmax)
    model = make_model(cfg, tiny_prep)
    batch = make_batch(tiny_prep)
    att = forward(model, batch)["attention"]
    pad = padded(batch)  # U == N here (user_idx = arange)
    assert att.shape == pad.shape
    assert (att[pad] == 0).all()
    assert (att[~pad] != 0).any()
    if softmax or model_type == "dien":  # normalised over the real positions
        sums = att.sum(-1)
        has = batch["hist_len"] > 0
        torch.testing.assert_close(sums[has], torch.ones_like(sums[has]))
        assert (sums[~has] == 0).all()


# ---- user_idx broadcasting ------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_one_user_row_broadcasts_to_candidates(
    tiny_config: Config, tiny_prep: Prepared, model_type: str, activation: str
) -> None:
    """History enters once: one user row + user_idx zeros == that row copied N times."""
    model = make_model(tiny_config(model_type, model__activation=activation), tiny_prep)
    batch = make_batch(tiny_prep, n=40)
    n = 40
    for u in (2, 5):  # a full history and a drawn one
        user = {k: batch[k][u : u + 1] for k in ("user_sparse", "user_dense", "hist", "hist_len")}
        items = {"item_sparse": batch["item_sparse"], "item_dense": batch["item_dense"]}
        once = forward(model, {**user, **items, "user_idx": torch.zeros(n, dtype=torch.int64)})
        copies = {k: v.expand(n, *v.shape[1:]).contiguous() for k, v in user.items()}
        rows = forward(model, {**copies, **items, "user_idx": torch.arange(n)})
        assert once["logits"].shape == (n,)
        torch.testing.assert_close(once["logits"], rows["logits"], rtol=0, atol=1e-6)
        if "attention" in rows:
            torch.testing.assert_close(once["attention"], rows["attention"], rtol=0, atol=1e-6)


def test_user_idx_routes_candidates_to_their_user(tiny_config: Config, tiny_prep: Prepared) -> None:
    """Several users in one call: candidate i is scored with user user_idx[i]."""
    model = make_model(tiny_config("din"), tiny_prep)
    batch = make_batch(tiny_prep, n=12)
    user_keys = ("user_sparse", "user_dense", "hist", "hist_len")
    idx = torch.tensor([3, 0, 3, 7, 1, 7, 7, 0, 2, 11, 5, 3])
    mixed = forward(model, {**batch, "user_idx": idx})
    gathered = {k: batch[k].index_select(0, idx) for k in user_keys}
    direct = forward(model, {**batch, **gathered, "user_idx": torch.arange(12)})
    torch.testing.assert_close(mixed["logits"], direct["logits"], rtol=0, atol=1e-6)


# ---- DIEN ---------------------------------------------------------------------------------


def dien_batch(prep: Prepared, n: int = 64, seed: int = 0) -> Batch:
    batch = make_batch(prep, n=n, seed=seed)
    neg = sample_negatives(
        prep.item_pool,
        batch["hist"].numpy(),
        batch["hist_len"].numpy(),
        prep.config.max_seq_len,
        np.random.default_rng(seed),
        key=negative_key(prep.config),
    )
    batch["neg_hist"] = torch.from_numpy(neg)
    return batch


def test_dien_aux_loss_reaches_the_interest_extractor(
    tiny_config: Config, tiny_prep: Prepared
) -> None:
    model = make_model(tiny_config("dien"), tiny_prep).train()
    out = model(dien_batch(tiny_prep))
    aux = out["aux_loss"]
    assert aux.ndim == 0 and aux.item() > 0
    model.zero_grad()
    aux.backward()
    for name, p in model.extractor.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    # aux alone: the CTR head gets nothing
    assert model.head.weight.grad is None or float(model.head.weight.grad.abs().sum()) == 0


def test_dien_aux_loss_pairs_each_state_with_the_next_behaviour(
    tiny_config: Config, tiny_prep: Prepared
) -> None:
    """The DIEN paper's auxiliary loss: interest state ``h_t`` against the next behaviour
    ``e_{t+1}`` (label 1) and the negative drawn for step t+1 (label 0), averaged over the
    steps t whose t+1 is real, written plainly one (user, step) at a time. A loss that
    paired h_t with e_t (or with the negative of step t) passed every other test."""
    model = make_model(tiny_config("dien"), tiny_prep)
    batch = dien_batch(tiny_prep)
    seen: list[torch.Tensor] = []
    model.extractor.register_forward_hook(lambda mod, inp, out: seen.append(out[0]))
    with torch.no_grad():
        got = model(batch)["aux_loss"]
        mask = model.mask(batch)
        states = seen[0] * mask.unsqueeze(-1)
        pos = model.emb.sequence(model.group, batch["hist"])
        neg = model.emb.sequence(model.group, batch["neg_hist"])
        logit = lambda h, e: model.aux_head(model.aux(torch.cat([h, e]))).squeeze()  # noqa: E731
        terms = [
            torch.nn.functional.softplus(-logit(states[u, t], pos[u, t + 1]))
            + torch.nn.functional.softplus(logit(states[u, t], neg[u, t + 1]))
            for u in range(mask.shape[0])
            for t in range(mask.shape[1] - 1)
            if mask[u, t + 1]
        ]
    assert len(terms) > 10
    torch.testing.assert_close(got, torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)


def test_dien_aux_loss_ignores_padded_steps(tiny_config: Config, tiny_prep: Prepared) -> None:
    model = make_model(tiny_config("dien"), tiny_prep)
    batch = dien_batch(tiny_prep)
    with torch.no_grad():
        model.train()
        torch.manual_seed(0)
        a = model(batch)["aux_loss"]
        neg = batch["neg_hist"].clone()
        pad = padded(batch)
        for s in range(neg.shape[1]):
            neg[:, s][pad] = 5
        torch.manual_seed(0)
        b = model({**batch, "neg_hist": neg})["aux_loss"]
    assert torch.equal(a, b)


@pytest.mark.parametrize("evolution", ["augru", "agru", "aigru"])
def test_dien_evolution_variants_train(
    tiny_config: Config, tiny_prep: Prepared, evolution: str
) -> None:
    cfg = tiny_config("dien", model__evolution=evolution)
    model = make_model(cfg, tiny_prep).train()
    batch = dien_batch(tiny_prep)
    out = model(batch)
    labels = torch.from_numpy(tiny_prep.train.label[np.arange(64)])
    loss = torch.nn.functional.binary_cross_entropy_with_logits(out["logits"], labels)
    (loss + out["aux_loss"]).backward()
    assert torch.isfinite(loss)
    for name, p in model.evolution.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert float(p.grad.abs().sum()) > 0, name
    model.eval()
    res = forward(model, {k: v for k, v in batch.items() if k != "neg_hist"})
    assert res["logits"].shape == (64,) and "aux_loss" not in res


@pytest.mark.parametrize("evolution", ["augru", "agru", "aigru"])
def test_dien_evolution_padded_steps_keep_the_state(evolution: str) -> None:
    """The final interest state of a user with n real steps equals a run over those n
    steps alone: the L - n padded steps after them change nothing."""
    torch.manual_seed(0)
    gru = AttentionalGRU(6, 5, evolution)
    with torch.no_grad():
        for p in gru.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    length, lens = 8, torch.tensor([3, 8, 1, 5])
    mask = torch.arange(length)[None, :] < lens[:, None]
    states = torch.randn(4, length, 6) * mask.unsqueeze(-1)
    att = torch.softmax(torch.randn(4, length), -1) * mask
    with torch.no_grad():
        full = gru(states, att, torch.arange(4), mask)
        for u, n in enumerate(lens.tolist()):
            alone = gru(
                states[u : u + 1, :n],
                att[u : u + 1, :n],
                torch.zeros(1, dtype=torch.int64),
                mask[u : u + 1, :n],
            )
            torch.testing.assert_close(full[u : u + 1], alone, rtol=0, atol=1e-6)


def textbook_cell(
    gru: AttentionalGRU,
    states: torch.Tensor,
    att: torch.Tensor,
    idx: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """The DIEN paper's recurrences written plainly, one candidate row at a time."""
    hd = gru.hidden
    w_ih, b_ih = gru.w_ih.weight, gru.w_ih.bias
    w_hh, b_hh = gru.w_hh.weight, gru.w_hh.bias
    out = []
    for k, u in enumerate(idx.tolist()):
        h = torch.zeros(hd)
        for t in range(states.shape[1]):
            a = att[k, t]
            x = w_ih @ states[u, t] + b_ih
            if gru.kind == "aigru":
                x = a * (w_ih @ states[u, t]) + b_ih
            g = w_hh @ h + b_hh
            r = torch.sigmoid(x[:hd] + g[:hd])
            z = torch.sigmoid(x[hd : 2 * hd] + g[hd : 2 * hd])
            n = torch.tanh(x[2 * hd :] + r * g[2 * hd :])
            if gru.kind == "augru":
                upd = a * (1 - z)
            elif gru.kind == "agru":
                upd = a * torch.ones(hd)
            else:
                upd = (1 - z) * mask[u, t]
            h = (1 - upd) * h + upd * n
        out.append(h)
    return torch.stack(out)


@pytest.mark.parametrize("evolution", ["augru", "agru", "aigru"])
def test_dien_evolution_matches_the_textbook_cell(evolution: str) -> None:
    """The few-node step (negated update rows, addmm, h + u(n - h)) computes the same
    function as the paper's cell, candidates sharing users through ``user_idx``."""
    torch.manual_seed(1)
    gru = AttentionalGRU(6, 5, evolution)
    with torch.no_grad():
        for p in gru.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    length, lens = 7, torch.tensor([7, 2, 4])
    mask = torch.arange(length)[None, :] < lens[:, None]
    states = torch.randn(3, length, 6) * mask.unsqueeze(-1)
    idx = torch.tensor([0, 2, 2, 1, 0])
    att = torch.softmax(torch.randn(5, length), -1) * mask[idx]
    with torch.no_grad():
        got = gru(states, att, idx, mask)
        want = textbook_cell(gru, states, att, idx, mask)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_dien_evolution_variants_differ(tiny_config: Config, tiny_prep: Prepared) -> None:
    """AUGRU, AGRU and AIGRU are different recurrences (same weights, other logits)."""
    batch = make_batch(tiny_prep)
    ref = make_model(tiny_config("dien"), tiny_prep)
    logits = []
    for evolution in ("augru", "agru", "aigru"):
        model = build_model(
            tiny_config("dien", model__evolution=evolution), tiny_prep.mapper.table_sizes()
        )
        model.load_state_dict(ref.state_dict())
        logits.append(forward(model.eval(), batch)["logits"])
    for i in range(3):
        for j in range(i + 1, 3):
            assert float((logits[i] - logits[j]).abs().max()) > 1e-5


# ---- capacity -------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_overfits_a_tiny_batch(
    tiny_config: Config, tiny_prep: Prepared, model_type: str, activation: str
) -> None:
    cfg = tiny_config(model_type, model__activation=activation)
    torch.manual_seed(0)
    model = build_model(cfg, tiny_prep.mapper.table_sizes())
    idx = np.arange(32)
    batch = tiny_prep.train.batch(idx)
    labels = torch.from_numpy(tiny_prep.train.label[idx])
    assert 0 < float(labels.sum()) < 32
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    bce = torch.nn.BCEWithLogitsLoss()
    model.train()
    first = None
    for _ in range(200):
        loss = bce(model(batch)["logits"], labels)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 0.5
    assert loss.item() < 0.05
    model.eval()
    probs = torch.sigmoid(forward(model, batch)["logits"]).numpy()
    assert auc(labels.numpy(), probs) >= 0.99


# ---- mini-batch aware L2 --------------------------------------------------------------------


def test_mba_l2_term_is_positive_and_touches_batch_rows_only(
    tiny_config: Config, tiny_prep: Prepared
) -> None:
    cfg = tiny_config("din", model__mba_l2=0.01)
    model = make_model(cfg, tiny_prep)
    counts = table_counts(cfg, tiny_prep)
    idx = np.arange(16)
    batch = tiny_prep.train.batch(idx)
    term = mba_l2(model, batch, counts)
    assert term.ndim == 0 and term.item() > 0
    model.zero_grad()
    term.backward()
    enc = tiny_prep.train.enc
    present = {
        "user_id": set(enc.user_sparse[idx, 0].tolist()),
        "item_id": set(enc.item_sparse[idx, 0].tolist()) | set(enc.hist[idx, 0].ravel().tolist()),
    }
    for table, ids in present.items():
        grad = model.emb.tables[table].weight.grad
        touched = set(torch.nonzero(grad.abs().sum(-1)).squeeze(1).tolist())
        assert touched == ids - {0}, table


def test_mba_l2_trains_and_shrinks_embeddings(
    tiny_config: Config, tiny_prep: Prepared, tmp_path: Path
) -> None:
    from training.train import load_run

    norms = {}
    for weight in (0.0, 1.0):
        cfg = tiny_config("din", model__mba_l2=weight)
        metrics = train(cfg, tmp_path / str(weight), prep=tiny_prep, progress=False)
        first = metrics["history"][0]
        assert np.isfinite(first["train_loss"])
        assert np.isfinite(metrics["test"]["logloss"])
        # train_logloss is the click BCE alone: the objective (train_loss) holds the
        # penalty besides (a training review: DIEN's aux_loss made it ~3x the val logloss)
        if weight:
            assert first["train_loss"] > first["train_logloss"] + 1e-3, first
        else:
            assert first["train_loss"] == pytest.approx(first["train_logloss"], rel=1e-9)
        _, _, model, _ = load_run(tmp_path / str(weight))
        norms[weight] = model.emb.tables["item_id"].weight[2:].norm().item()
    assert norms[1.0] < 0.9 * norms[0.0]


def test_dice_in_eval_is_the_paper_formula_on_running_statistics() -> None:
    """Dice's eval form (folded into 6 element-wise ops for export) equals
    ``p*x + (1-p)*alpha*x`` with ``p = sigmoid(BN(x))`` from torch's own BatchNorm in eval
    mode, for leading shapes [B, H] and [B, L, H]."""
    from training.modules import Dice

    torch.manual_seed(3)
    dice = Dice(24)
    with torch.no_grad():
        dice.alpha.uniform_(-0.5, 0.8)
    dice.train()
    for _ in range(5):  # move the running statistics away from (0, 1)
        dice(torch.randn(64, 24) * 2.0 + 0.7)
    dice.eval()
    for shape in ((33, 24), (7, 50, 24)):
        x = torch.randn(*shape) * 3.0
        p = torch.sigmoid(dice.bn(x.reshape(-1, 24)).reshape(shape))
        want = p * x + (1.0 - p) * dice.alpha * x
        got = dice(x)
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)
        assert not torch.allclose(got, torch.sigmoid(x) * x, atol=1e-3)  # not a plain swish


def test_dien_negatives_compare_on_the_item_id_wherever_the_sequences_list_it() -> None:
    """The item ID's sequence decides whether a negative is the behaviour itself, not the
    first sequence: with the categories listed first (``item_key`` naming the item), a
    negative is never the clicked item but may share its category (compared on the
    first field, no negative could, which made the auxiliary task easier). Where no
    sequence holds the item ID (Alimama), whole rows are compared."""
    from tests.conftest import CONFIGS, tiny_raw

    raw = tiny_raw("dien")
    seqs = [f for f in raw["features"] if f["kind"] == "sequence"]
    others = [f for f in raw["features"] if f["kind"] != "sequence"]
    assert negative_key(FeatureConfig.model_validate(raw)) == (0,)
    cate_first = {**raw, "features": others + seqs[::-1], "item_key": "item_id"}
    assert negative_key(FeatureConfig.model_validate(cate_first)) == (1,)
    assert negative_key(load_config(CONFIGS / "alimama_din.yaml")) == (0, 1)
    # 30 items in 3 categories, the category first
    pool = np.stack([np.arange(30) % 3 + 2, np.arange(30) + 10], axis=1)
    rng = np.random.default_rng(0)
    rows = pool[rng.integers(0, 30, size=(500, 8))]  # [B, L, 2]
    hist = np.ascontiguousarray(rows.transpose(0, 2, 1))  # [B, 2, L]
    hist_len = np.full(500, 8)
    neg = sample_negatives(pool, hist, hist_len, 8, np.random.default_rng(1), key=(1,))
    assert (neg[:, 1] != hist[:, 1]).all()  # never the clicked item
    same_cate = float((neg[:, 0] == hist[:, 0]).mean())
    assert 0.25 < same_cate < 0.4  # about 9 of the 29 other items share its category
    whole = sample_negatives(pool, hist, hist_len, 8, np.random.default_rng(1), key=(0, 1))
    assert (whole != hist).any(axis=1).all()  # no negative is the behaviour's whole row


def test_dien_negatives_are_never_the_behaviour_they_stand_against() -> None:
    """Every negative differs from the real behaviour at its position (the auxiliary loss
    would otherwise be told a click is not one); draws that miss it are the seed's."""
    pool = np.stack([np.arange(2, 7), np.arange(12, 17)], axis=1)  # 5 items, 2 fields
    rng = np.random.default_rng(0)
    hist = np.zeros((400, 2, 6), dtype=np.int64)
    hist[:, 0] = rng.integers(2, 7, size=(400, 6))
    hist[:, 1] = hist[:, 0] + 10
    hist_len = rng.integers(0, 7, size=400)
    neg = sample_negatives(pool, hist, hist_len, 6, np.random.default_rng(1), key=(0,))
    real = np.arange(6)[None, :] < hist_len[:, None]
    assert (neg[:, 0][real] != hist[:, 0][real]).all()
    assert (neg[:, 1] == np.where(real, neg[:, 0] + 10, 0)).all()  # whole pool rows
    assert (neg[:, 0][~real] == 0).all()
    plain = pool[np.random.default_rng(1).integers(0, 5, size=(400, 6)), 0]
    kept = plain != hist[:, 0]
    assert (neg[:, 0][kept & real] == plain[kept & real]).all()
    assert (~kept & real).sum() > 100  # a fifth of the draws hit: the case is exercised


def test_deepfm_without_user_side_sparse_features_and_with_dropout(tiny_config: Config) -> None:
    """DeepFM trains and scores with no user- or context-side sparse feature (its
    first-order user term is then zero; it used to fail on ``sum([])``), and its MLP
    takes ``model.dropout`` like every other model's."""
    from ctr.bundle import random_inputs
    from tests.conftest import tiny_raw
    from training.export import ExportWrapper

    raw = tiny_raw("deepfm", model__dropout=0.5)
    drop = {f["name"] for f in raw["features"] if f["kind"] == "sparse" and f["side"] != "item"}
    raw["features"] = [f for f in raw["features"] if f["name"] not in drop]
    raw["groups"] = [
        {**g, "features": [n for n in g["features"] if n not in drop]} for g in raw["groups"]
    ]
    raw["groups"] = [g for g in raw["groups"] if g["features"]]
    cfg = FeatureConfig.model_validate(raw)
    assert not cfg.user_sparse
    sizes = {t.name: 30 for t in cfg.tables}
    model = build_model(cfg, sizes)
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.5 for m in model.mlp.modules())
    feed = random_inputs(cfg, sizes, 3, 11, None, np.random.default_rng(0))
    assert "user_sparse" not in feed  # the graph has no such input
    wrapper = ExportWrapper(model)  # fills the inputs the graph lacks, as in serving
    args = [torch.from_numpy(v) for v in feed.values()]
    wrapper.train()
    wrapper(*args)[0].sigmoid().mean().backward()
    logits, probs = wrapper.eval()(*args)
    assert logits.shape == (11,) and torch.isfinite(logits).all()


def test_two_sequences_sharing_one_item_feature_are_refused() -> None:
    """Two behaviour sequences over the same item feature (clicks and carts, both
    ``shared_with: item_id``) trained apart, but a stored behaviour holds one ``item_id``
    (``ctr load``, ``POST /v1/events``): the service fed both groups the same history,
    silently (max |served - offline| 1.6e-4 after one epoch). The config is refused."""
    from pydantic import ValidationError

    from tests.conftest import tiny_raw

    raw = tiny_raw("dien")
    raw["features"].append({"name": "hist_cart", "kind": "sequence", "shared_with": "item_id"})
    for g in raw["groups"]:
        if g["type"] == "sequence":
            g["features"].append("hist_cart")
    with pytest.raises(ValidationError, match="'hist_item_id' and 'hist_cart' share 'item_id'"):
        FeatureConfig.model_validate(raw)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_oov_and_padding_rows_start_at_zero(
    tiny_config: Config, tiny_prep: Prepared, model_type: str
) -> None:
    """Every table's PAD (0) and OOV (1) rows start at zero; the other rows are random.
    An ID unseen in training then scores by a neutral vector, not by an untrained random
    one (every training value is in the vocabulary, so only missing values train OOV)."""
    from ctr.mapping import OOV, PAD

    torch.manual_seed(0)
    model = build_model(tiny_config(model_type), tiny_prep.mapper.table_sizes())
    for name, emb in model.emb.tables.items():
        w = emb.weight.detach()
        assert not w[PAD].any() and not w[OOV].any(), name
        assert (w[2:].abs().sum(1) > 0).all(), name


def no_user_features_config(model_type: str) -> FeatureConfig:
    """The tiny config without any user- or context-side sparse or dense feature."""
    from tests.conftest import tiny_raw

    raw = tiny_raw(model_type)
    drop = {f["name"] for f in raw["features"] if f["kind"] != "sequence" and f["side"] != "item"}
    raw["features"] = [f for f in raw["features"] if f["name"] not in drop]
    raw["groups"] = [
        {**g, "features": [n for n in g["features"] if n not in drop]} for g in raw["groups"]
    ]
    raw["groups"] = [g for g in raw["groups"] if g["features"]]
    return FeatureConfig.model_validate(raw)


@pytest.mark.parametrize("model_type", ["base", "din", "dien"])
def test_models_without_user_features_train_and_export(model_type: str, tmp_path: Path) -> None:
    """A config without user/context features (which the spec accepts) has a ``[U, 0]``
    user part: the models used to fail on ``torch.cat([])``. They train, their MLP
    widths add up, and the exported graph (no user inputs) agrees with torch."""
    from training.dataset import prepare
    from training.export import export_onnx, parity_gate

    cfg = no_user_features_config(model_type)
    assert not cfg.user_sparse and not cfg.user_dense
    prep = prepare(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, prep.mapper.table_sizes())
    assert model.user_width == 0
    batch = prep.train.batch(np.arange(32))
    assert model.user_deep(batch).shape == (32, 0)
    if model_type == "dien":
        batch["neg_hist"] = torch.from_numpy(
            sample_negatives(prep.item_pool, batch["hist"].numpy(), batch["hist_len"].numpy(),
                             cfg.max_seq_len, np.random.default_rng(0),
                             key=negative_key(cfg))
        )  # fmt: skip
    out = model.train()(batch)
    loss = out["logits"].sigmoid().mean() + out.get("aux_loss", torch.zeros(()))
    loss.backward()
    assert torch.isfinite(out["logits"]).all() and out["logits"].shape == (32,)
    path = tmp_path / "model.onnx"
    export_onnx(model, path)
    report = parity_gate(model, path, n_values=(1, 7))
    assert report.ok and report.max_abs_diff <= 1e-5, report.cases


def test_the_item_id_is_the_first_sequence_target_or_item_key(tiny_prep: Prepared) -> None:
    """A candidate's ID (the API's item_id, the key of DIEN's negative pool and of stored
    behaviours) is the feature the first sequence shares, whatever the order of the item
    features; ``item_key`` names it where the sequences list another one first (listing
    ``hist_cate_id`` first without it made the category the key: the negative pool kept
    one item per category)."""
    from pydantic import ValidationError

    from tests.conftest import CONFIGS, tiny_raw
    from training.dataset import item_pool

    raw = tiny_raw("dien")
    seqs = [f for f in raw["features"] if f["kind"] == "sequence"]
    others = [f for f in raw["features"] if f["kind"] != "sequence"]
    items = [f for f in others if f.get("side") == "item" and f["kind"] == "sparse"]
    rest = [f for f in others if f not in items]
    assert [f["name"] for f in seqs] == ["hist_item_id", "hist_cate_id"]
    # the item features' order does not matter
    flipped = FeatureConfig.model_validate({**raw, "features": rest + items[::-1] + seqs})
    assert flipped.item_id_feature.name == "item_id"
    # the sequences' order does, unless item_key says which
    cate_first = {**raw, "features": others + seqs[::-1]}
    assert FeatureConfig.model_validate(cate_first).item_id_feature.name == "cate_id"
    keyed = FeatureConfig.model_validate({**cate_first, "item_key": "item_id"})
    assert keyed.item_id_feature.name == "item_id"
    frame = tiny_prep.frames["train"]
    assert len(item_pool(keyed, tiny_prep.mapper, frame)) == frame["item_id"].nunique()
    by_category = item_pool(FeatureConfig.model_validate(cate_first), tiny_prep.mapper, frame)
    assert len(by_category) == frame["cate_id"].nunique() < frame["item_id"].nunique()
    for bad in ("age_bucket", "hist_item_id", "no_such_feature"):
        with pytest.raises(ValidationError, match="item_key"):
            FeatureConfig.model_validate({**raw, "item_key": bad})
    # every shipped config keys candidates by the item ID: by default where its first
    # sequence is the item IDs', by item_key where the histories hold none (Alimama)
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.item_id_feature.name == "item_id", path


def test_dien_aux_network_widths_come_from_the_config(tiny_config: Config) -> None:
    """``model.aux_hidden`` sets DIEN's auxiliary network (default: the official code's
    [100, 50], so older configs and manifests build the same model); widths must be
    positive."""
    from pydantic import ValidationError

    sizes = {t: 30 for t in ("user_id", "age_bucket", "hour", "item_id", "cate_id")}
    model = build_model(tiny_config("dien", model__aux_hidden=[24, 6]), sizes)
    widths = [m.out_features for m in model.aux.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [24, 6] and model.aux_head.in_features == 6
    default = build_model(tiny_config("dien"), sizes)
    widths = [m.out_features for m in default.aux.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [100, 50]
    for bad in ([0], [16, -1]):
        with pytest.raises(ValidationError, match="aux_hidden"):
            tiny_config("dien", model__aux_hidden=bad)


def test_overrides_reach_into_lists_by_position() -> None:
    """``--set features.0.mapping.buckets=N``: a list's item by its position (how the
    memory benchmark widens an embedding table); a position past the end says so."""
    path = Path(__file__).resolve().parents[1] / "configs" / "synthetic_din.yaml"
    config = load_config(path, {"features.0.mapping.buckets": 123, "train.epochs": 1})
    assert config.features[0].name == "user_id" and config.features[0].mapping.buckets == 123
    assert config.train.epochs == 1
    with pytest.raises(ValueError, match="not a position"):
        load_config(path, {"features.99.embedding_dim": 4})
    with pytest.raises(ValueError, match="not a position"):
        load_config(path, {"features.x.embedding_dim": 4})


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"model.attention_mlp": []}, "attention_mlp needs at least one layer for a din"),
        ({"model.attention_mlp": [80, 0]}, "model.attention_mlp.1"),
        ({"model.mlp": [0]}, "model.mlp.0"),
        ({"model.tower_mlp": [-4]}, "model.tower_mlp.0"),
        ({"model.gru_dim": 0}, "model.gru_dim"),
    ],
)
def test_a_layer_width_of_zero_or_no_attention_layer_is_refused(
    override: dict[str, object], field: str
) -> None:
    """Widths come from the config: one that would build a zero-width layer, or an
    attention MLP with no layer (which the activation unit cannot build), is an error
    naming the field, not a crash or a degenerate model."""
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_config(Path(__file__).resolve().parents[1] / "configs/synthetic_din.yaml", override)


@pytest.mark.parametrize(
    "model", [{"type": "deepfm"}, {"type": "base"}, {"type": "dien", "dien_attention": "bilinear"}]
)
def test_a_model_without_an_attention_mlp_may_leave_it_empty(model: dict[str, str]) -> None:
    """Models that build no activation unit never read ``attention_mlp``: a bundle of one
    saved with ``[]`` still loads."""
    override = {"model.attention_mlp": [], **{f"model.{k}": v for k, v in model.items()}}
    path = Path(__file__).resolve().parents[1] / "configs/synthetic_din.yaml"
    assert load_config(path, override).model.attention_mlp == []


def test_deepfm_mean_pools_over_the_positions_it_sums(
    tiny_config: Callable[..., FeatureConfig], tiny_prep: object
) -> None:
    """A hist_len past L (a raw graph input; the service caps it) divided the sum of L
    positions by more: the mean shrank. It divides by the positions summed."""
    config = tiny_config("deepfm")
    sizes = tiny_prep.mapper.table_sizes()  # type: ignore[attr-defined]
    model = build_model(config, sizes).eval()
    from training.export import ExportWrapper

    feed = random_inputs(config, sizes, 2, 5, None, np.random.default_rng(4))
    wrapper = ExportWrapper(model).eval()  # fills the inputs the graph lacks

    def logits(hist_len: int) -> torch.Tensor:
        x = {**feed, "hist_len": np.full_like(feed["hist_len"], hist_len)}
        with torch.no_grad():
            return wrapper(*[torch.from_numpy(v) for v in x.values()])[0]

    assert torch.equal(logits(config.max_seq_len), logits(config.max_seq_len + 30))


@pytest.mark.parametrize("on", [True, False])
def test_deepfm_first_order_weighs_the_history(
    on: bool, tiny_config: Callable[..., FeatureConfig], tiny_prep: object
) -> None:
    """The paper's first order covers multi-valued fields: a sequence field adds the mean
    of its behaviours' first-order weights (the term was missing). Raising one history
    item's weight by 1 raises the logit of a user with that item at ``k`` of its ``n``
    real steps by ``k / n``; off (runs trained before it), it moves nothing."""
    config = tiny_config("deepfm", model__deepfm_sequence_first_order=on)
    sizes = tiny_prep.mapper.table_sizes()  # type: ignore[attr-defined]
    model = build_model(config, sizes).eval()
    feed = random_inputs(config, sizes, 3, 9, None, np.random.default_rng(5))
    x = {k: torch.from_numpy(v) for k, v in feed.items()}
    x.setdefault("user_dense", torch.zeros(3, len(config.user_dense)))  # as the graph fills
    x.setdefault("item_dense", torch.zeros(9, len(config.item_dense)))
    s, f = 0, config.sequences[0]
    n = torch.tensor([4, 0, config.max_seq_len])  # one user with no history
    x["hist_len"] = n
    item = 7
    hist = x["hist"].clone()
    hist[:, s] = 9  # every real step another item
    hist[0, s, [0, 2]] = item  # user 0: 2 of 4 steps
    hist[0, s, 5] = item  # past hist_len: not counted
    hist[2, s, :3] = item  # user 2: 3 of L
    x["hist"] = hist
    with torch.no_grad():
        before = model(x)["logits"]
        model.first_order[config.table_of(f.name)].weight[item] += 1.0  # type: ignore[index]
        after = model(x)["logits"]
    per_user = torch.tensor([2 / 4, 0.0, 3 / config.max_seq_len]) if on else torch.zeros(3)
    torch.testing.assert_close(after - before, per_user[x["user_idx"]], atol=1e-5, rtol=0)


@pytest.mark.parametrize("on", [True, False])
def test_din_final_mlp_reads_candidate_times_interest(
    on: bool, tiny_config: Callable[..., FeatureConfig], tiny_prep: object
) -> None:
    """The official DIN code feeds its MLP [interest, item, interest * item]; this DIN
    read no product (a review against the reference code). ``din_interaction: false``
    keeps the old input for runs trained before it; the multi-tower DIN (TorchEasyRec's)
    has none either way."""
    config = tiny_config("din", model__din_interaction=on)
    sizes = tiny_prep.mapper.table_sizes()  # type: ignore[attr-defined]
    model = build_model(config, sizes).eval()
    feed = random_inputs(config, sizes, 3, 9, None, np.random.default_rng(6))
    x = {k: torch.from_numpy(v) for k, v in feed.items()}
    x.setdefault("user_dense", torch.zeros(3, len(config.user_dense)))
    x.setdefault("item_dense", torch.zeros(9, len(config.item_dense)))
    seen: list[torch.Tensor] = []
    model.mlp.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    with torch.no_grad():
        model(x)
        g = model.groups[0]  # type: ignore[attr-defined]
        q = model.emb.query(g, x["item_sparse"])
        keys = model.emb.sequence(g, x["hist"])
        pooled, _ = model.att[0](q, keys, x["user_idx"], model.mask(x))  # type: ignore[index]
    d = q.shape[1]
    start = model.user_width + model.item_width
    torch.testing.assert_close(seen[0][:, start : start + d], pooled)
    if on:
        torch.testing.assert_close(seen[0][:, start + d : start + 2 * d], q * pooled)
    assert seen[0].shape[1] == start + d * (2 if on else 1)  # one group in this config
    mt = build_model(tiny_config("multi_tower_din", model__din_interaction=on), sizes)
    assert mt.interaction is False  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda r: r["features"].append({"name": "clicked", "kind": "dense", "side": "item",
                                         "column": "label"}),
         "read the label column 'label'"),
        (lambda r: r["train"].update(eval_batch_size=0), "eval_batch_size"),
        (lambda r: r["train"].update(weight_decay=-0.1), "weight_decay"),
        (lambda r: r["train"].update(lr=float("inf")), "lr"),
        (lambda r: r["data"].update(seq_delimiter=""), "seq_delimiter"),
        (lambda r: r["groups"].append({"name": "empty", "type": "deep", "features": []}),
         "features"),
    ],
)  # fmt: skip
def test_configs_that_trained_into_trouble_are_refused(edit: Any, says: str) -> None:
    """Each of these validated, then trained to a leaked AUC of 1.0, failed after a
    whole epoch, in torch, or at export: refused at once, naming the field."""
    from pydantic import ValidationError

    from tests.conftest import tiny_raw

    raw = tiny_raw("din")
    raw.setdefault("train", {})
    raw.setdefault("data", {})
    edit(raw)
    with pytest.raises(ValidationError, match=says):
        FeatureConfig.model_validate(raw)


def test_multi_tower_din_refuses_a_feature_in_no_deep_group() -> None:
    """Its towers read features through the deep groups only: a feature left out of
    them trained and was served, and never read (its logits moved by 0.0)."""
    from pydantic import ValidationError

    from tests.conftest import tiny_raw

    raw = tiny_raw("multi_tower_din")
    deep = [g for g in raw["groups"] if g["type"] == "deep"]
    name = deep[0]["features"].pop()
    with pytest.raises(ValidationError, match=f"feature '{name}' is in no deep group"):
        FeatureConfig.model_validate(raw)


def test_an_override_of_a_yaml_alias_changes_that_place_only(tmp_path: Path) -> None:
    """PyYAML gives every *alias the one object: --set on one feature's mapping changed
    every feature that shared the anchor."""
    from ctr.spec import load_config

    text = (Path(__file__).resolve().parents[1] / "configs" / "synthetic_din.yaml").read_text()
    text = text.replace("mapping: {type: hash, buckets: 5000}}",
                        "mapping: &hm {type: hash, buckets: 5000}}", 1)  # fmt: skip
    text = text.replace("{name: cate_id, kind: sparse, side: item, embedding_dim: 8}",
                        "{name: cate_id, kind: sparse, side: item, embedding_dim: 8, "
                        "mapping: *hm}", 1)  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert load_config(path).feature("cate_id").mapping.buckets == 5000  # the alias holds
    config = load_config(path, {"features.0.mapping.buckets": 100})
    assert config.features[0].mapping.buckets == 100
    assert config.feature("cate_id").mapping.buckets == 5000


def test_a_recorded_zero_thread_count_still_loads() -> None:
    """0 meant torch's default before train.threads was refused below 1: bundles and
    runs that recorded it must still load (the service stayed not-ready on them)."""
    from tests.conftest import tiny_raw

    raw = tiny_raw("din")
    raw.setdefault("train", {})["threads"] = 0
    assert FeatureConfig.model_validate(raw).train.threads is None
