"""Reload broadcast: ``POST /admin/reload`` on one worker reaches every worker.

Each uvicorn worker is its own process with its own loaded model, and a request reaches
one of them. So after a worker has loaded a version for ``/admin/reload``, it publishes
that version number on a Redis channel; every other worker of the deployment subscribes
to it and loads the same version (not "latest": a version written in between does not
split the workers). A worker that fails to load it logs the error and serves on, as
after a failed local reload, and tries that version again later (the other worker
loaded it, so it may load here once, e.g., its files have reached this host), until it
loads or a newer broadcast supersedes it.

* **Order.** Every broadcast gets a sequence number from Redis (one Lua script: the
  number, the deployment's last-broadcast record and the PUBLISH, atomically; the number
  is at least the Redis server's clock in µs, so it keeps growing even if the key is
  lost). A worker applies a broadcast only if its number is above the last one it
  applied or published, and checks that under the app's reload lock. So two operators
  reloading different versions at once leave every worker on the one published last,
  and no wall clock of any worker is compared with another's.
* **Who listens.** The channel is ``<CTR_RELOAD_CHANNEL>:<hash>`` of the Redis database
  number, the model store's path and the model name (``CTR_MODELS_DIR``,
  ``CTR_MODEL_NAME``): workers that share all three are one deployment (pub/sub itself
  ignores database numbers). Two deployments that share them, e.g. a canary next to
  production on one Redis database and the same image, must set different
  ``CTR_RELOAD_CHANNEL`` values.
* **A worker that starts later** (uvicorn restarting one after a crash, a replica
  added) starts on the deployment's last broadcast version rather than
  ``CTR_MODEL_VERSION``, so it serves what its peers serve, a rollback included, when
  the record was made by workers configured with the same ``CTR_MODEL_VERSION`` and,
  for ``latest``, no newer version has been exported since (the record notes the
  newest then; the record never expires). A new export starts on the newest, as
  without the bus; a deploy that changes ``CTR_MODEL_VERSION`` starts on its setting
  and drops the record (reverting it must not bring an old rollback back). A worker
  whose load of that version fails (files still on their way) starts on its setting
  and tries the version again, as a broadcast that failed. A broadcast of the version
  a worker already serves loads nothing.
* **A worker that was not listening** (starting up, Redis restarted, a dead connection)
  catches up when it subscribes: it reads the last-broadcast record and applies it if
  its number is newer than what the worker has seen. At start-up the worker notes the
  current number *before* it loads its model, so a broadcast made while it loads is
  applied too. If Redis cannot be read then, the worker's own start time stands in for
  that number (broadcast numbers follow the Redis server's clock in µs), and it starts
  on ``CTR_MODEL_VERSION``; the last broadcast from before it started is applied when
  it subscribes only if it is the version a start would have taken (as above).
* **A silently dead connection** (no RST: a NAT timeout, a partition) is found by a PING
  every few idle seconds whose PONG must come back within a bound.
* **Redis down.** The local reload still happens; the answer says that no other worker
  was reached (``peers_notified: null``), and the broadcast is sent again in the
  background once Redis takes it, unless a newer reload or broadcast supersedes it.
* **Redis Cluster.** The script and the record go through the app's cluster-aware client
  (the keys share one hash tag). Pub/sub messages reach every node's subscribers, so the
  listener subscribes on any one node of ``CTR_REDIS_URL``, trying them in turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.connection import parse_url

from ctr.bundle import BundleError, list_versions, version_of
from service.retry import retry_under_lock
from service.store import REDIS_ERRORS, node_urls

log = logging.getLogger("ctr.service.reload")

# what a Redis call may raise; a malformed number or record (ValueError) is treated alike
ERRORS = (*REDIS_ERRORS, ValueError)
_DIGITS = re.compile(r"[0-9]{1,20}")
# the bus's own calls are off the request path: a bound for a slow or loading Redis,
# not the scoring reads' CTR_REDIS_TIMEOUT_MS
MIN_TIMEOUT_S = 2.0
# the first wait before a version that did not load here is tried again (doubling)
LOAD_RETRY_S = 30.0
# CAS delete of the record (KEYS[1]) if it still holds ARGV[1]
DROP_RECORD = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: sequence, record; ARGV: message (JSON, without "seq"), channel. The record never
# expires (one key per deployment): a worker starting months later still finds it.
# The new number is above the previous one and at least the server's clock in µs (exact
# in a Lua double until the year 2255), so it grows even if the sequence key was lost.
PUBLISH_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local seq = math.max(tonumber(redis.call('GET', KEYS[1]) or '0') + 1, now)
redis.call('SET', KEYS[1], string.format('%.0f', seq))
local m = cjson.decode(ARGV[1])
m['seq'] = string.format('%.0f', seq)  -- a string: cjson prints numbers to 14 digits
local s = cjson.encode(m)
redis.call('SET', KEYS[2], s)
return {string.format('%.0f', seq), redis.call('PUBLISH', ARGV[2], s)}
"""


