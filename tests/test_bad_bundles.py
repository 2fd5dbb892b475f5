"""Bundles that pass the checksums but cannot serve: a graph whose outputs are not one
probability per candidate, a load that fails with an unforeseen exception, odd version
folders and manifests. Each must leave the service not-ready at start-up (or on the
version before it) and answer a reload with 409 while the old version serves on."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import helper, numpy_helper

from ctr.bundle import (
    CONTRACT_KEY,
    CONTRACT_KEY_V2,
    MANIFEST,
    BundleError,
    contract_digest,
    contract_of,
    list_versions,
    load_bundle,
    publish,
    sha256_file,
)
from service import lifecycle
from service.app import create_app
from tests.helpers import Built, build_bundle, child_answers, settings_for

KEY = {"X-API-Key": "k"}
BODY = {"user_id": "u1", "candidates": [{"item_id": f"i{k}"} for k in range(5)]}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_bundle(tmp_path_factory.mktemp("bad-bundles"), "din")


@pytest.fixture
def two_versions(built: Built, tmp_path: Path) -> Built:
    """``built``'s bundle as versions 1 and 2 of a fresh model store."""
    src = built.models_dir / built.config.name / str(built.version)
    models = tmp_path / "models"
    for v in ("1", "2"):
        shutil.copytree(src, models / built.config.name / v)
        _edit_manifest(models / built.config.name / v, lambda m, v=v: m.update(version=int(v)))
    return Built(built.config, built.frame, models, built.run_dir, 1)


