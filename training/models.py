"""CTR models: Base (sum pooling), DeepFM, DIN, multi-tower DIN and DIEN.

Every model takes the graph layout of :mod:`ctr.encode` plus ``user_idx``:

* ``user_sparse [U, Fu]``, ``user_dense [U, Du]``, ``hist [U, S, L]``, ``hist_len [U]``
* ``item_sparse [N, Fi]``, ``item_dense [N, Di]``, ``user_idx [N]`` (row of U per candidate)

User-side work runs on U rows and is gathered to N inside the graph, so a request's
history enters once however many candidates it has. ``forward`` returns a dict with
``logits [N]`` (no sigmoid: that lives in the export wrapper), optionally
``attention [N, L]`` and, in training with ``neg_hist``, DIEN's ``aux_loss`` (a mean
over ``aux_steps`` steps).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from ctr import native
from ctr.spec import FeatureConfig
from training.modules import (
    MLP,
    DenseClip,
    DINAttention,
    EmbeddingCollection,
    check_table_names,
    masked_softmax,
    sequence_mask,
)

Inputs = dict[str, Tensor]


class CTRModel(nn.Module):
    """Shared plumbing: embeddings and the user/item deep parts, widths from the config."""

    def __init__(self, config: FeatureConfig, table_sizes: dict[str, int]) -> None:
        super().__init__()
        self.config = config
        self.emb = EmbeddingCollection(config, table_sizes)
        self.user_width = sum(f.embedding_dim for f in config.user_sparse) + len(config.user_dense)
        self.item_width = sum(f.embedding_dim for f in config.item_sparse) + len(config.item_dense)
        # the dense inputs clamped to the training split's range (train.clip_dense)
        self.user_clip = DenseClip(len(config.user_dense))
        self.item_clip = DenseClip(len(config.item_dense))

    head: nn.Linear  # the last layer, [*, width] -> [*, 1]: its bias is the logits' offset

    def init_bias(self, rate: float) -> None:
        """Start the output bias at ``logit(rate)``, the training split's share of label
        1, so that a model before training (or stopped after a few steps) predicts that
        rate: PyTorch's default start is about 0, a probability near 0.5 (train.init_bias)."""
        rate = min(max(rate, 1e-6), 1.0 - 1e-6)
        with torch.no_grad():
            self.head.bias.fill_(math.log(rate / (1.0 - rate)))

    def seq_width(self, names: list[str]) -> int:
        return sum(self.config.embedding_dim(n) for n in names)

    def user_deep(self, x: Inputs) -> Tensor:
        """``[U, user_width]``; ``[U, 0]`` for a config without user or context features."""
        parts = self.emb.fields(self.config.user_sparse, x["user_sparse"])
        if self.config.user_dense:
            parts.append(x["user_dense"])
        if not parts:
            return x["hist_len"].new_zeros((x["hist_len"].shape[0], 0), dtype=torch.float32)
        return torch.cat(parts, dim=-1)

    def item_deep(self, x: Inputs) -> Tensor:
        """``[N, item_width]``."""
        parts = self.emb.fields(self.config.item_sparse, x["item_sparse"])
        if self.config.item_dense:
            parts.append(x["item_dense"])
        return torch.cat(parts, dim=-1)

    def mask(self, x: Inputs) -> Tensor:
        """``hist_len [U]`` -> bool ``[U, L]``, True at real history positions."""
        return sequence_mask(x["hist_len"], self.config.max_seq_len)

    def set_dense_range(self, user: tuple[Tensor, Tensor], item: tuple[Tensor, Tensor]) -> None:
        """Clamp ``user_dense`` to ``user = (lo [Du], hi [Du])`` and ``item_dense`` to
        ``item`` (:class:`~training.modules.DenseClip`); a side without dense features
        takes empty tensors."""
        self.user_clip.set(*user)
        self.item_clip.set(*item)

    def dense_range(self) -> dict[str, list[float]]:
        """``{feature: [lo, hi]}`` for every clamped dense feature (what the manifest's
        ``dense_range`` records); empty while no bound is set."""
        out: dict[str, list[float]] = {}
        for feats, clip in ((self.config.user_dense, self.user_clip),
                            (self.config.item_dense, self.item_clip)):  # fmt: skip
            bounds = clip.bounds()
            if bounds is not None:
                for f, (lo, hi) in zip(feats, bounds, strict=True):
                    out[f.name] = [lo, hi]
        return out

    def forward(self, x: Inputs) -> dict[str, Tensor]:
        """The dense inputs clamped (where bounds are set), then :meth:`score`."""
        if self.user_clip.bounded or self.item_clip.bounded:
            x = {**x, "user_dense": self.user_clip(x["user_dense"]),
                 "item_dense": self.item_clip(x["item_dense"])}  # fmt: skip
        return self.score(x)

    def score(self, x: Inputs) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


