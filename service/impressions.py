"""The impression log: every scored response, as served, in a Redis stream.

With ``CTR_IMPRESSION_STREAM`` set, each ``POST /v1/score`` answered 200 (a share
``CTR_IMPRESSION_SAMPLE`` of them) is added to that stream as one entry:

* ``ts``: the unix time it was scored;
* ``user_id``: the request's user;
* ``context``: the request's ``context`` as JSON (all of it: a later model may read keys
  this one does not);
* ``response``: the response body, byte for byte (model name and version, request ID,
  ``degraded``, ``cold_start`` and the ranked items with their probabilities).

The request path only appends to an in-memory queue (a deque append, after the
response passed its deadline check); a task of the worker writes the queue in pipelines
of ``BATCH`` ``XADD ... MAXLEN ~ CTR_IMPRESSION_MAXLEN``, every ``FLUSH_S`` or sooner when
a batch is full, on the service's write clients. Packing and writing a pipeline is
Python work on the event loop (22-30 µs of CPU per entry written: docs/api.md's
command; in slices of ``BATCH``, the requests queued meanwhile served between them).
It is telemetry: a failed write goes back to the queue
and is tried again after ``RETRY_S``; the queue holds at most ``CTR_IMPRESSION_QUEUE``
entries and ``CTR_IMPRESSION_QUEUE_MB`` of contexts and bodies (while Redis is slow or
down) and beyond them new ones are dropped, counted in
``ctr_impressions_dropped_total``, never a failed request. Shutdown writes what is queued,
for up to ``CLOSE_S``.

:mod:`service.impression_read` turns the stream back into one row per ranked item
labelled by the user's later behaviours (``ctr impressions``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from typing import Any

import orjson

from service import metrics as m
from service.store import AnyRedis

log = logging.getLogger("ctr.impressions")

BATCH = 32  # entries per pipeline: packing and writing one holds the event loop ~0.8 ms
FLUSH_S = 0.1  # the longest an entry waits in the queue while Redis answers
CLOSE_S = 2.0  # how long shutdown spends writing what is queued
RETRY_S = (0.1, 0.2, 0.5, 1.0, 2.0)  # waits after failed writes, in a row (the last repeats)
# a context whose JSON is longer is logged as the keys the model reads only, marked
# "_truncated" (a request may send up to CTR_MAX_BODY_BYTES of context keys)
MAX_CONTEXT_BYTES = 8192


Entry = tuple[float, str, bytes, bytes]  # (ts, user, context JSON, response body)


def _size(entry: Entry) -> int:
    """What an entry holds against ``CTR_IMPRESSION_QUEUE_MB``: its context and body."""
    return len(entry[2]) + len(entry[3])


class ImpressionLog:
    """The queue and its writer task (:meth:`start`; :meth:`close` ends it)."""

    def __init__(
        self,
        redis: AnyRedis,
        stream: str,
        maxlen: int,
        queue: int,
        sample: float = 1.0,
        queue_bytes: int = 64 << 20,
    ) -> None:
        self.redis = redis
        self.stream = stream
        self.maxlen = maxlen
        self.sample = sample
        self.queue: deque[Entry] = deque()
        self.limit = queue
        self.limit_bytes = queue_bytes
        self.queued_bytes = 0  # of the queue's contexts and responses
        self.wake = asyncio.Event()
        self.stopping = asyncio.Event()  # set by close(): ends a backoff's wait
        self.failures = 0  # failed writes in a row
        self.task: asyncio.Task[None] | None = None
        self._warned = 0.0
        self.lost_at_shutdown = 0  # entries close() could not write (logged as it ends)

    def add(
        self,
        user_id: str,
        context: dict[str, Any],
        response: bytes,
        read: frozenset[str] | set[str] = frozenset(),
    ) -> None:
        """Queue one scored response (a share ``sample`` of the calls); never blocks,
        never raises: a full queue (``CTR_IMPRESSION_QUEUE`` entries or
        ``CTR_IMPRESSION_QUEUE_MB``) drops it (counted). A context over
        ``MAX_CONTEXT_BYTES`` as JSON keeps only the keys the model reads (``read``)."""
        if self.sample < 1.0 and random.random() >= self.sample:
            return
        try:
            ctx = orjson.dumps(context)
            if len(ctx) > MAX_CONTEXT_BYTES:
                kept = {k: v for k, v in context.items() if k in read}
                ctx = orjson.dumps({**kept, "_truncated": len(ctx)})
        except TypeError:  # a value JSON cannot hold as UTF-8 (a lone surrogate)
            m.IMPRESSIONS_DROPPED.labels("encode").inc()
            return
        entry = (time.time(), user_id, ctx, response)
        size = _size(entry)
        if len(self.queue) >= self.limit or self.queued_bytes + size > self.limit_bytes:
            m.IMPRESSIONS_DROPPED.labels("queue_full").inc()
            return
        self.queue.append(entry)
        self.queued_bytes += size
        if len(self.queue) >= BATCH:
            self.wake.set()

    @property
    def closing(self) -> bool:
        return self.stopping.is_set()

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run())
        self.task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:  # a bug: say so
            log.error("the impression log's writer stopped: %r", task.exception())

    async def run(self) -> None:
        """Write the queue: a batch as soon as one is full, else what is there every
        ``FLUSH_S``; after a failed write, wait (``RETRY_S``) and write it again. Once
        :meth:`close` is called, write what is queued and end."""
        while True:
            if not self.closing:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), FLUSH_S)
                self.wake.clear()
            while self.queue:
                written = await self.flush()
                if not written and self.closing:
                    # shutdown's CLOSE_S bounds the tries (close() cancels this task):
                    # a Redis paused for a moment still gets the entries
                    await asyncio.sleep(RETRY_S[0])
                elif self.failures:  # backing off: cut short by close(), whose time runs
                    with contextlib.suppress(TimeoutError):
                        delay = RETRY_S[min(self.failures, len(RETRY_S)) - 1]
                        await asyncio.wait_for(self.stopping.wait(), delay)
                await asyncio.sleep(0)  # the requests queued meanwhile go first
            if self.closing:
                return

    async def flush(self) -> bool:
        """Write up to ``BATCH`` queued entries in one pipeline. Those whose write fails
        (all of them where the call fails; those Redis refused, e.g. out of memory, where
        it took the others) go back to the front of the queue (as many as it has room
        for; the rest are dropped, counted) for the next try (while closing, until
        ``CLOSE_S`` runs out). True when all were written."""
        kept = [self.queue.popleft() for _ in range(min(BATCH, len(self.queue)))]
        self.queued_bytes -= sum(map(_size, kept))
        pipe = self.redis.pipeline(transaction=False)
        for ts, user, ctx, response in kept:
            fields = {"ts": repr(ts), "user_id": user, "context": ctx, "response": response}
            pipe.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
        if not kept:
            return True
        try:
            replies = await pipe.execute(raise_on_error=False)
        except asyncio.CancelledError:  # shutdown's time ran out mid-write: unknown, counted
            m.IMPRESSIONS_DROPPED.labels("shutdown").inc(len(kept))
            self.lost_at_shutdown += len(kept)
            raise
        except Exception as exc:  # Redis down, slow or unreachable: kept for another try
            self._retry(kept, exc)
            return False
        # an entry Redis took is never sent again (it would be stored twice)
        refused = [(e, r) for e, r in zip(kept, replies, strict=True) if isinstance(r, Exception)]
        m.IMPRESSIONS_LOGGED.inc(len(kept) - len(refused))
        if refused:
            self._retry([e for e, _ in refused], refused[0][1])
            return False
        self.failures = 0
        return True

    def _retry(self, kept: list[Entry], exc: Exception) -> None:
        """Put the entries of a failed write back at the front of the queue, within its
        bounds (the batch's newest dropped first, counted)."""
        self.failures += 1
        m.IMPRESSION_WRITE_FAILURES.inc()
        room = self.limit - len(self.queue)
        back = kept[: max(room, 0)]
        back_bytes = sum(map(_size, back))
        while back and back_bytes > self.limit_bytes - self.queued_bytes:
            back_bytes -= _size(back.pop())  # the batch's newest go first: the bound holds
        self.queue.extendleft(reversed(back))
        self.queued_bytes += back_bytes
        if len(kept) > len(back):
            m.IMPRESSIONS_DROPPED.labels("redis").inc(len(kept) - len(back))
        now = time.monotonic()
        if now - self._warned > 10:  # at most one line per 10 s
            self._warned = now
            log.warning("impressions not written (%d queued to retry): %r", len(back), exc)

    async def close(self) -> None:
        """Write what is queued, for up to ``CLOSE_S``, and end the writer; what is left
        is dropped, counted as ``shutdown``."""
        self.stopping.set()
        self.wake.set()
        if self.task is not None and not self.task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self.task), CLOSE_S)
            except TimeoutError:
                self.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self.task
        if self.queue:
            m.IMPRESSIONS_DROPPED.labels("shutdown").inc(len(self.queue))
            self.lost_at_shutdown += len(self.queue)
            self.queue.clear()
            self.queued_bytes = 0
        if self.lost_at_shutdown:  # the counter dies with the process: the log says it
            log.warning("impression log: %d entries not written to %s at shutdown (Redis did "
                        "not take them within %g s)", self.lost_at_shutdown, self.stream,
                        CLOSE_S)  # fmt: skip
