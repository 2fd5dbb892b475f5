"""Typed feature configuration (YAML) shared by training and serving.

The spec decides every tensor layout: which raw fields enter the graph, in which
order, and how wide each embedding is. Nothing here imports torch.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Side = Literal["user", "item", "context"]


class _Strict(BaseModel):
    # NaN and infinity nowhere: a NaN default trained, then its config.json (null) did
    # not load at export; an infinite learning rate validated
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class MappingSpec(_Strict):
    """How raw IDs become table indices. 0 is padding, 1 is out-of-vocabulary."""

    type: Literal["vocab", "hash"] = "vocab"
    buckets: int | None = Field(default=None, gt=0, description="hash buckets (type=hash)")
    min_count: int = Field(
        default=1,
        ge=1,
        description="vocab: tokens seen fewer times map to OOV (training rows count once "
        "each; a behaviour sequence counts each user's behaviours once, see "
        "ctr.encode.raw_columns_for_fit)",
    )
    max_size: int | None = Field(default=None, gt=0, description="vocab: keep the most frequent")

    @model_validator(mode="after")
    def _check(self) -> MappingSpec:
        if self.type == "hash" and self.buckets is None:
            raise ValueError("mapping.type=hash needs mapping.buckets")
        return self


class FeatureSpec(_Strict):
    """One raw feature.

    * ``sparse``: a categorical ID with its own embedding table.
    * ``dense``: a float, fed as-is (after ``log1p`` if asked).
    * ``sequence``: a behaviour field (oldest first) that shares the embedding
      table and the ID mapping of the sparse feature named in ``shared_with``.
    """

    name: str
    kind: Literal["sparse", "dense", "sequence"]
    side: Side = "user"
    column: str | None = None
    embedding_dim: int = Field(default=8, gt=0)
    mapping: MappingSpec = Field(default_factory=MappingSpec)
    shared_with: str | None = None
    default: float = 0.0
    log1p: bool = False

    @property
    def source(self) -> str:
        """The raw column / JSON key this feature is read from."""
        return self.column or self.name

    @model_validator(mode="after")
    def _check(self) -> FeatureSpec:
        if self.kind == "sequence":
            if not self.shared_with:
                raise ValueError(f"sequence feature {self.name!r} needs shared_with")
            self.side = "user"
        return self


class GroupSpec(_Strict):
    """A feature group: ``deep`` (concatenated) or ``sequence`` (one behaviour group)."""

    name: str
    type: Literal["deep", "sequence"]
    features: list[str] = Field(min_length=1)  # an empty one failed in torch.cat


class ModelSpec(_Strict):
    type: Literal["base", "deepfm", "din", "multi_tower_din", "dien"] = "din"
    mlp: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [200, 80])
    tower_mlp: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [64])
    activation: Literal["dice", "prelu"] = "dice"
    attention_mlp: list[Annotated[int, Field(gt=0)]] = Field(
        default_factory=lambda: [80, 40],
        description="hidden widths of the attention MLP (at least one layer where a model "
        "has one: din, multi_tower_din, dien with dien_attention mlp)",
    )
    attention_activation: Literal["same", "dice", "prelu", "sigmoid"] = Field(
        default="same",
        description="activation inside the attention MLP ('same' = `activation`; the "
        "official DIN/DIEN code uses sigmoid there)",
    )
    attention_softmax: bool = False
    gru_dim: int | None = Field(default=None, gt=0)
    evolution: Literal["augru", "agru", "aigru"] = "augru"
    dien_attention: Literal["mlp", "bilinear"] = Field(
        default="mlp",
        description="DIEN attention: the official code's activation unit, or the paper's h W e",
    )
    dien_interaction: bool = Field(
        default=True,
        description="DIEN: the final MLP reads candidate x history sum (the official "
        "code's item_eb * item_his_eb_sum); false: the candidate's embedding again in its "
        "place, as runs trained before session 34 did (load_run sets it for them)",
    )
    din_interaction: bool = Field(
        default=True,
        description="DIN: the final MLP also reads candidate x attention-pooled interest per "
        "group (the official DIN code's u_emb * i_emb); false: as runs trained before "
        "session 35 (load_run sets it for them)",
    )
    deepfm_sequence_first_order: bool = Field(
        default=True,
        description="DeepFM: the first-order term weighs each sequence field by the mean "
        "of its behaviours' weights, as the paper's multi-valued fields; false: no "
        "sequence term, as runs trained before session 35 (load_run sets it for them)",
    )
    aux_loss_weight: float = Field(default=1.0, ge=0.0)
    aux_hidden: list[Annotated[int, Field(gt=0)]] = Field(
        default_factory=lambda: [100, 50],
        description="DIEN: hidden widths of the auxiliary network (the official code's)",
    )
    mba_l2: float = Field(default=0.0, ge=0.0, description="mini-batch aware L2 on embeddings")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)

    @property
    def attention_act(self) -> str:
        return self.activation if self.attention_activation == "same" else self.attention_activation

    @model_validator(mode="after")
    def _attention_layers(self) -> ModelSpec:
        # only where an activation unit is built: other models' bundles may hold []
        unit = self.type in ("din", "multi_tower_din") or (
            self.type == "dien" and self.dien_attention == "mlp"
        )
        if unit and not self.attention_mlp:
            raise ValueError(f"attention_mlp needs at least one layer for a {self.type} model")
        return self


class TrainSpec(_Strict):
    epochs: int = Field(default=5, gt=0)
    batch_size: int = Field(
        default=256,
        ge=2,
        description="rows per step; at least 2 (a batch of one is skipped: Dice's batch "
        "statistics need two rows)",
    )
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    seed: int = 42
    patience: int = Field(
        default=2,
        ge=0,
        description="early stopping: training stops once more than this many epochs in a "
        "row have not improved validation AUC (patience 2: at the third); the best "
        "epoch's weights are kept",
    )
    eval_batch_size: int = Field(default=2048, gt=0)  # 0 failed after a whole epoch
    threads: int | None = Field(
        default=None,
        gt=0,
        description="torch threads per process; default (or 0, as runs "
        "and bundles before session 37 may record it): torch's own",
    )

    @field_validator("threads", mode="before")
    @classmethod
    def _zero_is_default(cls, value: object) -> object:
        """0 meant torch's default before it was refused: a bundle that recorded it loads."""
        return None if value == 0 and not isinstance(value, bool) else value

    init_bias: bool | Literal["auto"] = Field(
        default="auto",
        description="true: start the output layer's bias at the training split's log-odds "
        "of label 1 (and DeepFM's dense first-order term at 0), so an untrained or "
        "early-stopped model predicts the base rate instead of wherever PyTorch's random "
        "start puts it (about 0.5: 15x a 3 % CTR); false: PyTorch's start; auto: true "
        "where the rarer label is under 20 % of the training split (clicks are rare), "
        "false otherwise (on the synthetic data, 37 % clicks, the start cost test AUC)",
    )
    clip_dense: bool = Field(
        default=True,
        description="clamp each dense feature, inside the model and so in the exported "
        "graph, to the range its encoded values (after log1p) held in the training split, "
        "widened to hold its encoded default: "
        "a value far beyond it scores as the range's edge instead of saturating the "
        "network (the manifest's dense_range records the bounds); false: fed as-is",
    )


