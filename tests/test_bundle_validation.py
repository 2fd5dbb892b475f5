"""``load_bundle`` validates the manifest before serving it: a corrupt mapping (indices out
of range, repeated, of the wrong type; a table missing, unknown or mapped differently from
the config) or a malformed ``metrics``/``fused``/``inputs`` entry is a :class:`BundleError`
naming the manifest and the bad key, not a ready service that answers 500 or wrong scores.
A real DIN bundle is trained once (session) and exported once (module); each case damages
a private copy of its manifest."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ctr.bundle import MANIFEST, BundleError, load_bundle, validate_manifest
from ctr.mapping import RESERVED
from ctr.spec import FeatureConfig
from tests.helpers import child_answers
from training.export import export_bundle

Manifest = dict[str, Any]


@pytest.fixture(scope="module")
def exported_din(trained: Callable[[str], Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The version folder of a DIN bundle exported by ``export_bundle``."""
    run = trained("din")
    models = tmp_path_factory.mktemp("validation-models")
    _, path, _ = export_bundle(run.model, run.config, run.mapper, run.metrics, models)
    return path


@pytest.fixture
def bundle_copy(exported_din: Path, tmp_path: Path) -> tuple[Path, Path]:
    """``(models_dir, manifest path)`` of a private copy of the bundle as ``m/1``."""
    models = tmp_path / "models"
    shutil.copytree(exported_din, models / "m" / "1")
    return models, models / "m" / "1" / MANIFEST


def _key(vocab: dict[str, int], at: int) -> str:
    return list(vocab)[at]


def _vocab_value(table: str, at: int, value: Any) -> Callable[[Manifest], str]:
    """Set the vocab entry at position ``at`` of ``table`` to ``value``; the bad key."""

    def damage(m: Manifest) -> str:
        vocab = m["mapping"][table]["vocab"]
        key = _key(vocab, at)
        vocab[key] = value
        return f"mapping.{table}.vocab[{json.dumps(key)}]"

    return damage


def _one_past_end(m: Manifest) -> str:
    vocab = m["mapping"]["cate_id"]["vocab"]
    key = _key(vocab, 0)
    vocab[key] = RESERVED + len(vocab)  # unique, but leaves index RESERVED unused
    return f"mapping.cate_id.vocab[{json.dumps(key)}]"


def _duplicate(m: Manifest) -> str:
    vocab = m["mapping"]["item_id"]["vocab"]
    last = _key(vocab, -1)
    vocab[last] = vocab[_key(vocab, 0)]
    return f"mapping.item_id.vocab[{json.dumps(last)}]"


def _missing_table(m: Manifest) -> str:
    del m["mapping"]["cate_id"]
    return "mapping.cate_id"


def _extra_table(m: Manifest) -> str:
    m["mapping"]["bogus"] = copy.deepcopy(m["mapping"]["cate_id"])
    return "mapping.bogus"


def _spec_edit(table: str, field: str, value: Any) -> Callable[[Manifest], str]:
    def damage(m: Manifest) -> str:
        m["mapping"][table]["spec"][field] = value
        return f"mapping.{table}.spec"

    return damage


def _hash_with_vocab(m: Manifest) -> str:
    m["mapping"]["user_id"]["vocab"] = {"u1": RESERVED}
    return "mapping.user_id.vocab"


def _vocab_null(m: Manifest) -> str:
    m["mapping"]["cate_id"]["vocab"] = None
    return "mapping.cate_id.vocab"


def _no_spec(m: Manifest) -> str:
    del m["mapping"]["cate_id"]["spec"]
    return "mapping.cate_id.spec"


def _over_max_size(m: Manifest) -> str:
    """Config and mapping agree on ``max_size``, but the vocab is larger than that."""
    for f in m["config"]["features"]:
        if f["name"] == "cate_id":
            f["mapping"]["max_size"] = 3
    m["mapping"]["cate_id"]["spec"]["max_size"] = 3
    return "mapping.cate_id.vocab"


def _top(key: str, value: Any) -> Callable[[Manifest], str]:
    def damage(m: Manifest) -> str:
        m[key] = value
        return key

    return damage


