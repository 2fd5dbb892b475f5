"""A large manifest read in a child process (``ctr.manifest_proc``,
``CTR_MANIFEST_CHILD_BYTES``) gives the bundle reading it here gives: the same manifest,
vocabularies (sent back in pieces) and errors, in the same order of checks, and the
contract digest the service would compute; a child that fails leaves the read to this
process. ``tests/test_bundle_validation.py`` runs every corrupt-manifest case both ways,
``tests/test_bad_bundles.py`` the service's refusal of an edited mapping."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from ctr import manifest_proc
from ctr.bundle import (
    CONTRACT_KEY_V2,
    MANIFEST,
    MODEL_FILE,
    BundleError,
    contract_digest,
    load_bundle,
)
from service.app import create_app
from tests.helpers import Built, build_and_load, child_answers, settings_for
from training.big_manifest import write_big_bundle

BIG = 2 * manifest_proc.CHUNK + 123  # three pieces, the last a short one


def write_bundle(models: Path, vocab: int) -> Path:
    """A DIN bundle whose item_id vocabulary has ``vocab`` entries, shuffled indices."""
    return write_big_bundle(models, vocab, shuffled=True, others=40)


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bundle(tmp_path_factory.mktemp("big"), BIG).parent.parent


def test_a_child_reads_what_this_process_reads(big: Path) -> None:
    here = load_bundle(big, "din", 1)
    with child_answers() as answers:
        there = load_bundle(big, "din", 1, child_min_bytes=1)
    assert len(answers) == 1
    assert there.manifest == here.manifest
    for name, table in here.mapper.tables.items():
        # the same entries in the same order, pieces joined
        assert list(there.mapper.tables[name].vocab.items()) == list(table.vocab.items())
        assert there.mapper.tables[name].size == table.size
    assert len(there.mapper.tables["item_id"].vocab) == BIG
    m = here.manifest
    assert here.contract_v2 is None  # not computed here: the service digests when it checks
    assert there.contract_v2 == contract_digest(m["config"], m["mapping"], CONTRACT_KEY_V2)
    # the table keeps the vocabulary the child sent: no copy of a million entries
    assert there.mapper.tables["item_id"].vocab is there.manifest["mapping"]["item_id"]["vocab"]


def test_only_a_manifest_of_the_threshold_goes_to_a_child(
    big: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = (big / "din" / "1" / MANIFEST).stat().st_size
    calls: list[Path] = []
    real = manifest_proc.read
    monkeypatch.setattr(manifest_proc, "read", lambda p: calls.append(p) or real(p))
    assert load_bundle(big, "din", 1, child_min_bytes=size + 1).contract_v2 is None
    assert load_bundle(big, "din", 1).contract_v2 is None  # 0: never
    assert not calls
    assert load_bundle(big, "din", 1, child_min_bytes=size).contract_v2 is not None
    assert len(calls) == 1


@pytest.mark.parametrize("executable", ["/nonexistent/python", "/bin/true", "/bin/false"])
def test_a_child_that_fails_leaves_the_read_to_this_process(
    big: Path, executable: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    here = load_bundle(big, "din", 1)
    monkeypatch.setattr(sys, "executable", executable)
    with caplog.at_level(logging.WARNING, "ctr.bundle"):
        got = load_bundle(big, "din", 1, child_min_bytes=1)
    assert got.manifest == here.manifest and got.contract_v2 is None
    assert "read in-process" in caplog.text


def test_a_child_that_hangs_is_killed_at_the_deadline(
    big: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One that neither writes nor ends (a wedged interpreter) would hold the load, and a
    worker's shutdown, for good."""
    stuck = tmp_path / "stuck"
    stuck.write_text("#!/bin/sh\nexec sleep 600\n")
    stuck.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(stuck))
    with caplog.at_level(logging.WARNING, "ctr.bundle"):
        assert manifest_proc.read(big / "din" / "1" / MANIFEST, timeout_s=1.0) is None
    assert "killed after 1.0 s" in caplog.text


def test_the_stream_holds_plain_values_only() -> None:
    """Whatever writes it, unpickling it loads no class (runs no code)."""
    import io
    import pickle

    evil = pickle.dumps({"tag": manifest_proc.TAG, "x": Path("/")})
    with pytest.raises(pickle.UnpicklingError, match="not a plain value"):
        manifest_proc._receive(io.BytesIO(evil))
    other = {"tag": manifest_proc.TAG, "code": "/elsewhere/ctr/manifest_proc.py"}
    with pytest.raises(ValueError, match="the child ran"):
        manifest_proc._receive(io.BytesIO(pickle.dumps(other)))


def test_no_temporary_folder_leaves_the_read_to_this_process(
    big: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refused() -> None:
        raise FileNotFoundError("no usable temporary directory")

    monkeypatch.setattr(manifest_proc.tempfile, "TemporaryFile", refused)
    with caplog.at_level(logging.WARNING, "ctr.bundle"):
        assert load_bundle(big, "din", 1, child_min_bytes=1).contract_v2 is None
    assert "no temporary file" in caplog.text


def _damage(folder: Path, edit: Any) -> None:
    path = folder / MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _both(models: Path) -> list[str]:
    """The BundleError message a load gives here and through a child (which must answer:
    a fallback to reading here would make the two agree whatever the child does)."""
    messages = []
    for child in (0, 1):
        with child_answers(), pytest.raises(BundleError) as err:
            load_bundle(models, "din", 1, child_min_bytes=child)
        messages.append(str(err.value))
    return messages


def test_errors_come_in_the_same_order_both_ways(tmp_path: Path) -> None:
    """load_bundle reports a manifest it cannot read before the model file, and the
    model file before the mapping's checks: a child's error keeps its place."""
    folder = write_bundle(tmp_path, 300)

    def bad_index(m: dict) -> None:
        m["mapping"]["item_id"]["vocab"]["item_id:3"] = 10**6

    _damage(folder, bad_index)
    here, there = _both(tmp_path)
    assert here == there and "mapping.item_id.vocab" in here
    (folder / MODEL_FILE).write_bytes(b"altered")  # now the model file is wrong too
    here, there = _both(tmp_path)
    assert here == there and "is corrupt" in here
    (folder / MANIFEST).write_text("{not json")  # and now the manifest does not parse
    here, there = _both(tmp_path)
    assert here == there and "unreadable manifest" in here
    (folder / MANIFEST).write_text('{"format": 99}')  # or is of another format
    here, there = _both(tmp_path)
    assert here == there and "unsupported format 99" in here


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_and_load(tmp_path_factory.mktemp("child-served"), "din")


def test_the_service_scores_alike_from_a_manifest_read_in_a_child(built: Built) -> None:
    body = {
        "user_id": str(built.frame["user_id"].iloc[0]),
        "candidates": [{"item_id": str(i)} for i in built.frame["item_id"].unique()[:30]],
    }
    answers = []
    for child in (0, 1):
        with TestClient(create_app(settings_for(built, manifest_child_bytes=child))) as c:
            model = c.app.state.ctr.model  # type: ignore[attr-defined]
            assert (model.bundle.contract_v2 is not None) == bool(child)
            r = c.post("/v1/score", json=body)
            assert r.status_code == 200, r.text
            answers.append(r.json()["items"])
    assert answers[0] == answers[1]