class DataSpec(_Strict):
    """Where examples come from. ``source`` picks a thin adapter onto the generic loader."""

    source: Literal["synthetic", "amazon", "movielens", "alimama", "csv", "parquet"] = "synthetic"
    path: str | None = None
    label: str = "label"
    user_key: str = "user_id"
    time_column: str | None = "ts"
    seq_delimiter: str = Field(default="|", min_length=1)
    behaviour_labels: Literal["positive", "all", "none"] | None = Field(
        default=None,
        description=(
            "which examples' candidates are real behaviours that later histories hold "
            "(`ctr load` appends the newest ones to a user's stored history): `positive` "
            "(label 1; negatives were sampled, e.g. Amazon), `all` (every example is an "
            "interaction, e.g. MovieLens ratings) or `none` (candidates never enter the "
            "histories: the synthetic generator's are drawn apart from them); default: "
            "`all` for movielens, `none` for synthetic, else `positive`"
        ),
    )
    item_key_tolerance: float = Field(
        default=0.01,
        ge=0.0,
        le=1.0,
        description=(
            "share of item-key values allowed to carry two values of another item-side "
            "sparse feature (an item re-categorised) before `ctr train` and `ctr load` "
            "refuse the key as not the items' ID (ctr.encode.check_item_key); 1 turns "
            "the check off"
        ),
    )
    split: Literal["last_per_user", "time", "random"] = "last_per_user"
    val_steps: int = Field(default=1, ge=1, description="last_per_user: time steps in val")
    test_steps: int = Field(default=1, ge=1, description="last_per_user: time steps in test")
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    split_seed: int = Field(
        default=42,
        description="random split: the shuffle's seed, apart from train.seed, so that "
        "runs of several model seeds are scored on one test set (before session 35 the "
        "split followed train.seed, whose default is also 42)",
    )
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _fractions(self) -> DataSpec:
        if self.split != "last_per_user" and self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"data.val_fraction + data.test_fraction must be under 1 (they are "
                f"{self.val_fraction} + {self.test_fraction}): nothing would be left to train on"
            )
        return self

    @property
    def behaviours(self) -> Literal["positive", "all", "none"]:
        """:attr:`behaviour_labels`, resolved for the source."""
        if self.behaviour_labels is not None:
            return self.behaviour_labels
        if self.source == "movielens":
            return "all"
        return "none" if self.source == "synthetic" else "positive"


