"""ONNX export and the model store: the parity gate for every model type, dynamic N,
manifest round trips, the raw ID -> index contract, versioning, and the errors a
damaged bundle raises. Each model type is trained once (session) and exported once
(module)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ctr.bundle import (
    MANIFEST,
    MODEL_FILE,
    BundleError,
    graph_inputs,
    graph_outputs,
    list_versions,
    load_bundle,
    publish,
    resolve_version,
    sha256_file,
    staging_dir,
)
from ctr.encode import encode_frame
from ctr.spec import LATER_KEYS, FeatureConfig
from training.export import PARITY_TOL, ParityReport, export_bundle, parity_gate
from training.train import predict

MODEL_TYPES = ["base", "deepfm", "din", "multi_tower_din", "dien"]


@dataclass
class Exported:
    run: Any  # conftest.TrainedRun
    models_dir: Path
    name: str
    version: int
    path: Path
    report: ParityReport


@pytest.fixture(scope="module")
def exported(
    trained: Callable[[str], Any], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], Exported]:
    """Factory: ``exported(model_type)``, one export per type into a shared models dir."""
    models_dir = tmp_path_factory.mktemp("models")
    cache: dict[str, Exported] = {}

    def get(model_type: str) -> Exported:
        if model_type not in cache:
            run = trained(model_type)
            version, path, report = export_bundle(
                run.model, run.config, run.mapper, run.metrics, models_dir
            )
            cache[model_type] = Exported(run, models_dir, run.config.name, version, path, report)
        return cache[model_type]

    return get


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def real_feed(prep: Any, user: int, n: int) -> dict[str, np.ndarray]:
    """One real test user and ``n`` real test candidates (cycled), in the model's layout
    (every array; the graph takes the subset named by its inputs)."""
    enc = prep.test.enc
    rows = np.arange(n) % len(prep.test)
    feed = {
        "user_sparse": enc.user_sparse[user : user + 1],
        "user_dense": enc.user_dense[user : user + 1],
        "hist": enc.hist[user : user + 1],
        "hist_len": enc.hist_len[user : user + 1],
        "item_sparse": enc.item_sparse[rows],
        "item_dense": enc.item_dense[rows],
        "user_idx": np.zeros(n, dtype=np.int64),
    }
    return {k: np.ascontiguousarray(v) for k, v in feed.items()}


def torch_outputs(model: Any, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    model.eval()
    with torch.no_grad():
        out = model({k: torch.from_numpy(v) for k, v in feed.items()})
    return {k: v.numpy() for k, v in out.items()}


# ---- parity gate ------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_parity_gate_passes(exported: Callable[[str], Exported], model_type: str) -> None:
    ex = exported(model_type)
    assert ex.version == 1
    assert (ex.path / MODEL_FILE).is_file() and (ex.path / MANIFEST).is_file()
    assert ex.report.ok
    assert ex.report.max_abs_diff <= 1e-5
    cases = {(c["n"], c["hist_len"]) for c in ex.report.cases}
    length = ex.run.config.max_seq_len
    assert {(1, 0), (1, 1), (7, length), (500, 0), (500, length)} <= cases
    assert any(c["users"] > 1 for c in ex.report.cases)
    manifest = json.loads((ex.path / MANIFEST).read_text())
    assert manifest["parity"] == {"max_abs_diff": ex.report.max_abs_diff, "tolerance": PARITY_TOL}
    assert manifest["model_type"] == model_type
    # the fused graph: each DIN unit (one per behaviour group) and DIEN's AUGRU as custom
    # nodes, gated the same way; nothing to fuse in the models without attention
    fused = manifest["fused"]
    if model_type in ("base", "deepfm"):
        assert fused is None and manifest["fused_cuda"] is None
        return
    assert fused is not None and fused["parity"]["max_abs_diff"] <= 1e-5
    graph = onnx.load(str(ex.path / fused["file"])).graph
    custom = sorted(n.op_type for n in graph.node if n.domain == "ctr_ops")
    groups = len(ex.run.config.sequence_groups())
    want = ["AttentionalGRU", "DinAttention"] if model_type == "dien" else ["DinAttention"] * groups
    assert custom == want
    assert (manifest["fused_cuda"] is not None) == (model_type == "dien")


def test_parity_gate_catches_a_model_that_disagrees(exported: Callable[[str], Exported]) -> None:
    """The gate can fail: the same graph against a slightly different torch model."""
    ex = exported("din")
    other = copy.deepcopy(ex.run.model)
    with torch.no_grad():
        other.head.bias.add_(0.01)
    report = parity_gate(other, ex.path / MODEL_FILE, n_values=(1, 7))
    assert not report.ok and report.max_abs_diff > PARITY_TOL


def _skew_output(src: Path, dst: Path, output: str, factor: float, op: str = "Mul") -> None:
    """Copy graph ``src`` to ``dst`` with only ``output`` multiplied by ``factor`` (with
    ``op="Add"``: shifted by it)."""
    model = onnx.load(str(src))
    g = model.graph
    inner = f"{output}_before_skew"
    for node in g.node:
        node.output[:] = [inner if o == output else o for o in node.output]
        node.input[:] = [inner if i == output else i for i in node.input]
    g.initializer.append(onnx.numpy_helper.from_array(np.array(factor, np.float32), "skew"))
    g.node.append(onnx.helper.make_node(op, [inner, "skew"], [output]))
    onnx.save(model, str(dst))


@pytest.mark.parametrize("output", ["logits", "attention"])
def test_parity_gate_checks_every_output_not_only_probs(
    exported: Callable[[str], Exported], tmp_path: Path, output: str
) -> None:
    """A graph whose probabilities match but whose logits or attention weights (served as
    explanations) do not is refused. Before, the gate compared ``probs`` alone."""
    ex = exported("din")
    skewed = tmp_path / "skewed.onnx"
    _skew_output(ex.path / MODEL_FILE, skewed, output, 1.001)
    report = parity_gate(ex.run.model, skewed, n_values=(1, 7))
    assert not report.ok
    assert max(c["probs_diff"] for c in report.cases) <= PARITY_TOL  # probs still agree
    assert max(c[f"{output}_diff"] for c in report.cases) > PARITY_TOL
    clean = parity_gate(ex.run.model, ex.path / MODEL_FILE, n_values=(1, 7))
    assert clean.ok and {"logits_diff", "probs_diff", "attention_diff"} <= set(clean.cases[0])


def test_probabilities_off_by_three_times_the_tolerance_fail_the_gate(
    exported: Callable[[str], Exported], tmp_path: Path
) -> None:
    """The gate holds probabilities to PARITY_TOL (1e-5) in absolute terms: a graph
    whose probabilities are all 3e-5 off, ten times closer than the 0.01 bias above
    gives, is refused."""
    ex = exported("din")
    shifted = tmp_path / "shifted.onnx"
    _skew_output(ex.path / MODEL_FILE, shifted, "probs", 3e-5, op="Add")
    report = parity_gate(ex.run.model, shifted, n_values=(1, 7))
    assert not report.ok
    assert max(c["probs_diff"] for c in report.cases) == pytest.approx(3e-5, rel=0.05)


def test_a_model_name_the_store_cannot_hold_is_refused(
    exported: Callable[[str], Exported], tmp_path: Path
) -> None:
    """``--name`` is held to what a config's name may be (a folder of the model store,
    at most 100 characters) before anything is staged."""
    run = exported("din").run
    store = tmp_path / "store"
    for name in ("m" * 101, "../escaped", ".hidden", "a/b"):
        with pytest.raises(ValueError, match="model name"):
            export_bundle(run.model, run.config, run.mapper, run.metrics, store, name)
    assert not store.exists() or not any(store.iterdir())
    version, path, report = export_bundle(run.model, run.config, run.mapper, run.metrics,
                                          store, "m" * 100)  # fmt: skip
    assert report.ok and path == store / ("m" * 100) / str(version)


@pytest.mark.parametrize("model_type", ["base", "din", "multi_tower_din", "dien"])
def test_a_sequence_in_no_group_is_a_config_error(model_type: str) -> None:
    """These models read behaviours only through sequence groups: a sequence feature in
    none would be ignored, and its export failed (a KeyError on ``attention``, or a graph
    without the ``hist`` inputs the service feeds). The config is refused, naming it.
    DeepFM reads every sequence and takes the same config."""
    from pydantic import ValidationError

    from tests.conftest import tiny_raw

    groups = [g for g in tiny_raw("din")["groups"] if g["type"] != "sequence"]
    with pytest.raises(ValidationError, match="'hist_item_id' is in no sequence group"):
        FeatureConfig.model_validate(tiny_raw(model_type, groups=groups))
    if model_type == "dien":  # DIEN reads only its first sequence group
        two = [*groups, {"name": "a", "type": "sequence", "features": ["hist_cate_id"]},
               {"name": "b", "type": "sequence", "features": ["hist_item_id"]}]  # fmt: skip
        with pytest.raises(ValidationError, match="'hist_item_id' is in no sequence group"):
            FeatureConfig.model_validate(tiny_raw(model_type, groups=two))
    assert FeatureConfig.model_validate(tiny_raw("deepfm", groups=groups)).sequences


@pytest.mark.parametrize("model_type", ["base", "din", "multi_tower_din"])
def test_a_model_without_sequence_features_exports(model_type: str, tmp_path: Path) -> None:
    """No model reads ``hist_len`` without a sequence feature, and the exporter dropped
    the unread input: the graph lacked the input the manifest names and the service
    feeds, and the parity gate failed in ORT ("Invalid input name: hist_len")."""
    from tests.conftest import tiny_raw
    from training.export import export_bundle
    from training.train import load_run, train

    raw = tiny_raw(model_type)
    raw["features"] = [f for f in raw["features"] if f["kind"] != "sequence"]
    raw.pop("groups", None)
    config = FeatureConfig.model_validate(raw)
    train(config, tmp_path / "run", progress=False)
    cfg, mapper, model, metrics = load_run(tmp_path / "run")
    version, path, report = export_bundle(model, cfg, mapper, metrics, tmp_path / "models")
    assert report.ok and version == 1
    manifest = json.loads((path / MANIFEST).read_text())
    graph = [i.name for i in session(path / MODEL_FILE).get_inputs()]
    assert graph == [i["name"] for i in manifest["inputs"]] and "hist_len" in graph


def test_a_config_without_an_item_sparse_feature_is_refused() -> None:
    """Requests name candidates by an item-side sparse feature: a config without one
    validated, then ``ctr train`` died in an IndexError."""
    from pydantic import ValidationError

    from tests.conftest import tiny_raw

    raw = tiny_raw("base")
    raw["features"] = [f for f in raw["features"]
                       if f["kind"] == "dense" or f.get("side") == "user"]  # fmt: skip
    raw.pop("groups", None)
    with pytest.raises(ValidationError, match="needs an item-side sparse feature"):
        FeatureConfig.model_validate(raw)


def test_a_non_finite_output_fails_the_gate() -> None:
    """NaN would drop out of ``max()`` and pass; any non-finite value is an infinite
    difference."""
    from training.export import scaled_diff

    ok = np.array([0.5, 2.0], np.float32)
    assert scaled_diff(ok, ok) == 0.0
    assert scaled_diff(np.array([0.5, np.nan], np.float32), ok) == float("inf")
    assert scaled_diff(np.array([np.inf, 2.0], np.float32), ok) == float("inf")
    assert not ParityReport(max(0.0, scaled_diff(np.array([np.nan]), np.array([0.0]))), []).ok


# ---- dynamic shapes ------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_traced_with_seven_serves_one_and_a_thousand(
    exported: Callable[[str], Exported], model_type: str
) -> None:
    ex = exported(model_type)
    sess = session(ex.path / MODEL_FILE)
    names = [i.name for i in sess.get_inputs()]
    assert names == [i.name for i in graph_inputs(ex.run.config)]
    outputs = [o.name for o in graph_outputs(ex.run.config)]
    assert [o.name for o in sess.get_outputs()] == outputs
    for user, n in ((0, 1), (3, 1000)):
        feed = real_feed(ex.run.prep, user, n)
        ort_feed = {k: feed[k] for k in names}
        got = dict(zip(outputs, sess.run(outputs, ort_feed), strict=True))
        assert got["logits"].shape == (n,) and got["probs"].shape == (n,)
        assert ((got["probs"] > 0) & (got["probs"] < 1)).all()
        want = torch_outputs(ex.run.model, feed)
        np.testing.assert_allclose(got["logits"], want["logits"], rtol=0, atol=1e-4)
        np.testing.assert_allclose(
            got["probs"], 1 / (1 + np.exp(-want["logits"])), rtol=0, atol=1e-5
        )
        if "attention" in got:
            assert got["attention"].shape == (n, ex.run.config.max_seq_len)


# ---- manifest round trip -----------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["din", "dien"])
def test_manifest_round_trips_config_and_mapping(
    exported: Callable[[str], Exported],
    tiny_config: Callable[..., FeatureConfig],
    model_type: str,
) -> None:
    ex = exported(model_type)
    bundle = load_bundle(ex.models_dir, ex.name, "latest")
    assert bundle.version == ex.version and bundle.path == ex.path
    assert bundle.config.model_dump() == tiny_config(model_type).model_dump()
    assert bundle.config.model_dump() == ex.run.config.model_dump()
    # keys the config gained after format 1 are left out at their defaults, so this bundle
    # also loads on a service released before them (its config models forbid them)
    for path in LATER_KEYS:
        node = bundle.manifest["config"]
        for part in path[:-1]:
            node = node[part]
        assert path[-1] not in node, path

    fitted = ex.run.prep.mapper
    assert bundle.mapper.table_sizes() == fitted.table_sizes()
    frames = ex.run.prep.frames
    for table, m in fitted.tables.items():
        got = bundle.mapper.tables[table]
        assert got.spec == m.spec and got.vocab == m.vocab
        raws = [*frames["train"][table].tolist(), *frames["test"][table].tolist()]
        raws += ["never-seen", None, "", float("nan"), 13, "\ud800"]
        np.testing.assert_array_equal(got.map_many(raws), m.map_many(raws))

    manifest = bundle.manifest
    assert manifest["onnx_sha256"] == sha256_file(bundle.model_path)
    assert manifest["data_fingerprint"] == ex.run.prep.fingerprint
    assert manifest["metrics"]["test"] == ex.run.metrics["test"]
    assert manifest["max_seq_len"] == ex.run.config.max_seq_len
    assert bundle.input_names == [i.name for i in graph_inputs(bundle.config)]
    assert [tuple(i["shape"]) for i in manifest["inputs"]] == [
        i.shape for i in graph_inputs(bundle.config)
    ]


def test_raw_ids_through_the_manifest_give_the_training_indices(
    exported: Callable[[str], Exported],
) -> None:
    """Raw rows encoded with the manifest's mapping are exactly the arrays training used,
    and the served graph reproduces training's test predictions from them."""
    ex = exported("din")
    bundle = load_bundle(ex.models_dir, ex.name, ex.version)
    prep = ex.run.prep
    for split in ("train", "test"):
        enc = encode_frame(
            bundle.config, bundle.mapper, prep.frames[split], bundle.config.data.seq_delimiter
        )
        want = getattr(prep, split).enc
        for field in ("user_sparse", "user_dense", "hist", "hist_len", "item_sparse"):
            np.testing.assert_array_equal(getattr(enc, field), getattr(want, field), err_msg=field)
        np.testing.assert_allclose(enc.item_dense, want.item_dense, rtol=0, atol=0)

    enc = encode_frame(bundle.config, bundle.mapper, prep.frames["test"])
    feed = {
        "user_sparse": enc.user_sparse,
        "user_dense": enc.user_dense,
        "hist": enc.hist,
        "hist_len": enc.hist_len,
        "item_sparse": enc.item_sparse,
        "item_dense": enc.item_dense,
        "user_idx": np.arange(len(enc), dtype=np.int64),
    }
    served = session(bundle.model_path).run(["probs"], {k: feed[k] for k in bundle.input_names})
    offline = predict(ex.run.model, prep.test, 64)
    np.testing.assert_allclose(served[0], offline, rtol=0, atol=1e-5)


