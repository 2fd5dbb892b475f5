"""Redis behaviour store.

Key schema (every user key carries the hash tag ``{u:<user_id>}`` so a user's keys
share one Cluster slot):

=================================  ======  ==============================================
key                                type    content
=================================  ======  ==============================================
``{u:<user_id>}:profile``          HASH    user feature (source name) -> raw value
``{u:<user_id>}:seq``              LIST    behaviours, oldest first, JSON objects with the
                                           item-side raw features (``item_id``,
                                           ``cate_id``, ...) plus ``type`` and ``ts``;
                                           trimmed to the newest ``sequence_keep``
``{u:<user_id>}:event_ids``        ZSET    recent event IDs (score = the event's ``ts``),
                                           the idempotency window for ``POST /v1/events``
``{u:<user_id>}:events``           ZSET    the same IDs as versions before session 27
                                           keep them (score = arrival time), checked and
                                           written for workers of those versions while
                                           ``CTR_EVENT_LEGACY_IDS`` is on
``ctr:item:<feature>``             HASH    item_id -> raw value of one item feature
=================================  ======  ==============================================

A score request reads everything in one pipelined round trip: ``HGETALL`` profile,
``LRANGE`` the newest L behaviours, and one ``HMGET`` per item feature for the
candidates whose request did not carry it and that the in-process item cache does
not hold. On Redis Cluster the user's keys share one slot, so with a warm item cache
the request is one round trip to one node there too.
"""

from __future__ import annotations

import asyncio
import inspect
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any
from urllib.parse import unquote, urlparse

import orjson
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection, SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from service.resp import pack_commands

ITEM_PREFIX = "ctr:item:"

AnyRedis = Redis | RedisCluster
# what a call through either client may raise when the store is down, slow or moved
# (a cluster client's own errors are not RedisErrors)
REDIS_ERRORS = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)


def _acquire_newest(self: ClusterNode) -> Connection:
    """redis-py's async cluster client (8.2) follows an ASK redirect by sending
    ``ASKING`` and then the command as two pooled calls on the target node; its pool
    hands out the oldest free connection and takes one back at the end, so with two or
    more free the command went out on another connection than its ``ASKING``: the target
    answered MOVED back to the source, which answered ASK again, until ``ClusterError:
    TTL exhausted`` (every read of a key already moved out of a slot being resharded
    degraded; a cluster review). Taking the newest free connection gives the command the
    one ``ASKING`` was just sent on: nothing runs between the two on the event loop
    (``tests/test_cluster.py``). It also keeps the fewest connections warm."""
    free = self._free
    if free:
        return free.pop()
    return _acquire_oldest(self)


_acquire_oldest = ClusterNode.acquire_connection
ClusterNode.acquire_connection = _acquire_newest  # type: ignore[method-assign]


def data_error(exc: BaseException) -> str | None:
    """Redis's message where ``exc`` is a reply about the data, not the store: a key of
    another type than the service writes (``WRONGTYPE``, also inside a script's error).
    Retrying does not help until the key is fixed; every other error of
    :data:`REDIS_ERRORS` is the store down, slow, or refusing for now (OOM, READONLY,
    LOADING, BUSY...). None for those."""
    if isinstance(exc, ResponseError) and "WRONGTYPE" in str(exc):
        return str(exc)[:300]
    return None


def refused_code(exc: BaseException) -> str:
    """`` (Redis refused it: READONLY)`` where ``exc`` is Redis's reply refusing a
    command (its error code only: READONLY from a replica, OOM, BUSY, MASTERDOWN,
    NOPERM...; redis-py retries LOADING, a connection error, until the deadline), for an
    error's detail: a client told only "unavailable; retry" could not tell a service
    pointed at a read-only replica, which no retry outlasts, from a moment's outage (a
    writes review, session 46); ``""`` for anything else."""
    code = _error_code(exc)
    return "" if code is None or code == "ERR" else f" (Redis refused it: {code})"


def _error_code(exc: BaseException) -> str | None:
    """The error code of Redis's reply in ``exc`` (``READONLY``, ``NOPERM``...): redis-py
    keeps it as ``status_code`` and cuts it from the message of the errors it has a
    class for; a script's error keeps it in the message. None where there is none."""
    if not isinstance(exc, ResponseError):
        return None
    code = getattr(exc, "status_code", None) or str(exc).split(" ", 1)[0]
    if isinstance(code, str) and code.isascii() and code.isalpha() and code.isupper():
        return code[:20]
    return None