def masked_sum(seq: Tensor, mask: Tensor) -> Tensor:
    """``seq [U, L, D]``, ``mask [U, L]`` -> ``[U, D]``; padded positions add exactly 0."""
    return (seq * mask.unsqueeze(-1).to(seq.dtype)).sum(dim=1)


class BaseModel(CTRModel):
    """Embedding & MLP: behaviours sum-pooled per user, no candidate interaction."""

    def __init__(self, config: FeatureConfig, table_sizes: dict[str, int]) -> None:
        super().__init__(config, table_sizes)
        self.groups = [g.features for g in config.sequence_groups()]
        width = self.user_width + self.item_width + sum(self.seq_width(g) for g in self.groups)
        self.mlp = MLP(width, config.model.mlp, config.model.activation, config.model.dropout)
        self.head = nn.Linear(self.mlp.out_dim, 1)

    def score(self, x: Inputs) -> dict[str, Tensor]:
        mask = self.mask(x)
        user = [self.user_deep(x)]
        user += [masked_sum(self.emb.sequence(g, x["hist"]), mask) for g in self.groups]
        u = torch.cat(user, dim=-1).index_select(0, x["user_idx"])
        h = self.mlp(torch.cat([u, self.item_deep(x)], dim=-1))
        return {"logits": self.head(h).squeeze(-1)}