# a model's name: a folder of the model store (no path, not empty, not hidden)
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
MODEL_NAME_MAX = 100


def is_model_name(name: str) -> bool:
    """``name`` can be a model's folder in the store (:data:`MODEL_NAME_PATTERN`)."""
    import re

    return len(name) <= MODEL_NAME_MAX and re.fullmatch(MODEL_NAME_PATTERN, name) is not None


class FeatureConfig(_Strict):
    """Top-level config: features, groups, sequence length, model, training and data."""

    # a folder's name in the model store (models/<name>/<version>): no path, not empty
    name: str = Field(pattern=MODEL_NAME_PATTERN, max_length=MODEL_NAME_MAX)
    max_seq_len: int = Field(default=50, gt=0)
    features: list[FeatureSpec]
    item_key: str | None = Field(
        default=None,
        description=(
            "the item-side sparse feature that is a candidate's ID (the API's item_id, "
            "the key of stored behaviours and of DIEN's negative pool); default: the one "
            "the first sequence feature shares, else the first item-side sparse feature"
        ),
    )
    groups: list[GroupSpec] = Field(default_factory=list)
    model: ModelSpec = Field(default_factory=ModelSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    data: DataSpec = Field(default_factory=DataSpec)

    @model_validator(mode="after")
    def _check(self) -> FeatureConfig:
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError("feature names must be unique")
        by_name = {f.name: f for f in self.features}
        leak = [f.name for f in self.features if f.source == self.data.label]
        if leak:  # trained to AUC 1.0 on the answer, which no request carries
            raise ValueError(f"features {leak} read the label column "
                             f"{self.data.label!r} (data.label)")  # fmt: skip
        if not any(f.kind == "sparse" and f.side == "item" for f in self.features):
            raise ValueError("features: a config needs an item-side sparse feature (the "
                             "candidate's ID, which requests name items by)")  # fmt: skip
        for f in self.features:
            if f.kind == "sequence":
                target = by_name.get(f.shared_with or "")
                if target is None or target.kind != "sparse":
                    raise ValueError(f"{f.name}.shared_with must name a sparse feature")
                if target.side != "item":
                    raise ValueError(f"{f.name}.shared_with must name an item-side feature")
        shared: dict[str, str] = {}
        for f in self.features:
            if f.kind == "sequence" and (f.shared_with or "") in shared:
                raise ValueError(
                    f"sequence features {shared[f.shared_with or '']!r} and {f.name!r} share "
                    f"{f.shared_with!r}: a stored behaviour holds one {f.shared_with!r} "
                    "(POST /v1/events, ctr load), so both would be served the same history; "
                    "one sequence per item-side feature"
                )
            if f.kind == "sequence":
                shared[f.shared_with or ""] = f.name
        if self.item_key is not None:
            key = by_name.get(self.item_key)
            if key is None or key.kind != "sparse" or key.side != "item":
                raise ValueError(
                    f"item_key {self.item_key!r} must name an item-side sparse feature"
                )
        if not self.groups:
            self.groups = _default_groups(self.features)
        for g in self.groups:
            for n in g.features:
                if n not in by_name:
                    raise ValueError(f"group {g.name!r} names unknown feature {n!r}")
                want = "sequence" if g.type == "sequence" else None
                is_seq = by_name[n].kind == "sequence"
                if (want == "sequence") != is_seq:
                    raise ValueError(f"group {g.name!r}: {n!r} does not fit a {g.type} group")
        if self.model.type == "dien" and not any(f.kind == "sequence" for f in self.features):
            raise ValueError("a dien model needs a sequence feature in a sequence group (its "
                             "interest extractor reads the first): add one, or use "
                             "model.type din, deepfm or base")  # fmt: skip
        if self.model.type != "deepfm":  # the others read behaviours only through groups
            seq_groups = [g for g in self.groups if g.type == "sequence"]
            if self.model.type == "dien":  # DIEN's one interest extractor: the first group
                seq_groups = seq_groups[:1]
            grouped = {n for g in seq_groups for n in g.features}
            for f in self.features:
                if f.kind == "sequence" and f.name not in grouped:
                    raise ValueError(
                        f"sequence feature {f.name!r} is in no sequence group a "
                        f"{self.model.type} model reads (DIEN: the first), so it would "
                        "never be read (add it to that group, or drop it)"
                    )
        if self.model.type == "multi_tower_din":  # its towers read the deep groups only
            deep = {n for g in self.groups if g.type == "deep" for n in g.features}
            for f in self.features:
                if f.kind != "sequence" and f.name not in deep:
                    raise ValueError(
                        f"feature {f.name!r} is in no deep group, and multi_tower_din "
                        "reads features through them only: it would never be read (add it "
                        "to a group, or drop it)"
                    )
        return self

    # ---- derived layout (computed once: the feature list does not change after validation)
    @cached_property
    def _by_name(self) -> dict[str, FeatureSpec]:
        return {f.name: f for f in self.features}

    def feature(self, name: str) -> FeatureSpec:
        return self._by_name[name]

    @cached_property
    def user_sparse(self) -> list[FeatureSpec]:
        """Sparse features fed once per user/request (user and context side)."""
        return [f for f in self.features if f.kind == "sparse" and f.side != "item"]

    @cached_property
    def user_dense(self) -> list[FeatureSpec]:
        return [f for f in self.features if f.kind == "dense" and f.side != "item"]

    @cached_property
    def item_sparse(self) -> list[FeatureSpec]:
        return [f for f in self.features if f.kind == "sparse" and f.side == "item"]

    @cached_property
    def item_dense(self) -> list[FeatureSpec]:
        return [f for f in self.features if f.kind == "dense" and f.side == "item"]

    @cached_property
    def sequences(self) -> list[FeatureSpec]:
        return [f for f in self.features if f.kind == "sequence"]

    @cached_property
    def tables(self) -> list[FeatureSpec]:
        """Sparse features that own an embedding table (sequences borrow one)."""
        return [f for f in self.features if f.kind == "sparse"]

    @cached_property
    def sequence_targets(self) -> list[FeatureSpec]:
        """For each sequence field, the item-side feature it shares (``hist_cate_id`` ->
        ``cate_id``): a stored behaviour carries the item's raw value under its source."""
        return [self.feature(s.shared_with or "") for s in self.sequences]

    @cached_property
    def item_id_feature(self) -> FeatureSpec:
        """The candidate's ID (the API's ``item_id``; training's negative pool and
        serving's stored behaviours key on it): ``item_key`` if set, else the item
        feature the first sequence field shares, else the first item-side sparse
        feature. So list the item ID's sequence first (``hist_item_id`` before
        ``hist_cate_id``), or name it in ``item_key``."""
        if self.item_key is not None:
            return next(f for f in self.item_sparse if f.name == self.item_key)
        return self.sequence_targets[0] if self.sequences else self.item_sparse[0]

    def table_of(self, name: str) -> str:
        f = self.feature(name)
        return f.shared_with if f.kind == "sequence" and f.shared_with else f.name

    def embedding_dim(self, name: str) -> int:
        return self.feature(self.table_of(name)).embedding_dim

    def deep_groups(self) -> list[GroupSpec]:
        return [g for g in self.groups if g.type == "deep"]

    def sequence_groups(self) -> list[GroupSpec]:
        return [g for g in self.groups if g.type == "sequence"]


def _default_groups(features: list[FeatureSpec]) -> list[GroupSpec]:
    deep = [f.name for f in features if f.kind != "sequence"]
    seq = [f.name for f in features if f.kind == "sequence"]
    groups = [GroupSpec(name="all", type="deep", features=deep)]
    if seq:
        groups.append(GroupSpec(name="behavior", type="sequence", features=seq))
    return groups


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> FeatureConfig:
    """Load and validate a YAML config; ``overrides`` uses dotted keys (``train.epochs``),
    with list positions as numbers (``features.0.mapping.buckets``)."""
    raw = yaml.safe_load(Path(path).read_text())
    if not isinstance(raw, dict):  # an empty file, or a list or text at the top
        raise ValueError(f"config file {path} holds no mapping of settings (it is "
                         f"{'empty' if raw is None else type(raw).__name__})")  # fmt: skip
    # a YAML alias (*anchor) is one object wherever it is used: an override of one place
    # changed them all (copy.deepcopy keeps the sharing)
    raw = _unshared(raw)
    return FeatureConfig.model_validate(apply_overrides(raw, overrides))


def _unshared(node: Any) -> Any:
    """``node`` with every dict and list a copy of its own."""
    if isinstance(node, dict):
        return {k: _unshared(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_unshared(v) for v in node]
    return node


def apply_overrides(raw: Any, overrides: dict[str, Any] | None) -> Any:
    """``raw`` (a config's plain data) with ``overrides`` (dotted keys, as
    :func:`load_config` takes them) applied in place; returned for chaining."""
    for key, value in (overrides or {}).items():
        node = raw
        parts = key.split(".")
        if not all(parts):
            raise ValueError(f"override {key!r}: an empty key")
        for k, p in enumerate(parts[:-1]):
            node = (
                node[_position(node, p, key)] if isinstance(node, list) else node.setdefault(p, {})
            )
            if not isinstance(node, dict | list):  # e.g. name.x=1: a text has no keys
                where = ".".join(parts[: k + 1])
                raise ValueError(f"override {key!r}: {where} is a {type(node).__name__}, "
                                 "not a mapping or a list")  # fmt: skip
        if isinstance(node, list):
            node[_position(node, parts[-1], key)] = value
        else:
            node[parts[-1]] = value
    return raw


def _position(items: list[Any], part: str, key: str) -> int:
    """``part`` of the override ``key`` as a position in ``items``."""
    if not part.isdigit() or int(part) >= len(items):
        raise ValueError(f"override {key!r}: {part!r} is not a position in a list of {len(items)}")
    return int(part)


# Config keys added after bundle format 1: a manifest holds one only when it is not at its
# default, so a bundle that does not use it still loads on a service released before it
# (the config models forbid unknown keys). A key added from now on goes here too.
LATER_KEYS: tuple[tuple[str, ...], ...] = (
    ("item_key",),
    ("data", "behaviour_labels"),
    ("model", "aux_hidden"),
    ("data", "item_key_tolerance"),
)
# Training-only keys added after format 1 that the manifest never holds: the service does
# not read them, and the bundle records their effect itself (``train.clip_dense``: the
# manifest's ``dense_range``, empty when off), so a bundle using one still loads on a
# service released before it.
TRAINING_ONLY_KEYS: tuple[tuple[str, ...], ...] = (
    ("train", "clip_dense"),
    ("train", "init_bias"),  # the weights carry its effect
    ("model", "dien_interaction"),  # the graph computes it: the service never reads it
    ("model", "deepfm_sequence_first_order"),  # the same
    ("model", "din_interaction"),  # the same
    ("data", "split_seed"),  # the service never splits data
)


def ignored_settings(config: FeatureConfig) -> list[str]:
    """A feature's settings that its kind does not read, set away from their defaults
    (``embedding_dim`` on a sequence, which uses its ``shared_with`` table; ``mapping``
    on a dense feature; ``buckets`` with a vocabulary ...). Accepted, as a manifest
    stores every field at its value, but each a mistake that trains as if unset: said
    as a warning by training (:func:`training.train.train`)."""
    fields = FeatureSpec.model_fields
    out: list[str] = []
    for i, f in enumerate(config.features):
        where = f"features.{i} ({f.name}, {f.kind})"
        unread: list[str] = []
        if f.kind != "sparse" and f.embedding_dim != fields["embedding_dim"].default:
            unread.append("embedding_dim")
        if f.kind != "sparse" and f.mapping != MappingSpec():
            unread.append("mapping")
        if f.kind != "dense":
            unread += [k for k in ("default", "log1p") if getattr(f, k) != fields[k].default]
        if f.kind != "sequence" and f.shared_with is not None:
            unread.append("shared_with")
        if unread:
            uses = f"; it uses {f.shared_with!r}'s table" if f.kind == "sequence" else ""
            out.append(f"{where}: {', '.join(unread)} not read for a {f.kind} feature{uses}")
        m = f.mapping
        if f.kind == "sparse" and m.type == "vocab" and m.buckets is not None:
            out.append(f"{where}: mapping.buckets not read by a vocab mapping (type: hash)")
        if f.kind == "sparse" and m.type == "hash":
            unread = [k for k in ("min_count", "max_size")
                      if getattr(m, k) != MappingSpec.model_fields[k].default]  # fmt: skip
            if unread:
                out.append(f"{where}: mapping.{', mapping.'.join(unread)} not read by a "
                           "hash mapping (type: vocab)")  # fmt: skip
    return out + _unread_model_settings(config)


# the model settings each model type reads (the others train as if unset)
_COMMON = frozenset({"type", "mlp", "activation", "dropout", "mba_l2"})
_ATTENTION = frozenset({"attention_mlp", "attention_activation", "attention_softmax"})
MODEL_READS: dict[str, frozenset[str]] = {
    "base": _COMMON,
    "deepfm": _COMMON | {"deepfm_sequence_first_order"},
    "din": _COMMON | _ATTENTION | {"din_interaction"},
    "multi_tower_din": _COMMON | _ATTENTION | {"tower_mlp"},
    "dien": _COMMON
    | {"attention_mlp", "attention_activation", "gru_dim", "evolution", "dien_attention",
       "dien_interaction", "aux_loss_weight", "aux_hidden"},  # fmt: skip
}


def _unread_model_settings(config: FeatureConfig) -> list[str]:
    """Model settings, and deep groups, that ``config``'s model type does not read."""
    m = config.model
    reads = set(MODEL_READS[m.type])
    if m.type == "dien" and m.dien_attention == "bilinear":  # no activation unit
        reads -= {"attention_mlp", "attention_activation"}
    fields = ModelSpec.model_fields
    unread = [k for k in fields if k not in reads
              and getattr(m, k) != fields[k].get_default(call_default_factory=True)]  # fmt: skip
    out = []
    if unread:
        out.append(f"model: {', '.join(unread)} not read by a {m.type} model")
    deep = [g for g in config.groups if g.type == "deep"]
    if m.type != "multi_tower_din" and deep:
        grouped = {n for g in deep for n in g.features}
        left = [f.name for f in config.features if f.kind != "sequence" and f.name not in grouped]
        if left:  # the groups read as "only these", which holds for multi_tower_din only
            out.append(f"groups: {', '.join(left)} in no deep group, but a {m.type} model "
                       "reads every user, context and item feature (deep groups are "
                       "multi_tower_din's towers)")  # fmt: skip
    return out


def manifest_config(config: FeatureConfig) -> dict[str, Any]:
    """``config`` as the manifest stores it: its JSON form without the :data:`LATER_KEYS`
    that hold their defaults, and without the :data:`TRAINING_ONLY_KEYS`. Validating the
    result gives ``config`` back, those keys at their defaults."""
    out: dict[str, Any] = config.model_dump(mode="json")
    for path in (*LATER_KEYS, *TRAINING_ONLY_KEYS):
        owner: BaseModel = config
        node = out
        for part in path[:-1]:
            owner, node = getattr(owner, part), node[part]
        field = type(owner).model_fields[path[-1]]
        if path in TRAINING_ONLY_KEYS or node[path[-1]] == field.get_default(
            call_default_factory=True
        ):
            del node[path[-1]]
    return out
