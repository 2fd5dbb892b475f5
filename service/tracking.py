"""Server-assisted invalidation of the cached user rows (Redis ``CLIENT TRACKING``).

Without it, every scoring request reads the user's profile and newest behaviours from
Redis, and reuses the encoded rows only when what it read is unchanged
(:mod:`service.usercache`). With it, Redis tells the worker when any user key changes,
so a user whose rows were read since their last change is scored without a Redis
round trip at all.

One connection per worker, of its own (not from the pool): ``CLIENT TRACKING on
REDIRECT <its own id> BCAST PREFIX {u:``, then ``SUBSCRIBE __redis__:invalidate``. From
then on Redis sends the names of the user keys (``{u:<id>}:profile``, ``:seq``,
``:event_ids``) that any client writes, deletes or that expire or are evicted; a null
name when a database is flushed. The worker reads the socket whenever it is readable
(``CTR_USER_TRACKING_DRAIN_MS=0``) or only every that many ms, and always once more,
synchronously, before a request trusts a cached row or stamps a read
(:meth:`UserTracker.poll`), so an invalidation that has reached this host is applied
before the request that follows it is answered. Read on a timer, a burst of writes to
other users costs an idle worker one wake-up per tick instead of one per message.

Trust is decided with a sequence number. :meth:`UserTracker.stamp` is taken before a
read is sent; each invalidation takes the next number and notes it for its user. Rows
read under stamp ``s`` are trusted while no invalidation for that user has a number
above ``s`` (:meth:`UserTracker.valid`), so an invalidation that is handled while the
read is in flight, or before the rows are stored, distrusts them. Anything that can
lose an invalidation distrusts every row at once (the floor moves past every stamp):

* the connection closes or fails (a Redis restart, ``CLIENT KILL``);
* the heartbeat's probe does not come back within :data:`DEAD_S` (see below);
* a flush (the null name);
* the per-user table grows past its bound.

The heartbeat checks the whole path, not only that the socket answers: every
:data:`PING_S` the worker writes its own probe key ``{u:}:probe:<client id>:<random>``
(the user ID is empty, which no request may name) through a second connection, and
the key's invalidation must come back on the tracking connection within
:data:`DEAD_S`. A connection is trusted only once its first probe has come back, so a
server or proxy that accepts ``CLIENT TRACKING`` but never delivers what it promises
(or stops delivering later) leaves every request reading Redis, with a warning, instead
of serving rows that no longer match the store. The probe key expires after
:data:`PROBE_TTL_MS`; writing it needs ``SET`` on ``{u:*`` keys (events need only
``EVALSHA``).

With ``CTR_ITEM_TRACKING`` the same connection also asks for ``PREFIX ctr:item:``: each
item-feature hash Redis names goes to :attr:`UserTracker.on_items` (the worker's
:meth:`service.itemcache.ItemCache.reported`), which drops that feature's cached values and,
through the cache's generation, every encoded candidate row (at once, or at the end of
``CTR_ITEM_TRACKING_HOLD_MS`` after the last it applied); a flush and each
(re)connection say that any hash may have changed. Item values are cached with a TTL
either way: while the connection is down they stay (a degraded response scores with
them) and age out as before.

Until the connection is up again, :meth:`stamp` returns None and every request reads
Redis as without tracking. Plain ``redis://`` and ``unix://`` URLs on a single node
only: with TLS or Redis Cluster the service reads on every request (logged at start).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import hiredis
from redis.asyncio.connection import SSLConnection, parse_url

from service import metrics as m
from service.resp import pack_command
from service.settings import Settings
from service.store import ITEM_PREFIX

log = logging.getLogger("ctr.tracking")

CHANNEL = b"__redis__:invalidate"
PREFIX = b"{u:"
ITEMS = ITEM_PREFIX.encode()  # the item-feature hashes (CTR_ITEM_TRACKING)
PROBE_PREFIX = PREFIX + b"}:probe:"  # + the tracking connection's client ID, random bits
PING_S = 1.0  # heartbeat (probe) interval
# a drain that read this much, or a quarter of the socket's receive buffer where that is
# less, may have found the buffer full: Redis may hold more invalidations behind it. A
# unix socket is full far sooner than its SO_RCVBUF says (about 20 KB of invalidation
# messages: the sender's buffer, counted per message with overhead)
BEHIND_BYTES = 48 * 1024
BEHIND_BYTES_UNIX = 8 * 1024
CATCH_UP_TTL_MS = 5000  # a catch-up probe key's life: its invalidation goes as it is set
DEAD_S = 3.0  # a probe not back this long after it was written: the connection is lost
PROBE_TTL_MS = 60_000  # a probe key outlives its worker by at most this
RETRY_MAX_S = 2.0  # reconnect backoff ceiling
REFUSED_RETRY_S = 30.0  # after Redis refused the set-up (an error reply)
MAX_NOTED = 200_000  # per-user invalidations kept before the floor moves instead


def encode(*args: bytes | str | int) -> bytes:
    """One RESP command (:func:`service.resp.pack_command`, as redis-py would send it)."""
    packed = pack_command(args, "utf-8", "strict")
    assert packed is not None  # text, bytes and ints are always packed
    return packed


def probe_key(client_id: int) -> bytes:
    """The probe key of the tracking connection ``client_id`` (an empty user ID), with
    random bits: client IDs are unique on one server only."""
    return PROBE_PREFIX + f"{client_id}:{os.urandom(6).hex()}".encode()


def user_of(key: bytes) -> str | None:
    """The user ID in a user key ``{u:<id>}:<suffix>``; None for any other key."""
    head, sep, _ = key.rpartition(b"}:")
    if not sep or not head.startswith(PREFIX):
        return None
    return head[len(PREFIX) :].decode("utf-8", "surrogateescape")


def unsupported(url: str, cluster: bool) -> str | None:
    """Why tracking cannot run against ``url``; None when it can."""
    if cluster:
        return "Redis Cluster"
    if "," in url:
        return "several Redis URLs"
    try:
        kw = parse_url(url)
    except ValueError as exc:
        return str(exc)
    if kw.get("connection_class") is SSLConnection:
        return "TLS (rediss://)"
    return None


class UserTracker:
    """One worker's invalidation connection and its trust table (event loop thread only)."""

    def __init__(
        self,
        url: str,
        connect_timeout_s: float,
        drain_s: float = 0.0,
        on_items: Callable[[str | None], None] | None = None,
    ) -> None:
        self.url = url
        # told of each item-feature hash Redis reports written (its feature), and None
        # where any may have changed unseen: a flush, or each (re)connection, as writes
        # while it was down were not reported (:meth:`service.itemcache.ItemCache.reported`);
        # None: the item hashes are not tracked
        self.on_items = on_items
        self.connect_timeout_s = connect_timeout_s
        self.setup_budget_s = max(connect_timeout_s, DEAD_S)
        # 0: read the socket whenever it is readable; else every drain_s and on demand
        self.drain_s = drain_s
        self.seq = 0  # the newest invalidation's number
        self.floor = 0  # every stamp below this is distrusted
        self.noted: dict[str, int] = {}  # user -> number of their newest invalidation
        self.live = False  # subscribed, and its newest probe back in time
        self.refused: str | None = None  # Redis's error reply to the last set-up, if any
        self.invalidations = 0  # users invalidated one by one (seen by the tests)
        self.losses = 0  # times every row was distrusted at once (seen by the tests)
        self.client_id: int | None = None  # the connection's CLIENT ID (CLIENT KILL ID)
        # the server has hash field expiry (HPEXPIRE: Redis 7.4, Valkey 9): a field that
        # expires is left out of HGETALL before any invalidation says so, so a read
        # also asks the profile fields' time to live (found out at each connect)
        self.field_ttl = False
        self._sock: socket.socket | None = None
        self._reader: Any = None
        self._probe_sock: socket.socket | None = None  # writes the probe key
        self._probe_reader: Any = None
        self._probe_key = b""
        self._probe_sent = 0.0  # when the newest probe was written
        self._probe_back = False  # its invalidation has come back
        # catching up (:meth:`_catch_up`): no kept row is trusted until the invalidation
        # of this probe key, written after a drain that found the socket full, is back
        self._behind: bytes | None = None
        self._again = False  # a drain found the socket full while one was in flight
        self._catch_ups = 0
        self._behind_bytes = BEHIND_BYTES  # what one drain reads from a full socket, at least
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    # -- trust ----------------------------------------------------------------------

    def stamp(self) -> int | None:
        """The stamp to record before a read is sent; None when tracking is down (rows
        read now are not trusted later). Call :meth:`poll` first, so that a change from
        before the read does not count as one after it and distrust its rows for
        nothing."""
        return self.seq if self.live else None

    def poll(self) -> None:
        """Apply what has reached the socket (called before a cached row is trusted).
        While catching up (:meth:`_catch_up`), an item hash write Redis acknowledged may
        still be queued there too: ``on_items`` hears None at each poll until the probe
        is back, so no cached item value or row is trusted meanwhile (as no user row is)."""
        if self._sock is not None:
            try:
                self._drain()
            except Exception as exc:  # never the request's error: read it instead
                self._lost(exc)
        if self._behind is not None and self._sock is not None and self.on_items is not None:
            self.on_items(None)

    def valid(self, user_id: str, stamp: int | None) -> bool:
        """Whether rows of ``user_id`` read under ``stamp`` are still what Redis holds
        (as far as the invalidations applied so far tell; none while catching up)."""
        if stamp is None or not self.live or stamp < self.floor or self._behind is not None:
            return False
        return self.noted.get(user_id, -1) <= stamp

    def invalidate(self, user_id: str) -> None:
        """Distrust ``user_id``'s rows read before now (this worker's own writes call
        it at once; Redis's message follows)."""
        self.seq += 1
        self.invalidations += 1
        if len(self.noted) >= MAX_NOTED:
            self._distrust_all()
        self.noted[user_id] = self.seq

    def _distrust_all(self, counted: bool = True) -> None:
        """Distrust every row read so far (``counted``: in ``ctr_user_tracking_resets_total``;
        not on the worker's own shutdown)."""
        self.seq += 1
        self.floor = self.seq
        self.noted.clear()
        self.losses += 1
        if counted:
            m.USER_TRACKING_RESETS.inc()

    # -- connection -----------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background, and keep connected until :meth:`aclose`."""
        self._loop = asyncio.get_running_loop()
        m.set_tracking(True)  # until Redis refuses the set-up
        self._task = asyncio.create_task(self._keep())

    async def wait_live(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the connection (start-up, tests)."""
        end = time.monotonic() + timeout_s
        while not self.live and time.monotonic() < end:
            await asyncio.sleep(0.01)
        return self.live

    async def aclose(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._lost(None)

    async def _keep(self) -> None:
        delay = 0.05
        failing = False
        tick = self.drain_s if 0 < self.drain_s < PING_S else PING_S
        pinged = 0.0
        connected_at: float | None = None
        while not self._closed:
            if self._sock is None:
                if connected_at is not None:  # lost: again at once only after a long life
                    lived, connected_at = time.monotonic() - connected_at, None
                    if lived < DEAD_S:  # killed soon after each set-up: back off
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, RETRY_MAX_S)
                    else:
                        delay = 0.05
                    if self._closed:
                        return
                try:
                    await self._connect()
                    connected_at, failing = time.monotonic(), False
                    self.refused = None
                    m.set_tracking(True)
                except Exception as exc:  # whatever it was: try again later
                    if not failing:  # once per outage, not every retry
                        log.warning("user-row tracking cannot connect (%r); retrying", exc)
                        failing = True
                    # a Redis that refuses tracking is not a connection down; one that
                    # does not answer (after refusing, too) is
                    refused = isinstance(exc, TrackingRefused)
                    self.refused = str(exc) if refused else None
                    m.set_tracking(not refused, refused)
                    # refused (Redis < 6, ACL, password): the next try is no likelier soon
                    await asyncio.sleep(
                        REFUSED_RETRY_S if isinstance(exc, TrackingRefused) else delay
                    )
                    delay = min(delay * 2, RETRY_MAX_S)
                    continue
            await asyncio.sleep(tick)
            if self.drain_s > 0:
                self.poll()
            if (now := time.monotonic()) - pinged >= PING_S * 0.999:
                pinged = now
                self._heartbeat()

    def _heartbeat(self) -> None:
        """Check the last probe and write the next: lost when one is not back within
        DEAD_S, or when the probe connection fails or is refused."""
        if self._sock is None or self._probe_sock is None:
            return
        now = time.monotonic()
        try:
            self._probe_replies()
        except Exception as exc:
            self._lost(exc)
            return
        if not self._probe_back:
            # the third check after the write (each PING_S * 0.999 or later), not a
            # fourth one a second on where the three ticks came to a hair under DEAD_S
            if now - self._probe_sent >= DEAD_S * 0.999:
                self._lost(
                    TimeoutError(f"the probe key's invalidation not back within {DEAD_S:g} s")
                )
            return
        self._probe_sent, self._probe_back = now, False
        try:
            self._probe_sock.send(self._probe_write())
        except OSError as exc:
            self._lost(exc)

    def _probe_write(self) -> bytes:
        """The probe: any write of the key makes Redis send its name."""
        return encode("SET", self._probe_key, 1, "PX", PROBE_TTL_MS)

    def _probe_replies(self) -> None:
        """Read the probe connection's replies (``OK``s); raise on an error reply or a
        close."""
        assert self._probe_sock is not None
        _recv_into(self._probe_sock, self._probe_reader)
        while (reply := self._probe_reader.gets()) is not False:
            if isinstance(reply, hiredis.ReplyError):
                raise refusal(f"{reply} (the probe key's SET)")

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        kw = parse_url(self.url)
        reader, probe_reader = hiredis.Reader(), hiredis.Reader()
        sock: socket.socket | None = None
        probe: socket.socket | None = None
        verifying = False
        try:
            # two connections and about ten round trips: a budget of its own, so that a
            # link with tens of ms of round trip still sets up (start-up waits only
            # CTR_REDIS_CONNECT_TIMEOUT_MS for it; it goes on in the background)
            async with asyncio.timeout(self.setup_budget_s):
                try:
                    sock = await _open(loop, kw)
                    await _hello(loop, sock, reader, kw, "ctr-tracking")
                    cid = await _ask(loop, sock, reader, encode("CLIENT", "ID"))
                    prefixes: tuple[bytes, ...] = (b"PREFIX", PREFIX)
                    if self.on_items is not None:
                        prefixes += (b"PREFIX", ITEMS)
                    await _ask(
                        loop,
                        sock,
                        reader,
                        encode("CLIENT", "TRACKING", "on", "REDIRECT", cid, "BCAST", *prefixes),
                    )
                    await _ask(loop, sock, reader, encode("SUBSCRIBE", CHANNEL))
                    probe = await _open(loop, kw)
                    await _hello(loop, probe, probe_reader, kw, "ctr-tracking-probe")
                    if kw.get("db"):
                        await _ask(loop, probe, probe_reader, encode("SELECT", kw["db"]))
                    self._probe_key, self._probe_back = probe_key(int(cid)), False
                    field_ttl = await _has_field_ttl(loop, probe, probe_reader, self._probe_key)
                    await _ask(loop, probe, probe_reader, self._probe_write())
                    verifying = True
                    while not self._probe_back:  # the first probe's invalidation
                        data = await loop.sock_recv(sock, 65536)
                        if not data:
                            raise ConnectionError("closed by the server")
                        reader.feed(data)
                        self._handle_all(reader)
                except BaseException:
                    for s in (sock, probe):
                        if s is not None:
                            s.close()
                    raise
        except TimeoutError:
            if verifying:
                raise TrackingUnverified(
                    "CLIENT TRACKING was accepted, but the probe key's invalidation did not"
                    f" come back within {self.setup_budget_s:g} s"
                ) from None
            raise
        assert sock is not None and probe is not None
        self._sock, self._reader = sock, reader
        self._probe_sock, self._probe_reader = probe, probe_reader
        self._behind, self._again = None, False
        self._behind_bytes = behind_bytes(sock)
        self.client_id = int(cid)
        self.field_ttl = field_ttl
        if self.drain_s <= 0:
            loop.add_reader(sock.fileno(), self._drain)
        self.live = True
        if self.on_items is not None:  # item writes while it was down were not reported
            self.on_items(None)
        m.USER_TRACKING_UP.set(1)
        log.info("user-row tracking connected (client id %s)", cid)

    def _drain(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            read = _recv_into(sock, self._reader)
        except OSError as exc:  # a close, a reset
            self._lost(exc)
            return
        try:
            self._handle_all(self._reader)
        except Exception as exc:  # a protocol error: start over on a new connection
            self._lost(exc)
            return
        if read >= self._behind_bytes:
            self._catch_up()

    def _catch_up(self) -> None:
        """The drain may have emptied a full socket with more invalidations still queued
        in Redis (the event loop stalled while others wrote megabytes of user keys): a
        write Redis acknowledged meanwhile has its invalidation behind them, and a kept
        row of that user would be trusted. Until a probe key written now comes back
        (after everything Redis queued before it, on this one connection), no kept row
        is trusted: requests read Redis. Reads stamped meanwhile are kept rightly: an
        invalidation still queued takes a later number."""
        if self._probe_sock is None:
            return
        if self._behind is not None:  # one in flight: the next goes when it is back
            self._again = True
            return
        self._send_catch_up()

    def _send_catch_up(self) -> None:
        """Write a catch-up probe key (one of its own: an older one's invalidation must
        not end this catch-up), short-lived: its invalidation is sent as it is written."""
        assert self._probe_sock is not None
        self._catch_ups += 1
        self._again = False
        key = self._probe_key + b":behind:%d" % self._catch_ups
        try:
            self._probe_sock.send(encode("SET", key, 1, "PX", CATCH_UP_TTL_MS))
        except OSError as exc:
            self._lost(exc)
            return
        self._behind = key
        m.USER_TRACKING_CATCH_UPS.inc()

    def _handle_all(self, reader: Any) -> None:
        while (msg := reader.gets()) is not False:
            self._handle(msg)

    def _handle(self, msg: Any) -> None:
        if not isinstance(msg, list) or len(msg) < 3 or msg[0] != b"message":
            return  # a subscribe confirmation
        keys = msg[2]
        if keys is None:  # FLUSHDB / FLUSHALL
            self._distrust_all()
            if self.on_items is not None:
                self.on_items(None)
            return
        if not isinstance(keys, list):  # not from Redis (anyone may PUBLISH here)
            log.warning("unexpected message on %s ignored", CHANNEL.decode())
            return
        named = items = 0
        for key in keys:
            if not isinstance(key, bytes):
                continue
            if key.startswith(ITEMS):
                if self.on_items is not None:
                    self.on_items(key[len(ITEMS) :].decode("utf-8", "surrogateescape"))
                    items += 1
                continue
            user = user_of(key)
            # a worker's probe (this one's, or another's): the empty user ID, which no
            # request may name; a user whose ID merely starts like a probe's suffix
            # ("}:probe:7") is a user
            if user == "":
                if key == self._probe_key:
                    self._probe_back = True
                elif key == self._behind:  # caught up with what Redis had queued
                    self._behind = None
                    if self._again:  # the socket was full again meanwhile: once more
                        self._send_catch_up()
                continue
            named += 1
            if user is not None:
                self.invalidate(user)
        m.USER_INVALIDATIONS.inc(named)
        if items:
            m.ITEM_INVALIDATIONS.inc(items)

    def _lost(self, exc: BaseException | None) -> None:
        """Close the connection (if any) and distrust every row read under it."""
        sock, self._sock = self._sock, None
        probe, self._probe_sock = self._probe_sock, None
        was_live, self.live = self.live, False
        m.USER_TRACKING_UP.set(0)
        if sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(sock.fileno())
            sock.close()
        if probe is not None:
            probe.close()
        if was_live:
            self._distrust_all(counted=exc is not None)
            if exc is not None:
                log.warning("user-row tracking lost (%s): reading Redis on every request", exc)


async def _open(loop: asyncio.AbstractEventLoop, kw: dict[str, Any]) -> socket.socket:
    """A connected non-blocking socket to the Redis of parsed URL ``kw``: its unix path,
    or each address its host resolves to in turn."""
    if "path" in kw:
        targets: list[tuple[int, Any]] = [(socket.AF_UNIX, kw["path"])]
    else:
        host, port = kw.get("host", "localhost"), kw.get("port", 6379)
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        targets = [(family, addr) for family, _, _, _, addr in infos]
    error: OSError | None = None
    for family, addr in targets:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            if family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, addr)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
        except BaseException:
            sock.close()
            raise
    raise error or OSError(f"no address to connect to for {kw.get('host')}")


def behind_bytes(sock: socket.socket) -> int:
    """What one drain of ``sock`` reads, at least, when it finds the socket full:
    :data:`BEHIND_BYTES`, or a quarter of its receive buffer where that is less;
    :data:`BEHIND_BYTES_UNIX` on a unix socket."""
    if sock.family == socket.AF_UNIX:
        return BEHIND_BYTES_UNIX
    quarter = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 4
    return min(BEHIND_BYTES, quarter or BEHIND_BYTES)


def _recv_into(sock: socket.socket, reader: Any) -> int:
    """Feed ``reader`` all that non-blocking ``sock`` holds, on until EAGAIN (so a close
    behind data is seen now): the bytes read. Raise ConnectionError when the server
    has closed it."""
    read = 0
    try:
        while data := sock.recv(65536):
            reader.feed(data)
            read += len(data)
    except BlockingIOError:
        return read
    raise ConnectionError("closed by the server")


class TrackingRefused(Exception):
    """Redis answered a set-up command with an error (no CLIENT TRACKING: Redis < 6, an
    ACL that forbids it or the probe key's write, a wrong password)."""


class TrackingUnverified(TrackingRefused):
    """``CLIENT TRACKING`` was accepted, but the first probe's invalidation never came
    back (a proxy or a look-alike server that does not deliver them): retried as seldom
    as a refusal."""


async def _hello(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    reader: Any,
    kw: dict[str, Any],
    name: str,
) -> None:
    """Authenticate as URL ``kw`` says and name the connection."""
    if kw.get("password") is not None:
        user = kw.get("username")
        auth = ("AUTH", user, kw["password"]) if user else ("AUTH", kw["password"])
        await _ask(loop, sock, reader, encode(*auth))
    await _ask(loop, sock, reader, encode("CLIENT", "SETNAME", name))


async def _ask(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, reader: Any, command: bytes
) -> Any:
    """Send ``command`` and return its reply (raise :class:`TrackingRefused` on an error
    reply)."""
    await loop.sock_sendall(sock, command)
    while (reply := reader.gets()) is False:
        data = await loop.sock_recv(sock, 65536)
        if not data:
            raise ConnectionError("closed by the server")
        reader.feed(data)
    if isinstance(reply, hiredis.ReplyError):
        raise refusal(reply)
    return reply


async def _has_field_ttl(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, reader: Any, probe: bytes
) -> bool:
    """Whether the server has hash field expiry: it answers ``HPTTL`` (of a key that is
    never written, the probe key's name and ``:fields``) instead of refusing it."""
    try:
        await _ask(loop, sock, reader, encode("HPTTL", probe + b":fields", "FIELDS", 1, "f"))
    except TrackingRefused as exc:
        if "unknown command" not in str(exc).lower():  # e.g. NOPERM: reads could not ask
            log.warning("hash field expiry not checked (HPTTL refused: %s): a profile "
                        "field's own expiry is seen once Redis deletes it", exc)  # fmt: skip
        return False
    return True


# error replies that pass (a Redis loading its data, a script running, a failover):
# retried with the usual backoff, not after REFUSED_RETRY_S
TRANSIENT = ("LOADING", "BUSY", "MASTERDOWN", "NOREPLICAS", "READONLY", "TRYAGAIN")


def refusal(reply: Any) -> Exception:
    """The exception for error reply ``reply``: a ConnectionError when it passes soon."""
    text = str(reply)
    if text.startswith(TRANSIENT):
        return ConnectionError(f"Redis answered {text}")
    return TrackingRefused(text)


def off_reason(settings: Settings) -> str | None:
    """Why ``settings`` run without tracking; None when they run with it."""
    if not settings.user_tracking:
        return "CTR_USER_TRACKING=false"
    if settings.user_cache_size <= 0:
        return "CTR_USER_CACHE_SIZE=0"
    return unsupported(settings.redis_url, settings.redis_cluster)


async def start_tracking(
    settings: Settings, on_items: Callable[[str | None], None] | None = None
) -> UserTracker | None:
    """The worker's tracker, connected if Redis answers within the connect timeout (it
    keeps trying in the background otherwise); None when ``settings`` run without.
    ``on_items``: told of item-hash writes (:attr:`UserTracker.on_items`) where
    ``CTR_ITEM_TRACKING`` is on and the item cache is (``CTR_ITEM_CACHE_TTL_S`` > 0)."""
    if why := off_reason(settings):
        if settings.user_tracking and settings.user_cache_size > 0:
            log.info("user-row tracking off (%s): Redis is read on every request", why)
        return None
    tracker = UserTracker(
        settings.redis_url,
        settings.redis_connect_timeout_ms / 1000,
        settings.user_tracking_drain_ms / 1000,
        on_items if settings.item_tracking and settings.item_cache_ttl_s > 0 else None,
    )
    tracker.start()
    await tracker.wait_live(settings.redis_connect_timeout_ms / 1000)
    return tracker


def describe(tracker: UserTracker | None, settings: Settings) -> dict[str, Any]:
    """What ``/v1/models`` shows of tracking: ``refused`` is Redis's error reply while it
    refuses the set-up (``ctr_user_tracking_refused``), null otherwise (it showed as
    ``enabled`` and not ``live``, as a connection down: a docs review)."""
    if tracker is None:
        return {"enabled": False, "why_not": off_reason(settings)}
    return {"enabled": True, "live": tracker.live, "drain_ms": tracker.drain_s * 1000,
            "refused": tracker.refused, "items": tracker.on_items is not None}  # fmt: skip