class DeepFM(CTRModel):
    """First order + FM second order + deep MLP over the same field embeddings.

    Fields: every sparse feature, every sequence field (masked mean), every dense
    feature (a learned vector times its value). Fields narrower than the FM width (the
    widest sparse embedding, so none is wider) get a bias-free projection. The first order
    weighs every field too: a sequence field by the mean of its behaviours' weights
    (the paper's multi-valued field; ``model.deepfm_sequence_first_order``, off for runs
    trained before session 35, which had no such term).
    """

    def __init__(self, config: FeatureConfig, table_sizes: dict[str, int]) -> None:
        super().__init__(config, table_sizes)
        self.k = max(f.embedding_dim for f in config.tables)
        sparse = config.user_sparse + config.item_sparse
        self.proj = nn.ModuleDict(
            {
                f.name: nn.Linear(config.embedding_dim(f.name), self.k, bias=False)
                for f in sparse + config.sequences
                if config.embedding_dim(f.name) != self.k
            }
        )
        self.dense_user = nn.Parameter(torch.randn(len(config.user_dense), self.k) * 0.05)
        self.dense_item = nn.Parameter(torch.randn(len(config.item_dense), self.k) * 0.05)
        self.first_order = nn.ModuleDict(
            {t.name: nn.Embedding(table_sizes[t.name], 1, padding_idx=0) for t in config.tables}
        )
        for e in self.first_order.values():
            nn.init.zeros_(e.weight)
        n_fields = len(sparse) + len(config.sequences) + len(config.user_dense)
        n_fields += len(config.item_dense)
        with warnings.catch_warnings():  # no dense feature: a weight of 0 columns, fine
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            self.dense_linear = nn.Linear(len(config.user_dense) + len(config.item_dense), 1)
        self.mlp = MLP(
            n_fields * self.k, config.model.mlp, config.model.activation, config.model.dropout
        )
        self.head = nn.Linear(self.mlp.out_dim, 1)

    def init_bias(self, rate: float) -> None:
        """As :meth:`CTRModel.init_bias`, and the dense first-order term starts at 0 (as
        the sparse ones do): PyTorch's random start of ``dense_linear`` moved the logits'
        offset by up to about 1.6 with one dense feature (0.2x to 2.6x the base rate by
        seed: diff review, session 45)."""
        super().init_bias(rate)
        with torch.no_grad():
            self.dense_linear.weight.zero_()
            self.dense_linear.bias.zero_()

    def _p(self, name: str, e: Tensor) -> Tensor:
        return self.proj[name](e) if name in self.proj else e

    def score(self, x: Inputs) -> dict[str, Tensor]:
        c = self.config
        idx = x["user_idx"]
        mask = self.mask(x)
        # the positions summed (hist_len capped at L: a longer hist_len would shrink it)
        denom = mask.sum(1, keepdim=True).clamp(min=1).to(torch.float32)  # [U, 1]
        user_fields = [
            self._p(f.name, e)
            for f, e in zip(
                c.user_sparse, self.emb.fields(c.user_sparse, x["user_sparse"]), strict=True
            )
        ]
        for s, f in enumerate(c.sequences):
            seq = self.emb.table(f.name)(x["hist"][:, s])
            user_fields.append(self._p(f.name, masked_sum(seq, mask) / denom))
        for j in range(len(c.user_dense)):
            user_fields.append(x["user_dense"][:, j : j + 1] * self.dense_user[j])
        fields = [t.index_select(0, idx) for t in user_fields]
        item_embs = self.emb.fields(c.item_sparse, x["item_sparse"])
        fields += [self._p(f.name, e) for f, e in zip(c.item_sparse, item_embs, strict=True)]
        for j in range(len(c.item_dense)):
            fields.append(x["item_dense"][:, j : j + 1] * self.dense_item[j])
        stack = torch.stack(fields, dim=1)  # [N, F, k]
        fm = 0.5 * (stack.sum(1).pow(2) - stack.pow(2).sum(1)).sum(-1)  # [N]
        first_u = sum(  # [U]; zeros when there is no user-side sparse feature
            (
                self.first_order[f.name](x["user_sparse"][:, j]).squeeze(-1)
                for j, f in enumerate(c.user_sparse)
            ),
            x["hist_len"].new_zeros(x["hist_len"].shape, dtype=torch.float32),
        )
        if c.model.deepfm_sequence_first_order:
            real = mask.to(torch.float32)  # [U, L]
            for s, f in enumerate(c.sequences):
                w = self.first_order[c.table_of(f.name)](x["hist"][:, s]).squeeze(-1)  # [U, L]
                first_u = first_u + (w * real).sum(1) / denom.squeeze(1)
        first_i = sum(  # [N]
            (
                self.first_order[f.name](x["item_sparse"][:, j]).squeeze(-1)
                for j, f in enumerate(c.item_sparse)
            ),
            idx.new_zeros(idx.shape, dtype=torch.float32),
        )
        first = first_u.index_select(0, idx) + first_i
        if c.user_dense or c.item_dense:
            dense = torch.cat([x["user_dense"].index_select(0, idx), x["item_dense"]], dim=-1)
            first = first + self.dense_linear(dense).squeeze(-1)
        deep = self.head(self.mlp(stack.flatten(1))).squeeze(-1)
        return {"logits": first + fm + deep}