def node_urls(url: str) -> list[str]:
    """Plain Redis URLs for each node of a (possibly comma-separated) URL list."""
    parts = [p.strip() for p in url.split(",") if p.strip()]
    return [p if "://" in p else "redis://" + p for p in parts]


def make_client(
    url: str, cluster: bool, timeout_s: float, connect_timeout_s: float, max_connections: int
) -> AnyRedis:
    """The async client: a pooled ``Redis`` or a ``RedisCluster`` (one pool per node)."""
    kw: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": connect_timeout_s,
        "max_connections": max_connections,
    }
    if cluster:
        # every node given in a comma-separated URL list is a startup node; no backoff
        # sleeps inside the client: the caller's deadline bounds each request instead
        urls = node_urls(url)
        addrs = map(urlparse, urls)
        nodes = [ClusterNode(u.hostname or "127.0.0.1", u.port or 6379) for u in addrs]
        kw.update(cluster_options(urls[0]))
        return RedisCluster(startup_nodes=nodes, retry=Retry(NoBackoff(), 1), **kw)
    # a burst beyond the pool waits for a free connection (bounded by the timeout)
    # instead of failing at once into a degraded response
    pool = BlockingConnectionPool.from_url(url, retry_on_timeout=False, timeout=timeout_s, **kw)
    return Redis(connection_pool=pool)


class RedisRefused(Exception):
    """Redis answered the worker's start-up check and refused it (:func:`check_refused`)."""


def refused_as(exc: BaseException) -> str | None:
    """What a Redis that answered refused, from its error: ``"credentials"`` (no
    password where one is needed, a wrong one, an ACL user that is disabled or may not
    run the command), ``"protected"`` (the connection: protected mode) or
    ``"database"`` (its number); None for anything else (not answering, a timeout: the
    store down, which the service serves through degraded). A cluster client's error
    holds a node's refusal as its cause (diff review). The one test both the service's
    start-up (:func:`refusal`) and the command line's check (:func:`ping`) make."""
    from redis.exceptions import AuthenticationError, NoPermissionError

    for err in (exc, exc.__cause__):
        if err is None:
            continue
        text, code = str(err), _error_code(err)
        if (
            isinstance(err, AuthenticationError | NoPermissionError)
            or code in ("NOAUTH", "WRONGPASS", "NOPERM")
            or any(s in text for s in ("NOAUTH", "WRONGPASS", "NOPERM", "must be called with"))
        ):
            return "credentials"
        if code == "DENIED":
            return "protected"
        if "DB index is out of range" in text:
            return "database"
    return None


# what the service's start-up (:func:`refusal`) and the command line's check
# (:func:`ping`) say of each refusal :func:`refused_as` tells, after "the Redis at URL"
_SAID = {
    "protected": "refused the connection (protected mode: it has no password, and this "
    "host is not its loopback): set a password there (requirepass), or bind it where "
    "protected mode allows",
    "database": "has no such database",
}


def refusal(exc: BaseException) -> str | None:
    """What a Redis that answered refused the service (:func:`refused_as`), said for the
    start-up's error; None where it did not answer."""
    kind = refused_as(exc)
    if kind == "credentials":
        return (
            "refused the service's credentials or commands: put the password (and ACL "
            "user, one that may run PING, LRANGE, HGETALL and HMGET on the {u:*} and "
            "ctr:item:* keys) in the URL, redis://USER:PASSWORD@host:port/db"
        )
    return None if kind is None else _SAID[kind]


