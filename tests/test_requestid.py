"""Request IDs (``service.requestid``): 32 hex characters, never repeated within a
process, and drawn afresh in a forked child, whose IDs then differ from its parent's."""

from __future__ import annotations

import multiprocessing
import re

from service.requestid import REQUEST_IDS, RequestIds


def _child_id(conn: object) -> None:
    conn.send(REQUEST_IDS.next())  # type: ignore[attr-defined]


def test_ids_are_32_hex_characters_and_never_repeat() -> None:
    ids = RequestIds()
    seen = [ids.next() for _ in range(10_000)]
    assert all(re.fullmatch("[0-9a-f]{32}", i) for i in seen)
    assert len(set(seen)) == len(seen)
    assert RequestIds().next()[:16] != ids.next()[:16]  # each draws its own 64 bits
    # the count does not show: consecutive IDs differ in many of their last 64 bits
    tails = [int(i[16:], 16) for i in seen[:100]]
    flips = [bin(a ^ b).count("1") for a, b in zip(tails, tails[1:], strict=False)]
    assert sum(flips) / len(flips) > 16


def test_a_forked_worker_draws_its_own_prefix() -> None:
    parent = REQUEST_IDS.next()
    ctx = multiprocessing.get_context("fork")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_child_id, args=(theirs,))
    proc.start()
    child = ours.recv()
    proc.join(10)
    assert proc.exitcode == 0
    assert re.fullmatch("[0-9a-f]{32}", child)
    assert child[:16] != parent[:16]
