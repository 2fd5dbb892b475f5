"""A bundle whose manifest holds a large vocabulary, for ``scripts/bench_manifest.py`` and
``tests/test_manifest_proc.py``: the synthetic DIN config's feature spec, an ``item_id``
vocabulary of any size, and a placeholder model file (``load_bundle`` checks its sha256
only; nothing here parses it). Torch-free."""

from __future__ import annotations

import json
from pathlib import Path

from ctr.bundle import FORMAT_VERSION, MANIFEST, MODEL_FILE, sha256_file
from ctr.spec import load_config, manifest_config

ROOT = Path(__file__).resolve().parents[1]


def write_big_bundle(
    models: Path, vocab: int, long_ids: bool = False, shuffled: bool = False, others: int = 50
) -> Path:
    """Writes ``models/din/1`` and returns it: ``item_id`` has ``vocab`` entries (keys
    ``item_id:<k>``, or 19-digit ones with ``long_ids``; indices in order, or a
    permutation with ``shuffled``), the other vocabulary tables ``others``."""
    config = load_config(ROOT / "configs" / "synthetic_din.yaml", {"name": "din"})
    mapping = {}
    for table in config.tables:
        n = vocab if table.name == "item_id" else others
        names = [str(10**18 + k) if long_ids else f"{table.name}:{k}" for k in range(n)]
        # 7919 is prime: k -> 7919 k mod n is a permutation unless n is a multiple of it
        index = [(k * 7919) % n if shuffled and n % 7919 else k for k in range(n)]
        spec = table.mapping
        entries = {name: i + 2 for name, i in zip(names, index, strict=True)}
        mapping[table.name] = {
            "spec": spec.model_dump(),
            "vocab": entries if spec.type == "vocab" else {},
        }
    path = models / "din" / "1"
    path.mkdir(parents=True)
    (path / MODEL_FILE).write_bytes(b"placeholder: load_bundle checks its sha256 only")
    manifest = {
        "format": FORMAT_VERSION,
        "name": "din",
        "version": 1,
        "config": manifest_config(config),
        "mapping": mapping,
        "metrics": {"test": {"auc": 0.5}},
        "onnx_sha256": sha256_file(path / MODEL_FILE),
    }
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return path
