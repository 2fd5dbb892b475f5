"""Small building blocks. Every width is derived from the feature config by the caller.

Shapes: U users, N candidates, L history positions, D embedding widths.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ctr import native
from ctr.mapping import OOV
from ctr.spec import FeatureConfig, FeatureSpec


class Dice(nn.Module):
    """Data-adaptive activation (DIN paper): ``p*x + (1-p)*alpha*x``, ``p = sigmoid(BN(x))``.

    Input ``x [..., dim]``; in training, statistics are over every leading position, or
    only over the positions where ``mask [...]`` (bool, ``x``'s leading shape) is True.
    The attention unit passes its history mask: its ``[N, L, H]`` input is mostly padding
    on real data (88 % of positions on Amazon Beauty), and padded positions, whose scores
    are masked out anyway, would otherwise set the statistics the served graph uses.
    Under data parallelism (a process group of more than one rank) the statistics are
    the global batch's, every rank's rows together (:meth:`_p_global`).
    """

    def __init__(self, dim: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, eps=eps, affine=False)
        self.alpha = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if self.training and _ranks() > 1:
            p = self._p_global(x, mask)
        elif self.training:
            flat = x.reshape(-1, x.shape[-1])
            if mask is None:
                p = torch.sigmoid(self.bn(flat)).reshape(x.shape)
            else:
                real = mask.reshape(-1)
                rows = flat[real]
                if rows.shape[0] > 1:  # batch statistics (and their running update): real rows only
                    z = flat.new_zeros(flat.shape)
                    z[real] = self.bn(rows)
                    p = torch.sigmoid(z).reshape(x.shape)  # padded positions: 0.5, masked later
                else:  # under two real positions: no batch statistics, the running ones
                    p = self._p_running(x)
        else:
            p = self._p_running(x)
        # p*x + (1-p)*alpha*x, in the form that exports as 3 element-wise ops once 1 - alpha
        # folds (5 for the sum): with the 3 above, 6 instead of 8 on tensors as large as
        # [N, L, H] in the unfused attention unit
        return x * (p * (1.0 - self.alpha) + self.alpha)

    def _p_global(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """``p`` in training under data parallelism: the batch statistics are those of
        every rank's real rows together (a rank may have none), and the running ones move
        by them alike on every rank, as one process over the global batch moves its own.
        Under two real rows in all, the running statistics, unchanged (one process
        refuses a single unmasked row; the ranks' share of a global batch may be one).
        Every rank takes part in the same collectives: its own rows decide nothing."""
        # the sums in float32 at least: a half-precision sum of thousands of rows
        # overflows, and its count of 3001 is 3000 (BatchNorm's own statistics are float)
        flat = x.reshape(-1, x.shape[-1]).to(torch.promote_types(x.dtype, torch.float32))
        real = None if mask is None else mask.reshape(-1)
        rows = flat if real is None else flat[real]
        n = torch.full((1,), float(rows.shape[0]), dtype=rows.dtype, device=rows.device)
        total = _all_reduce_sum(torch.cat([n, rows.sum(0)]))
        count = int(total[0].item())
        if count < 2:
            return self._p_running(x)
        mean = total[1:] / count
        var = _all_reduce_sum((rows - mean).square().sum(0)) / count  # biased: normalises
        self._update_running(mean.detach(), var.detach(), count)
        z = (rows - mean) * torch.rsqrt(var + self.bn.eps)
        if real is not None:
            z = flat.new_zeros(flat.shape).index_put((real,), z)  # padded positions: 0.5
        return torch.sigmoid(z).reshape(x.shape).to(x.dtype)

    def _update_running(self, mean: Tensor, var: Tensor, count: int) -> None:
        """Move the running statistics by a batch's ``mean`` and biased ``var`` over
        ``count`` rows, as ``nn.BatchNorm1d`` does (the variance unbiased)."""
        bn = self.bn
        assert bn.running_mean is not None and bn.running_var is not None
        assert bn.num_batches_tracked is not None
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            m = bn.momentum if bn.momentum is not None else 1.0 / int(bn.num_batches_tracked)
            bn.running_mean.mul_(1.0 - m).add_(mean, alpha=m)
            bn.running_var.mul_(1.0 - m).add_(var * (count / (count - 1)), alpha=m)

    def _p_running(self, x: Tensor) -> Tensor:
        """``p`` from the running statistics, broadcast over the last dim (exports as
        plain ops)."""
        mean, var = self.bn.running_mean, self.bn.running_var
        assert mean is not None and var is not None
        return torch.sigmoid((x - mean) * torch.rsqrt(var + self.bn.eps))


def _ranks() -> int:
    """Processes in the default process group (1 where there is none)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class _AllReduceSum(torch.autograd.Function):
    """``x`` summed over every rank, with the gradient summed back: each rank's input
    reaches every rank's loss, and DDP's average of the ranks is that global loss's."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor) -> Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
        out = grad.clone()
        dist.all_reduce(out)
        return out


def _all_reduce_sum(x: Tensor) -> Tensor:
    """``x`` summed over the ranks (differentiable: :class:`_AllReduceSum`)."""
    out: Tensor = _AllReduceSum.apply(x)  # type: ignore[assignment]
    return out


def masked_act(module: nn.Module, x: Tensor, mask: Tensor | None) -> Tensor:
    """Apply activation ``module``; only Dice reads ``mask`` (its batch statistics)."""
    return module(x, mask) if isinstance(module, Dice) else module(x)


def activation(kind: str, dim: int) -> nn.Module:
    """``dice``, ``prelu`` (one slope per channel of the last dim) or ``sigmoid``."""
    if kind == "sigmoid":
        return nn.Sigmoid()
    return Dice(dim) if kind == "dice" else _ChannelLastPReLU(dim)


class MLP(nn.Module):
    """``[..., in_dim] -> [..., hidden[-1]]``: Linear + activation (+ dropout) per layer."""

    def __init__(
        self, in_dim: int, hidden: list[int], act: str = "dice", dropout: float = 0.0
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers.append(nn.Linear(d, h))
            layers.append(activation(act, h))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = h
        self.net = nn.Sequential(*layers)
        self.out_dim = d

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``mask [...]``: positions of ``x [..., in_dim]`` that Dice's batch statistics
        count (None: all)."""
        for layer in self.net:
            x = masked_act(layer, x, mask)
        return x


class DenseClip(nn.Module):
    """``[B, D] -> [B, D]``: each dense column clamped to ``[lo[d], hi[d]]``, the range its
    encoded values (after ``log1p``) held in the training split (:meth:`set`).

    A value far outside what the model was trained on (a price of ``1e30`` where training
    saw at most 8.2 after ``log1p``) would otherwise drive a layer into saturation and
    score a confident 0 or 1; clamped, it scores as the edge of the range does. The bounds
    are buffers, so the checkpoint and the exported graph carry them (one ``Max`` and one
    ``Min`` node per input). Unset (a fresh module, ``train.clip_dense: false``, or a
    checkpoint written before the bounds existed, which loads without them) the input
    passes unchanged and the graph has no node for it.
    """

    lo: Tensor
    hi: Tensor

    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("lo", torch.full((width,), -math.inf))
        self.register_buffer("hi", torch.full((width,), math.inf))
        self.bounded = False

    def set(self, lo: Tensor, hi: Tensor) -> None:
        """Clamp to ``lo [D]`` .. ``hi [D]`` from now on (finite, ``lo <= hi``)."""
        if lo.shape != self.lo.shape or hi.shape != self.hi.shape:
            raise ValueError(f"bounds of shape {tuple(lo.shape)}, {tuple(hi.shape)} for "
                             f"{self.lo.shape[0]} dense columns")  # fmt: skip
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all() and (lo <= hi).all()):
            raise ValueError("dense bounds must be finite with lo <= hi")
        with torch.no_grad():
            self.lo.copy_(lo)
            self.hi.copy_(hi)
        self._update()

    def _update(self) -> None:
        self.bounded = bool(self.lo.numel()) and bool(
            torch.isfinite(self.lo).any() or torch.isfinite(self.hi).any()
        )

    def bounds(self) -> list[tuple[float, float]] | None:
        """``[(lo, hi)]`` per column as Python floats (exactly the float32 values), or
        None while unset."""
        if not self.bounded:
            return None
        return list(zip(self.lo.tolist(), self.hi.tolist(), strict=True))

    def forward(self, x: Tensor) -> Tensor:
        return torch.minimum(torch.maximum(x, self.lo), self.hi) if self.bounded else x

    def _load_from_state_dict(  # type: ignore[no-untyped-def]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
        error_msgs,
    ) -> None:  # fmt: skip
        """A checkpoint from before the bounds loads without them (unbounded)."""
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
            error_msgs,
        )  # fmt: skip
        for name in ("lo", "hi"):
            if prefix + name in missing_keys:
                missing_keys.remove(prefix + name)
        self._update()


