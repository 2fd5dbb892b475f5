"""Writes to Redis while a benchmark runs (``ctr bench-pair --writes / --other-writes``).

On its own a benchmark writes nothing, so a user scored twice is unchanged the second
time. Under ``CTR_USER_TRACKING`` such a request needs no Redis read, so a benchmark
without writes shows tracking at its best. Real traffic writes: a click between two of
a user's ranking requests changes what the second one must read. Two kinds of writes
bring that in:

* **The scored users' writes** (:class:`UserWrites`): before a share ``p`` of the
  requests, the client appends one behaviour to that request's user, as an event
  pipeline does after a click. It uses the service's own append script
  (:class:`service.store.EventWriter`), straight to Redis, not through the service. The
  request that follows finds its user changed and reads. The write is not part of the
  request's measured time, and its CPU is the client's and Redis's, not the service's.
* **Other users' writes** (:class:`OtherWrites`): a separate process appends behaviours
  for users the benchmark never scores, at a steady rate. They change no answer, but in
  BCAST mode every tracking worker is told of every user key written. This prices that
  traffic: the side with tracking off hears nothing.
* **Item-feature writes** (:class:`ItemWrites`): a separate process writes one field of an
  item-feature hash (``ctr:item:<feature>``, a field no candidate has) at a steady rate,
  as a catalogue pipeline updating items does. No answer changes, but under
  ``CTR_ITEM_TRACKING`` every report empties the caches of that feature and the encoded
  candidate rows (``CTR_ITEM_TRACKING_HOLD_MS`` bounds how often).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Self

import orjson
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from service.features import EVENT_FIELDS
from service.store import APPEND_EVENT, EventWriter, event_keys, item_key, user_key

OTHER = "bench-other-"  # the other users' IDs: OTHER + a number below OTHER_USERS
OTHER_USERS = 10_000
ITEM_FIELD = "bench-item-writer"  # the item-feature field ItemWrites writes (no candidate's)
DEDUP_WINDOW = 100  # event IDs each written user remembers (the benchmark's own)
TS = EVENT_FIELDS[1]  # the stored behaviour's time field


def due(k: int, share: float) -> bool:
    """Whether the ``k``-th request (from 0) is preceded by a write, for a share
    ``share`` of requests spread evenly: 0.25 writes before every fourth."""
    return math.floor((k + 1) * share) > math.floor(k * share)


class UserWrites:
    """Appends one behaviour for a request's user before a share of the requests
    (:meth:`before`). Each behaviour is the user's newest stored one with a new time
    (now) and event ID, so what the model reads changes as it would after a click on an
    item like the last one. Open it inside the event loop that sends the requests."""

    def __init__(self, redis_url: str, bodies: list[bytes], share: float, keep: int) -> None:
        if not 0 <= share <= 1:
            raise ValueError(f"the share of requests with a write is in [0, 1], not {share}")
        self.redis_url, self.share, self.keep = redis_url, share, keep
        self.users = [str(orjson.loads(b)["user_id"]) for b in bodies]
        self.requests = 0  # requests seen by before()
        self.written = 0
        self._redis: AsyncRedis | None = None
        self._writer: EventWriter | None = None
        self._newest: dict[str, dict[str, Any]] = {}

    async def open(self) -> UserWrites:
        self._redis = AsyncRedis.from_url(self.redis_url)
        self._writer = EventWriter(self._redis, DEDUP_WINDOW)
        try:
            for user in set(self.users):
                raw = await self._redis.lindex(user_key(user, "seq"), -1)
                newest = orjson.loads(raw) if raw else {}
                self._newest[user] = newest if isinstance(newest, dict) else {}
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

    async def __aenter__(self) -> UserWrites:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def before(self, index: int) -> None:
        """Called before the request for ``bodies[index % len(bodies)]`` is sent."""
        k, self.requests = self.requests, self.requests + 1
        if not due(k, self.share):
            return
        assert self._writer is not None, "open() first"
        user = self.users[index % len(self.users)]
        ts = time.time()
        payload = {**self._newest[user], TS: ts}
        await self._writer.append(user, f"bench-{k}-{ts}", ts, payload, self.keep)
        self.written += 1


def _paced(
    rate: float, stop: Any, count: Any, since: Any, burst: Callable[[int, int], None]
) -> None:
    """A writer process's loop: ``rate`` writes per second in 10 ms ticks until ``stop``,
    each tick's ``burst(first, n)`` writing numbers ``first`` to ``first + n - 1``; the
    count in ``count``, the first tick's ``time.monotonic()`` in ``since``."""
    period, owed, k = 0.01, 0.0, 0
    since.value = time.monotonic()  # system-wide: the parent reads the rate against it
    tick = time.perf_counter()
    while not stop.is_set():
        owed += rate * period
        batch, owed = int(owed), owed - int(owed)
        if batch:
            burst(k, batch)
            k += batch
            with count.get_lock():
                count.value += batch
        tick += period
        time.sleep(max(0.0, tick - time.perf_counter()))