async def check_refused(client: AnyRedis, url: str, timeout_s: float) -> None:
    """At a worker's start: raise :class:`RedisRefused`, naming ``CTR_REDIS_URL`` (its
    password hidden), where the Redis there answers and refuses the service (a wrong or
    missing password, an ACL user that may not read, protected mode, a database it does
    not have: :func:`refusal`). Such a worker served every request
    degraded, ready, as for a Redis down (a rollout with a wrong secret went on, its
    scores cold-start ones: an earlier review); a Redis that does not answer within
    ``timeout_s`` is left to the requests, which serve degraded until it does (docs/api.md
    "Degraded modes")."""
    user = "ctr-start-check"  # no such user: read, nothing written
    try:
        async with asyncio.timeout(timeout_s):
            await client.ping()
            # the reads scoring sends: an ACL user may PING and not read (diff review)
            await client.lrange(user_key(user, "seq"), 0, 0)
            await client.hgetall(user_key(user, "profile"))
            # and the item features' (HMGET on ctr:item:*): a user limited to the user
            # keys, or without HMGET, passed, and every score was degraded (diff review)
            await client.hmget(item_key(user), user)
    except (*REDIS_ERRORS, ValueError) as exc:
        problem = refusal(exc)
        if problem is None:
            return
        raise RedisRefused(
            f"CTR_REDIS_URL: the Redis at {redact(url)} {problem} ({str(exc)[:200]})"
        ) from None


def cluster_options(url: str) -> dict[str, Any]:
    """What a cluster client takes from one node's URL, as redis-py's ``from_url`` reads
    it: the credentials percent-decoded (``p%40ss`` is ``p@ss``), TLS for ``rediss`` and
    the query's options (``?ssl_cert_reqs=none``); the address is each node's own.
    Raises ValueError naming a query option the cluster client does not take (a single
    node's client takes more, e.g. ``timeout``)."""
    options = dict(parse_url(url))
    for key in ("host", "port", "db", "path"):
        options.pop(key, None)
    if options.pop("connection_class", None) is SSLConnection:
        options["ssl"] = True
    unknown = sorted(set(options) - _CLUSTER_OPTIONS)
    if unknown:
        raise ValueError(f"a Redis Cluster client takes no URL option {', '.join(unknown)}")
    return options


# what RedisCluster's constructor takes (it has no **kwargs): a URL's other options fail it
_CLUSTER_OPTIONS = frozenset(inspect.signature(RedisCluster.__init__).parameters) - {"self"}


def redact(url: str) -> str:
    """The URL(s) with any password replaced, for logs and messages.

    One URL where redis-py reads it as one (a password may hold a comma); else each
    part of a list as :func:`node_urls` reads it (a part without a scheme is a URL too).
    The credentials are the user-info ``urlparse`` finds before the host: the user name
    kept where there is one, the rest ``***``. In a URL redis-py refuses (a password
    with an unencoded ``/``, ``#`` or ``?`` moves where ``urlparse`` looks), everything
    between ``://`` and the last ``@``. A query option whose name (decoded, as redis-py
    reads it) ends in ``password`` (``password``, ``ssl_password``) has its value
    replaced too."""
    one = url if "://" in url else f"redis://{url}"
    if _parses(one):
        return _redact_one(one, True)
    return ",".join(_redact_one(part, _parses(part)) for part in node_urls(url) or [url])


def _parses(url: str) -> bool:
    try:
        parse_url(url)
    except Exception:  # noqa: BLE001 - any refusal: not one URL as redis-py reads it
        return False
    return True


def _redact_one(part: str, parses: bool) -> str:
    """:func:`redact` of one URL; ``parses``: whether redis-py reads it."""
    scheme, sep, rest = part.partition("://")
    if not sep:
        return part
    if parses:
        head = urlparse(part).netloc  # the user-info is before its last "@"
        at = head.rfind("@")
    else:
        head = rest
        at = rest.rfind("@")
    if at >= 0:
        user, colon, _ = head[:at].partition(":")
        shown = f"{user}:***" if colon and "/" not in user else "***"
        rest = shown + rest[at:]
    if "?" in rest:
        base, _, query = rest.partition("?")
        rest = base + "?" + "&".join(
            f"{name}=***" if unquote(name).lower().endswith("password") else pair
            for pair in query.split("&")
            for name in [pair.partition("=")[0]]
        )
    return f"{scheme}{sep}{rest}"


# connection options that take an object (a class, a callable, a provider): a URL's
# text is never one
_OBJECT_OPTIONS = frozenset({
    "connection_class", "credential_provider", "driver_info", "encoder_class",
    "event_dispatcher", "parser_class", "redis_connect_func", "retry", "retry_on_error",
    "socket_keepalive_options", "himport_registry", "queue_class",
})  # fmt: skip