# ---- versions ------------------------------------------------------------------------------


def test_versions_increase_and_never_overwrite(
    trained: Callable[[str], Any], tmp_path: Path
) -> None:
    run = trained("base")
    models = tmp_path / "models"
    v1, p1, _ = export_bundle(run.model, run.config, run.mapper, run.metrics, models, "m")
    before = {f.name: sha256_file(f) for f in p1.iterdir()}
    v2, p2, _ = export_bundle(run.model, run.config, run.mapper, run.metrics, models, "m")
    assert (v1, v2) == (1, 2) and p1 != p2
    assert {f.name: sha256_file(f) for f in p1.iterdir()} == before
    assert list_versions(models, "m") == [1, 2]
    assert resolve_version(models, "m", "latest") == 2
    assert load_bundle(models, "m").version == 2
    assert load_bundle(models, "m", 1).manifest["version"] == 1
    assert load_bundle(models, "m", "2").manifest["version"] == 2
    assert not [p for p in models.iterdir() if p.name.startswith(".staging")]

    # a half-written version folder (no manifest) is not "latest" and is never reused
    (models / "m" / "3").mkdir()
    (models / "m" / "3" / "partial").write_text("in progress")
    assert resolve_version(models, "m", "latest") == 2
    staged = staging_dir(models)
    for f in p2.iterdir():
        shutil.copy(f, staged / f.name)
    v4, p4 = publish(models, "m", staged)
    assert v4 == 4 and (models / "m" / "3" / "partial").read_text() == "in progress"
    assert json.loads((p4 / MANIFEST).read_text())["version"] == 4
    assert load_bundle(models, "m").version == 4
    assert {f.name: sha256_file(f) for f in p1.iterdir()} == before

    # a deleted version's number is not given again: workers that served the deleted
    # bundle as 4 would take the next export for what they serve (a reload broadcast of
    # "4" would change nothing there)
    shutil.rmtree(p4)
    shutil.rmtree(models / "m" / "3")
    staged = staging_dir(models)
    for f in p2.iterdir():
        shutil.copy(f, staged / f.name)
    v5, _ = publish(models, "m", staged)
    assert v5 == 5 and list_versions(models, "m") == [1, 2, 5]
    assert (models / "m" / ".last_version").read_text().strip() == "5"
    # a mark that cannot be read counts as none (the folders still count), and one
    # that cannot be written does not fail a publish that has happened
    (models / "m" / ".last_version").write_bytes(b"\xff\xfe7")
    staged = staging_dir(models)
    for f in p2.iterdir():
        shutil.copy(f, staged / f.name)
    assert publish(models, "m", staged)[0] == 6
    (models / "m" / ".last_version").unlink()
    (models / "m" / ".last_version").mkdir()
    staged = staging_dir(models)
    for f in p2.iterdir():
        shutil.copy(f, staged / f.name)
    assert publish(models, "m", staged)[0] == 7 and list_versions(models, "m")[-1] == 7
    assert not [p.name for p in (models / "m").iterdir() if p.name.startswith(".last_version.")]