def _edit_manifest(folder: Path, edit: Callable[[dict], Any]) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    edit(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


def _alter_probs(folder: Path, kind: str) -> None:
    """Rewrite ``model.onnx`` so that its ``probs`` output is wrong (``kind``: twice as
    many values, or values out of [0, 1]), with the manifest's sha256 to match and no
    fused graph (which would otherwise fail its parity check and not be served)."""
    model = onnx.load(str(folder / "model.onnx"))
    graph = model.graph
    for node in graph.node:
        node.output[:] = ["probs_inner" if o == "probs" else o for o in node.output]
    if kind == "twice":
        graph.node.append(helper.make_node("Concat", ["probs_inner", "probs_inner"], ["probs"],
                                           axis=0))  # fmt: skip
    else:
        graph.initializer.append(numpy_helper.from_array(np.array(1.5, np.float32), "c1_5"))
        graph.node.append(helper.make_node("Add", ["probs_inner", "c1_5"], ["probs"]))
    onnx.save(model, str(folder / "model.onnx"))
    digest = sha256_file(folder / "model.onnx")

    def edit(m: dict) -> None:
        m["onnx_sha256"] = digest
        m.pop("fused", None)
        m.pop("fused_cuda", None)

    _edit_manifest(folder, edit)


@pytest.mark.parametrize("kind", ["twice", "out of range"])
def test_a_graph_that_does_not_return_probabilities_never_serves(
    two_versions: Built, kind: str
) -> None:
    store = two_versions.models_dir / two_versions.config.name
    _alter_probs(store / "2", kind)
    # start-up on it: not ready, and the reason names the graph's answer
    with TestClient(create_app(settings_for(two_versions, model_version="2"))) as c:
        ready = c.get("/readyz")
        assert ready.status_code == 503
        assert "warm-up" in ready.json()["model_error"]
        assert c.post("/v1/score", json=BODY).json()["error"] == "model_not_ready"
    # a reload to it: 409, and version 1 serves on, every candidate scored
    with TestClient(create_app(settings_for(two_versions, model_version="1", api_key="k"))) as c:
        r = c.post("/admin/reload", json={"version": 2}, headers=KEY)
        assert r.status_code == 409 and r.json()["serving"] == "1", r.text
        scored = c.post("/v1/score", json=BODY)
        assert scored.status_code == 200 and len(scored.json()["items"]) == 5
        assert scored.json()["model"]["version"] == "1"
    # "latest" at start-up: the version before it serves
    with TestClient(create_app(settings_for(two_versions, model_version="latest"))) as c:
        assert c.get("/readyz").status_code == 200
        assert c.get("/v1/models").json()["fallback"]["newest"] == "2"


def test_an_unforeseen_exception_while_loading_is_a_bundle_that_does_not_load(
    two_versions: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception of any type from a load (here injected for version 2) is handled as a
    bundle that does not load, never a 500 or a crashed start-up."""
    real = lifecycle.load_model

    def load_model(settings: Any, version: str | None = None) -> Any:
        if version == "2" or (version is None and settings.model_version == "2"):
            raise RuntimeError("an exception nobody foresaw")
        return real(settings, version)

    monkeypatch.setattr(lifecycle, "load_model", load_model)
    with TestClient(create_app(settings_for(two_versions, model_version="2"))) as c:
        error = c.get("/readyz").json()["model_error"]
        assert "RuntimeError: an exception nobody foresaw" in error
    with TestClient(create_app(settings_for(two_versions, model_version="1", api_key="k"))) as c:
        before = _model_load_errors(c)
        r = c.post("/admin/reload", json={"version": 2}, headers=KEY)
        assert r.status_code == 409 and "RuntimeError" in r.json()["detail"], r.text
        assert r.json()["serving"] == "1"
        assert _model_load_errors(c) == before + 1
        assert c.post("/v1/score", json=BODY).status_code == 200


def _model_load_errors(c: TestClient) -> float:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith('ctr_errors_total{kind="model_load"}'):
            return float(line.split()[-1])
    return 0.0


def _buckets(folder: Path, table: str, buckets: int) -> None:
    """Change ``table``'s hash buckets in the manifest, in the config and the mapping
    alike: a manifest that is consistent in itself but not what the graph learnt."""

    def edit(m: dict) -> None:
        for f in m["config"]["features"]:
            if f["name"] == table:
                f["mapping"]["buckets"] = buckets
        m["mapping"][table]["spec"]["buckets"] = buckets

    _edit_manifest(folder, edit)


@pytest.mark.parametrize("child", [0, 1], ids=["read here", "read in a child"])
@pytest.mark.parametrize("buckets", [6000, 4000])
def test_a_mapping_edited_after_the_export_does_not_serve(
    two_versions: Built, buckets: int, child: int
) -> None:
    """DIN's user table has 5,002 rows: 6,000 buckets would index past it (a 500 for some
    users), 4,000 would score every user with another user's row, silently."""
    store = two_versions.models_dir / two_versions.config.name
    model = onnx.load(str(store / "2" / "model.onnx"))
    assert {p.key for p in model.metadata_props} >= {CONTRACT_KEY_V2}  # the export wrote it
    assert load_bundle(two_versions.models_dir, two_versions.config.name, 2).mapper
    _buckets(store / "2", "user_id", buckets)
    load_bundle(two_versions.models_dir, two_versions.config.name, 2)  # valid in itself
    # the digest the child made (CTR_MANIFEST_CHILD_BYTES), or the one made here
    on = {"manifest_child_bytes": child}
    settings = settings_for(two_versions, model_version="2", **on)
    with answered(child), TestClient(create_app(settings)) as c:
        error = c.get("/readyz").json()["model_error"]
        assert "not the ones this graph was exported with" in error, error
    settings = settings_for(two_versions, model_version="1", api_key="k", **on)
    with answered(child), TestClient(create_app(settings)) as c:
        r = c.post("/admin/reload", json={"version": 2}, headers=KEY)
        assert r.status_code == 409 and r.json()["serving"] == "1", r.text


def answered(child: int) -> contextlib.AbstractContextManager[object]:
    """With ``child``, every manifest read must be the child's answer (child_answers)."""
    return child_answers() if child else contextlib.nullcontext()


def _restamp(folder: Path, props: dict[str, str]) -> None:
    """Replace ``model.onnx``'s metadata with ``props``, the manifest's sha256 to match and
    no fused graph (stamped the export's way, it would no longer match)."""
    model = onnx.load(str(folder / "model.onnx"))
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(folder / "model.onnx"))
    digest = sha256_file(folder / "model.onnx")
    _edit_manifest(folder, lambda m: (m.update(onnx_sha256=digest), m.pop("fused"),
                                      m.pop("fused_cuda", None)))  # fmt: skip