def url_options_problem(url: str) -> str | None:
    """What a single node's client would refuse at its first connection in ``url``'s
    query (a TypeError there, a traceback in the lifespan): an option its connection
    class does not take (``?foo=1``; ``?ssl_password=`` on a ``redis://`` URL), or one
    that takes an object. None where every option is taken."""
    options = dict(parse_url(url))
    klass = options.pop("connection_class", Connection)
    if not isinstance(klass, type):
        return "a Redis URL takes no option connection_class"
    taken = {"max_connections", "timeout"}  # the pool's own
    for cls in klass.__mro__:
        # the maintenance-notification mixin's are the client's to set, not a URL's
        if "__init__" in vars(cls) and "MaintNotifications" not in cls.__name__:
            taken |= set(inspect.signature(cls.__init__).parameters)
    unknown = sorted(set(options) - (taken - _OBJECT_OPTIONS) - {"self", "args", "kwargs"})
    if unknown:
        return f"a {klass.__name__} takes no URL option {', '.join(unknown)}"
    return None


def ping(url: str, cluster: bool = False, timeout_s: float = 5.0) -> None:
    """Synchronous check for the command line (``ctr load``, ``ctr demo``): raise
    ``RedisError`` naming the (redacted) URL if the Redis there does not answer. A
    cluster's URL may list several nodes (:func:`node_urls`); the first is asked."""
    from redis import Redis, RedisCluster
    from redis.exceptions import RedisClusterException, RedisError

    kw = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    try:
        first = (node_urls(url) or [url])[0]
        if not cluster and (problem := url_options_problem(url)):
            raise TypeError(problem)
        client = RedisCluster.from_url(first, **kw) if cluster else Redis.from_url(url, **kw)
        try:
            from service.settings import check_dbs

            # as CTR_REDIS_URL is checked: redis-py took `/1O` for database 0, silently
            # (`ctr load --redis-url` loaded there); after parsing, which names a bad port
            check_dbs(url, cluster)
            client.ping()
        finally:
            client.close()
    except (ValueError, TypeError) as exc:
        # not a Redis URL (redis-py's parse_url, whose message may quote a password with
        # an unencoded "/"), or an option the client does not take (a TypeError)
        # nothing was asked ("does not answer" sent a reader to look for a Redis down)
        raise RedisError(f"{redact(url)} is not a usable Redis URL: {url_problem(exc)}") from exc
    except (RedisError, RedisClusterException, OSError) as exc:
        kind = refused_as(exc)  # as the service's start-up tells a refusal (one test)
        if kind == "credentials":
            said = (
                "needs a password (or another one), or an ACL user that may run the "
                "command: put them in the URL, redis://USER:PASSWORD@host:port/db"
            )
        elif kind is not None:
            said = _SAID[kind]
        else:
            raise RedisError(f"the Redis at {redact(url)} does not answer: {exc}") from exc
        raise RedisError(f"the Redis at {redact(url)} {said} ({exc})") from exc


def sync_client(redis_url: str, cluster: bool, timeout_s: float = 10) -> Any:
    """A synchronous client for the command line's bulk work (``ctr load``, ``ctr
    impressions``; here, not in :mod:`service.loader`, so that ``ctr impressions`` does
    not import pandas, ~100 MB of its peak): a long timeout; a cluster's URL may list
    several nodes (the first is asked for the rest). A URL whose database is no number
    is refused (``ValueError``), as ``CTR_REDIS_URL`` is: redis-py took ``/1O`` for
    database 0, and a benchmark's load replaced that database's item hashes.

    No command is sent again after a timeout or a lost connection (the error is
    raised): the server may have run it, and a user replaced twice loses an event
    appended between the two (``service.loader._replace_users``). redis-py's cluster client sent
    it again up to 10 times by default; a cluster's redirections (MOVED, ASK, TRYAGAIN)
    are still followed, as the server ran nothing then."""
    from redis import Redis as SyncRedis
    from redis.backoff import NoBackoff as SyncNoBackoff
    from redis.cluster import RedisCluster as SyncRedisCluster
    from redis.retry import Retry as SyncRetry

    from service.settings import check_dbs

    once = SyncRetry(SyncNoBackoff(), 0)
    if cluster:
        client: Any = SyncRedisCluster.from_url(
            node_urls(redis_url)[0], socket_timeout=timeout_s, retry=once
        )
    else:  # Redis.from_url has no retry by default in redis-py 8 (Redis() has 10)
        client = SyncRedis.from_url(redis_url, socket_timeout=timeout_s, retry=once)
    try:  # after parsing, which names a bad port first
        check_dbs(redis_url, cluster)
    except ValueError as exc:
        client.close()
        raise ValueError(f"the Redis URL {redact(redis_url)}: {exc}") from None
    return client


