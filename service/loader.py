"""``ctr load``: bulk-load a dataset's users, sequences and item features into Redis.

Torch-free. Each user gets their profile and their most recent behaviour sequence
(the history of their newest example, plus that example's candidate when it is a
behaviour: see :func:`user_records`); item features come from every candidate and
history entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import secrets
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from typing import Any

import orjson
import pandas as pd
from redis import Redis
from redis.cluster import RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from tqdm import tqdm

from ctr.encode import check_item_key, parse_dense, split_sequence
from ctr.mapping import normalize
from ctr.spec import FeatureConfig
from service.heldset import DATA_KEY, differences, record
from service.store import ITEM_PREFIX, event_keys, item_key, sync_client, user_key

TIME = "__ctr_load_time__"  # the time order user_records sorts on
# what the last complete load wrote (:func:`load_identity`), so that ``ctr load --once``
# (the compose init job on every `up`) does not reset histories events have moved on
LOADED_KEY = "ctr:loaded"
# the running load's token: gone at its end where Redis lost its writes meanwhile (a
# restart without its data, a flush, a fail-over), whose record would otherwise name a
# load the database no longer holds, and `--once` skip it for good
LOADING_KEY = "ctr:loading"
# KEYS: LOADING_KEY, DATA_KEY, LOADED_KEY; ARGV: the token, the data set, the identity
FINISH_LOAD = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('SET', KEYS[3], ARGV[3])
redis.call('DEL', KEYS[1])
return 1
"""


# KEYS: LOADING_KEY; ARGV: the token. Deleted only where it is still this load's.
DROP_TOKEN = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""
# what a load stopped part-way leaves (``ctr``'s line for Ctrl-C or SIGTERM), by how far
# it had come: its ctr:loaded record deleted, then its data being written
LEFT_BY_PHASE = {
    "cleared": "nothing of this load was written, but its ctr:loaded record was cleared "
    "(so --once loads again): run it again",
    "writing": "Redis holds part of this load (its ctr:loaded record cleared, so --once "
    "loads again): run it again",
}


class LoadLost(RuntimeError):
    """Redis no longer holds a load's writes (restarted without its data, flushed or
    failed over while it ran)."""


# what the keys a load writes hold: raise it when that changes (2, session 35: a CSV's
# float-written integer IDs read as digits; history item features lined up from the end;
# 3, session 36: an item's features from its newest row by time, ISO 8601 times ordered
# as times, Parquet BINARY IDs as text; 4, session 40: Parquet DECIMAL IDs as their
# numbers, 3.00 as 3; 5, session 42: the rows sharing a user's newest time in any order
# give one history, each behaviour once; an item column read as a category and a number
# stored as the category's token; a profile's int64 ID past 2**53 exact in a numeric frame)
LOAD_FORMAT = 5
ITEM_PIECE = 5000  # item-feature fields per command

# One user replaced in one step, so that an event appended meanwhile (POST /v1/events,
# whose script touches the same keys) lands wholly before the replace, and goes with
# the old list, or wholly after it, on the new one: never between a DEL and the RPUSH,
# where the next append would trim the event away while its ID stays recorded.
# KEYS: profile, seq, event_ids, events (one user: one hash-tag slot).
# ARGV: ttl (s; 0: none), the profile's field count F, F field/value pairs, then the
# sequence's entries, oldest first.
REPLACE_USER = """
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
local fields = tonumber(ARGV[2])
local step = 1000  -- Lua's unpack takes a few thousand values at most
for i = 3, 2 + 2 * fields, 2 * step do
  redis.call('HSET', KEYS[1], unpack(ARGV, i, math.min(i + 2 * step - 1, 2 + 2 * fields)))
end
for i = 3 + 2 * fields, #ARGV, step do
  redis.call('RPUSH', KEYS[2], unpack(ARGV, i, math.min(i + step - 1, #ARGV)))
end
local ttl = tonumber(ARGV[1])
if ttl > 0 and #ARGV > 2 + 2 * fields then redis.call('EXPIRE', KEYS[2], ttl) end
return 1
"""


