"""Training loop: seeded, progress bar, early stopping on validation AUC, checkpoints,
metrics JSON. Runs data-parallel under ``torchrun`` (gloo: training runs on the CPU)."""

from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from ctr.bundle import finite
from ctr.encode import to_float
from ctr.spec import FeatureConfig, FeatureSpec, ignored_settings
from training.dataset import Prepared, Split, negative_key, prepare, sample_negatives
from training.metrics import evaluate
from training.models import CTRModel, build_model
from training.modules import check_table_names


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_backend() -> str:
    """The process-group backend: always gloo. Training never moves the model or the
    batches to a GPU, and NCCL only reduces CUDA tensors, so NCCL would fail on the CPU
    gradients even on a machine that has CUDA."""
    return "gloo"


def init_distributed() -> DistInfo:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend=dist_backend())
    return DistInfo(dist.get_rank(), dist.get_world_size())


def leave_distributed() -> None:
    """Leave the process group, if this process is in one: every rank waits for the
    others (a barrier) before any tears its part down, so no rank closes its
    connections while another still exchanges on them. A process that exits without
    this leaves gloo's threads to the interpreter's finalisation, which can abort it."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class TrainingDiverged(RuntimeError):
    """The training loss or the validation predictions stopped being finite: nothing is
    reported, nothing more is saved (a NaN epoch would otherwise be compared on a metric
    that NaN scores make meaningless)."""


def rank_slice(rows: np.ndarray, info: DistInfo) -> np.ndarray:
    """This rank's contiguous part of the global batch's ``rows [B, ...]``."""
    return np.array_split(rows, info.world)[info.rank]


def rank_negatives(
    prep: Prepared, glob: np.ndarray, info: DistInfo, rng: np.random.Generator
) -> np.ndarray:
    """DIEN negatives ``[b, S, L]`` for this rank's rows of the global batch ``glob [B]``.

    They are drawn for the whole global batch, from the same seeded ``rng`` on every
    rank, and sliced as the rows are: N ranks get what 1 process draws (drawn per rank,
    row j of every rank would get the same negatives)."""
    e = prep.train.enc
    neg = sample_negatives(
        prep.item_pool,
        e.hist[glob],
        e.hist_len[glob],
        prep.config.max_seq_len,
        rng,
        key=negative_key(prep.config),
    )
    return rank_slice(neg, info)


def rank_share(count: Tensor, info: DistInfo) -> float:
    """``world x`` this rank's share of a count summed over the ranks (1.0 for one
    process): the weight that turns a mean over this rank's items into its part of the
    global mean once DDP averages the ranks' gradients."""
    if info.world == 1:
        return 1.0
    total = count.detach().to(torch.float64).clone()
    dist.all_reduce(total)
    return float(count) * info.world / max(float(total), 1.0)


