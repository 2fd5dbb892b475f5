"""Cross-request micro-batching: several users' requests in one graph call.

The graph already takes ``U`` users and a per-candidate ``user_idx [N]`` (the row of
``U`` each candidate belongs to), so requests merge without copying any history: user
tensors are stacked (``[U, ...]``), candidate rows concatenated (``[sum N_i, ...]``)
and ``user_idx`` tells each candidate whose history to attend over. Outputs are split
back by the same offsets.

Policy ("batch while busy", with an optional bounded wait):

* when a run slot is free and nothing waits, a request runs at once, alone: at low load
  batching adds no latency;
* requests that arrive while every slot is busy queue up, and the next free slot takes
  as many as fit (``max_users``, ``max_candidates``) in one call;
* ``wait_s > 0`` also holds a lone request up to that long for company.

The queue is touched only from the event loop thread; graph calls run on the executor.
A request cancelled while queued (its deadline passed) is dropped from its batch.
A merged call that fails is run again one request at a time, so that a request whose
feeds fail the graph fails alone (``ctr_batch_splits_total`` counts these).
"""

from __future__ import annotations

import asyncio
import time
from asyncio import CancelledError
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from service import metrics as m

RunFn = Callable[[dict[str, np.ndarray], bool], list[np.ndarray]]


@dataclass
class _Job:
    feeds: dict[str, np.ndarray]  # one user: U = 1, user_idx all zeros
    explain: bool
    future: asyncio.Future
    n: int
    since: float


def merge_feeds(feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Single-user feeds -> one feed with ``U = len(feeds)`` users; candidate ``k`` of
    request ``i`` points at user ``i`` through ``user_idx``."""
    if len(feeds) == 1:
        return feeds[0]
    out = {k: np.concatenate([f[k] for f in feeds], axis=0) for k in feeds[0] if k != "user_idx"}
    sizes = [f["user_idx"].shape[0] for f in feeds]
    out["user_idx"] = np.repeat(np.arange(len(feeds), dtype=np.int64), sizes)
    return {k: out[k] for k in feeds[0]}  # the graph's input order


def split_outputs(outs: list[np.ndarray], sizes: list[int]) -> list[list[np.ndarray]]:
    """Per-candidate outputs (``[sum N_i, ...]``) -> one list per request."""
    bounds = np.cumsum([0, *sizes])
    return [[o[a:b] for o in outs] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


class Batcher:
    def __init__(
        self,
        run: RunFn,
        slots: int,
        max_users: int,
        max_candidates: int,
        wait_s: float,
    ) -> None:
        self.run = run
        self.slots = slots
        self.max_users = max_users
        self.max_candidates = max_candidates
        self.wait_s = wait_s
        self.queue: deque[_Job] = deque()
        self.busy = 0
        self.timer: asyncio.TimerHandle | None = None

    async def submit(
        self, executor: Executor, feeds: dict[str, np.ndarray], explain: bool
    ) -> list[np.ndarray]:
        """Outputs for one request (``probs [N]``, and ``attention [N, L]`` if asked)."""
        if feeds["hist_len"].shape[0] != 1:
            raise ValueError("the batcher takes single-user feeds")
        loop = asyncio.get_running_loop()
        job = _Job(feeds, explain, loop.create_future(), feeds["user_idx"].shape[0],
                   time.perf_counter())  # fmt: skip
        self.queue.append(job)
        self._dispatch(loop, executor)
        return await job.future

    def _dispatch(self, loop: asyncio.AbstractEventLoop, executor: Executor) -> None:
        while self.busy < self.slots:
            while self.queue and self.queue[0].future.done():  # cancelled while queued
                self.queue.popleft()
            if not self.queue:
                return
            if self.wait_s and not self._full():
                left = self.queue[0].since + self.wait_s - time.perf_counter()
                if left > 0:
                    if self.timer is None:
                        self.timer = loop.call_later(left, self._on_timer, loop, executor)
                    return
            batch = self._take()
            try:
                fut = loop.run_in_executor(executor, self._run_batch, batch)
            except RuntimeError as exc:  # the executor is shut down (service stopping)
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            self.busy += 1
            fut.add_done_callback(
                lambda f, b=batch: self._finished(f, b, loop, executor)  # type: ignore[misc]
            )

    def _on_timer(self, loop: asyncio.AbstractEventLoop, executor: Executor) -> None:
        self.timer = None
        self._dispatch(loop, executor)

    def _full(self) -> bool:
        """Whether the queue's live jobs (not cancelled while queued) fill a call."""
        live = [j.n for j in self.queue if not j.future.done()]
        return len(live) >= self.max_users or sum(live) >= self.max_candidates

    def _take(self) -> list[_Job]:
        batch = [self.queue.popleft()]
        total = batch[0].n
        while self.queue and len(batch) < self.max_users:
            job = self.queue[0]
            if job.future.done():
                self.queue.popleft()
                continue
            if total + job.n > self.max_candidates:
                break
            batch.append(self.queue.popleft())
            total += job.n
        return batch

    def _run_batch(self, batch: list[_Job]) -> list[list[np.ndarray] | BaseException]:
        """Each job's outputs; where a merged call fails, each job is run alone, so that
        one request's failure is its own (and a transient one is tried once more)."""
        try:  # merging too: a batch too large to merge (MemoryError) is run job by job
            outs = self.run(merge_feeds([j.feeds for j in batch]), any(j.explain for j in batch))
        except Exception:
            if len(batch) == 1:
                raise
            m.BATCH_SPLITS.inc()
            return [self._run_alone(job) for job in batch]
        return list(split_outputs(outs, [j.n for j in batch]))

    def _run_alone(self, job: _Job) -> list[np.ndarray] | BaseException:
        if job.future.done():  # cancelled meanwhile: nothing to run for
            return CancelledError()
        try:
            return self.run(job.feeds, job.explain)
        except Exception as exc:
            return exc

    def _finished(
        self,
        fut: asyncio.Future,
        batch: list[_Job],
        loop: asyncio.AbstractEventLoop,
        executor: Executor,
    ) -> None:
        self.busy -= 1
        m.BATCH_USERS.observe(len(batch))
        cancelled = fut.cancelled()
        exc = None if cancelled else fut.exception()
        for k, job in enumerate(batch):
            if job.future.done():
                continue
            if cancelled:
                job.future.cancel()
            elif exc is not None:
                job.future.set_exception(exc)
            else:
                outs = fut.result()[k]
                if isinstance(outs, BaseException):
                    job.future.set_exception(outs)
                else:
                    job.future.set_result(outs if job.explain else outs[:1])
        self._dispatch(loop, executor)