def load_identity(config: FeatureConfig, keep: int | None = None, replay: str | None = None) -> str:
    """A digest of what a load of ``config`` writes: the parts of its config the load
    reads (the data source and its options, the features, the item key; the config's
    later keys left out at their defaults, as a manifest stores it), the behaviours kept
    per user, ``CTR_DATA_ROOT``, and :data:`LOAD_FORMAT`. Training and model settings
    are not in it: a version retrained on the same data has the same identity. The data
    files' contents are not compared. ``replay``: the split whose first example times
    the users' histories were taken from (``ctr load --replay-split``), None for the
    newest (a plain load, whose identity it leaves as it was)."""
    from ctr.spec import manifest_config

    stored = manifest_config(config)
    read = {k: stored[k] for k in ("data", "features", "item_key") if k in stored}
    root = os.environ.get("CTR_DATA_ROOT")
    body = {
        "config": read,
        "keep": keep or config.max_seq_len,
        "data_root": os.path.realpath(root) if root else None,
        "format": LOAD_FORMAT,
    }
    if replay is not None:  # only then: a plain load's identity is as before
        body["replay"] = replay
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


# which data set the database holds (:func:`data_description`), kept across loads (not
# deleted when one starts): ``ctr load`` of another data set into it warns, as its
# item hashes and the users both share are replaced; the service compares it with its
# bundle's (service.heldset)


def data_description(config: FeatureConfig) -> dict[str, Any]:
    """The data set a load of ``config`` reads: its source, file, options and, for the
    shared datasets, ``CTR_DATA_ROOT``; and the config's name, for messages."""
    from training.data.generic import data_root, reads_data_root

    spec = config.data
    root = str(data_root()) if reads_data_root(spec) else None
    return {
        "name": config.name,
        "source": spec.source,
        "path": os.path.realpath(spec.path) if spec.path else None,
        "options": spec.options,
        "data_root": root,
    }


OTHER_DATA = ("source", "path", "options", "data_root")  # what names a loaded data set


def other_data(before: dict[str, Any] | None, now: dict[str, Any]) -> bool:
    """``before`` (what the database held) is another data set than ``now``."""
    if not isinstance(before, dict):
        return False
    return any(before.get(k) != now.get(k) for k in OTHER_DATA)


def unreachable(ids: Iterable[Any], max_len: int) -> tuple[int, str | None]:
    """How many of ``ids`` no request can name (the API refuses them: empty, longer
    than ``CTR_MAX_ID_LENGTH``, control characters), and the first of them."""
    from service.errors import BadRequest
    from service.validate import check_id

    count, first = 0, None
    for value in ids:
        try:
            check_id(value, "id", max_len)
        except BadRequest:
            count += 1
            first = first if first is not None else str(value)
    return count, first


# set in a database a benchmark command loaded (``ctr bench``, ``bench-path``,
# ``bench-pair``, ``soak``): it may load there again without ``--force``
BENCH_KEY = "ctr:bench"


def check_bench_db(redis_url: str, force: bool = False) -> None:
    """Refuse (``ValueError``) to let a benchmark load into a database that holds keys
    no benchmark wrote (no :data:`BENCH_KEY`): its load replaces the users' histories
    and profiles and the ``ctr:item:*`` hashes there, and a run pointed at a served
    database (``/0``) replaced real users' data without a word. An empty database, or
    one a benchmark loaded (its key, or its ``bench-*`` data record from before the
    key), is fine; ``force`` takes any. Sends nothing but reads."""
    from service.store import redact

    if force:
        return
    client = sync_client(redis_url, False)
    try:
        keys = client.dbsize()
        if keys and not client.exists(BENCH_KEY) and not _bench_data(client.get(DATA_KEY)):
            raise ValueError(
                f"{redact(redis_url)} holds {keys} keys no benchmark wrote (no {BENCH_KEY}): "
                "a benchmark replaces users' histories and the ctr:item:* hashes there; "
                "give it a database of its own (--redis-url .../<db>, default database "
                "14), or --force to load there all the same"
            )
    finally:
        client.close()


def _bench_data(raw: bytes | None) -> bool:
    """The data record (``ctr:loaded:data``) is a benchmark's own: its synthetic
    ``bench-*`` config (a database a benchmark loaded before :data:`BENCH_KEY`)."""
    held = record(raw)
    return held is not None and str(held.get("name", "")).startswith("bench-")


def load_bench_db(config: FeatureConfig, frame: pd.DataFrame, redis_url: str) -> None:
    """A benchmark's load: the database marked its own (:data:`BENCH_KEY`) before any
    write, so that a load cut short is still a benchmark's, then loaded."""
    mark_bench_db(redis_url)
    load_into_redis(config, frame, redis_url, progress=False)


def mark_bench_db(redis_url: str) -> None:
    """Note in the database a benchmark just loaded that it may load there again."""
    client = sync_client(redis_url, False)
    try:
        client.set(BENCH_KEY, "1")
    finally:
        client.close()


# what a server answers when it ran nothing: the call may go again (NOSCRIPT aside)
REFUSED = (MovedError, AskError, TryAgainError, ClusterDownError)