@torch.no_grad()
def predict(model: CTRModel, split: Split, batch_size: int) -> np.ndarray:
    """Probabilities for every row of ``split``, in order."""
    model.eval()
    out = []
    for start in range(0, len(split), batch_size):
        idx = np.arange(start, min(start + batch_size, len(split)))
        out.append(torch.sigmoid(model(split.batch(idx))["logits"]).numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def table_ids(config: FeatureConfig, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per embedding table, the distinct real IDs (> 0, ascending) of a batch's
    ``user_sparse [B, Fu]``, ``item_sparse [B, Fi]`` and ``hist [B, S, L]``."""
    parts: dict[str, list[Tensor]] = {}
    for j, f in enumerate(config.user_sparse):
        parts.setdefault(f.name, []).append(batch["user_sparse"][:, j])
    for j, f in enumerate(config.item_sparse):
        parts.setdefault(f.name, []).append(batch["item_sparse"][:, j])
    for s, f in enumerate(config.sequences):
        parts.setdefault(config.table_of(f.name), []).append(batch["hist"][:, s].reshape(-1))
    out = {}
    for table, cols in parts.items():
        ids = torch.unique(torch.cat(cols))
        out[table] = ids[ids > 0]
    return out


def l2_of(model: CTRModel, ids: dict[str, Tensor], counts: dict[str, Tensor]) -> Tensor:
    """Sum over tables of ``|w_id|^2 / freq(id)`` for the rows ``ids[table] [K]``. Scalar."""
    total = torch.zeros(())
    for table, rows in ids.items():
        w = model.emb.tables[table].weight[rows]
        total = total + (w.pow(2).sum(-1) / counts[table][rows].clamp(min=1.0)).sum()
    return total


def mba_l2(model: CTRModel, batch: dict[str, Tensor], counts: dict[str, Tensor]) -> Tensor:
    """DIN's mini-batch aware L2: only rows present in the batch, each scaled by 1/freq."""
    return l2_of(model, table_ids(model.config, batch), counts)


def sparse_ids(split: Split, idx: np.ndarray) -> dict[str, Tensor]:
    """Only the ID inputs of rows ``idx``: ``user_sparse [B, Fu]``, ``item_sparse [B, Fi]``
    and ``hist [B, S, L]`` (what :func:`mba_l2` reads)."""
    e = split.enc
    return {
        "user_sparse": torch.from_numpy(e.user_sparse[idx]),
        "item_sparse": torch.from_numpy(e.item_sparse[idx]),
        "hist": torch.from_numpy(e.hist[idx]),
    }


def rank_mba_l2(
    model: CTRModel,
    split: Split,
    glob: np.ndarray,
    info: DistInfo,
    counts: dict[str, Tensor],
) -> Tensor:
    """This rank's part of :func:`mba_l2` over the global batch ``glob [B]``. Scalar.

    The global batch's distinct IDs are split across the ranks and each rank's share is
    scaled by ``world``: DDP averages the gradients, which leaves every row's as one
    process has it (on its own rows alone, an ID that one rank sees would get 1/world
    of its penalty). One process (``world`` 1) gets :func:`mba_l2` of ``glob``."""
    ids = table_ids(model.config, sparse_ids(split, glob))
    mine = {t: rows.tensor_split(info.world)[info.rank] for t, rows in ids.items()}
    return info.world * l2_of(model, mine, counts)


def table_counts(config: FeatureConfig, prep: Prepared) -> dict[str, Tensor]:
    """Occurrences of every index in the training data, per table."""
    e = prep.train.enc
    sizes = prep.mapper.table_sizes()
    counts = {t: np.zeros(n, dtype=np.float32) for t, n in sizes.items()}
    for j, f in enumerate(config.user_sparse):
        counts[f.name] += np.bincount(e.user_sparse[:, j], minlength=sizes[f.name])
    for j, f in enumerate(config.item_sparse):
        counts[f.name] += np.bincount(e.item_sparse[:, j], minlength=sizes[f.name])
    for s, f in enumerate(config.sequences):
        t = config.table_of(f.name)
        counts[t] += np.bincount(e.hist[:, s].reshape(-1), minlength=sizes[t])
    return {t: torch.from_numpy(c) for t, c in counts.items()}


# train.init_bias "auto": the output bias starts at the base rate where the rarer label's
# share of the training split is under this. Where clicks are rare a start near 0.5 is far
# off (15x a 3 % CTR; the Alimama sample's early-stopped model served that); at 37 %
# (the synthetic data) the start cost test AUC, 0.7278 -> 0.6865 and 0.7098 -> 0.6792 on
# two of four seeds (session 45), and on MovieLens and Amazon (55 % and 50 %) it changed
# nothing beyond the seeds' spread
AUTO_INIT_RARER = 0.2

# fewer rows than this of the rarer label in the validation split: a warning (its AUC
# moves by 1/THIN_VALIDATION or more with one row's score)
THIN_VALIDATION = 10


def setting_warnings(config: FeatureConfig, prep: Prepared) -> list[str]:
    """What in ``config`` trains as if it were not there: settings a feature's kind does
    not read (:func:`ctr.spec.ignored_settings`), and vocabularies that kept no token of
    the training split (``min_count`` above every token's count, or an empty column);
    and a validation split too thin in one label for its AUC to pick an epoch."""
    out = ignored_settings(config)
    for name in prep.mapper.empty_vocabularies():
        m = config.feature(name).mapping
        out.append(f"{name}: its vocabulary kept no token of the training split (min_count "
                   f"{m.min_count}): every value maps to OOV, so the feature carries "
                   "nothing")  # fmt: skip
    c = config
    if c.model.type == "dien" and c.model.aux_loss_weight > 0 and c.sequences:
        keyed = prep.item_pool[:, list(negative_key(c))]
        # 0, 1, or at least 2 distinct rows: every row is the first (one pass, no set)
        distinct = 0 if len(keyed) == 0 else 1 + bool((keyed != keyed[0]).any())
        if distinct < 2:  # no other item to draw: every negative is the behaviour itself
            out.append(f"model.aux_loss_weight: the training split's candidates hold "
                       f"{distinct} distinct item(s) to draw DIEN's auxiliary negatives "
                       "from, so each negative is the behaviour it stands against "
                       "(trained as clicked and not): set aux_loss_weight 0")  # fmt: skip
    labels = np.asarray(prep.val.label)  # 0 / 1 (the loaders check)
    ones = int((labels == 1).sum())
    rarer, kind = (ones, "1") if ones <= len(labels) - ones else (len(labels) - ones, "0")
    if len(labels) and rarer == 0:  # an empty split (val_fraction 0) is said at the start
        out.append(f"the validation split holds no row labelled {kind} of {len(labels)}: "
                   "no AUC to pick an epoch by, the last epoch is kept")  # fmt: skip
    elif 0 < rarer < THIN_VALIDATION:
        out.append(f"the validation split holds {rarer} row(s) labelled {kind} of "
                   f"{len(labels)}: its AUC, which picks the epoch kept, is mostly noise "
                   "(a larger data.val_fraction, or more data)")  # fmt: skip
    return out


def train(
    config: FeatureConfig,
    out_dir: str | Path,
    prep: Prepared | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``config`` and write ``checkpoint.pt``, ``metrics.json`` and ``config.json``
    to ``out_dir``. Returns the metrics dict (rank 0's, identical on every rank)."""
    info = init_distributed()
    tc = config.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    seed_everything(tc.seed)
    out = Path(out_dir)
    if info.world > 1:  # one run folder: rank 0's (a default one is named by the clock)
        box = [str(out)]
        dist.broadcast_object_list(box, src=0)
        out = Path(box[0])
    check_table_names(config)  # before the data is read: that can take minutes
    prep = prep or prepare(config)
    if info.main:
        for line in setting_warnings(config, prep):
            print(f"warning: {line}", file=sys.stderr, flush=True)
    model = build_model(config, prep.mapper.table_sizes())
    rate = float(np.mean(prep.train.label))
    if tc.init_bias is True or (tc.init_bias == "auto" and min(rate, 1 - rate) < AUTO_INIT_RARER):
        model.init_bias(rate)
    if tc.clip_dense:
        model.set_dense_range(*dense_bounds(config, prep.train))
    net: nn.Module = model
    if info.world > 1:
        # a model may leave parameters unused in a step, so DDP looks for them; where it
        # finds none, torch's C++ side says so once per rank (a warning Python's filters
        # do not see): harmless
        net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        # each rank its own dropout masks (the same seed drew the same mask for row j
        # of every rank's batch); the weights are rank 0's, broadcast by DDP above
        torch.manual_seed(tc.seed + 1_000_003 * info.rank)
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    bce = nn.BCEWithLogitsLoss()
    counts = table_counts(config, prep) if config.model.mba_l2 > 0 else {}
    rng = np.random.default_rng(tc.seed)
    neg_rng = np.random.default_rng(tc.seed + 1)
    best_auc, best_epoch, history = -1.0, -1, []
    # an empty or one-label validation split has no AUC to choose an epoch by: then every
    # epoch runs and the last is kept
    by_auc = len(prep.val) > 0 and len(np.unique(prep.val.label)) == 2
    if not len(prep.val) and info.main and progress:  # one label: setting_warnings
        print("validation split: 0 rows, no AUC: the last epoch is kept")
    steps = 0
    if info.main:
        out.mkdir(parents=True, exist_ok=True)
        # a previous run's record goes first: an interrupted run into the same folder
        # left new weights beside the old run's config, mapping and metrics, which
        # `ctr export` published as one bundle
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    started = time.time()
    for epoch in range(tc.epochs):
        model.train()
        perm = rng.permutation(len(prep.train))
        n_batches = len(perm) // tc.batch_size or 1
        bar = tqdm(
            range(n_batches),
            desc=f"epoch {epoch + 1}/{tc.epochs}",
            # None: tqdm draws only on a terminal (a piped log gets the epoch lines)
            disable=None if progress and info.main else True,
            leave=False,
        )
        total = 0.0  # the objective: the click BCE, plus aux_loss and mba_l2 where set
        total_bce = 0.0  # the click BCE alone: what compares with the validation logloss
        for b in bar:
            glob = perm[b * tc.batch_size : (b + 1) * tc.batch_size]
            # the global batch is split across ranks, so N processes see what 1 process
            # sees; the skip is decided on the global batch so that all ranks agree (a
            # rank skipping alone would leave the others waiting in the all-reduce)
            if len(glob) < 2 * info.world:
                continue
            idx = rank_slice(glob, info)
            batch = prep.train.batch(idx)
            if config.model.type == "dien":
                batch["neg_hist"] = torch.from_numpy(rank_negatives(prep, glob, info, neg_rng))
            res = net(batch)
            # means over this rank's rows (or aux steps), weighted by its share of the
            # global batch's, so that DDP's average of the ranks is the global mean
            loss = bce(res["logits"], torch.from_numpy(prep.train.label[idx]))
            loss = loss * (len(idx) * info.world / len(glob))
            bce_part = loss.item()
            if "aux_loss" in res:
                aux = res["aux_loss"] * rank_share(res["aux_steps"], info)
                loss = loss + config.model.aux_loss_weight * aux
            if config.model.mba_l2 > 0:
                penalty = rank_mba_l2(model, prep.train, glob, info, counts)
                loss = loss + config.model.mba_l2 * penalty
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            total += loss.item()
            total_bce += bce_part
            bar.set_postfix(loss=f"{total / (b + 1):.4f}")
        if info.world > 1:
            # every rank validates the same model and agrees on early stopping: Dice's
            # running statistics move alike on every rank (by the global batch's); rank
            # 0's buffers are taken all the same, should any drift by a rounding
            for buf in model.buffers():
                dist.broadcast(buf, src=0)
            mean_loss = torch.tensor([total, total_bce], dtype=torch.float64) / info.world
            dist.all_reduce(mean_loss)
            total, total_bce = (float(v) for v in mean_loss)
        if steps == 0:  # every batch was skipped: nothing would be trained
            raise ValueError(
                f"no training step in epoch 1: {len(prep.train)} training rows, "
                f"train.batch_size {tc.batch_size}, {info.world} process(es); a step needs "
                "at least 2 rows per process"
            )
        val_probs = predict(model, prep.val, tc.eval_batch_size)
        if not (np.isfinite(total) and np.isfinite(val_probs).all()):
            what = "validation predictions are not finite"
            if not np.isfinite(total):
                what = f"the training loss is {total}"
            raise TrainingDiverged(
                f"epoch {epoch + 1}: {what}; the best epoch before it was {best_epoch} "
                "(lower train.lr, or check the data for huge or missing dense values)"
            )
        val = evaluate(prep.val.users, prep.val.label, val_probs)
        # train_loss: the objective (DIEN's aux_loss and mba_l2 in it, where set, made it
        # about 3x the validation logloss: a training review); train_logloss: the click
        # BCE alone, the figure to set beside the validation logloss
        history.append({"epoch": epoch + 1, "train_loss": total / n_batches,
                        "train_logloss": total_bce / n_batches, **val})  # fmt: skip
        if info.main and progress:
            print(f"epoch {epoch + 1}: loss {total / n_batches:.4f} (click logloss "
                  f"{total_bce / n_batches:.4f}) val logloss {val['logloss']:.4f} "
                  f"auc {val['auc']:.4f}")  # fmt: skip
        score = -1.0 if np.isnan(val["auc"]) else val["auc"]
        if best_epoch < 0 or score > best_auc or not by_auc:
            best_auc, best_epoch = score, epoch + 1
            if info.main:
                torch.save(model.state_dict(), out / "checkpoint.pt")
        elif epoch + 1 - best_epoch > tc.patience:
            break
    if info.world > 1:
        dist.barrier()
    model.load_state_dict(torch.load(out / "checkpoint.pt", weights_only=True))
    metrics = {
        "model": config.model.type,
        "name": config.name,
        "best_epoch": best_epoch,
        "selected_by": "validation AUC" if by_auc else "last epoch (no validation AUC)",
        "epochs_run": len(history),
        "seconds": round(time.time() - started, 2),
        "world_size": info.world,
        "data_fingerprint": prep.fingerprint,
        "dense_range": model.dense_range(),
        "rows": {"train": len(prep.train), "val": len(prep.val), "test": len(prep.test)},
        "val": evaluate(
            prep.val.users, prep.val.label, predict(model, prep.val, tc.eval_batch_size)
        ),
        "test": evaluate(
            prep.test.users, prep.test.label, predict(model, prep.test, tc.eval_batch_size)
        ),
        "history": history,
    }
    if info.main:
        (out / "metrics.json").write_text(json.dumps(finite(metrics), indent=2, allow_nan=False))
        (out / "config.json").write_text(config.model_dump_json(indent=2))
        (out / "mapping.json").write_text(json.dumps(prep.mapper.to_json()))
    return metrics


def dense_bounds(
    config: FeatureConfig, split: Split
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``((lo [Du], hi [Du]), (lo [Di], hi [Di]))``: each dense column's smallest and
    largest encoded value in ``split`` (the training split: at least one row), widened
    to hold the feature's encoded ``default``: what a missing value (an unknown item, a
    degraded read) is fed as is never clamped, whether training saw it or not."""

    def side(feats: list[FeatureSpec], a: np.ndarray) -> tuple[Tensor, Tensor]:
        if not a.shape[1]:
            return torch.zeros(0), torch.zeros(0)
        default = np.array([to_float(None, f) for f in feats], np.float32)
        lo = np.minimum(a.min(axis=0), default)
        hi = np.maximum(a.max(axis=0), default)
        return torch.from_numpy(lo), torch.from_numpy(hi)

    return (
        side(config.user_dense, split.enc.user_dense),
        side(config.item_dense, split.enc.item_dense),
    )


# what a finished run folder holds (written at the end but the checkpoint)
RUN_FILES = ("config.json", "mapping.json", "metrics.json", "checkpoint.pt")


class RunError(ValueError):
    """A run folder that cannot be loaded: unfinished, damaged, or not one run's."""


# model keys whose default changed what a model computes: a run folder trained before
# the key existed lacks it, and loads with it off
LEGACY_OFF = ("dien_interaction", "deepfm_sequence_first_order", "din_interaction")


def load_run(run_dir: str | Path) -> tuple[FeatureConfig, Any, CTRModel, dict[str, Any]]:
    """``(config, mapper, model in eval mode, metrics)`` from a training run folder."""
    from ctr.mapping import FeatureMapper

    run = Path(run_dir)
    if run.exists() and not run.is_dir():
        raise NotADirectoryError(20, "a file, not a run folder", str(run))
    if not run.is_dir():
        raise FileNotFoundError(2, "no such run folder", str(run))
    missing = [name for name in RUN_FILES if not (run / name).is_file()]
    if missing:
        raise RunError(f"{run} is not a finished training run (no {', '.join(missing)}): "
                       "train into it again")  # fmt: skip
    step = "config.json"
    try:
        raw = json.loads((run / "config.json").read_text())
        for key in LEGACY_OFF:  # trained before the key existed: as it was trained
            raw.setdefault("model", {}).setdefault(key, False)
        config = FeatureConfig.model_validate(raw)
        step = "mapping.json"
        mapper = FeatureMapper.from_json(config, json.loads((run / "mapping.json").read_text()))
        # a mapping without the config's tables fails here, before the checkpoint
        model = build_model(config, mapper.table_sizes())
        step = "checkpoint.pt"
        model.load_state_dict(torch.load(run / "checkpoint.pt", weights_only=True))
        model.eval()
        step = "metrics.json"
        metrics = json.loads((run / "metrics.json").read_text())
        if not isinstance(metrics, dict):
            raise TypeError(f"a JSON object expected, not {type(metrics).__name__}")
    except OSError:
        raise
    except Exception as exc:  # damaged, or not this config's (another shape)
        text = " ".join(str(exc).split())[:300]
        raise RunError(f"{run / step} does not load with this run's other files: "
                       f"{type(exc).__name__}: {text}") from exc  # fmt: skip
    return config, mapper, model, metrics