class DIN(CTRModel):
    """Deep Interest Network: one attention unit per behaviour group, then an MLP over
    [user, candidate, pooled interest per group, candidate x pooled interest per group]
    (the product: the official DIN code's ``u_emb * i_emb``; ``model.din_interaction``,
    off for runs trained before session 35)."""

    def __init__(self, config: FeatureConfig, table_sizes: dict[str, int]) -> None:
        super().__init__(config, table_sizes)
        m = config.model
        self.groups = [g.features for g in config.sequence_groups()]
        self.att = nn.ModuleList(
            DINAttention(self.seq_width(g), m.attention_mlp, m.attention_act, m.attention_softmax)
            for g in self.groups
        )
        pooled_width = sum(self.seq_width(g) for g in self.groups)
        width = self.user_width + self.item_width + pooled_width * (2 if self.interaction else 1)
        self.mlp = MLP(width, m.mlp, m.activation, m.dropout)
        self.head = nn.Linear(self.mlp.out_dim, 1)

    @property
    def interaction(self) -> bool:
        return self.config.model.din_interaction

    def interests(self, x: Inputs) -> tuple[list[Tensor], Tensor | None]:
        """Per group, the attention-pooled interest ``[N, D_g]`` and, with
        ``din_interaction``, the candidate's query times it ``[N, D_g]``; group 0's
        weights ``[N, L]``."""
        mask = self.mask(x)
        pooled, products, first_w = [], [], None
        for g, att in zip(self.groups, self.att, strict=True):
            keys = self.emb.sequence(g, x["hist"])
            q = self.emb.query(g, x["item_sparse"])
            p, w = att(q, keys, x["user_idx"], mask)
            pooled.append(p)
            if self.interaction:
                products.append(q * p)
            first_w = w if first_w is None else first_w
        return pooled + products, first_w

    def score(self, x: Inputs) -> dict[str, Tensor]:
        pooled, w = self.interests(x)
        u = self.user_deep(x).index_select(0, x["user_idx"])
        h = self.mlp(torch.cat([u, self.item_deep(x), *pooled], dim=-1))
        out = {"logits": self.head(h).squeeze(-1)}
        if w is not None:
            out["attention"] = w
        return out


class MultiTowerDIN(DIN):
    """TorchEasyRec ``multi_tower_din``: an MLP tower per DEEP group, a DIN tower per
    SEQUENCE group, and a final MLP over the concatenated tower outputs.

    Towers whose features are all user/context side run on U rows, once per user.
    """

    def __init__(self, config: FeatureConfig, table_sizes: dict[str, int]) -> None:
        CTRModel.__init__(self, config, table_sizes)
        m = config.model
        self.groups = [g.features for g in config.sequence_groups()]
        self.att = nn.ModuleList(
            DINAttention(self.seq_width(g), m.attention_mlp, m.attention_act, m.attention_softmax)
            for g in self.groups
        )
        self.deep_groups = [g.features for g in config.deep_groups()]
        self.towers = nn.ModuleList(
            MLP(self._group_width(g), m.tower_mlp, m.activation, m.dropout)
            for g in self.deep_groups
        )
        width = sum(t.out_dim for t in self.towers) + sum(self.seq_width(g) for g in self.groups)
        self.mlp = MLP(width, m.mlp, m.activation, m.dropout)
        self.head = nn.Linear(self.mlp.out_dim, 1)

    @property
    def interaction(self) -> bool:
        return False  # TorchEasyRec's DIN tower: the pooled sequence alone

    def _group_width(self, names: list[str]) -> int:
        c = self.config
        return sum(
            c.feature(n).embedding_dim if c.feature(n).kind == "sparse" else 1 for n in names
        )

    def _user_only(self, names: list[str]) -> bool:
        return all(self.config.feature(n).side != "item" for n in names)

    def _group_input(self, names: list[str], x: Inputs, idx: Tensor | None) -> Tensor:
        """Group features in group order; user-side parts gathered to N unless ``idx`` is None."""
        c = self.config
        us = [f.name for f in c.user_sparse]
        ud = [f.name for f in c.user_dense]
        its = [f.name for f in c.item_sparse]
        itd = [f.name for f in c.item_dense]
        parts = []
        for n in names:
            if n in us:
                t = self.emb.table(n)(x["user_sparse"][:, us.index(n)])
            elif n in ud:
                t = x["user_dense"][:, ud.index(n) : ud.index(n) + 1]
            elif n in its:
                parts.append(self.emb.table(n)(x["item_sparse"][:, its.index(n)]))
                continue
            else:
                parts.append(x["item_dense"][:, itd.index(n) : itd.index(n) + 1])
                continue
            parts.append(t if idx is None else t.index_select(0, idx))
        return torch.cat(parts, dim=-1)

    def score(self, x: Inputs) -> dict[str, Tensor]:
        idx = x["user_idx"]
        outs = []
        for g, tower in zip(self.deep_groups, self.towers, strict=True):
            if self._user_only(g):
                outs.append(tower(self._group_input(g, x, None)).index_select(0, idx))
            else:
                outs.append(tower(self._group_input(g, x, idx)))
        pooled, w = self.interests(x)
        h = self.mlp(torch.cat([*outs, *pooled], dim=-1))
        out = {"logits": self.head(h).squeeze(-1)}
        if w is not None:
            out["attention"] = w
        return out