def url_problem(exc: BaseException) -> str:
    """redis-py's complaint about a URL, without the parts of the URL it quotes (a
    password with an unencoded ``/``, ``#`` or ``?`` lands in the "port")."""
    text = str(exc)
    if "Port could not be cast" not in text:
        return text  # e.g. the schemes it takes, an option's value it cannot read
    return ("a malformed URL (percent-encode any / # ? @ : in the user name or "
            "password: %2F %23 %3F %40 %3A)")


# KEYS: seq, event_ids, events. ARGV: event_id, ts, payload, keep, window, ttl (s; 0: the
# keys never expire, and an expiry an earlier setting left is removed; else they expire
# that long after the user's last stored event), legacy ("1": check and write ``events``
# too, below; "0": leave it alone).
# The list stays in time order (``ts``; arrival order among equal ones; behaviours with no
# ``ts``, e.g. from ``ctr load``, count as oldest), as training histories are: a late or
# retried event goes in at its place in time, lifting the newer ones off the tail and
# putting them back, and the trim drops the oldest by time. An event older than all of
# the newest ``keep`` would be trimmed at once: it is not stored, nor is its event_id.
# The event_id is recorded after every write that could fail, so a failed append is never
# remembered as done. Only stored events are recorded, scored by their ``ts``; the window
# (ARGV[5], at least ``keep``) drops the oldest by time, never one as new as the oldest
# kept behaviour, so a retry is known for as long as its behaviour is in the list. Only
# where more than ``window`` recorded events share the oldest kept time can one of them
# be dropped (the set stays within twice the window). ``events`` is the ID set of earlier
# versions (scored by arrival, the newest ``window`` kept): while ``legacy`` is on
# (``CTR_EVENT_LEGACY_IDS``) it is checked and written too, so that during a rolling
# deploy or a rollback a retry that reaches a worker of the other version is known.
# Returns 0 when the event_id was already seen, 1 when appended, 2 when outside the window.
APPEND_EVENT = """
local keep = tonumber(ARGV[4])
local window = tonumber(ARGV[5])
local function ts_of(raw)  -- nil: no usable ts (counts as the oldest)
  if not raw then return nil end
  local ok, ev = pcall(cjson.decode, raw)
  if ok and type(ev) == 'table' and type(ev['ts']) == 'number' then return ev['ts'] end
  return nil
end
local legacy = ARGV[7] == '1'
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 0 end
if legacy and redis.call('ZSCORE', KEYS[3], ARGV[1]) then return 0 end
local ts = tonumber(ARGV[2])
-- older than the oldest of the newest `keep`: it would be trimmed at once. Nothing is
-- written, its ID included: a retry is outside again (the edge only moves forward)
local function edge_ts()
  if redis.call('LLEN', KEYS[1]) < keep then return nil end
  return ts_of(redis.call('LINDEX', KEYS[1], -keep))
end
local edge = edge_ts()
if edge ~= nil and ts < edge then return 2 end
-- lift the newer ones off the tail (newest first), push this one, put them back
local later = {}
while true do
  local t = ts_of(redis.call('LINDEX', KEYS[1], -1))
  if t == nil or t <= ts then break end
  later[#later + 1] = redis.call('RPOP', KEYS[1])
end
redis.call('RPUSH', KEYS[1], ARGV[3])
for i = #later, 1, -1 do redis.call('RPUSH', KEYS[1], later[i]) end
redis.call('LTRIM', KEYS[1], -keep, -1)
local ttl = tonumber(ARGV[6])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) else redis.call('PERSIST', KEYS[1]) end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
-- the window: the oldest by time go, but none as new as the oldest kept behaviour
local n = redis.call('ZCARD', KEYS[2])
if n > window then
  edge = edge_ts()
  local cut = redis.call('ZRANGE', KEYS[2], n - window - 1, n - window - 1, 'WITHSCORES')
  if edge == nil or tonumber(cut[2]) < edge then
    redis.call('ZREMRANGEBYRANK', KEYS[2], 0, n - window - 1)
  else
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', string.format('(%.17g', edge))
    n = redis.call('ZCARD', KEYS[2])
    if n > 2 * window then redis.call('ZREMRANGEBYRANK', KEYS[2], 0, n - 2 * window - 1) end
  end
end
-- earlier versions' set: the newest `window` by arrival
local last = 2
if legacy then
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[3], tonumber(t[1]) * 1000000 + tonumber(t[2]), ARGV[1])
  n = redis.call('ZCARD', KEYS[3])
  if n > window then redis.call('ZREMRANGEBYRANK', KEYS[3], 0, n - window - 1) end
  last = 3
end
-- the keys exist now, and the TTL is bounded (MAX_TTL_S): this cannot fail
for k = 2, last do
  if ttl > 0 then redis.call('EXPIRE', KEYS[k], ttl) else redis.call('PERSIST', KEYS[k]) end
end
return 1
"""