def _staged(store: Path, tag: str) -> Path:
    staged = store / f".staging-{tag}"
    staged.mkdir(parents=True)
    (staged / MANIFEST).write_text('{"format": 1}')
    return staged


def test_two_exports_at_once_never_give_a_deleted_number_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exporter A published 1 and was about to write its mark when B published 2 and
    wrote 2; A's mark then landed: ``.last_version`` said 1, and once 2 was deleted (a
    bad version rolled back) the next export was given 2 again. Publishing holds a lock
    (A here stalls between its check and its write, as a descheduled process would):
    B waits for A, and the mark ends at 2. Other exporters read the mark (0644)."""
    import stat
    import threading

    import ctr.bundle as cb

    store = tmp_path / "models"
    real_replace = os.replace
    a_ready, b_started = threading.Event(), threading.Event()

    def replace(src: str, dst: str) -> None:
        if threading.current_thread().name == "A" and str(dst).endswith(cb.LAST_VERSION_FILE):
            a_ready.set()
            b_started.wait(5)
            time.sleep(0.3)  # B runs meanwhile, up to the lock
        real_replace(src, dst)

    monkeypatch.setattr(cb.os, "replace", replace)
    got: dict[str, int] = {}

    def export_a() -> None:
        got["A"] = cb.publish(store, "din", _staged(store, "a"))[0]

    a = threading.Thread(name="A", target=export_a)
    a.start()
    assert a_ready.wait(5)
    b_started.set()
    got["B"] = cb.publish(store, "din", _staged(store, "b"))[0]
    a.join()
    assert got == {"A": 1, "B": 2}
    mark = store / "din" / cb.LAST_VERSION_FILE
    assert mark.read_text().strip() == "2"
    assert stat.S_IMODE(mark.stat().st_mode) == 0o644
    shutil.rmtree(store / "din" / "2")
    assert cb.publish(store, "din", _staged(store, "c"))[0] == 3


def test_a_dead_exports_staging_folder_is_swept_by_the_next(tmp_path: Path) -> None:
    """An export killed before its clean-up (SIGKILL, its container stopped) left
    ``.staging-*`` in the store for good. Each exporter holds a lock on its folder; the
    next export removes the folders whose lock it can take, whatever machine, container
    or process namespace made them. A running export's and an old-style folder (no lock
    file) are left alone; a published version carries no lock file."""
    import signal
    import subprocess
    import sys

    from ctr.bundle import STAGING_LOCK, sweep_staging
    from tests.helpers import ROOT, until

    models = tmp_path / "models"
    make = ("import os, sys, time; from ctr.bundle import staging_dir; "
            "p = staging_dir(sys.argv[1]); (p / 'model.onnx').write_bytes(b'partial'); "
            "print(p, flush=True); time.sleep(float(sys.argv[2])); os._exit(0)")  # fmt: skip
    dead = subprocess.run([sys.executable, "-c", make, str(models), "0"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    live = subprocess.Popen([sys.executable, "-c", make, str(models), "60"], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert live.stdout is not None
        running = Path(live.stdout.readline().strip())
        old = models / ".staging-k2j3h4"  # before session 37: no lock file
        old.mkdir()
        mine = staging_dir(models)
        assert not Path(dead).exists(), "a dead export's folder was not swept"
        assert running.exists() and old.exists() and (mine / STAGING_LOCK).exists()
        assert sweep_staging(models) == []  # its own folder: this process holds it
        live.send_signal(signal.SIGKILL)
        live.wait(10)
        assert until(lambda: sweep_staging(models) == [running], 5)
        assert not running.exists() and mine.exists() and old.exists()
        (mine / MANIFEST).write_text('{"format": 1}')
        _, published = publish(models, "m", mine)
        assert not (published / STAGING_LOCK).exists()
        # an exporter killed between its rename and its unlink left the lock file in
        # its version for good: the next publish (under the publish lock) drops it
        (published / STAGING_LOCK).write_text("")
        again = staging_dir(models)
        (again / MANIFEST).write_text('{"format": 1}')
        _, second = publish(models, "m", again)
        assert not (published / STAGING_LOCK).exists() and not (second / STAGING_LOCK).exists()
        assert (published / MANIFEST).exists()
    finally:
        live.kill()


def test_an_export_killed_while_it_waits_to_publish_leaves_a_folder_the_next_sweeps(
    tmp_path: Path,
) -> None:
    """``publish`` dropped the staged folder's lock file before it waited for the
    publish lock (another exporter publishing) and rewrote the manifest (seconds for a
    large vocabulary): an exporter killed there left its whole bundle in the store, which
    no sweep removed (review, session 40). The folder stays locked until renamed."""
    import fcntl
    import signal
    import subprocess
    import sys

    from ctr.bundle import PUBLISH_LOCK_FILE, STAGING_LOCK, sweep_staging
    from tests.helpers import ROOT, until

    models = tmp_path / "models"
    (models / "m").mkdir(parents=True)
    stage = ("import sys; from ctr.bundle import publish, staging_dir; "
             "p = staging_dir(sys.argv[1]); (p / 'manifest.json').write_text('{}'); "
             "print(p, flush=True); publish(sys.argv[1], 'm', p)")  # fmt: skip
    with open(models / "m" / PUBLISH_LOCK_FILE, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another exporter publishing
        proc = subprocess.Popen([sys.executable, "-c", stage, str(models)], cwd=ROOT,
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert proc.stdout is not None
            staged = Path(proc.stdout.readline().strip())
            assert staged.name.startswith(".staging-")
            time.sleep(0.5)  # it waits on the publish lock
            assert proc.poll() is None and (staged / STAGING_LOCK).exists()
            assert sweep_staging(models) == []  # a waiting exporter's folder stays
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        finally:
            proc.kill()
    assert until(lambda: sweep_staging(models) == [staged], 5)
    assert not staged.exists() and not any((models / "m").glob("[0-9]*"))


def test_sigterm_during_ctr_export_leaves_no_staging_folder(
    trained: Callable[[str], Any], tmp_path: Path
) -> None:
    """SIGTERM (a job's timeout, ``kill``) ended ``ctr export`` on the spot: its staging
    folder stayed in the store. It now runs the same clean-up as Ctrl-C, says so and
    exits 143."""
    import signal
    import subprocess
    import sys
    import time

    from tests.helpers import ROOT, until

    run = trained("din")
    models = tmp_path / "models"
    cmd = [sys.executable, "-m", "ctr.cli", "export", "--run", str(run.run_dir),
           "--models-dir", str(models)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        staged = lambda: models.is_dir() and any(  # noqa: E731
            p.name.startswith(".staging-") and any(p.iterdir()) for p in models.iterdir()
        )
        assert until(staged, 120), "the export never staged a file"
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert "ctr export: terminated; no version was published" in err
    assert not [p.name for p in models.iterdir() if p.name.startswith(".staging")]
    assert list_versions(models, run.config.name) == []


# ---- damaged bundles -----------------------------------------------------------------------


@pytest.fixture
def copy_of(exported: Callable[[str], Exported], tmp_path: Path) -> tuple[Path, Path]:
    """``(models_dir, version folder)``: a private copy of the DIN bundle as version 1."""
    ex = exported("din")
    models = tmp_path / "models"
    shutil.copytree(ex.path, models / "m" / "1")
    load_bundle(models, "m")  # intact before the damage
    return models, models / "m" / "1"


def _flip(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i : i + 8] = bytes(b ^ 0xFF for b in data[i : i + 8])
    path.write_bytes(bytes(data))


def test_truncated_model_is_corrupt(copy_of: tuple[Path, Path]) -> None:
    models, folder = copy_of
    model = folder / MODEL_FILE
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    with pytest.raises(BundleError, match="corrupt") as err:
        load_bundle(models, "m")
    assert str(model) in str(err.value)


def test_flipped_bytes_are_corrupt(copy_of: tuple[Path, Path]) -> None:
    models, folder = copy_of
    _flip(folder / MODEL_FILE)
    with pytest.raises(BundleError, match=r"corrupt.*sha256"):
        load_bundle(models, "m", 1)


def test_missing_model_file(copy_of: tuple[Path, Path]) -> None:
    models, folder = copy_of
    (folder / MODEL_FILE).unlink()
    with pytest.raises(BundleError, match="model file missing") as err:
        load_bundle(models, "m")
    assert MODEL_FILE in str(err.value)


def test_missing_version_and_missing_model(copy_of: tuple[Path, Path], tmp_path: Path) -> None:
    models, _ = copy_of
    with pytest.raises(BundleError, match=r"'m' has no version 7 \(have \[1\]\)"):
        load_bundle(models, "m", 7)
    for bad in ("abc", ":", "1.5", ""):
        with pytest.raises(BundleError, match="version must be a number or 'latest'"):
            load_bundle(models, "m", bad)
    with pytest.raises(BundleError, match="no versions of model 'other'"):
        load_bundle(models, "other", "latest")
    with pytest.raises(BundleError, match="no versions"):
        load_bundle(tmp_path / "nowhere", "m")


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda t: t[: len(t) // 2], "unreadable manifest"),
        (lambda t: "", "unreadable manifest"),
        (lambda t: "\xff\xfe" + t, "unreadable manifest"),  # written as latin-1: not UTF-8
        (lambda t: "[1, 2, 3]", "manifest"),
        (lambda t: t.replace('"format": 1', '"format": 99'), "unsupported format 99"),
        (lambda t: _drop(t, "mapping"), "invalid feature spec or mapping"),
        (lambda t: _edit(t, ["config", "max_seq_len"], -3), "invalid feature spec or mapping"),
        (lambda t: _edit(t, ["mapping", "item_id"], "oops"), "invalid feature spec or mapping"),
    ],
    ids=[
        "truncated",
        "empty",
        "not-utf8",
        "not-an-object",
        "format",
        "no-mapping",
        "bad-config",
        "bad-mapping",
    ],
)
def test_garbled_manifest(
    copy_of: tuple[Path, Path], damage: Callable[[str], str], message: str
) -> None:
    models, folder = copy_of
    path = folder / MANIFEST
    text = damage(path.read_text())
    path.write_bytes(text.encode("latin-1") if text.startswith("\xff") else text.encode())
    with pytest.raises(BundleError, match=message) as err:
        load_bundle(models, "m")
    assert MANIFEST in str(err.value)


def _drop(text: str, key: str) -> str:
    data = json.loads(text)
    del data[key]
    return json.dumps(data)


def _edit(text: str, keys: list[str], value: Any) -> str:
    data = json.loads(text)
    node = data
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    return json.dumps(data)


def test_an_unreadable_model_file_is_a_bundle_error(
    exported: Callable[[str], Exported], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An I/O error reading model.onnx (a failing network volume, a file removed meanwhile)
    is a BundleError: the service then runs not-ready at start, or answers 409 to a reload,
    as docs/api.md says, instead of crashing or a 500."""
    import ctr.bundle as cb

    ex = exported("din")

    def failing(path: Path) -> str:
        raise OSError(5, "Input/output error", str(path))

    monkeypatch.setattr(cb, "sha256_file", failing)
    with pytest.raises(BundleError, match="unreadable"):
        load_bundle(ex.models_dir, ex.name, ex.version)


def test_a_sweep_never_takes_a_publishing_folders_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publish unlinks its folder's lock file, releases the lock, then renames the
    folder into place: a sweep that had opened the lock file just before took the lock
    then and deleted the folder being published. The lock must still be the folder's."""
    import fcntl

    import ctr.bundle as cb

    models = tmp_path / "models"
    staged = cb.staging_dir(models)
    owner = cb._STAGING_LOCKS.pop(staged)  # as another exporter's folder to this sweep
    real = fcntl.flock

    def flock(fd: int, op: int) -> None:
        if op & fcntl.LOCK_NB:  # the sweep opened the lock file; the publish gets in now
            (staged / cb.STAGING_LOCK).unlink()
            os.close(owner)
        real(fd, op)

    monkeypatch.setattr(cb.fcntl, "flock", flock)
    assert cb.sweep_staging(models) == []
    assert staged.exists(), "a folder being published was swept"