CASES: dict[str, Callable[[Manifest], str]] = {
    "index-out-of-range": _vocab_value("item_id", 3, 1_000_000),
    "index-one-past-end": _one_past_end,
    "index-negative": _vocab_value("item_id", 5, -1),
    "index-pad": _vocab_value("cate_id", 1, 0),
    "index-oov": _vocab_value("cate_id", 2, 1),
    "index-string": _vocab_value("item_id", 7, "5"),
    "index-float": _vocab_value("hour", 1, 3.0),
    "index-null": _vocab_value("age_bucket", 0, None),
    "index-bool": _vocab_value("item_id", 0, True),
    "index-duplicate": _duplicate,
    "table-missing": _missing_table,
    "table-extra": _extra_table,
    "spec-min-count": _spec_edit("item_id", "min_count", 5),
    "spec-hash-buckets": _spec_edit("user_id", "buckets", 10),
    "spec-type": _spec_edit("cate_id", "type", "hash"),
    "spec-missing": _no_spec,
    "hash-with-vocab": _hash_with_vocab,
    "vocab-null": _vocab_null,
    "vocab-over-max-size": _over_max_size,
    "metrics-null": _top("metrics", None),
    "metrics-list": _top("metrics", [1, 2]),
    "fused-string": _top("fused", "yes"),
    "fused-cuda-list": _top("fused_cuda", []),
    "inputs-not-list": _top("inputs", {"user_sparse": 1}),
    "outputs-not-list": _top("outputs", "logits"),
}


@pytest.mark.parametrize("damage", list(CASES.values()), ids=list(CASES))
def test_a_corrupt_manifest_is_a_bundle_error_naming_the_key(
    bundle_copy: tuple[Path, Path], damage: Callable[[Manifest], str]
) -> None:
    models, path = bundle_copy
    manifest = json.loads(path.read_text())
    key = damage(manifest)
    path.write_text(json.dumps(manifest))
    messages = []
    for child in (0, 1):  # read here, and in a child process (ctr.manifest_proc): the same
        with child_answers(), pytest.raises(BundleError) as err:
            load_bundle(models, "m", child_min_bytes=child)
        messages.append(str(err.value))
    message = messages[0]
    assert messages[1] == message
    assert str(path) in message
    assert key in message


def test_the_unmodified_copy_loads(bundle_copy: tuple[Path, Path]) -> None:
    models, path = bundle_copy
    bundle = load_bundle(models, "m")
    manifest = json.loads(path.read_text())
    for name, table in manifest["mapping"].items():
        assert bundle.mapper.tables[name].size == RESERVED + (
            len(table["vocab"]) if table["spec"]["type"] == "vocab" else table["spec"]["buckets"]
        )


@pytest.mark.parametrize("key", ["metrics", "fused", "fused_cuda", "inputs", "outputs"])
def test_optional_entries_may_be_left_out(bundle_copy: tuple[Path, Path], key: str) -> None:
    models, path = bundle_copy
    manifest = json.loads(path.read_text())
    del manifest[key]
    path.write_text(json.dumps(manifest))
    load_bundle(models, "m")


def test_fused_entries_may_be_null(bundle_copy: tuple[Path, Path]) -> None:
    models, path = bundle_copy
    manifest = json.loads(path.read_text())
    manifest["fused"] = manifest["fused_cuda"] = None
    path.write_text(json.dumps(manifest))
    assert load_bundle(models, "m").fused is None


# ---- validate_manifest on its own: what JSON cannot express, and a large vocabulary ------


def _tiny_manifest(tiny_config: Callable[..., FeatureConfig]) -> tuple[Manifest, FeatureConfig]:
    config = tiny_config("din")
    mapping = {
        t.name: {
            "spec": t.mapping.model_dump(),
            "vocab": {} if t.mapping.type == "hash" else {"a": RESERVED, "b": RESERVED + 1},
        }
        for t in config.tables
    }
    return {"mapping": mapping, "metrics": {}}, config


def test_a_vocab_key_must_be_a_string(tiny_config: Callable[..., FeatureConfig]) -> None:
    manifest, config = _tiny_manifest(tiny_config)
    validate_manifest(manifest, config, Path("x/manifest.json"))
    manifest["mapping"]["item_id"]["vocab"] = {"a": RESERVED, 7: RESERVED + 1}
    with pytest.raises(BundleError, match=r"mapping\.item_id\.vocab\[7\].*not a string"):
        validate_manifest(manifest, config, Path("x/manifest.json"))


def test_a_large_shuffled_vocab_passes_and_a_single_gap_is_found(
    tiny_config: Callable[..., FeatureConfig],
) -> None:
    import random

    manifest, config = _tiny_manifest(tiny_config)
    n = 200_000
    idx = list(range(RESERVED, RESERVED + n))
    random.Random(0).shuffle(idx)
    vocab = {f"i{k}": i for k, i in enumerate(idx)}
    manifest["mapping"]["item_id"]["vocab"] = vocab
    validate_manifest(manifest, config, Path("x/manifest.json"))
    vocab["i123"] = RESERVED + n
    with pytest.raises(BundleError, match=r'mapping\.item_id\.vocab\["i123"\]'):
        validate_manifest(manifest, config, Path("x/manifest.json"))