def test_a_graph_stamped_the_older_way_is_checked_the_older_way(two_versions: Built) -> None:
    """Exports before the faster digest stamped the ``json`` form under CONTRACT_KEY:
    such a graph loads with its own manifest and is refused with an edited one."""
    store = two_versions.models_dir / two_versions.config.name

    def rename(m: dict) -> None:  # non-ASCII: json escapes it, orjson writes UTF-8
        vocab = m["mapping"]["item_id"]["vocab"]
        key = next(iter(vocab))
        vocab["\u00ef" + key] = vocab.pop(key)

    _edit_manifest(store / "2", rename)
    manifest = json.loads((store / "2" / MANIFEST).read_text())
    older = contract_digest(manifest["config"], manifest["mapping"], CONTRACT_KEY)
    assert older != contract_digest(manifest["config"], manifest["mapping"])  # two forms
    _restamp(store / "2", {CONTRACT_KEY: older})
    # the manifest read here, and in a child (whose digest is the V2 form: not used here)
    for child in (0, 1):
        settings = settings_for(two_versions, model_version="2", manifest_child_bytes=child)
        with answered(child), TestClient(create_app(settings)) as c:
            assert c.get("/readyz").status_code == 200
            assert c.post("/v1/score", json=BODY).status_code == 200
    _buckets(store / "2", "user_id", 4000)
    for child in (0, 1):
        settings = settings_for(two_versions, model_version="2", manifest_child_bytes=child)
        with answered(child), TestClient(create_app(settings)) as c:
            error = c.get("/readyz").json()["model_error"]
            assert "not the ones this graph was exported with" in error, error


def test_an_export_whose_ids_orjson_refuses_is_stamped_the_older_way() -> None:
    """orjson writes UTF-8 only: an ID with a lone surrogate (which the mapping takes)
    made the export fail; it is stamped in ``json``'s form instead."""
    config = {"name": "din"}
    odd = {"item_id": {"spec": {"type": "vocab"}, "vocab": {"i\ud800": 2}}}
    plain = {"item_id": {"spec": {"type": "vocab"}, "vocab": {"i1": 2}}}
    assert contract_of(config, plain) == (CONTRACT_KEY_V2, contract_digest(config, plain))
    assert contract_of(config, odd) == (
        CONTRACT_KEY, contract_digest(config, odd, CONTRACT_KEY))  # fmt: skip


def test_a_graph_exported_before_the_digest_still_loads(two_versions: Built) -> None:
    """Bundles exported before the digest was written carry none: not checked."""
    _restamp(two_versions.models_dir / two_versions.config.name / "2", {})
    with TestClient(create_app(settings_for(two_versions, model_version="2"))) as c:
        assert c.get("/readyz").status_code == 200
        assert c.post("/v1/score", json=BODY).status_code == 200


def test_only_plain_decimal_folders_are_versions(two_versions: Built, tmp_path: Path) -> None:
    """``02`` would be listed as 2 and looked for in ``2``; ``²`` and ``٣`` are digits to
    ``str.isdigit`` but not to ``int``'s folder name: none of them is a version."""
    store = two_versions.models_dir / two_versions.config.name
    for odd in ("02", "²", "٣", "1 "):
        shutil.copytree(store / "1", store / odd)
    assert list_versions(two_versions.models_dir, two_versions.config.name) == [1, 2]
    assert load_bundle(two_versions.models_dir, two_versions.config.name).version == 2
    staged = tmp_path / "staged"
    shutil.copytree(store / "1", staged)
    version, target = publish(two_versions.models_dir, two_versions.config.name, staged)
    assert version == 3 and target == store / "3"


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda m: m.update(created_at=2**70), ".created_at"),
        (lambda m: m["metrics"].update(test={"auc": 10**30}), ".metrics.test.auc"),
        (lambda m: m["inputs"][0]["shape"].__setitem__(0, 2**64), ".inputs[0].shape[0]"),
        # 19 digits: orjson would read it as a float
        (lambda m: m.update(created_at=-(2**63) - 1), ".created_at"),
        # in a container of integers only, checked by its bounds first
        (lambda m: m["mapping"]["item_id"]["vocab"].update(zz=2**64), ".mapping.item_id.vocab.zz"),
    ],
    ids=["created_at", "metric", "input shape", "negative 19 digits", "vocab index"],
)
def test_a_manifest_integer_past_64_bits_is_a_bundle_error(
    two_versions: Built, edit: Callable[[dict], Any], named: str
) -> None:
    """/v1/models writes the manifest back as JSON, which holds no such integer."""
    folder = two_versions.models_dir / two_versions.config.name / "2"
    _edit_manifest(folder, edit)
    with pytest.raises(BundleError, match=re.escape(named)):
        load_bundle(two_versions.models_dir, two_versions.config.name, 2)
    with TestClient(create_app(settings_for(two_versions, model_version="latest"))) as c:
        assert c.get("/v1/models").status_code == 200  # version 1 serves


