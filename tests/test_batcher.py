"""The micro-batcher's packing rules (``service/batcher.py``), driven on a real event
loop and the service's inference threads (``CallThreads``): ``CTR_BATCH_MAX_USERS`` and
``CTR_BATCH_MAX_CANDIDATES`` bound what one graph call takes, queue order is kept, and
each request gets its own rows back. The service-level check (concurrent HTTP requests
score as alone) is ``tests/test_runtime.py::test_micro_batching_over_http``."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from service.batcher import Batcher
from service.callthreads import CallThreads


def _feeds(tag: int, n: int) -> dict[str, np.ndarray]:
    """One user's feeds with ``n`` candidates; candidate ``j`` carries ``tag * 1000 + j``
    so a request can tell its rows from any other's."""
    return {
        "hist_len": np.array([1], dtype=np.int64),
        "item": (tag * 1000 + np.arange(n, dtype=np.int64)).reshape(n, 1),
        "user_idx": np.zeros(n, dtype=np.int64),
    }


def _serve(max_users: int, max_candidates: int, sizes: list[int]) -> tuple[list, list]:
    """Submit a request that holds the only run slot, then ``sizes`` more while it runs;
    release it. Returns the calls the graph saw (each: the candidates' tags per call)
    and each queued request's outputs."""
    calls: list[list[int]] = []
    gate = threading.Event()

    def run(feeds: dict[str, np.ndarray], explain: bool) -> list[np.ndarray]:
        if not calls:
            gate.wait(10)  # the first call holds the slot until everything is queued
        tags = feeds["item"][:, 0] // 1000
        calls.append([int(t) for t in dict.fromkeys(tags.tolist())])
        # what the graph would do with user_idx: every candidate row finds its own user
        assert feeds["hist_len"].shape[0] == len(calls[-1])
        assert np.array_equal(np.unique(feeds["user_idx"]), np.arange(len(calls[-1])))
        return [feeds["item"][:, 0].astype(np.float32)]

    async def main() -> list:
        batcher = Batcher(run, slots=1, max_users=max_users, max_candidates=max_candidates,
                          wait_s=0.0)  # fmt: skip
        with CallThreads(1, "ort") as pool:
            first = asyncio.ensure_future(batcher.submit(pool, _feeds(99, 5), False))
            await asyncio.sleep(0)  # the first request takes the slot
            queued = [
                asyncio.ensure_future(batcher.submit(pool, _feeds(k, n), False))
                for k, n in enumerate(sizes)
            ]
            await asyncio.sleep(0)
            gate.set()
            await first
            return list(await asyncio.gather(*queued))

    outs = asyncio.run(main())
    return calls[1:], outs


def test_a_call_takes_queued_requests_up_to_max_candidates_in_order() -> None:
    calls, outs = _serve(max_users=8, max_candidates=100, sizes=[60, 30, 20, 50, 120, 10])
    # 60 + 30 fit (and 20 more would not); then 20 + 50; 120 alone, though over the bound
    # (never starved); 10 after it, not packed ahead of it
    assert calls == [[0, 1], [2, 3], [4], [5]]
    for k, (n, out) in enumerate(zip([60, 30, 20, 50, 120, 10], outs, strict=True)):
        np.testing.assert_array_equal(out[0], k * 1000 + np.arange(n, dtype=np.float32))


def test_a_call_takes_at_most_max_users() -> None:
    calls, outs = _serve(max_users=3, max_candidates=4096, sizes=[5] * 7)
    assert calls == [[0, 1, 2], [3, 4, 5], [6]]
    assert [len(o[0]) for o in outs] == [5] * 7


def test_max_users_one_never_merges() -> None:
    calls, _ = _serve(max_users=1, max_candidates=4096, sizes=[5, 5, 5])
    assert calls == [[0], [1], [2]]