# what the append script returns
SEEN, APPENDED, OUTSIDE_WINDOW = 0, 1, 2


def user_key(user_id: str, suffix: str) -> str:
    return "{u:" + user_id + "}:" + suffix


def event_keys(user_id: str) -> list[str]:
    """:data:`APPEND_EVENT`'s keys for a user: the list, the event IDs, and the event
    IDs as earlier versions keep them (still written, for a rolling deploy)."""
    return [user_key(user_id, "seq"), user_key(user_id, "event_ids"), user_key(user_id, "events")]


def item_key(feature: str) -> str:
    return ITEM_PREFIX + feature


@dataclass
class UserData:
    """What one request needs from Redis: the profile, the newest behaviours as stored
    (raw bytes, oldest first; parsed on first use) and the item features looked up."""

    profile: dict[str, str] = field(default_factory=dict)
    raw_events: list[bytes] = field(default_factory=list)
    item_features: dict[str, list[str | None]] = field(default_factory=dict)
    # seconds until the first of the user's keys expires (inf: none; read only for
    # CTR_USER_TRACKING, which must not trust rows past it: Redis reports an expiry
    # only once it deletes the key, which may be long after for a key nobody reads)
    ttl_s: float = math.inf

    @cached_property
    def events(self) -> list[dict[str, Any]]:
        """The behaviours; entries that are not JSON objects are skipped."""
        return _events(self.raw_events)

    @property
    def found(self) -> bool:
        """Whether the store knows the user (a profile or a usable behaviour)."""
        return bool(self.profile) or bool(self.events)


def _text(v: Any) -> str:
    return v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else str(v)


def _texts(vals: list[Any]) -> list[str | None]:
    """HMGET's reply as text (None where the field is absent). Where every value is
    there as bytes and none holds a NUL, one join, one decode and one split do it."""
    if None not in vals:
        try:
            joined = b"\0".join(vals)
        except TypeError:  # not all bytes
            joined = None
        if joined is not None and joined.count(b"\0") == len(vals) - 1:
            return joined.decode("utf-8", "surrogateescape").split("\0")
    return [None if v is None else _text(v) for v in vals]


def _decode_items(feats: list[str], replies: list[Any]) -> dict[str, list[str | None]]:
    return {f: _texts(vals) for f, vals in zip(feats, replies, strict=True)}


# a reused connection the server closed: worth one retry on a fresh one (not timeouts)
RETRYABLE = (RedisConnectionError, ConnectionError)