def _replace_users(client: Redis | RedisCluster, calls: list[list[Any]]) -> None:
    """:data:`REPLACE_USER` for each of ``calls`` (its EVALSHA arguments after the
    SHA), pipelined; the calls a server refused for want of the script (a restart, a
    failover) run again once it has it. Only those: a user replaced twice would lose an
    event appended between the two. A timeout or a lost connection fails the load
    (:func:`_unanswered`): the server may have run the calls it was sent."""
    for attempt in (1, 2):
        if not calls:
            return
        sha = client.script_load(REPLACE_USER)  # on every master of a cluster
        try:
            if isinstance(client, RedisCluster):
                results = _evalsha_by_node(client, sha, calls)
            else:
                results = _evalsha_pipelined(client, sha, calls)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise _unanswered(exc) from exc
        for r in results:  # any other error: the load fails (a retry would not help)
            if isinstance(r, Exception) and not (isinstance(r, NoScriptError) and attempt == 1):
                raise r
        calls = [c for c, r in zip(calls, results, strict=True) if isinstance(r, NoScriptError)]


def _evalsha_pipelined(redis: Redis, sha: str, calls: list[list[Any]]) -> list[Any]:
    """The replies (errors among them) to ``EVALSHA sha *call`` for each of ``calls``,
    in one plain pipeline to ``redis``, which never sends a call again."""
    pipe = redis.pipeline(transaction=False)
    for args in calls:
        pipe.evalsha(sha, *args)
    return pipe.execute(raise_on_error=False)


def _evalsha_by_node(client: RedisCluster, sha: str, calls: list[list[Any]]) -> list[Any]:
    """The replies to ``EVALSHA sha *call`` for each of ``calls``, sent once each: in one
    plain pipeline per master, by the slot of the call's keys (one user's). A cluster
    pipeline sent the calls of a node that timed out or dropped the connection again,
    one by one, whatever its retry: the node may have run them. A call a node refused
    unrun (:data:`REFUSED`: the slot moved or is moving) goes again on its own through
    ``client``, which follows the redirection; a lost connection or a timeout is
    raised."""
    by_node: dict[str, tuple[Any, list[int]]] = {}
    for i, args in enumerate(calls):
        node = client.get_node_from_key(args[1])
        by_node.setdefault(node.name, (node, []))[1].append(i)
    results: list[Any] = [None] * len(calls)
    for node, indices in by_node.values():
        replies = _evalsha_pipelined(
            client.get_redis_connection(node), sha, [calls[i] for i in indices]
        )
        for i, r in zip(indices, replies, strict=True):
            results[i] = r
    for i, r in enumerate(results):
        if isinstance(r, REFUSED):
            try:
                results[i] = client.evalsha(sha, *calls[i])
            except (RedisConnectionError, RedisTimeoutError):
                raise
            except RedisError as exc:  # NOSCRIPT on the slot's new master, say
                results[i] = exc
    return results


def _unanswered(exc: RedisConnectionError | RedisTimeoutError) -> RedisError:
    """The error a load fails with where Redis did not answer a batch of user replaces
    (``exc``): of its type, saying why it was not sent again."""
    return type(exc)(
        f"Redis did not answer a batch of user replaces ({exc}); not sent again, as "
        "Redis may have run them (a user replaced twice would lose an event appended "
        "between the two): run the load again"
    )


def _replace_items(client: Redis | RedisCluster, key: str, values: dict[str, Any]) -> None:
    """The hash ``key`` made to hold ``values`` and nothing else: written in pieces,
    then the fields the data no longer has deleted in pieces. No step holds Redis for
    long (one transaction over a large catalogue stopped it for a sizeable fraction of
    a second, longer than the service's read timeout); meanwhile a reader may see old
    and new values side by side, never a missing hash."""
    pairs = list(values.items())
    for start in range(0, len(pairs), ITEM_PIECE):
        client.hset(key, mapping=dict(pairs[start : start + ITEM_PIECE]))
    gone = [
        f for f, _ in client.hscan_iter(key, count=ITEM_PIECE)
        if (f.decode("utf-8", "surrogateescape") if isinstance(f, bytes) else f) not in values
    ]  # fmt: skip
    for start in range(0, len(gone), ITEM_PIECE):
        client.hdel(key, *gone[start : start + ITEM_PIECE])


def _drop_item_hashes(client: Redis | RedisCluster, keep: set[str]) -> None:
    """Every ``ctr:item:*`` hash but ``keep``'s deleted (``UNLINK``: Redis frees a large
    one in the background): the item features of a data set the load replaces that
    this one lacks (each node's keys, on a cluster)."""
    for key in client.scan_iter(match=ITEM_PREFIX + "*", count=ITEM_PIECE):
        name = key.decode("utf-8", "surrogateescape") if isinstance(key, bytes) else key
        if name not in keep:
            client.unlink(key)