def _replace(
    task: asyncio.Task[None] | None, coro: Coroutine[Any, Any, None] | None
) -> asyncio.Task[None] | None:
    """Cancel ``task`` (superseded) and run ``coro`` in its place, if any."""
    if task is not None:
        task.cancel()
    return asyncio.get_running_loop().create_task(coro) if coro is not None else None


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class ReloadBus:
    """Publishes this worker's reloads and applies the other workers'.

    ``redis`` is the app's client (a ``Redis`` or ``RedisCluster``); ``lock`` is the app's
    reload lock and ``load(version)`` loads and swaps in a version (called with the lock
    held; it logs its own failures)."""

    def __init__(
        self,
        redis: Redis | RedisCluster,
        url: str,
        channel: str,
        models_dir: str,
        model_name: str,
        timeout_s: float,
        connect_timeout_s: float,
        lock: asyncio.Lock,
        load: Callable[[str], Awaitable[Any]],
        retry_s: float = 0.5,
        ping_s: float = 5.0,
        pong_timeout_s: float = 2.0,
        load_retry_s: float | None = None,
        load_retry_max_s: float = 600.0,
        configured: str = "latest",
        serving: Callable[[], str | None] = lambda: None,
        agreed: Callable[[str], None] = lambda version: None,
        serving_digest: Callable[[], str | None] = lambda: None,
        owns_redis: bool = False,
    ) -> None:
        # one channel and one record per deployment: the store's path and the model name,
        # hashed to a short suffix; the keys share a hash tag (one cluster slot)
        where = os.path.abspath(models_dir)
        db = str(parse_url(node_urls(url)[0]).get("db") or 0)  # as redis-py reads it
        digest = hashlib.sha1(f"{db}\0{where}\0{model_name}".encode()).hexdigest()[:16]
        self.channel = f"{channel}:{digest}"
        tag = "{" + f"{channel}:{digest}" + "}"
        self.seq_key = f"{tag}:seq"
        self.last_key = f"{tag}:last"
        self.deployment = {"models_dir": where, "model": model_name}
        self.configured = configured  # CTR_MODEL_VERSION: what a fresh start loads
        self.serving = serving  # the version this worker serves now (None: none)
        self.agreed = agreed  # a broadcast named the version served here: no load
        # the served bundle's onnx_sha256: a broadcast of the same number with another
        # digest (a folder replaced under its number) is loaded, not agreed with
        self.serving_digest = serving_digest
        # a reload made here whose broadcast Redis has not taken yet
        self.pending: str | None = None
        self.token = uuid.uuid4().hex  # this worker
        # its commands' client (the record, the publish script): one whose socket
        # timeout is at least MIN_TIMEOUT_S (the scoring reads' 50 ms cut a broadcast
        # short on a Redis stalled for a moment); closed here where ``owns_redis``
        self.redis = redis
        self.owns_redis = owns_redis
        self.timeout_s = max(timeout_s, MIN_TIMEOUT_S)
        self.lock = lock
        self.load = load
        self.retry_s = retry_s
        self.ping_s = ping_s
        self.pong_timeout_s = pong_timeout_s
        self.load_retry_s = LOAD_RETRY_S if load_retry_s is None else load_retry_s
        self.load_retry_max_s = load_retry_max_s
        self.retry_task: asyncio.Task[None] | None = None  # a failed broadcast's load
        self.publish_task: asyncio.Task[None] | None = None  # a broadcast Redis refused
        self.applied_seq: int | None = None  # None: not known yet (Redis not reached)
        # broadcast numbers follow the Redis server's clock in µs: one numbered after this
        # is newer than the model this worker loads at start-up (used when the baseline
        # read fails; a clock skew between this host and Redis shifts it by that much)
        self.started_us = int(time.time() * 1_000_000)
        self.subscribed = False
        # (rolled back to, newest then): the deployment's last broadcast, a rollback that
        # a newer export has since made no start's version (:meth:`baseline`); a start-up
        # fallback passes over the versions rolled back from
        self.rolled_back: tuple[int, int] | None = None
        self.applied = 0  # other workers' reloads applied here
        self.catch_ups = 0  # subscriptions made and caught up (one per (re)connect)
        # the listener's own connections (one per node, made on first use): a blocking
        # read must not hold one of the scoring pool's connections
        # named, so `CLIENT LIST` shows which connections are reload listeners
        opts = {
            "socket_timeout": self.timeout_s,
            "socket_connect_timeout": max(connect_timeout_s, 1.0),
            "client_name": f"ctr-reload-bus:{self.token[:12]}",
        }
        self.nodes = [Redis.from_url(u, max_connections=2, **opts) for u in node_urls(url)]
        self.task: asyncio.Task[None] | None = None
        self.closing = False

    async def baseline(self) -> str | None:
        """Note the current broadcast number (call before the start-up load), and return
        the version to start on instead of ``CTR_MODEL_VERSION``: the last broadcast's,
        when it was made by workers configured alike and, for ``latest``, nothing newer
        has been exported since; else None."""
        try:
            async with asyncio.timeout(self.timeout_s):
                raw, current = await self.redis.mget(self.last_key, self.seq_key)  # one slot
            self.applied_seq = int(current or 0)  # a malformed one: ValueError, in ERRORS
        except ERRORS as exc:
            log.warning("reload bus: no baseline (redis): %s", type(exc).__name__)
            return None
        msg = self._record(raw)
        if msg is None:
            return None
        if not await self._adoptable(msg):
            if msg.get("configured", self.configured) == self.configured:
                newest, to = msg.get("newest"), version_of(str(msg["version"]))
                if isinstance(newest, int) and to is not None and to < newest:
                    self.rolled_back = (to, newest)
                return None
            # a deploy with another CTR_MODEL_VERSION: that record is over (else reverting
            # the deploy would bring an old rollback back)
            with contextlib.suppress(*ERRORS):
                async with asyncio.timeout(self.timeout_s):
                    await self.redis.eval(DROP_RECORD, 1, self.last_key, raw)  # type: ignore[misc]
            return None
        log.info("starting on version %s, the deployment's last broadcast", msg["version"])
        return str(msg["version"])

    async def _adoptable(self, msg: dict[str, Any]) -> bool:
        """Whether a worker starting now should start on the record ``msg``'s version:
        made by workers configured alike and, for ``latest``, nothing newer exported
        since."""
        if msg.get("configured") != self.configured:
            return False  # another setting, or a record from before the rule
        if self.configured != "latest":
            return True
        seen = msg.get("newest")
        if not isinstance(seen, int) or isinstance(seen, bool):
            return False
        return await asyncio.to_thread(self._newest) <= seen  # else exported since

    def retry_later(self, version: str) -> None:
        """The start-up load of the deployment's ``version`` failed here: try it again in
        the background (backing off), as a broadcast version that failed, until it loads
        or a newer broadcast supersedes it."""
        if self.applied_seq is not None:
            self.retry_task = _replace(self.retry_task, self._retry(self.applied_seq, version))

    def _newest(self) -> int:
        """The highest complete version in the model store (0: none, or unreadable)."""
        try:
            return max(list_versions(self.deployment["models_dir"], self.deployment["model"]),
                       default=0)  # fmt: skip
        except (OSError, BundleError):  # the model's folder unreadable: list_versions says
            return 0

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._listen(), name="reload-bus")

    async def publish(self, version: str) -> int | None:
        """Tell the other workers to load ``version`` (call with the reload lock held, after
        loading it); how many were reached, ``None`` when Redis could not be. Then the
        broadcast is tried again in the background (backing off) until Redis takes it,
        unless something newer (a reload here, a broadcast applied) supersedes it."""
        # this reload supersedes an older broadcast's pending load here, and an older
        # reload's pending broadcast
        self.retry_task = _replace(self.retry_task, None)
        reached = await self._publish_once(version)
        self.pending = None if reached is not None else version
        self.publish_task = _replace(
            self.publish_task, self._republish(version) if reached is None else None
        )
        return reached

    async def _republish(self, version: str) -> None:
        async def attempt() -> bool:
            await self._send_pending()
            return self.pending != version

        # sent (here or by the listener, before it caught up), or superseded: by a newer
        # reload here, or a broadcast this worker received after this reload (_apply)
        done = lambda: self.closing or self.pending != version  # noqa: E731
        await retry_under_lock(self.lock, attempt, done, self.retry_s, 30.0)

    async def _send_pending(self) -> bool:
        """Broadcast the reload made here whose broadcast Redis refused (call with the
        lock held); whether Redis took it (True, also when none was pending)."""
        version = self.pending
        if version is None:
            return True
        reached = await self._publish_once(version)
        if reached is None:
            return False
        self.pending = None
        log.info("reload of version %s broadcast late, to %d worker(s)", version, reached)
        return True

    async def _publish_once(self, version: str) -> int | None:
        # what a worker starting later compares with its own setting and store (baseline)
        note = {"configured": self.configured, "newest": await asyncio.to_thread(self._newest)}
        if (digest := self.serving_digest()) is not None and self.serving() == version:
            note["digest"] = digest  # what this worker loaded under that number
        msg = orjson.dumps({**self.deployment, "version": version, "origin": self.token, **note})
        try:
            async with asyncio.timeout(self.timeout_s):
                seq, receivers = await self.redis.eval(  # type: ignore[misc]
                    PUBLISH_SCRIPT, 2, self.seq_key, self.last_key, msg, self.channel
                )  # fmt: skip
        except ERRORS as exc:
            log.warning("reload not broadcast (redis): %s", type(exc).__name__)
            return None
        self.applied_seq = max(self.applied_seq or 0, int(seq))
        if isinstance(self.redis, RedisCluster):
            # a cluster's PUBLISH counts the receiving node's subscribers only: count the
            # channel's subscribers on every node the listeners subscribe on instead
            receivers = await self._subscribers()
        # the count includes this worker's own subscription, when it has one
        return max(int(receivers) - (1 if self.subscribed else 0), 0)

    async def _subscribers(self) -> int:
        """Subscribers of the channel over the nodes that answer (a node that does not
        has no listener of ours to count)."""
        total = 0
        for node in self.nodes:
            try:
                async with asyncio.timeout(self.timeout_s):
                    total += sum(n for _, n in await node.pubsub_numsub(self.channel))
            except ERRORS:
                continue
        return total

    def _record(self, raw: bytes | str | None) -> dict[str, Any] | None:
        """A well-formed message or record for this deployment, else None."""
        if not raw:
            return None
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError:
            msg = None
        if (
            not isinstance(msg, dict)
            or not isinstance(msg.get("version"), str)
            or not _DIGITS.fullmatch(str(msg.get("seq", "")))
        ):
            log.warning("ignored a malformed reload message on %s", self.channel)
            return None
        if {k: msg.get(k) for k in self.deployment} != self.deployment:
            return None  # not this deployment's (a hash collision of channels)
        return msg

    def _parse(self, raw: bytes | str | None) -> tuple[int, str, str | None] | None:
        """(number, version, digest) of a message for this deployment from another
        worker."""
        return self._peer(self._record(raw))

    def _peer(self, msg: dict[str, Any] | None) -> tuple[int, str, str | None] | None:
        """(number, version, digest or None) of a well-formed record (:meth:`_record`),
        unless it is this worker's own."""
        if msg is None or msg.get("origin") == self.token:
            return None  # not ours to apply (this worker's own: published after its load)
        digest = msg.get("digest")
        return int(msg["seq"]), msg["version"], digest if isinstance(digest, str) else None

    async def _apply(self, seq: int, version: str, digest: str | None = None) -> None:
        async with self.lock:  # a local reload in progress finishes (and publishes) first
            if self.applied_seq is not None and seq <= self.applied_seq:
                return  # this worker has applied or published a newer one
            self.applied_seq = seq
            self.pending = None  # a reload here not broadcast yet: this came after it
            served = self.serving_digest()
            if self.serving() == version and (digest is None or served in (None, digest)):
                # already served here (several workers reloading it at once); a start-up
                # fallback to it is what the deployment chose now
                self.agreed(version)
                return
            log.info("reloading version %s, as another worker did (#%d)", version, seq)
            if await self._load_quietly(version):
                return
        # the other worker loaded it, so it may load here later (files still being
        # copied to this host, say): retried until it does or a newer one comes
        self.retry_task = _replace(
            self.retry_task, self._retry(seq, version)
        )  # the older's: superseded

    async def _load_quietly(self, version: str) -> bool:
        try:
            await self.load(version)
        except Exception:  # `load` logs its own failures
            return False
        self.applied += 1
        return True

    async def _retry(self, seq: int, version: str) -> None:
        """Load a broadcast version that failed here, after ``load_retry_s`` and then
        twice as long each time (up to ``load_retry_max_s``), while it is still the
        newest broadcast this worker has seen (a newer one, applied or published,
        supersedes it: see :meth:`_apply`)."""

        async def attempt() -> bool:
            log.info("retrying version %s from another worker (#%d)", version, seq)
            return await self._load_quietly(version)

        done = lambda: self.closing or self.applied_seq != seq  # noqa: E731
        await retry_under_lock(self.lock, attempt, done, self.load_retry_s, self.load_retry_max_s)

    async def _catch_up(self) -> None:
        """Apply the last broadcast if it is newer than what this worker has seen. A
        failure raises: the listener then reconnects and tries again."""
        async with asyncio.timeout(self.timeout_s):
            raw, current = await self.redis.mget(self.last_key, self.seq_key)  # one slot
        msg = self._record(raw)
        parsed = self._peer(msg)
        if self.applied_seq is None:
            # the start-up baseline read failed: what was broadcast since this worker
            # began starting is newer than its model (it is applied below); what came
            # before is too, when it is the version a start would have taken (baseline),
            # else not (it loaded CTR_MODEL_VERSION, like any fresh start)
            self.applied_seq = min(self.started_us, int(current or 0))
            if msg is not None and parsed is not None and await self._adoptable(msg):
                self.applied_seq = min(self.applied_seq, parsed[0] - 1)
        if parsed is not None:
            await self._apply(*parsed)

    async def _listen(self) -> None:
        """Subscribe (nodes in turn), catch up, then apply messages; on a Redis error or
        an unanswered PING, wait and start again."""
        delay, attempt = self.retry_s, 0
        while not self.closing:
            node = self.nodes[attempt % len(self.nodes)]
            attempt += 1
            pubsub = node.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                await self._confirmed(pubsub)  # listening before reading what was missed
                self.subscribed = True
                # a reload made here that Redis refused goes out first: numbered after every
                # broadcast made meanwhile, none of which may undo it (a catch-up of an
                # older record would, and end its re-sending)
                if self.pending is not None:
                    async with self.lock:
                        if not await self._send_pending():
                            raise ConnectionError("the reload made here is not broadcast yet")
                await self._catch_up()
                self.catch_ups += 1
                delay = self.retry_s
                await self._receive(pubsub)
            except Exception as exc:  # the listener must outlive any error
                # a cancellation that met a client timeout can come out as a timeout error
                if self.closing or _cancelling():
                    raise asyncio.CancelledError() from exc
                level = logging.WARNING if isinstance(exc, ERRORS) else logging.ERROR
                log.log(level, "reload bus: %r; retrying in %.1f s", exc, delay)
            finally:
                self.subscribed = False
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _receive(self, pubsub: Any) -> None:
        """Apply messages until closing; a PING after ``ping_s`` of silence must be
        answered within ``pong_timeout_s``, else the connection is dead (raises)."""
        seen = time.monotonic()  # the last message of any kind, PONGs included
        pinged: float | None = None
        while not self.closing:
            message = await pubsub.get_message(timeout=1.0)
            now = time.monotonic()
            if message is not None:
                seen = now
                parsed = self._parse(message["data"]) if message["type"] == "message" else None
                if parsed is not None:
                    await self._apply(*parsed)
            elif pinged is not None and seen < pinged:
                if now - pinged > self.pong_timeout_s:
                    raise ConnectionError("no answer to PING: the connection is dead")
            elif now - seen >= self.ping_s:
                await pubsub.ping()
                pinged = now

    async def aclose(self) -> None:
        self.closing = True
        for task in (self.retry_task, self.publish_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self.task is not None:
            self.task.cancel()
            # the loop also stops on `closing`, should a cancellation be swallowed inside
            # the client; bounded either way
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self.task, 5.0)
        for node in self.nodes:
            with contextlib.suppress(Exception):
                await node.aclose()
                await node.connection_pool.disconnect()
        if self.owns_redis:
            with contextlib.suppress(Exception):
                await self.redis.aclose()
                if isinstance(self.redis, Redis):
                    await self.redis.connection_pool.disconnect()

    async def _confirmed(self, pubsub: Any) -> None:
        """Wait for the server's confirmation of the subscription."""
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            message = await pubsub.get_message(timeout=0.2)
            if message is not None and message.get("type") == "subscribe":
                return
        raise TimeoutError("the subscription was not confirmed")