class Reader:
    """The scoring request's read-only pipeline, on a few connections of its own.

    redis-py's ``Pipeline`` pays for its generality on every call (a command stack,
    response callbacks, pool bookkeeping behind a condition variable, metrics hooks):
    about 0.2 ms of event-loop CPU per request, as much as mapping 500 candidates. This
    keeps up to ``size`` connections made by the client's own pool (so the same URL,
    TLS, credentials, database and timeouts; none on a reply where ``caller_bounds``),
    writes the packed commands and reads the replies. A connection whose call fails or
    is cancelled half-way (the request deadline) is closed, never reused, so replies
    cannot desync; a failure on a reused connection (an idle connection the server
    closed, a Redis restart) is retried once on a fresh one, since these reads are
    idempotent (a timeout is not retried). On Redis Cluster it uses the client's
    pipeline, which routes by slot. What redis-py does only for its pool's own
    connections does not apply here: health checks, re-authentication with streaming
    credentials, maintenance notifications (Redis Enterprise) and its connection
    metrics."""

    def __init__(self, redis: AnyRedis, size: int, caller_bounds: bool = False) -> None:
        self.redis = redis
        # the caller bounds every read (an asyncio.timeout, which LateTimer moves on a
        # late loop): the connections wait for replies with no socket timeout of their own
        self.caller_bounds = caller_bounds
        self.pool = redis.connection_pool if isinstance(redis, Redis) else None
        self.idle: list[Connection] = []
        self.size = size
        self.slots = asyncio.Semaphore(size)
        self.closed = False

    async def warm(self, count: int, timeout_s: float) -> int:
        """Open up to ``count`` connections now (at start-up), idle for the first
        requests: a fresh worker hit by a burst opened one per request inside its read's
        budget (``CTR_REDIS_TIMEOUT_MS``), and some of the burst degraded (a review saw
        up to 4 of 64, 59 of 150 with a larger in-flight limit). Those that do not open
        within ``timeout_s`` (Redis down or slow) are left to the requests, as before.
        The number opened; 0 on a cluster, whose client pools its own per node."""
        if self.pool is None or self.closed:
            return 0

        async def one() -> Connection | None:
            conn = self._fresh()
            try:
                await asyncio.wait_for(conn.connect(), timeout_s)
            except REDIS_ERRORS:
                await conn.disconnect(nowait=True)
                return None
            except BaseException:  # cancelled: the start-up is ending
                await conn.disconnect(nowait=True)
                raise
            return conn

        opened = [c for c in await asyncio.gather(*[one() for _ in range(min(count, self.size))])
                  if c is not None]  # fmt: skip
        if self.closed:
            for conn in opened:
                await conn.disconnect()
            return 0
        self.idle.extend(opened)
        return len(opened)

    async def run(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Replies to ``commands`` (raw: bytes, lists, flat HGETALL pairs)."""
        if self.closed:
            raise RedisConnectionError("the store's reader is closed")
        if self.pool is None:
            pipe = self.redis.pipeline(transaction=False)
            for cmd in commands:
                pipe.execute_command(*cmd)
            return await pipe.execute()
        async with self.slots:
            idle = self.idle
            while idle:
                conn = idle.pop()
                if _closed_by_server(conn):  # while idle: no round trip to learn it
                    await conn.disconnect(nowait=True)
                    continue
                try:
                    return await self._call(conn, commands)
                except RETRYABLE:
                    break  # closed by _call; a reused connection may be stale: once more
            return await self._call(self._fresh(), commands)

    def _fresh(self) -> Connection:
        """A new connection of the client's pool; with no reply timer of its own where
        the caller bounds the reads (``caller_bounds``): redis-py's timer cut a reply,
        the commands' or the set-up's (CLIENT SETINFO, SELECT, AUTH/HELLO), on a loop
        busy just after the send, which LateTimer does not move (soak and diff reviews,
        session 45). ``socket_connect_timeout`` still bounds the TCP connect."""
        assert self.pool is not None
        conn = self.pool.make_connection()
        if self.caller_bounds:
            conn.socket_timeout = None
        return conn

    async def _call(self, conn: Connection, commands: list[tuple[Any, ...]]) -> list[Any]:
        try:
            enc = conn.encoder
            packed = pack_commands(commands, enc.encoding, enc.encoding_errors)
            if packed is None:
                packed = conn.pack_commands(commands)
            await conn.send_packed_command(packed, False)
            replies = [await conn.read_response() for _ in commands]
        except BaseException:  # cancelled or failed half-way: unread replies may follow
            await conn.disconnect(nowait=True)
            raise
        if self.closed:  # closed while this read was in flight: do not keep it
            await conn.disconnect()
        else:
            self.idle.append(conn)
        return replies

    async def aclose(self) -> None:
        """Close the idle connections; reads still in flight close theirs when done."""
        self.closed = True
        idle, self.idle = self.idle, []
        for conn in idle:
            await conn.disconnect()


def _closed_by_server(conn: Connection) -> bool:
    """Redis closed ``conn`` while it sat idle (a restart, its ``timeout``, ``CLIENT
    KILL``): its stream has seen the end. Each such connection cost a request a failed
    write and a retry; after a restart a worker's idle ones (``Reader.warm``'s 64 too)
    would each cost one request that."""
    reader = getattr(conn, "_reader", None)
    return reader is not None and reader.at_eof()


def _pairs(reply: Any) -> dict[str, str]:
    """HGETALL's reply (RESP2: a flat list of pairs; RESP3: a map) as text."""
    if isinstance(reply, dict):
        return {_text(k): _text(v) for k, v in reply.items()}
    it = iter(reply)
    return {_text(k): _text(v) for k, v in zip(it, it, strict=True)}