def loaded_identity(redis_url: str, cluster: bool = False) -> str | None:
    """The identity the last complete load into ``redis_url`` recorded, if any."""
    client = sync_client(redis_url, cluster)
    try:
        raw = client.get(LOADED_KEY)
    finally:
        client.close()
    return None if raw is None else raw.decode() if isinstance(raw, bytes) else str(raw)


def dense_text(raw: Any) -> str | None:
    """A dense cell as stored: the number as text, or None (nothing stored) where
    training reads the feature's default (empty, not a number, NaN, inf); serving reads
    a missing value as that default too."""
    v = parse_dense(raw)
    return None if v is None else str(v)


def time_order(column: pd.Series) -> pd.Series:
    """The order of a time column, as training's split reads it
    (:func:`ctr.times.time_numbers`: numbers, datetimes, dates, ISO 8601 text; a CSV is
    read as strings, where "9" > "11"). A column that is not all times (which a random
    split never reads): as numbers where they are numbers, a blank or other non-number
    as missing; with no number at all, as given."""
    from ctr.times import time_numbers

    numbers = time_numbers(column)
    if numbers is not None:
        return numbers
    numbers = pd.to_numeric(column, errors="coerce")
    return column if numbers.isna().all() else numbers


def user_records(
    config: FeatureConfig, frame: pd.DataFrame, as_of_first: bool = False
) -> Iterator[tuple[str, dict, list]]:
    """``(user_id, profile, events oldest-first)`` per user.

    The history is the one of the user's newest example time; the candidates of that
    time that are behaviours are appended, since they followed it: the clicked ones
    (label 1), all of them where every example is an interaction, or none where the
    candidates are not drawn from the behaviours (``data.behaviour_labels``: MovieLens'
    histories hold every rated movie; the synthetic generator's candidates are apart).

    ``as_of_first`` (``ctr load --replay-split test``, ``frame`` the test split): the
    history and profile of the user's first example time instead, nothing appended:
    what that example's row held in training, so that a replay of it is scored as the
    offline evaluation scored it (the newest history holds later behaviours, the
    clicked candidate among them: a skew review, session 47)."""
    spec = config.data
    profile_feats = [f for f in config.features if f.side == "user" and f.kind != "sequence"]
    seqs = config.sequences
    key = spec.user_key
    time = spec.time_column if spec.time_column and spec.time_column in frame else None
    if time is not None:  # rows with no time count as the oldest
        frame = frame.assign(**{TIME: time_order(frame[time])})
        frame = frame.sort_values([key, TIME], kind="stable", na_position="first")
    for uid, rows in frame.groupby(key, sort=False):
        # the newest row's values column by column: a row of numeric columns alone is a
        # float64 Series, which rounds an int64 ID past 2**53 to another ID
        at = 0 if as_of_first else -1  # the row whose time is stored
        profile = {
            f.source: v
            for f in profile_feats
            if f.source in rows and f.source != key
            and (v := normalize(rows[f.source].iloc[at])) is not None
        }
        newest_time = rows[TIME].iloc[at] if time is not None else None
        timed = newest_time is not None and not pd.isna(newest_time)
        newest = rows[rows[TIME] == newest_time] if timed else rows.iloc[[at]]
        events = newest_events(config, newest, not as_of_first) if seqs else []
        user = normalize(uid)  # the token training and requests use: 5.0 is user "5"
        if user is not None:
            yield user, profile, events


Event = dict[str, Any]