def test_a_failed_merged_call_fails_only_the_request_it_fails_for() -> None:
    """A merged call that raises is run again one request at a time: the request whose
    feeds fail the graph gets the error, the others their own rows (before, every
    request of the batch answered 500)."""
    calls: list[list[int]] = []
    gate = threading.Event()

    def run(feeds: dict[str, np.ndarray], explain: bool) -> list[np.ndarray]:
        if not calls:
            gate.wait(10)
        tags = [int(t) for t in dict.fromkeys((feeds["item"][:, 0] // 1000).tolist())]
        calls.append(tags)
        if 2 in tags:  # request 2's feeds fail the graph, merged or alone
            raise RuntimeError("request 2 fails the graph")
        return [feeds["item"][:, 0].astype(np.float32)]

    async def main() -> list:
        batcher = Batcher(run, slots=1, max_users=8, max_candidates=4096, wait_s=0.0)
        with CallThreads(1, "ort") as pool:
            first = asyncio.ensure_future(batcher.submit(pool, _feeds(99, 5), False))
            await asyncio.sleep(0)
            queued = [
                asyncio.ensure_future(batcher.submit(pool, _feeds(k, 3 + k), False))
                for k in range(4)
            ]
            await asyncio.sleep(0)
            gate.set()
            await first
            return list(await asyncio.gather(*queued, return_exceptions=True))

    before = _splits()
    outs = asyncio.run(main())
    assert calls[1:] == [[0, 1, 2, 3], [0], [1], [2], [3]]  # merged, then one by one
    assert _splits() == before + 1
    for k, out in enumerate(outs):
        if k == 2:
            assert isinstance(out, RuntimeError) and "request 2" in str(out)
        else:
            np.testing.assert_array_equal(out[0], k * 1000 + np.arange(3 + k, dtype=np.float32))


def _splits() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("ctr_batch_splits_total") or 0.0


def test_a_batch_that_fails_to_merge_runs_job_by_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """Merging the feeds is part of the merged call: where it fails (a MemoryError for
    16 users' candidates), each request runs alone instead of all answering 500."""
    from service import batcher as batcher_mod

    real = batcher_mod.merge_feeds

    def merge(feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        if len(feeds) > 1:
            raise MemoryError("no room for the merged feeds")
        return real(feeds)

    monkeypatch.setattr(batcher_mod, "merge_feeds", merge)
    before = _splits()
    calls, outs = _serve(max_users=8, max_candidates=4096, sizes=[4, 6, 8])
    assert calls == [[0], [1], [2]]
    assert _splits() == before + 1
    for k, (n, out) in enumerate(zip([4, 6, 8], outs, strict=True)):
        np.testing.assert_array_equal(out[0], k * 1000 + np.arange(n, dtype=np.float32))


def test_cancelled_requests_do_not_fill_a_call() -> None:
    """A request cancelled while queued does not count towards a full call: when the
    slot frees, the live one left waits out CTR_BATCH_WAIT_MS for company instead of
    leaving at once as if its call were full, and goes with the next request."""
    calls: list[list[int]] = []
    gate = threading.Event()

    def run(feeds: dict[str, np.ndarray], explain: bool) -> list[np.ndarray]:
        if not calls:
            gate.wait(10)  # the first call holds the only slot
        calls.append([int(t) for t in dict.fromkeys((feeds["item"][:, 0] // 1000).tolist())])
        return [feeds["item"][:, 0].astype(np.float32)]

    async def main() -> bool:
        batcher = Batcher(run, slots=1, max_users=2, max_candidates=4096, wait_s=30.0)
        with CallThreads(1, "ort") as pool:
            first = asyncio.ensure_future(batcher.submit(pool, _feeds(9, 3), False))
            await asyncio.sleep(0)
            # the first waits for company, then a second fills its call and it starts
            second = asyncio.ensure_future(batcher.submit(pool, _feeds(8, 3), False))
            await asyncio.sleep(0)
            alive = asyncio.ensure_future(batcher.submit(pool, _feeds(2, 3), False))
            doomed = asyncio.ensure_future(batcher.submit(pool, _feeds(1, 3), False))
            await asyncio.sleep(0)
            doomed.cancel()
            gate.set()
            await asyncio.wait_for(asyncio.gather(first, second), 10)
            await asyncio.sleep(0.1)
            waited = not alive.done()  # not sent alone as a "full" call
            third = asyncio.ensure_future(batcher.submit(pool, _feeds(3, 3), False))
            outs = await asyncio.wait_for(asyncio.gather(alive, third), 10)
            assert [float(o[0][0]) for o in outs] == [2000.0, 3000.0]
            return waited

    assert asyncio.run(main())
    assert calls == [[9, 8], [2, 3]]