def evolve(
    x_proj: Tensor,
    att: Tensor,
    user_idx: Tensor,
    w: Tensor,
    b: Tensor,
    kind: str,
    mask: Tensor | None = None,
    b_ih: Tensor | None = None,
) -> Tensor:
    """The unrolled attentional GRU. ``x_proj [U, L, 3H]`` (input projection per user,
    bias included, update-gate rows negated), ``att [N, L]``, ``user_idx [N]``,
    ``w [3H, H]`` and ``b [3H]`` (recurrent weights and bias, same signs); AIGRU also
    takes ``mask [U, L]`` and the input bias ``b_ih [3H]``.
    Returns the final hidden state ``[N, H]``."""
    hd = w.shape[1]
    x_proj = x_proj.index_select(0, user_idx)  # [N, L, 3H]
    if kind == "aigru":  # scale the input by attention per candidate: a*(W h) + b_ih
        assert b_ih is not None
        x_proj = att.unsqueeze(-1) * (x_proj - b_ih) + b_ih
    w_ru, w_n = w[: 2 * hd].t(), w[2 * hd :].t()  # [H, 2H], [H, H]
    x_ru = (x_proj[..., : 2 * hd] + b[: 2 * hd]).unbind(1)  # L x [N, 2H]
    x_n = x_proj[..., 2 * hd :].unbind(1)  # L x [N, H]
    b_n = b[2 * hd :]
    a_t = att.unsqueeze(-1).unbind(1)  # L x [N, 1]
    if kind == "aigru":
        assert mask is not None
        m_t = mask.index_select(0, user_idx).to(x_proj.dtype).unsqueeze(-1).unbind(1)
    h = torch.zeros(user_idx.shape[0], hd, dtype=x_proj.dtype, device=x_proj.device)
    for t in range(len(x_ru)):
        ru = torch.sigmoid(torch.addmm(x_ru[t], h, w_ru))  # [N, 2H]: r, u = 1 - z
        r, u = ru[:, :hd], ru[:, hd:]
        n = torch.tanh(x_n[t] + r * torch.addmm(b_n, h, w_n))
        if kind == "augru":
            u = a_t[t] * u
        elif kind == "agru":
            u = a_t[t]
        else:
            u = u * m_t[t]  # AIGRU: padded steps keep the state
        h = h + u * (n - h)
    return h