def _events(raw: list[bytes]) -> list[dict[str, Any]]:
    """The stored behaviours, oldest first by their timestamp (``ts``; arrival order among
    equal ones, and for those without one, e.g. loaded by ``ctr load``, which sort first):
    a retried or late event takes its place in time, as in training histories. Entries
    that are not JSON objects are skipped."""
    events = []
    for one in raw:
        try:
            ev = orjson.loads(one)
        except orjson.JSONDecodeError:
            continue
        if isinstance(ev, dict):
            events.append(ev)
    events.sort(key=_ts)  # stable; one linear pass when already in order
    return events


def _ts(ev: dict[str, Any]) -> float:
    t = ev.get("ts")
    return float(t) if type(t) in (int, float) and math.isfinite(t) else -math.inf


def _item_commands(lookups: dict[str, list[str]]) -> tuple[list[str], list[tuple[Any, ...]]]:
    """One ``HMGET ctr:item:<feature> ids…`` per feature with IDs to look up."""
    feats = [f for f, ids in lookups.items() if ids]
    return feats, [("HMGET", item_key(f), *lookups[f]) for f in feats]


async def fetch(
    reader: Reader,
    user_id: str,
    history: int,
    lookups: dict[str, list[str]],
    ttl: bool = False,
    fields: tuple[str, ...] = (),
) -> UserData:
    """One pipelined round trip: profile, newest ``history`` behaviours and, per item
    feature, the values for the item IDs in ``lookups[feature]``; with ``ttl``, also
    the two user keys' time to live (``UserData.ttl_s``) and, of the profile's
    ``fields`` (a server with hash field expiry), the first to expire."""
    feats, items = _item_commands(lookups)
    profile = user_key(user_id, "profile")
    user: list[tuple[Any, ...]] = [
        ("HGETALL", profile),
        ("LRANGE", user_key(user_id, "seq"), -history, -1),
    ]
    if ttl:
        user += [("PTTL", profile), ("PTTL", user_key(user_id, "seq"))]
        if fields:
            user.append(("HPTTL", profile, "FIELDS", len(fields), *fields))
    res = await reader.run([*user, *items])
    n = len(user)
    data = UserData(_pairs(res[0]), list(res[1]), _decode_items(feats, res[n:]))
    if ttl:
        # -1: no expiry, -2: no such key (field); otherwise milliseconds
        left = [int(t) for t in res[2:4] if int(t) >= 0]
        if fields:
            left += [int(t) for t in res[4] or () if int(t) >= 0]
        data.ttl_s = min(left) / 1000 if left else math.inf
    return data


async def fetch_items(reader: Reader, lookups: dict[str, list[str]]) -> dict[str, list]:
    """Item features only, aligned with ``lookups`` (one pipelined round trip)."""
    feats, items = _item_commands(lookups)
    return _decode_items(feats, await reader.run(items) if items else [])


class EventWriter:
    """Atomic append + trim + dedup via one Lua script (all keys in the user's slot)."""

    def __init__(self, redis: AnyRedis, window: int, ttl_s: int = 0, legacy: bool = True) -> None:
        self.redis = redis
        self.window = window
        self.ttl_s = ttl_s
        self.legacy = legacy
        self.script = redis.register_script(APPEND_EVENT)

    async def append(self, user_id: str, event_id: str, ts: float, payload: dict, keep: int) -> int:
        """Insert at its place in time, trim to the newest ``keep`` and record
        ``event_id``: ``APPENDED``, ``SEEN`` (a retry: nothing written) or
        ``OUTSIDE_WINDOW`` (older than the newest ``keep``: neither stored nor recorded)."""
        keys = event_keys(user_id)
        # a window shorter than the list would forget the IDs of events it still holds,
        # and store their retries twice
        window = max(self.window, keep)
        args = [event_id, ts, orjson.dumps(payload), keep, window, self.ttl_s, int(self.legacy)]
        return int(await self.script(keys=keys, args=args))