def newest_events(
    config: FeatureConfig, newest: pd.DataFrame, followed: bool = True
) -> list[Event]:
    """A user's events oldest-first, from the rows of its newest example time.

    Each row's history is the events before it; the candidates that are behaviours
    (``data.behaviours``) followed it (none with ``followed`` False: the history
    of the first of them in that order alone, the one nothing of that time preceded).
    Rows sharing that time came in some order the file need not keep
    (MovieLens: movies rated in the same second): the behaviour rows go in the order
    their histories tell (:func:`_chain`). The events are the first row's history and
    then each row's candidate: every behaviour once (an item consumed again, too),
    whatever the file order wherever the histories tell one."""
    spec = config.data
    targets = config.sequence_targets
    if spec.behaviours == "none":
        behaved = [False] * len(newest)
    elif spec.behaviours == "all":
        behaved = [True] * len(newest)
    else:
        behaved = (newest[spec.label] == 1).tolist()
    rows = [pos for pos, f in enumerate(behaved) if f]
    # the histories and candidates of the rows read: the behaviours', else the first's
    read = rows or list(range(min(len(newest), 1)))
    seq_cells = [newest[s.source].tolist() for s in config.sequences]  # exact values
    cand_cells = [newest[t.source].tolist() if t.source in newest else None for t in targets]
    histories: dict[int, list[tuple[Any, ...]]] = {}
    for pos in read:
        cols = [split_sequence(cells[pos], spec.seq_delimiter) for cells in seq_cells]
        n = min((len(c) for c in cols), default=0)
        histories[pos] = [tuple(normalize(c[len(c) - n + i]) for c in cols) for i in range(n)]
    candidates = {
        pos: tuple(normalize(None if cells is None else cells[pos]) for cells in cand_cells)
        for pos in rows
    }
    if not rows:  # no behaviour among them: they share the history before that time
        events = histories.get(0, [])
    else:
        # an item is known by its ID where the histories hold it (its category may
        # differ between a candidate and a history entry), else by all its values
        ids = [i for i, t in enumerate(targets) if t is config.item_id_feature][:1]
        order = _chain(rows, histories, candidates, ids)
        events = [*histories[order[0]], *(candidates[pos] for pos in order if followed)]
    return [{t.source: v for t, v in zip(targets, key, strict=True)} for key in events]


CHAIN_STEPS = 20  # the search's steps per row before it settles for its longest path

Hist = tuple[Any, ...]
Row = tuple[Hist, Hist]  # (history, candidate) of a kind of row