def test_a_manifest_orjson_refuses_but_json_reads_loads(two_versions: Built) -> None:
    """``json.dumps`` writes a NaN metric as ``NaN``, which orjson refuses: such a manifest,
    and one with a 20-digit integer inside the range or a float past 2**63 (which orjson's
    reading of a long integer looks like), loads, read exactly by ``json``."""
    folder = two_versions.models_dir / two_versions.config.name / "2"
    _edit_manifest(folder, lambda m: m["metrics"].update(test={"auc": float("nan")}))
    assert "NaN" in (folder / MANIFEST).read_text()
    bundle = load_bundle(two_versions.models_dir, two_versions.config.name, 2)
    assert np.isnan(bundle.manifest["metrics"]["test"]["auc"])
    _edit_manifest(folder, lambda m: m["metrics"].update(rows=2**64 - 1, big=1e19))
    bundle = load_bundle(two_versions.models_dir, two_versions.config.name, 2)
    assert bundle.manifest["metrics"]["rows"] == 2**64 - 1  # exact, not a float
    assert bundle.manifest["metrics"]["big"] == 1e19  # a float that size is no error
    with TestClient(create_app(settings_for(two_versions, model_version="2"))) as c:
        assert c.post("/v1/score", json=BODY).status_code == 200
        assert c.get("/v1/models").status_code == 200