class _ChannelLastPReLU(nn.Module):
    """PReLU with one slope per last-dim channel, for inputs of any rank."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), 0.25))

    def forward(self, x: Tensor) -> Tensor:
        return torch.where(x >= 0, x, self.weight * x)


def unusable_names(config: FeatureConfig) -> list[str]:
    """Why sparse feature names (and DeepFM's sequences) cannot key the model's tables: torch's
    ``nn.ModuleDict`` refuses an empty key, a ``.`` and the name of one of its own
    attributes (``values``, ``type``, ``training`` ...). One line per name, naming the
    way out (``column:`` keeps the data's column and the requests' keys)."""
    probe = nn.ModuleDict()
    out = []
    for f in config.features:
        if f.kind == "dense" or (f.kind == "sequence" and config.model.type != "deepfm"):
            continue  # no table of its own (a sequence borrows one; DeepFM projects it)
        why = ("holds a '.'" if "." in f.name else "is empty" if not f.name
               else "is an attribute of torch's nn.ModuleDict" if hasattr(probe, f.name)
               else None)  # fmt: skip
        if why is not None:
            safe = f.name.replace(".", "_") if "." in f.name else f"{f.name}_feature"
            out.append(f"feature name {f.name!r} {why}, which cannot name a model table: "
                       f"name it e.g. {safe!r} with column: {f.source!r}")  # fmt: skip
    return out


def check_table_names(config: FeatureConfig) -> None:
    """Raise ValueError with the first of :func:`unusable_names`, if any."""
    if bad := unusable_names(config):
        raise ValueError(bad[0])


class EmbeddingCollection(nn.Module):
    """One table per sparse feature; sequence features borrow their ``shared_with`` table.

    Row 0 (padding) is zero and gets no gradient.
    """

    def __init__(self, config: FeatureConfig, table_sizes: dict[str, int]) -> None:
        super().__init__()
        self.config = config
        self.tables = nn.ModuleDict(
            {
                t.name: nn.Embedding(table_sizes[t.name], t.embedding_dim, padding_idx=0)
                for t in config.tables
            }
        )
        for emb in self.tables.values():
            nn.init.normal_(emb.weight, std=0.05)
            with torch.no_grad():
                emb.weight[0].zero_()  # PAD
                # OOV starts at zero (a neutral vector): with every training value in the
                # vocabulary it is trained only by missing values, and an ID unseen in
                # training must not score by a random vector
                emb.weight[OOV].zero_()

    def table(self, feature: str) -> nn.Embedding:
        return self.tables[self.config.table_of(feature)]

    def fields(self, feats: list[FeatureSpec], ids: Tensor) -> list[Tensor]:
        """``ids [B, F]`` (columns in ``feats`` order) -> F tensors ``[B, D_f]``."""
        return [self.table(f.name)(ids[:, j]) for j, f in enumerate(feats)]

    def sequence(self, names: list[str], hist: Tensor) -> Tensor:
        """``hist [U, S, L]`` -> ``[U, L, sum(D)]`` for the named sequence fields."""
        order = [f.name for f in self.config.sequences]
        return torch.cat([self.table(n)(hist[:, order.index(n)]) for n in names], dim=-1)

    def query(self, seq_names: list[str], item_sparse: Tensor) -> Tensor:
        """Candidate side of a behaviour group: ``item_sparse [N, Fi]`` -> ``[N, sum(D)]``."""
        item_order = [f.name for f in self.config.item_sparse]
        parts = []
        for n in seq_names:
            target = self.config.table_of(n)
            parts.append(self.tables[target](item_sparse[:, item_order.index(target)]))
        return torch.cat(parts, dim=-1)


def sequence_mask(hist_len: Tensor, length: int) -> Tensor:
    """``hist_len [U]`` -> bool ``[U, L]``, True at real (non-padded) positions."""
    pos = torch.arange(length, device=hist_len.device).unsqueeze(0)
    return pos < hist_len.unsqueeze(1)


def masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the last dim with masked positions exactly 0 (all-masked rows -> 0)."""
    filled = torch.where(mask, scores, torch.full_like(scores, -1e9))
    return torch.softmax(filled, dim=-1) * mask.to(scores.dtype)


def act_params(module: nn.Module) -> list[Tensor]:
    """An activation's parameters as ``native/din_attention.h`` packs them: none for
    sigmoid; ``mean, 1/sqrt(var + eps), alpha`` for Dice; the slopes for PReLU."""
    if isinstance(module, Dice):
        mean, var = module.bn.running_mean, module.bn.running_var
        assert mean is not None and var is not None
        return [mean, torch.rsqrt(var + module.bn.eps), module.alpha]
    if isinstance(module, _ChannelLastPReLU):
        return [module.weight]
    return []


def din_unit(
    q_part: Tensor, k_part: Tensor, q: Tensor, keys: Tensor, user_idx: Tensor,
    hist_len: Tensor, w_p: Tensor, params: Tensor, widths: tuple[int, ...], act: int,
    softmax: int,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``ctr_ops.DinAttention`` in torch, from its packed inputs (``native/din_attention.h``
    gives the layout): ``pooled [N, D]`` and ``weights [N, L]``. Shapes: ``q_part [N, H1]``,
    ``k_part [U, L, H1]``, ``q [N, D]``, ``keys [U, L, D]``, ``user_idx [N]``,
    ``hist_len [U]``, ``w_p [D, H1]``, ``params [P]``."""
    kinds = {v: k for k, v in native.DIN_ACTS.items()}

    def take(n: int) -> Tensor:
        nonlocal at
        at += n
        return params[at - n : at]

    def act_fn(x: Tensor, width: int) -> Tensor:
        if kinds[act] == "sigmoid":
            return torch.sigmoid(x)
        if kinds[act] == "dice":
            mean, inv_std, alpha = take(width), take(width), take(width)
            p = torch.sigmoid((x - mean) * inv_std)
            return x * (alpha + p * (1.0 - alpha))
        slope = take(width)
        return torch.where(x >= 0, x, slope * x)

    at = 0
    k = keys.index_select(0, user_idx)  # [N, L, D]
    h = q_part.unsqueeze(1) + k_part.index_select(0, user_idx) + (q.unsqueeze(1) * k) @ w_p
    h = act_fn(h, widths[0])
    for n_in, n_out in zip(widths, widths[1:], strict=False):
        w = take(n_out * n_in).reshape(n_out, n_in)
        h = act_fn(h @ w.t() + take(n_out), n_out)
    scores = h @ take(widths[-1]) + take(1)  # [N, L]
    mask = sequence_mask(hist_len, keys.shape[1]).index_select(0, user_idx)
    weights = masked_softmax(scores, mask) if softmax else scores * mask.to(scores.dtype)
    return torch.bmm(weights.unsqueeze(1), k).squeeze(1), weights


class FusedDINAttention(torch.autograd.Function):
    """The DIN activation unit and its pooling as one ONNX node, ``ctr_ops.DinAttention``
    (``native/din_attention.h``; CPU kernel). In torch it runs :func:`din_unit`."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: object, q_part: Tensor, k_part: Tensor, q: Tensor, keys: Tensor,
        user_idx: Tensor, hist_len: Tensor, w_p: Tensor, params: Tensor,
        widths: tuple[int, ...], act: int, softmax: int,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        return din_unit(q_part, k_part, q, keys, user_idx, hist_len, w_p, params, widths,
                        act, softmax)  # fmt: skip

    @staticmethod
    def symbolic(g: object, q_part: object, k_part: object, q: object, keys: object,
                 user_idx: object, hist_len: object, w_p: object, params: object,
                 widths: tuple[int, ...], act: int, softmax: int) -> object:  # fmt: skip
        pooled, weights = g.op(  # type: ignore[attr-defined]
            f"{native.DOMAIN}::{native.DIN_OP}", q_part, k_part, q, keys, user_idx, hist_len,
            w_p, params, widths_i=list(widths), act_i=act, softmax_i=softmax, outputs=2,
        )  # fmt: skip
        pooled.setType(q.type().with_sizes([None, None]))  # type: ignore[attr-defined]
        weights.setType(q.type().with_sizes([None, None]))  # type: ignore[attr-defined]
        return pooled, weights


class DINAttention(nn.Module):
    """DIN activation unit over ``[q, k, q-k, q*k]`` and weighted sum pooling.

    The first layer is applied in split form,
    ``W[q,k,q-k,q*k] = (Wq+Wd) q + (Wk-Wd) k + Wp (q*k)``: the q part runs once per
    candidate and the k part once per user history, never per (candidate, step).
    With ``fused`` set (export only), the per-(candidate, step) part, the masking and
    the pooling become one :class:`FusedDINAttention` node.

    Inputs: ``q [N, D]``, ``keys [U, L, D]``, ``user_idx [N]``, ``mask [U, L]``.
    Returns ``pooled [N, D]`` and ``weights [N, L]`` (0 at padded positions).
    """

    op = native.DIN_OP  # the custom op it exports as, when fused

    def __init__(self, dim: int, hidden: list[int], act: str, softmax: bool) -> None:
        super().__init__()
        self.dim = dim
        self.act = act
        self.first = nn.Linear(4 * dim, hidden[0])
        self.first_act = activation(act, hidden[0])
        self.rest = MLP(hidden[0], hidden[1:], act)
        self.out = nn.Linear(self.rest.out_dim, 1)
        self.softmax = softmax
        self.split_first_layer = True
        self.widths = tuple(hidden)
        self.fused = False

    @property
    def can_fuse(self) -> bool:
        return (
            self.split_first_layer
            and self.act in native.DIN_ACTS
            and 1 <= len(self.widths) <= native.DIN_MAX_LAYERS
            and max(self.widths) <= native.DIN_MAX_WIDTH
            and self.dim <= native.DIN_MAX_DIM
        )

    def packed_params(self) -> Tensor:
        """Every parameter after the first layer, packed as ``ctr_ops.DinAttention``
        reads them: ``[P]``."""
        parts = act_params(self.first_act)
        layers = list(self.rest.net)
        for lin, act in zip(layers[::2], layers[1::2], strict=True):
            assert isinstance(lin, nn.Linear)
            parts += [lin.weight.flatten(), lin.bias, *act_params(act)]
        parts += [self.out.weight.flatten(), self.out.bias]
        return torch.cat([t.flatten() for t in parts])

    def split_first(self, q: Tensor, keys: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The first layer's candidate part ``q_part [N, H]`` (bias included), its history
        part ``k_part [U, L, H]`` and the weights of its ``q*k`` term ``wp [H, D]``."""
        d = self.dim
        w = self.first.weight  # [H, 4D]
        wq, wk, wd, wp = w[:, :d], w[:, d : 2 * d], w[:, 2 * d : 3 * d], w[:, 3 * d :]
        return q @ (wq + wd).t() + self.first.bias, keys @ (wk - wd).t(), wp

    def forward(
        self, q: Tensor, keys: Tensor, user_idx: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        if self.fused and self.can_fuse:
            q_part, k_part, wp = self.split_first(q, keys)
            # [U]: every caller builds the mask with sequence_mask, a prefix of each row
            hist_len = mask.sum(-1)
            out: tuple[Tensor, Tensor] = FusedDINAttention.apply(  # type: ignore[assignment]
                q_part, k_part, q, keys, user_idx, hist_len, wp.t().contiguous(),
                self.packed_params(), self.widths, native.DIN_ACTS[self.act],
                int(self.softmax),
            )  # fmt: skip
            return out
        k = keys.index_select(0, user_idx)  # [N, L, D], gathered inside the graph
        if self.split_first_layer:
            q_part, k_part, wp = self.split_first(q, keys)  # k_part: once per user
            h = q_part.unsqueeze(1) + k_part.index_select(0, user_idx)
            h = h + (q.unsqueeze(1) * k) @ wp.t()  # [N, L, H]
        else:
            qq = q.unsqueeze(1).expand_as(k)
            h = self.first(torch.cat([qq, k, qq - k, qq * k], dim=-1))
        m = mask.index_select(0, user_idx)  # [N, L]
        h = masked_act(self.first_act, h, m)
        scores = self.out(self.rest(h, m)).squeeze(-1)  # [N, L]
        weights = masked_softmax(scores, m) if self.softmax else scores * m.to(scores.dtype)
        pooled = torch.bmm(weights.unsqueeze(1), k).squeeze(1)  # [N, D]
        return pooled, weights
