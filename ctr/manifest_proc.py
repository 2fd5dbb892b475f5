"""A large manifest read, checked and digested in a child process, so that the process
loading it (a serving worker, reloading) keeps answering meanwhile.

For a vocabulary of a million entries, ``orjson.loads`` of the manifest (about 0.35 s on
this project's machine), the vocabulary checks and the contract digest (0.13 s) are each
one C call that holds the GIL: the worker's event loop, and every request in flight,
stands still for the longest of them (``scripts/bench_manifest.py``). Here a child
Python (its own GIL) does all three, exactly as :func:`ctr.bundle.load_bundle` would,
and sends back a pickle stream: first the manifest with each large vocabulary left out,
the digest and the error the checks raised, if any; then each left-out vocabulary in
pieces of :data:`CHUNK` entries. The parent's longest single step is one piece's
unpickling and merge (a few ms for 10,000 entries; the merge that grows the dict past
a size step copies it, about 20 ms at a million, which no piece size avoids), and the
GIL can change hands between steps. Pieces of 50,000 entries (until session 30) paused
the loop for 32 ms at best, pieces of 10,000 for 23 ms (``scripts/bench_manifest.py
--against``).

Anything that goes wrong with the child itself (it cannot start, dies, sends something
unexpected) is not the bundle's fault: :func:`read` returns None and the caller reads the
manifest in-process, as before."""

from __future__ import annotations

import itertools
import logging
import pickle
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger("ctr.bundle")

# entries per piece of a vocabulary sent back; larger vocabularies are sent in pieces
CHUNK = 10_000
# the stream's first object says this: a child of another version is not trusted
TAG = "ctr-manifest-v1"


@dataclass
class Checked:
    """What the child found (:func:`read`)."""

    # as parsed, the vocabularies included (after a checks' error: its onnx_sha256 only;
    # after a reading error: None)
    manifest: Any
    # the checks' BundleError message: raised after the model file's checks, which
    # load_bundle makes first (None: the manifest is valid)
    error: str | None
    # whether ``error`` came from reading the manifest itself, which load_bundle reports
    # before it looks at the model file
    error_first: bool
    contract_v2: str | None  # ctr.bundle.contract_digest's V2 form, where orjson wrote it


# the folder this process imports ``ctr`` from: the child imports the same, and nothing
# from its working folder (-P)
ROOT = str(Path(__file__).resolve().parents[1])
# this module's file: the child names the one it ran, which must be this one
CODE = str(Path(__file__).resolve())
CHILD = "import sys; sys.path.insert(0, sys.argv[1]); from ctr.manifest_proc import main; main()"


def read(path: Path, timeout_s: float = 600.0) -> Checked | None:
    """The manifest at ``path`` read in a child process (see the module), or None when the
    child could not be used (no temporary file, no process, a stream that is not this
    module's, a failed exit, no answer within ``timeout_s``; logged): then read it here."""
    cmd = [sys.executable, "-P", "-c", CHILD, ROOT, str(path)]
    try:
        errors = tempfile.TemporaryFile()  # a file: a pipe could fill and stall the child
    except OSError as exc:  # no writable temporary folder (a read-only container)
        log.warning("manifest %s read in-process: no temporary file (%s)", path, exc)
        return None
    with errors:
        try:
            # its own process group: a Ctrl-C to the server's group is the server's to
            # handle, not a reason for the read to fail and be done again here
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=errors, process_group=0)  # fmt: skip
        except OSError as exc:
            log.warning("manifest %s read in-process: no child process (%s)", path, exc)
            return None
        assert proc.stdout is not None
        checked: Checked | None = None
        why: object = None
        # a child not done within timeout_s of its start is killed: the read ends at EOF
        killed = threading.Event()
        deadline = threading.Timer(timeout_s, lambda: (killed.set(), proc.kill()))
        deadline.start()
        try:
            checked = _receive(proc.stdout)
        except (EOFError, OSError, pickle.UnpicklingError, ValueError, TypeError, KeyError,
                AttributeError, IndexError) as exc:  # fmt: skip
            why = exc
        finally:
            deadline.cancel()
            proc.stdout.close()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                killed.set()
                proc.kill()
                proc.wait()
            if killed.is_set():
                checked, why = None, f"killed after {timeout_s} s"
        if checked is None or proc.returncode != 0:
            errors.seek(0)
            text = errors.read().decode("utf-8", "replace").strip()
            last = text.splitlines()[-1] if text else ""
            why = why if checked is None else f"exit status {proc.returncode}"
            log.warning("manifest %s read in-process: the child failed (%s) %s", path, why, last)
            return None
    return checked


class _PlainUnpickler(pickle.Unpickler):
    """Built-in values only (dicts, lists, strings, numbers, None): the stream never
    needs a class, so none is loaded, whoever wrote it."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"{module}.{name}: not a plain value")


def _receive(stream: BinaryIO) -> Checked:
    unpickler = _PlainUnpickler(stream)
    head = unpickler.load()
    if not isinstance(head, dict) or head.get("tag") != TAG:
        raise ValueError("not this version's stream")
    if head.get("code") != CODE:  # the child ran this very module
        raise ValueError(f"the child ran {head.get('code')!r}, not {CODE!r}")
    manifest = head["manifest"]
    for table, pieces in head["pieces"].items():
        vocab: dict[str, int] = {}
        for _ in range(pieces):
            vocab.update(unpickler.load())  # one piece a step: the GIL can move on
        manifest["mapping"][table]["vocab"] = vocab
    return Checked(manifest, head["error"], head["error_first"], head["contract_v2"])


def _send(path: Path, out: BinaryIO) -> None:
    """The child's side: read and check as ``load_bundle`` does, then the stream."""
    from ctr.bundle import (
        CONTRACT_KEY_V2,
        BundleError,
        check_manifest,
        contract_digest,
        read_checked_manifest,
    )

    error, first, manifest, digest = None, False, None, None
    try:
        manifest = read_checked_manifest(path)
    except BundleError as exc:
        error, first = str(exc), True
    if manifest is not None:
        try:
            check_manifest(manifest, path)
        except BundleError as exc:
            error = str(exc)
            # the parent checks the model file first: that needs its digest only
            manifest = {"onnx_sha256": manifest.get("onnx_sha256")}
    if manifest is not None and error is None:
        try:
            digest = contract_digest(manifest.get("config"), manifest.get("mapping"),
                                     CONTRACT_KEY_V2)  # fmt: skip
        except (TypeError, ValueError):  # orjson refuses the text: the parent digests
            digest = None
    pieces: dict[str, dict[str, int]] = {}
    if manifest is not None and error is None:
        for table, entry in manifest["mapping"].items():
            vocab = entry.get("vocab")
            if isinstance(vocab, dict) and len(vocab) > CHUNK:
                pieces[table] = vocab
                entry["vocab"] = None
    head = {
        "tag": TAG,
        "code": CODE,
        "manifest": manifest,
        "pieces": {t: -(-len(v) // CHUNK) for t, v in pieces.items()},
        "error": error,
        "error_first": first,
        "contract_v2": digest,
    }
    pickle.dump(head, out, protocol=pickle.HIGHEST_PROTOCOL)
    for vocab in pieces.values():
        items = iter(vocab.items())
        while piece := dict(itertools.islice(items, CHUNK)):  # one piece in memory at a time
            pickle.dump(piece, out, protocol=pickle.HIGHEST_PROTOCOL)
    out.flush()


def main() -> None:
    """The child: ``sys.argv[2]`` is the manifest's path (``argv[1]``: the import root)."""
    _send(Path(sys.argv[2]), sys.stdout.buffer)