def test_a_manifest_nested_past_the_parser_is_a_bundle_error(two_versions: Built) -> None:
    folder = two_versions.models_dir / two_versions.config.name / "2"
    (folder / MANIFEST).write_text('{"format": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(BundleError, match="unreadable manifest"):
        load_bundle(two_versions.models_dir, two_versions.config.name, 2)
    with TestClient(create_app(settings_for(two_versions, model_version="latest"))) as c:
        assert c.get("/readyz").status_code == 200  # version 1 serves
        assert c.get("/v1/models").json()["version"] == "1"


# the service in a child process without root's permission override (a root test run
# would read a chmod 000 folder anyway): /readyz's status and /v1/models' answer
_UNREADABLE_CHILD = """
import json, sys
from fastapi.testclient import TestClient
from service.app import create_app
from service.settings import Settings
models, name, redis_url, version = sys.argv[1:5]
s = Settings(models_dir=models, model_name=name, redis_url=redis_url, model_version=version,
             api_key="k", reload_channel="")
with TestClient(create_app(s)) as c:
    ready = c.get("/readyz", headers={"X-API-Key": "k"})
    info = c.get("/v1/models", headers={"X-API-Key": "k"}).json()
    reload = c.post("/admin/reload", json={"version": 1}, headers={"X-API-Key": "k"})
    print(json.dumps({"ready": ready.status_code, "readyz": ready.json(), "models": info,
                      "reload": reload.status_code}))
"""


def _as_unprivileged(*args: str, script: str = _UNREADABLE_CHILD) -> dict[str, Any]:
    import os
    import subprocess
    import sys

    from tests.helpers import REDIS_URL, ROOT

    cmd = [sys.executable, "-c", script, *args[:2], REDIS_URL, args[2]]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv (util-linux) is missing: root reads any folder")
        drop = "-dac_override,-dac_read_search"
        cmd = ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", *cmd]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_version_folder_that_cannot_be_read_is_a_broken_version(two_versions: Built) -> None:
    """A version folder without read permission made every load fail (the version
    listing raised PermissionError): start-up with ``latest`` crashed the worker, and a
    good pinned version did not load either. It is now a version that does not load."""
    store = two_versions.models_dir / two_versions.config.name
    shutil.copytree(store / "2", store / "3")
    (store / "3").chmod(0)
    try:
        args = (str(two_versions.models_dir), two_versions.config.name)
        latest = _as_unprivileged(*args, "latest")
        assert latest["ready"] == 200 and latest["models"]["version"] == "2", latest
        assert latest["models"]["fallback"]["newest"] == "3"
        assert "Permission" in latest["models"]["fallback"]["error"]
        assert latest["reload"] == 200  # another version loads on request
        pinned = _as_unprivileged(*args, "2")
        assert pinned["ready"] == 200 and pinned["models"]["version"] == "2", pinned
    finally:
        (store / "3").chmod(0o755)


def test_a_model_folder_that_cannot_be_read_leaves_the_service_not_ready(
    two_versions: Built,
) -> None:
    store = two_versions.models_dir / two_versions.config.name
    store.chmod(0)
    try:
        got = _as_unprivileged(str(two_versions.models_dir), two_versions.config.name, "latest")
    finally:
        store.chmod(0o755)
    assert got["ready"] == 503, got  # not ready, and says why; no crashed start-up
    assert "cannot read the model store's folder" in got["readyz"]["model_error"], got
    assert got["reload"] == 409


# the same with the reload bus on and a broadcast record there: the start-up read of the
# deployment's version listed the store too, outside the load's error handling
_UNREADABLE_BUS_CHILD = """
import json, os, sys, uuid
from fastapi.testclient import TestClient
from service.app import create_app
from service.settings import Settings
models, name, redis_url, version = sys.argv[1:5]
s = Settings(models_dir=models, model_name=name, redis_url=redis_url, model_version=version,
             api_key="k", reload_channel="test:bus:" + uuid.uuid4().hex)
with TestClient(create_app(s)) as c:
    r = c.post("/admin/reload", json={"version": 1}, headers={"X-API-Key": "k"})
    assert r.status_code == 200, r.text
os.chmod(os.path.join(models, name), 0)
try:
    with TestClient(create_app(s)) as c:
        ready = c.get("/readyz", headers={"X-API-Key": "k"})
        print(json.dumps({"ready": ready.status_code, "readyz": ready.json()}))
finally:
    os.chmod(os.path.join(models, name), 0o755)
"""


def test_an_unreadable_model_folder_with_the_reload_bus_on_leaves_it_not_ready(
    two_versions: Built,
) -> None:
    """With a deployment record in Redis the start-up asked the store for its newest
    version outside the load's handling: an unreadable folder crashed the worker."""
    got = _as_unprivileged(str(two_versions.models_dir), two_versions.config.name, "latest",
                           script=_UNREADABLE_BUS_CHILD)  # fmt: skip
    assert got["ready"] == 503, got
    assert "cannot read the model store's folder" in got["readyz"]["model_error"], got



def test_the_graph_served_is_the_graph_whose_sha256_was_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``load_bundle`` hashed model.onnx, then the loader read the file again: a file
    replaced in between (a copy landing in the version's folder during a reload) was
    served unchecked, as the version it replaced. The bytes served are hashed now."""
    import ctr.bundle as cb
    from service.model import load_model
    from tests.helpers import build_bundle, settings_for

    built = build_bundle(tmp_path, "din")
    v1 = built.models_dir / built.config.name / "1"
    other = (v1 / "model.onnx").read_bytes() + b"\x00"  # any other bytes
    real = cb.sha256_file

    def hash_then_copy_lands(path: Path) -> str:
        digest = real(path)
        if path == v1 / "model.onnx":
            path.write_bytes(other)
        return digest

    monkeypatch.setattr(cb, "sha256_file", hash_then_copy_lands)
    with pytest.raises(cb.BundleError, match="changed while it loaded"):
        load_model(settings_for(built, native_runner=False), "1")


def test_a_vocabulary_edited_after_the_export_does_not_serve(two_versions: Built) -> None:
    """Two item IDs' indices swapped in the manifest's mapping only (consistent in itself,
    the config untouched): the graph would score each item with the other's row."""
    store = two_versions.models_dir / two_versions.config.name

    def swap(m: dict) -> None:
        vocab = m["mapping"]["item_id"]["vocab"]
        a, b = list(vocab)[:2]
        vocab[a], vocab[b] = vocab[b], vocab[a]

    _edit_manifest(store / "2", swap)
    with TestClient(create_app(settings_for(two_versions, model_version="2"))) as c:
        error = c.get("/readyz").json()["model_error"]
        assert error and "not the ones this graph was exported with" in error, error