def _write_others(
    redis_url: str, rate: float, keep: int, pipelined: bool, stop: Any, count: Any, since: Any
) -> None:
    """The :class:`OtherWrites` process: ``rate`` appends per second, paced in 10 ms
    ticks, round-robin over :data:`OTHER_USERS` users, until ``stop``. Each append is a
    round trip of its own, as independent writers send them, so Redis names each one's
    keys to the trackers in a message of its own; ``pipelined``: one pipeline per tick,
    whose keys Redis names in one message."""
    client = Redis.from_url(redis_url)
    script = client.register_script(APPEND_EVENT)
    payload = orjson.dumps({"item_id": "bench-other-item"})

    def burst(first: int, n: int) -> None:
        pipe = client.pipeline(transaction=False) if pipelined else None
        now = time.time()
        for k in range(first, first + n):
            keys = event_keys(f"{OTHER}{k % OTHER_USERS}")
            args = [f"o{k}", now, payload, keep, DEDUP_WINDOW, 0, 1]
            script(keys=keys, args=args, client=pipe or client)
        if pipe is not None:
            pipe.execute()

    _paced(rate, stop, count, since, burst)
    client.close()


class _PacedWriter:
    """A writer process of its own (``target(redis_url, rate, *args, stop, count, since)``)
    while the ``with`` block runs (``rate`` 0: none); :attr:`achieved` is the rate it
    kept up. Subclasses clean up what it wrote in :meth:`_clean`."""

    what = "writer"  # for the messages: "the <what> exited ..."

    def __init__(self, redis_url: str, rate: float, target: Any, args: tuple[Any, ...]) -> None:
        if not math.isfinite(rate) or rate < 0:
            raise ValueError(f"{self.what}: writes per second 0 or more, not {rate}")
        self.redis_url, self.rate = redis_url, rate
        self.achieved = 0.0
        ctx = mp.get_context("spawn")
        self._stop = ctx.Event()
        self._count = ctx.Value("q", 0)
        self._since = ctx.Value("d", 0.0)  # time.monotonic() of the writer's first tick
        self._proc = (
            ctx.Process(
                target=target,
                args=(redis_url, rate, *args, self._stop, self._count, self._since),
                daemon=True,
            )
            if rate > 0
            else None
        )

    def __enter__(self) -> Self:
        if self._proc is not None:
            self._proc.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is None:
            return
        self._stop.set()
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        since = self._since.value
        self.achieved = self._count.value / max(1e-9, time.monotonic() - since) if since else 0.0
        client = Redis.from_url(self.redis_url)
        try:
            self._clean(client)
        finally:
            client.close()
        if self._proc.exitcode not in (0, -signal.SIGKILL) and not exc[0]:
            raise RuntimeError(
                f"the {self.what} exited with code {self._proc.exitcode}: its writes "
                "stopped part of the way (see its traceback above)"
            )

    def _clean(self, client: Redis) -> None:
        raise NotImplementedError


class OtherWrites(_PacedWriter):
    """``rate`` appends per second for users no request scores, from a process of its own
    while the ``with`` block runs (0: none), each a round trip of its own or, with
    ``pipelined``, 10 ms of them in one pipeline. :attr:`achieved` is the rate it kept
    up. Their keys are deleted on the way out."""

    what = "other users' writer"

    def __init__(self, redis_url: str, rate: float, keep: int, pipelined: bool = False) -> None:
        super().__init__(redis_url, rate, _write_others, (keep, pipelined))

    def _clean(self, client: Redis) -> None:
        for batch in _batched(client.scan_iter(match=f"{{u:{OTHER}*", count=1000)):
            client.delete(*batch)


def _write_items(redis_url: str, rate: float, key: str, stop: Any, count: Any, since: Any) -> None:
    """The :class:`ItemWrites` process: ``rate`` ``HSET``s of field :data:`ITEM_FIELD` of
    hash ``key`` per second, each a round trip of its own, paced in 10 ms ticks."""
    client = Redis.from_url(redis_url)

    def burst(first: int, n: int) -> None:
        for k in range(first, first + n):
            client.hset(key, ITEM_FIELD, k)

    _paced(rate, stop, count, since, burst)
    client.close()


class ItemWrites(_PacedWriter):
    """``rate`` writes per second to item-feature hash ``ctr:item:<feature>`` (field
    :data:`ITEM_FIELD`, which no candidate has), from a process of its own while the
    ``with`` block runs (0: none). :attr:`achieved` is the rate it kept up; the field is
    deleted on the way out."""

    what = "item-feature writer"

    def __init__(self, redis_url: str, rate: float, feature: str) -> None:
        self.key = item_key(feature)
        super().__init__(redis_url, rate, _write_items, (self.key,))

    def _clean(self, client: Redis) -> None:
        client.hdel(self.key, ITEM_FIELD)


def _batched(keys: Iterable[bytes], size: int = 500) -> Iterator[list[bytes]]:
    """``keys`` in lists of at most ``size``."""
    batch: list[bytes] = []
    for key in keys:
        batch.append(key)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