def _chain(
    rows: list[int],
    histories: dict[int, list[tuple[Any, ...]]],
    candidates: dict[int, tuple[Any, ...]],
    ids: list[int],
) -> list[int]:
    """``rows`` (positions in file order) in the order their histories show.

    The row after row ``i`` has as history ``i``'s history and ``i``'s candidate, cut to
    its length: one longer while histories grow, the same once they are at their cut
    (the longest history among the rows). Each row is so an edge from its history to
    the next row's, and an order of all the rows is an Euler trail (:func:`_trail`,
    linear; any trail stores the same newest events wherever the histories tell only
    one). Where there is none (rows missing, several positives sharing one history),
    a depth-first search (:func:`_search`) keeps the longest path it finds within
    ``CHAIN_STEPS`` steps per row, and the rows it leaves out follow by history length
    and file order."""

    def key(event: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(event[i] for i in ids) if ids else event

    kinds = [(tuple(key(e) for e in histories[pos]), key(candidates[pos])) for pos in rows]
    cut = max(len(h) for h, _ in kinds)
    alike: dict[Row, deque[int]] = {}
    for pos, kind in zip(rows, kinds, strict=True):
        alike.setdefault(kind, deque()).append(pos)
    chosen = _trail(kinds, cut)
    if chosen is None:
        chosen = _search(list(alike), {r: len(q) for r, q in alike.items()}, len(rows))
    order = [alike[r].popleft() for r in chosen]
    placed = set(order)
    rest = [pos for pos in rows if pos not in placed]
    return order + sorted(rest, key=lambda pos: (len(histories[pos]), pos))


def _next_hist(kind: Row, cut: int) -> Hist:
    """The history of the row right after a row of ``kind``: its history and candidate,
    cut to ``cut`` (histories grow to it, then keep it)."""
    state = (*kind[0], kind[1])
    return state[max(0, len(state) - cut) :]


def _trail(kinds: list[Row], cut: int) -> list[Row] | None:
    """The rows (their kinds, in file order) as an Euler trail of the graph whose nodes
    are histories and whose edges are the rows (Hierholzer's algorithm, the file's
    earlier row first at each node), or None where no trail takes every row."""
    out: dict[Hist, list[int]] = {}
    indeg: Counter[Hist] = Counter()
    for i, kind in enumerate(kinds):
        out.setdefault(kind[0], []).append(i)
        indeg[_next_hist(kind, cut)] += 1
    starts = [h for h in out if len(out[h]) - indeg[h] == 1]
    if len(starts) > 1:
        return None
    # the start: the one node with an edge more out than in; in a circuit, the shortest
    # history's (its earliest row's)
    start = starts[0] if starts else min(out, key=lambda h: (len(h), out[h][0]))
    for edges in out.values():
        edges.reverse()  # pop() takes the earliest row first
    stack: list[tuple[Hist, int | None]] = [(start, None)]
    trail: list[int] = []
    while stack:
        node, edge = stack[-1]
        if out.get(node):
            e = out[node].pop()
            stack.append((_next_hist(kinds[e], cut), e))
        else:
            stack.pop()
            if edge is not None:
                trail.append(edge)
    trail.reverse()
    if len(trail) != len(kinds) or any(
        _next_hist(kinds[a], cut) != kinds[b][0] for a, b in itertools.pairwise(trail)
    ):
        return None
    return [kinds[i] for i in trail]


def _search(kinds: list[Row], left: dict[Row, int], total: int) -> list[Row]:
    """The longest path of rows found by a depth-first search within ``CHAIN_STEPS``
    looks per row: each row's history is the one before's history and candidate, cut
    to that history's length or one longer (cuts may differ between rows); it starts
    at a row no other can come right before (the shortest history, then file order)."""
    by_hist: dict[Hist, list[Row]] = {}
    for r in kinds:  # in file order of each kind's first row
        by_hist.setdefault(r[0], []).append(r)

    def nexts(r: Row) -> list[Hist]:
        state = (*r[0], r[1])
        n = len(r[0])
        return [h for m in (n + 1, n) if 0 < m <= len(state)
                and (h := state[len(state) - m :]) in by_hist]  # fmt: skip

    def after(r: Row) -> Iterator[Row]:
        return (x for h in nexts(r) for x in by_hist[h])

    into: Counter[Hist] = Counter()  # rows that may come right before a history's
    for r in kinds:
        into.update({h: left[r] for h in nexts(r)})
    rank = {r: i for i, r in enumerate(kinds)}
    first = sorted(kinds, key=lambda r: (into[r[0]] - (r[0] in nexts(r)) > 0, len(r[0]), rank[r]))
    path: list[Row] = []
    best: list[Row] = []
    stack: list[Iterator[Row]] = [iter(first)]
    budget = CHAIN_STEPS * total + 100  # looks at a kind of row, each
    while stack and len(path) < total and budget > 0:
        nxt = None
        for x in stack[-1]:
            budget -= 1
            if left[x]:
                nxt = x
                break
            if budget <= 0:
                break
        if nxt is None:  # no way on from here: one step back
            if len(path) > len(best):
                best = list(path)
            stack.pop()
            if path:
                left[path.pop()] += 1
            continue
        left[nxt] -= 1
        path.append(nxt)
        stack.append(after(nxt))
    return max(path, best, key=len)  # all the rows, or the longest path found


def item_records(
    config: FeatureConfig, frame: pd.DataFrame, catalog: pd.DataFrame | None = None
) -> dict[str, dict[str, Any]]:
    """feature source -> {item_id: raw value}, from candidates and histories (a model
    without histories still needs its candidates' features: requests may send IDs only),
    then from ``catalog`` (the source's item table, ``training.data.load_catalog``) for
    the items none of those holds."""
    out = _example_items(config, frame)
    if catalog is not None:
        for source, values in _row_items(config, catalog).items():
            out[source] = {**values, **out[source]}  # the examples' values win
    return out


def _row_items(config: FeatureConfig, table: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """feature source -> {item_id: raw value} from ``table``'s rows (one item each: its
    ID column and the item-side feature columns it has), as serving reads them."""
    id_feat = config.item_id_feature
    out: dict[str, dict[str, Any]] = {
        f.source: {} for f in config.item_sparse + config.item_dense if f is not id_feat
    }
    ids = [normalize(v) for v in table[id_feat.source].tolist()]
    # a column read as a category too keeps its token (30, not the dense text 30.0,
    # which the category's vocabulary does not hold); the dense view parses it alike
    tokens = {f.source for f in config.item_sparse}
    for f in config.item_sparse + config.item_dense:
        if f is id_feat or f.source not in table or (f.kind == "dense" and f.source in tokens):
            continue
        for i, v in zip(ids, table[f.source].tolist(), strict=True):
            nv = normalize(v) if f.kind == "sparse" else dense_text(v)
            if i is not None and nv is not None:
                out[f.source][i] = nv
    return out


def _example_items(config: FeatureConfig, frame: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """:func:`item_records` from the examples alone: the candidates' rows (an item's
    newest row's values, by the time column where there is one: a log need not be in
    time order), then the histories."""
    time = config.data.time_column
    if time and time in frame:  # the last row per item wins below: the newest
        frame = frame.assign(**{TIME: time_order(frame[time])})
        frame = frame.sort_values(TIME, kind="stable", na_position="first")
    out = _row_items(config, frame)
    id_feat = config.item_id_feature
    # histories carry the sequence-shared features too (e.g. hist_cate_id for cate_id),
    # keyed by the history's item IDs; histories without item IDs (Alimama's hold
    # categories and brands) give none
    delim = config.data.seq_delimiter
    id_seq = next((s for s in config.sequences if s.shared_with == id_feat.name), None)
    if id_seq is None:
        return out
    for s, target in zip(config.sequences, config.sequence_targets, strict=True):
        if target is id_feat or target.source not in out:
            continue
        # newest rows first, each history newest first: setdefault keeps the first value
        # seen of an item
        newest = frame[::-1]
        for h_ids, h_vals in zip(newest[id_seq.source], newest[s.source], strict=True):
            a, b = split_sequence(h_ids, delim), split_sequence(h_vals, delim)
            k = min(len(a), len(b))  # lined up from the newest end, as training encodes them
            for i, v in zip(a[len(a) - k :][::-1], b[len(b) - k :][::-1], strict=True):
                ni, nv = normalize(i), normalize(v)
                if ni is not None and nv is not None:
                    out[target.source].setdefault(ni, nv)
    return out


def _finish(client: Any, cluster: bool, token: str, data: bytes, identity: str) -> None:
    """Record a complete load (:data:`DATA_KEY`, :data:`LOADED_KEY`) where Redis still
    holds its token; raises :class:`LoadLost` where it does not. One script on a single
    Redis; on a Cluster the keys lie in several slots: read, then written."""
    if not cluster:
        done = client.eval(FINISH_LOAD, 3, LOADING_KEY, DATA_KEY, LOADED_KEY, token, data, identity)
    elif (held := client.get(LOADING_KEY)) is not None and held.decode() == token:
        client.set(DATA_KEY, data)
        client.set(LOADED_KEY, identity)
        client.delete(LOADING_KEY)
        done = 1
    else:
        done = 0
    if not done:
        raise LoadLost(
            "Redis lost this load's writes meanwhile (restarted without its data, flushed, "
            f"or failed over: {LOADING_KEY} is gone or another load's): run it again"
        )


def load_into_redis(
    config: FeatureConfig,
    frame: pd.DataFrame,
    redis_url: str,
    chunk: int = 500,
    progress: bool = True,
    keep: int | None = None,
    cluster: bool = False,
    catalog: pd.DataFrame | None = None,
    sequence_ttl_s: int = 0,
    max_id_length: int = 256,
    user_frame: pd.DataFrame | None = None,
    replay: str | None = None,
) -> dict[str, Any]:
    """Write users and items; replaces each loaded user's profile and sequence, and
    forgets the event IDs remembered for them, in one step per user
    (:data:`REPLACE_USER`); the sequence expires after ``sequence_ttl_s`` (0: never), as
    an appended event's does (``CTR_SEQUENCE_TTL_S``). Each item feature's hash is
    made to hold this data's values only (:func:`_replace_items`): items the data no
    longer holds, and values it no longer has, are gone (a missing value reads as the
    feature's default, as in training); where the database held another data set, so
    are its item features this data lacks (:func:`_drop_item_hashes`). Once everything
    is written, records the load's :func:`load_identity` under :data:`LOADED_KEY`, and
    the data set under :data:`DATA_KEY`; ``replaced`` in the counts is the data set
    the database held before where that was another (:func:`other_data`), else None
    (``replaced_differs``: what differs);
    ``unreachable_users`` and ``unreachable_items`` count, with the first, the IDs
    written that no request can name (:func:`unreachable`, ``max_id_length``).

    ``catalog``: the source's item table (:func:`item_records`), for items no example
    holds. ``user_frame`` and ``replay`` (``ctr load --replay-split``): the users are
    written from ``user_frame`` (the split named by ``replay``), each as of its first
    example time there (:func:`user_records`); the items from ``frame``. Works on a
    single Redis and on Redis Cluster (``cluster=True``): every command
    touches one key or keys of one user's hash-tag slot. Raises ``ValueError`` before
    writing anything when the config's item key does not identify the data's items
    (:func:`ctr.encode.check_item_key`).
    """
    check_item_key(config, frame)
    client = sync_client(redis_url, cluster)
    token = secrets.token_hex(16)
    phase = {"at": ""}  # how far the load came: "", "cleared", "writing"
    try:
        keep = keep or config.max_seq_len
        return _load(client, cluster, token, phase, config, frame, chunk, progress, keep,
                     catalog, sequence_ttl_s, max_id_length, user_frame, replay)  # fmt: skip
    except BaseException as exc:
        _tag(exc, phase["at"])  # before the clean-up, which a second Ctrl-C may cut short
        if not isinstance(exc, LoadLost):  # its token is gone, or another load's
            try:
                _drop_token(client, cluster, token)
            except BaseException as again:  # a second Ctrl-C or SIGTERM meanwhile
                _tag(again, phase["at"])
                raise
        raise
    finally:
        client.close()


def _drop_token(client: Any, cluster: bool, token: str) -> None:
    """A load stopped (Ctrl-C, SIGTERM, an error) leaves no token behind: deleted where
    Redis still holds this load's (best effort)."""
    with contextlib.suppress(Exception):
        if not cluster:
            client.eval(DROP_TOKEN, 1, LOADING_KEY, token)
        elif (held := client.get(LOADING_KEY)) is not None and held.decode() == token:
            client.delete(LOADING_KEY)


def _tag(exc: BaseException, phase: str) -> None:
    """Note on an interruption what the load left (``ctr`` prints it); where it had not
    begun (``phase`` empty), ``ctr``'s own line says nothing was written."""
    if isinstance(exc, KeyboardInterrupt) and phase:
        exc.ctr_left = LEFT_BY_PHASE[phase]  # type: ignore[attr-defined]
        exc.ctr_load_cut = True  # type: ignore[attr-defined]  # another command's load too


def _load(
    client: Any,
    cluster: bool,
    token: str,
    phase: dict[str, str],
    config: FeatureConfig,
    frame: pd.DataFrame,
    chunk: int,
    progress: bool,
    keep: int,
    catalog: pd.DataFrame | None,
    sequence_ttl_s: int,
    max_id_length: int,
    user_frame: pd.DataFrame | None,
    replay: str | None,
) -> dict[str, Any]:
    """:func:`load_into_redis`'s writes, with ``client`` and the load's ``token``;
    ``phase["at"]`` says how far it has come."""
    # before the first write: a load that fails halfway leaves no record of the last
    # complete one (a `--once` of that data would skip, over this one's half)
    phase["at"] = "cleared"  # from the moment the command may have reached Redis
    client.delete(LOADED_KEY)
    client.set(LOADING_KEY, token)
    now = data_description(config)
    if replay is not None:  # the service says so (/v1/models -> redis_data.replay)
        now["replay"] = replay
    try:
        before = orjson.loads(client.get(DATA_KEY) or b"null")
    except orjson.JSONDecodeError:
        before = None
    replaced = before if other_data(before, now) else None
    if replaced is None and isinstance(before, dict) and before.get("complete") is False:
        # this data's own load cut short, which was replacing another data set: that set
        # may still hold item hashes (they go at the end), and the warning is due again
        held = before.get("replacing")
        replaced = held if isinstance(held, dict) else None
    users = list(user_records(config, frame if user_frame is None else user_frame,
                              as_of_first=replay is not None))  # fmt: skip
    # from the first write the database holds part of this data: said (a service warns)
    # until the end, as a load cut short leaves users of two data sets under the first
    # one's name (not before: a load stopped while it builds its records wrote nothing);
    # with the data set it replaces, for a retry of a load cut short
    phase["at"] = "writing"
    client.set(DATA_KEY, orjson.dumps({**now, "complete": False, "replacing": replaced}))
    calls: list[list[Any]] = []
    for i, (uid, profile, events) in enumerate(tqdm(users, desc="users", disable=not progress)):
        # the user's event IDs go too: kept, a retry of an event the replaced list held
        # would answer `duplicate` and never be stored again
        keys = (user_key(uid, "profile"), *event_keys(uid))
        fields = [x for pair in profile.items() for x in pair] if profile else []
        entries = [orjson.dumps(e) for e in events[-keep:]] if events else []
        calls.append([len(keys), *keys, sequence_ttl_s, len(fields) // 2, *fields, *entries])
        if (i + 1) % chunk == 0:
            _replace_users(client, calls)
            calls = []
    _replace_users(client, calls)
    items = item_records(config, frame, catalog)
    n_items = 0
    for feat, values in tqdm(items.items(), desc="item features", disable=not progress):
        _replace_items(client, item_key(feat), values)
        n_items = max(n_items, len(values))
    if replaced is not None:  # another data set's item features this one lacks: gone too
        _drop_item_hashes(client, {item_key(feat) for feat in items})
    _finish(client, cluster, token, orjson.dumps(now), load_identity(config, keep, replay))
    item_ids = set().union(*(values.keys() for values in items.values()))
    return {
        "users": len(users),
        "items": n_items,
        "replaced": replaced,
        # what differs (a config name and source alike, their options not)
        "replaced_differs": differences(replaced, now, OTHER_DATA) if replaced else None,
        "unreachable_users": unreachable((u for u, _, _ in users), max_id_length),
        "unreachable_items": unreachable(item_ids, max_id_length),
    }