class FusedAUGRU(torch.autograd.Function):
    """AUGRU as one ONNX node, ``ctr_ops.AttentionalGRU`` (``native/augru.h``).

    In torch it runs :func:`evolve` step by step; exported, the whole recurrence is one
    node that the project's custom-op library runs as one kernel (CPU and CUDA), where
    the unrolled graph has about 12 nodes per step. Inputs as :func:`evolve`."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: object, x_proj: Tensor, att: Tensor, user_idx: Tensor, w: Tensor, b: Tensor
    ) -> Tensor:
        return evolve(x_proj, att, user_idx, w, b, "augru")

    @staticmethod
    def symbolic(g: object, x_proj: object, att: object, user_idx: object, w: object,
                 b: object) -> object:  # fmt: skip
        out = g.op("ctr_ops::AttentionalGRU", x_proj, att, user_idx, w, b)  # type: ignore[attr-defined]
        out.setType(x_proj.type().with_sizes([None, None]))  # type: ignore[attr-defined]
        return out


class AttentionalGRU(nn.Module):
    """Interest evolving layer: AUGRU (default), AGRU or AIGRU, unrolled over L.

    The input projection ``W_ih h_t`` depends only on the user's interest states, so
    it runs once per user ``[U, L, 3H]``; only the recurrence runs per candidate.
    Inputs: ``states [U, L, H_in]``, ``att [N, L]`` (0 at padding), ``user_idx [N]``,
    ``mask [U, L]``. Returns the final hidden state ``[N, H]``.

    The step is written for few graph nodes, since the unrolled recurrence is most of
    DIEN's serving time: the update-gate rows of both projections are negated once, so
    one sigmoid gives ``r`` and ``u = 1 - z`` together, the r/u pre-activation is one
    ``addmm`` (Gemm with the input term as C) and ``h + u * (n - h)`` replaces
    ``(1 - u) * h + u * n``. Same parameters and the same function as the textbook cell.
    With ``fused`` set (export only; AUGRU), the recurrence becomes one
    :class:`FusedAUGRU` node.
    """

    op = native.OP  # the custom op it exports as, when fused

    def __init__(self, in_dim: int, hidden: int, kind: str) -> None:
        super().__init__()
        self.hidden = hidden
        self.kind = kind
        self.fused = False
        self.w_ih = nn.Linear(in_dim, 3 * hidden)
        self.w_hh = nn.Linear(hidden, 3 * hidden)
        sign = torch.ones(3 * hidden)
        sign[hidden : 2 * hidden] = -1.0
        self.register_buffer("sign", sign, persistent=False)

    @property
    def can_fuse(self) -> bool:
        return self.kind == "augru" and self.hidden <= native.MAX_HIDDEN

    def forward(self, states: Tensor, att: Tensor, user_idx: Tensor, mask: Tensor) -> Tensor:
        sign = self.sign
        # [U, L, 3H], z rows negated: the projection runs once per user
        x_proj = self.w_ih(states) * sign
        w = self.w_hh.weight * sign.unsqueeze(1)  # [3H, H]
        b = self.w_hh.bias * sign
        if self.fused and self.can_fuse:
            return FusedAUGRU.apply(x_proj, att, user_idx, w, b)  # type: ignore[no-any-return]
        return evolve(x_proj, att, user_idx, w, b, self.kind, mask, self.w_ih.bias * sign)


class DIEN(CTRModel):
    """Deep Interest Evolution Network (first behaviour group).

    GRU interest extractor (once per user) -> attention of each candidate over the
    interest states (an activation unit with softmax, as in the official code's
    ``din_fcn_attention``) -> attentional GRU evolution (per candidate) -> MLP. In training,
    ``neg_hist`` enables the auxiliary loss: each interest state h_t must tell the
    real next behaviour e_{t+1} from a sampled negative.
    """

    def __init__(self, config: FeatureConfig, table_sizes: dict[str, int]) -> None:
        super().__init__(config, table_sizes)
        m = config.model
        groups = config.sequence_groups()
        if not groups:
            raise ValueError("DIEN needs a sequence group")
        self.group = groups[0].features
        d = self.seq_width(self.group)
        hd = m.gru_dim or d
        self.extractor = nn.GRU(d, hd, batch_first=True)
        # "mlp": the official code's activation unit over [q, h, q-h, q*h] with softmax;
        # "bilinear": the paper's softmax(h_t W e_a), one dot product per (candidate, step)
        self.attention_kind = m.dien_attention
        if self.attention_kind == "mlp":  # the unit compares the query with H-wide states
            self.query_proj = nn.Linear(d, hd, bias=False) if hd != d else nn.Identity()
            self.att = DINAttention(hd, m.attention_mlp, m.attention_act, softmax=True)
        else:  # W maps the query to H itself
            self.att_w = nn.Linear(d, hd, bias=False)
            # runs trained before session 35 built an unused query_proj here: their
            # checkpoints load without it
            self.register_load_state_dict_pre_hook(_drop_unused_query_proj)
        self.evolution = AttentionalGRU(hd, hd, m.evolution)
        self.aux = MLP(hd + d, m.aux_hidden, "prelu")
        self.aux_head = nn.Linear(self.aux.out_dim, 1)
        width = self.user_width + self.item_width + d + hd + d
        self.mlp = MLP(width, m.mlp, m.activation, m.dropout)
        self.head = nn.Linear(self.mlp.out_dim, 1)

    def score(self, x: Inputs) -> dict[str, Tensor]:
        idx = x["user_idx"]
        mask = self.mask(x)
        e = self.emb.sequence(self.group, x["hist"])  # [U, L, D]
        states, _ = self.extractor(e)  # [U, L, H]; right padding never leaks left
        states = states * mask.unsqueeze(-1).to(states.dtype)
        q = self.emb.query(self.group, x["item_sparse"])  # [N, D]
        if self.attention_kind == "mlp":
            _, att = self.att(self.query_proj(q), states, idx, mask)  # [N, L], 0 at padding
        else:
            s_n = states.index_select(0, idx)  # [N, L, H]
            scores = torch.bmm(s_n, self.att_w(q).unsqueeze(-1)).squeeze(-1)  # [N, L]
            att = masked_softmax(scores, mask.index_select(0, idx))
        final = self.evolution(states, att, idx, mask)  # [N, H]
        pooled_sum = (e * mask.unsqueeze(-1).to(e.dtype)).sum(1).index_select(0, idx)
        u = self.user_deep(x).index_select(0, idx)
        # the official code's [uid, item, his_sum, item * his_sum, final_state]; runs
        # trained before session 34 read q again in place of q * pooled_sum
        inter = q * pooled_sum if self.config.model.dien_interaction else q
        h = self.mlp(torch.cat([u, self.item_deep(x), inter, final, pooled_sum], dim=-1))
        out = {"logits": self.head(h).squeeze(-1), "attention": att}
        if "neg_hist" in x:
            out["aux_loss"] = self.aux_loss(states, e, x["neg_hist"], mask)
            out["aux_steps"] = mask[:, 1:].sum().detach()  # the steps it averages over
        return out

    def aux_loss(self, states: Tensor, pos: Tensor, neg_hist: Tensor, mask: Tensor) -> Tensor:
        """Mean BCE over steps t with a real t+1: ``h_t`` vs ``e_{t+1}`` (1) and a negative (0).

        ``states [U, L, H]`` (0 at padding), ``pos [U, L, D]`` (the behaviours'
        embeddings), ``neg_hist [U, S, L]`` (sampled negative IDs), ``mask [U, L]``;
        returns a scalar ``[]``."""
        neg = self.emb.sequence(self.group, neg_hist)
        h = states[:, :-1]
        valid = (mask[:, 1:]).to(h.dtype)  # step t+1 is real
        logit_pos = self.aux_head(self.aux(torch.cat([h, pos[:, 1:]], -1))).squeeze(-1)
        logit_neg = self.aux_head(self.aux(torch.cat([h, neg[:, 1:]], -1))).squeeze(-1)
        bce = nn.functional.binary_cross_entropy_with_logits
        loss = bce(logit_pos, torch.ones_like(logit_pos), reduction="none")
        loss = loss + bce(logit_neg, torch.zeros_like(logit_neg), reduction="none")
        return (loss * valid).sum() / valid.sum().clamp(min=1.0)


def _drop_unused_query_proj(
    module: nn.Module, state: dict[str, Tensor], prefix: str, *_: object
) -> None:
    """Load-time hook of a bilinear DIEN: drops the ``query_proj`` weight that older
    runs saved (it never reached the score)."""
    state.pop(prefix + "query_proj.weight", None)


MODELS: dict[str, type[CTRModel]] = {
    "base": BaseModel,
    "deepfm": DeepFM,
    "din": DIN,
    "multi_tower_din": MultiTowerDIN,
    "dien": DIEN,
}


def build_model(config: FeatureConfig, table_sizes: dict[str, int]) -> CTRModel:
    check_table_names(config)
    return MODELS[config.model.type](config, table_sizes)
