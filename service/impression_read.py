"""Reading the impression log back (``ctr impressions``): one labelled row per served
item, and the served model's online figures.

:class:`ImpressionReader` walks the stream (``CTR_IMPRESSION_STREAM``, written by
:mod:`service.impressions`) a page of entries at a time, oldest first. Each entry becomes
its ranked items, labelled 1 where the user has a stored behaviour (``/v1/events``) on
that item of the given types within ``window_s`` after it was scored. A row whose window
has not closed by ``now`` (the read's start) is ``pending``: no label (None), left out
of the figures, as is a row whose user's history could not be read
(``unreadable_history``). The users a page brings that earlier pages did not, and that
have an entry whose window has closed, have their histories read in one pipelined round
trip per ``USERS_PER_TRIP`` users; each user's is read once. An entry stored twice (a
write retried after Redis had taken it: same ``ts``, user and response, byte for byte)
is read once and counted in ``duplicates``.

Rows stream through: a caller writes each out (the CSV) and adds it to an
:class:`OnlineEval`, which keeps what the figures need in flat arrays (about 19 bytes
a row: the user and the version as indices, the label, the probability); the figures'
sorts then take about 100 bytes a row for a moment, and each entry read costs about
150 bytes more (its digest, to read a repeated one once, and its ID, to count responses):
the per-row figure for entries of many items, not of a few. Two million rows (20,000 entries of
100 items) peaked at 340 MB above the command's 140 MB at start, against 760 MB when
every row was held (``scripts/bench_impressions_read.py``).
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from service.store import user_key
from training.metrics import evaluate

PAGE = 1000  # stream entries per XRANGE
USERS_PER_TRIP = 500  # histories read per pipelined round trip
MAX_HISTORY_ERRORS = 5  # unreadable histories named in the warning

LABELLED = "labelled"
PENDING = "pending"  # its click window had not closed when the read began
UNREADABLE_HISTORY = "unreadable_history"  # its user's history is no list (e.g. WRONGTYPE)
# not clicked as far as the history shows, but the history is full and its oldest entry
# is newer than the row's window's start: a click in the window may have been trimmed
CENSORED = "censored"


@dataclass
class Impression:
    """One ranked item of one logged response, and whether the user acted on it."""

    entry: str  # the stream entry's ID
    ts: float
    request_id: str
    user_id: str
    model: str
    version: str
    rank: int
    item_id: str
    probability: float
    degraded: bool
    cold_start: bool
    label: int | None = 0  # None: not known (``label_status`` says why)
    label_status: str = LABELLED  # LABELLED, PENDING, UNREADABLE_HISTORY or CENSORED

    FIELDS = (
        "entry", "ts", "request_id", "user_id", "model", "version", "rank", "item_id",
        "probability", "degraded", "cold_start", "label", "label_status",
    )  # fmt: skip

    def row(self) -> list[Any]:
        return [getattr(self, f) for f in self.FIELDS]


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _bytes(v: bytes | str) -> bytes:
    return v.encode() if isinstance(v, str) else v


def _name(v: bytes | str) -> str:
    """A field name as text; bytes that are not UTF-8 kept as surrogates (an entry
    some other writer added: read as unreadable, not a crash)."""
    return v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v


def pages(redis: Any, stream: str, page: int = PAGE) -> Iterator[list[tuple[str, dict]]]:
    """The stream, oldest first, as pages of ``(entry ID, fields)`` (a sync client)."""
    start = "-"
    while True:
        got = redis.xrange(stream, min=start, max="+", count=page)
        if not got:
            return
        yield [(_text(e), {_name(k): v for k, v in fields.items()}) for e, fields in got]
        start = "(" + _text(got[-1][0])
        if len(got) < page:
            return


def parse_entry(entry_id: str, fields: dict) -> list[Impression] | None:
    """One logged response as its ranked items; None for an entry that is not one."""
    try:
        body = orjson.loads(fields["response"])
        ts = float(_text(fields["ts"]))
        user = _text(fields["user_id"])
        model = body.get("model") or {}
        return [
            Impression(
                entry_id,
                ts,
                str(body.get("request_id")),
                user,
                str(model.get("name")),
                str(model.get("version")),
                int(it["rank"]),
                str(it["item_id"]),
                float(it["probability"]),
                bool(body.get("degraded")),
                bool(body.get("cold_start")),
            )  # fmt: skip
            for it in body.get("items", [])
        ]
    except (KeyError, ValueError, TypeError, AttributeError, orjson.JSONDecodeError):
        return None


@dataclass
class BehaviourCounts:
    """What the users' stored behaviours held, for telling "no clicks" from a wrong
    ``--item-key`` or ``--types``: ``stamped`` behaviours with a timestamp, of which
    ``without_item_key`` lacked the item field and ``counted`` were of the types asked;
    the other types seen (``other_types``) and the fields seen (``fields``)."""

    stamped: int = 0
    without_item_key: int = 0
    counted: int = 0
    other_types: dict[str, int] = field(default_factory=dict)
    fields: set[str] = field(default_factory=set)

    MAX_NAMES = 20  # type and field names kept: the warning names a few, not every one

    def warnings(self, item_key: str, types: frozenset[str]) -> list[str]:
        """One line per reason every row is labelled 0 that is not "nobody clicked"."""
        out = []
        if self.stamped and self.without_item_key == self.stamped:
            seen = ", ".join(sorted(self.fields)[:8])
            out.append(f"--item-key {item_key!r}: none of the {self.stamped} stored "
                       f"behaviours has that field (fields seen: {seen}): every row is "
                       "labelled 0")  # fmt: skip
        elif self.stamped > self.without_item_key and not self.counted and types:
            seen = ", ".join(f"{t!r}" for t in sorted(self.other_types)[:8])
            out.append(f"--types {','.join(sorted(types))}: none of the "
                       f"{self.stamped - self.without_item_key} stored behaviours is of "
                       f"those types (types seen: {seen or 'none'}): every row is "
                       "labelled 0")  # fmt: skip
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "stamped": self.stamped,
            "without_item_key": self.without_item_key,
            "counted": self.counted,
            "other_types": dict(sorted(self.other_types.items())),
        }


def behaviours(
    raw_events: list[bytes],
    item_key: str,
    types: frozenset[str],
    counts: BehaviourCounts | None = None,
    stamps: list[float] | None = None,
) -> dict[str, list]:
    """A user's stored behaviours with a timestamp (those ``/v1/events`` wrote), from
    the history list's raw entries: item ID -> their times, for the ``types`` given (all
    where empty); ``counts`` adds what was seen, ``stamps`` gets every stamped entry's
    time, whatever its item or type."""
    out: dict[str, list[float]] = {}
    counts = counts if counts is not None else BehaviourCounts()
    for raw in raw_events:
        try:
            ev = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(ev, dict):
            continue
        t, item = ev.get("ts"), ev.get(item_key)
        if not isinstance(t, int | float) or isinstance(t, bool):
            continue
        counts.stamped += 1
        if stamps is not None:
            stamps.append(float(t))
        if len(counts.fields) < counts.MAX_NAMES:
            counts.fields.update(str(k) for k in ev)
        if item is None:
            counts.without_item_key += 1
            continue
        kind = ev.get("type")
        if types and kind not in types:
            name = str(kind)
            if name in counts.other_types or len(counts.other_types) < counts.MAX_NAMES:
                counts.other_types[name] = counts.other_types.get(name, 0) + 1
            continue
        counts.counted += 1
        out.setdefault(str(item), []).append(float(t))
    return out


class ImpressionReader:
    """Iterating yields every logged ranked item, labelled 1 where its user has a
    behaviour on it (of ``types``) in ``(ts - skew_s, ts + window_s]``: ``ts`` is the
    server's clock, a behaviour's the client's ``timestamp`` (whole seconds, or a clock
    a little behind, would put a click just after the scoring before it). A behaviour
    trimmed from a history since (``CTR_SEQUENCE_KEEP``) is not seen.

    An item with ``ts + window_s > now`` (a click may still come) is yielded ``PENDING``,
    its label None; ``now`` None labels every row as it stands. An item whose user's
    history is not a list is yielded ``UNREADABLE_HISTORY``, its label None. Counts,
    once read: ``entries`` (responses read), ``duplicates`` (entries stored twice, read
    once), ``unreadable`` (entries that are not a logged response), ``pending`` (rows),
    ``censored`` (rows labelled 0 whose window reaches before the oldest entry of a
    history holding ``keep`` entries, all events: a click there may have been trimmed;
    None for ``keep`` means no row is censored; and, with ``ttl_s``, rows labelled 0
    whose click may have expired with the whole history (``CTR_SEQUENCE_TTL_S``: the
    window began more than ``ttl_s`` before ``now``, and the user's history is gone or
    holds only events stamped more than ``ttl_s`` after the window began, which a history
    re-made after it expired would; those also in ``expired``),
    ``unreadable_histories`` (users; their rows not pending: ``unreadable_history_rows``;
    the first few errors in ``history_errors``), ``oldest_ts`` (the earliest ``ts`` read,
    None before one), ``behaviours`` (what the users' histories held:
    :class:`BehaviourCounts`)."""

    def __init__(
        self,
        redis: Any,
        stream: str,
        item_key: str = "item_id",
        window_s: float = 3600.0,
        types: frozenset[str] = frozenset({"click"}),
        skew_s: float = 0.0,
        page: int = PAGE,
        now: float | None = None,
        keep: int | None = None,
        ttl_s: float = 0.0,
    ) -> None:
        self.redis = redis
        self.stream = stream
        self.item_key = item_key
        self.window_s = window_s
        self.types = types
        self.skew_s = skew_s
        self.page = page
        self.now = now
        self.keep = keep
        self.ttl_s = ttl_s
        self.entries = 0
        self.duplicates = 0
        self.unreadable = 0
        self.pending = 0
        self.unreadable_histories = 0
        self.unreadable_history_rows = 0
        self.censored = 0
        self.expired = 0
        self.history_errors: list[tuple[str, str]] = []
        self.oldest_ts: float | None = None
        self.behaviours = BehaviourCounts()
        self._acted: dict[str, dict[str, list[float]] | None] = {}
        # a user's full history's oldest time: behaviours before it may have been trimmed
        self._floor: dict[str, float] = {}
        # a user's history's oldest event time (-inf: it holds a loaded entry, so it has
        # not expired since the load; inf: it is empty or gone): ttl_s's censoring
        self._oldest: dict[str, float] = {}
        self._seen: set[bytes] = set()

    def __iter__(self) -> Iterator[Impression]:
        for page in pages(self.redis, self.stream, self.page):
            parsed = [self._parse(entry, fields) for entry, fields in page]
            responses = [items for items in parsed if items]
            self._read_histories({i[0].user_id for i in responses if not self._is_pending(i[0])})
            for items in responses:
                for imp in items:
                    self._label(imp)
                    yield imp

    def _is_pending(self, imp: Impression) -> bool:
        """Whether ``imp``'s click window was still open at ``now``."""
        return self.now is not None and imp.ts + self.window_s > self.now

    def _label(self, imp: Impression) -> None:
        """``imp``'s label and status, counted."""
        if self._is_pending(imp):
            imp.label, imp.label_status = None, PENDING
            self.pending += 1
            return
        acted = self._acted[imp.user_id]
        if acted is None:
            imp.label, imp.label_status = None, UNREADABLE_HISTORY
            self.unreadable_history_rows += 1
            return
        lo, hi = imp.ts - self.skew_s, imp.ts + self.window_s
        imp.label = int(any(lo < t <= hi for t in acted.get(imp.item_id, ())))
        if imp.label:
            return
        floor = self._floor.get(imp.user_id)
        trimmed = floor is not None and lo < floor
        expired = not trimmed and self._may_have_expired(imp.user_id, lo)
        if trimmed or expired:
            imp.label, imp.label_status = None, CENSORED
            self.censored += 1
            self.expired += expired

    def _may_have_expired(self, user: str, lo: float) -> bool:
        """A click after ``lo`` may have gone with the user's whole history: it expires
        ``ttl_s`` after its last event, so a click there, with no event for ``ttl_s``
        after it, left no trace by ``now`` (a writes review, session 46: labelled 0);
        an event stamped within ``ttl_s`` of ``lo`` kept the history alive past it."""
        if self.ttl_s <= 0 or self.now is None or self.now - lo <= self.ttl_s:
            return False
        return self._oldest.get(user, math.inf) > lo + self.ttl_s

    def _parse(self, entry: str, fields: dict) -> list[Impression] | None:
        """The entry's items; None for one read before (a retried write) or unreadable."""
        key = hashlib.blake2b(digest_size=16)  # of every field: a retry repeats them all
        for name in sorted(fields):
            value = _bytes(fields[name])
            raw = name.encode("utf-8", "surrogateescape")
            key.update(b"%d:%b%d:%b" % (len(raw), raw, len(value), value))
        digest = key.digest()
        if digest in self._seen:
            self.duplicates += 1
            return None
        self._seen.add(digest)
        items = parse_entry(entry, fields)
        if items is None:
            self.unreadable += 1
            return None
        self.entries += 1
        if items and (self.oldest_ts is None or items[0].ts < self.oldest_ts):
            self.oldest_ts = items[0].ts
        return items

    def _read_histories(self, users: set[str]) -> None:
        """Each of ``users`` not read yet: its behaviours, ``USERS_PER_TRIP`` a trip;
        None for one whose history Redis refused (a key of another type: counted)."""
        todo = sorted(u for u in users if u not in self._acted)
        for i in range(0, len(todo), USERS_PER_TRIP):
            chunk = todo[i : i + USERS_PER_TRIP]
            pipe = self.redis.pipeline(transaction=False)
            for user in chunk:
                pipe.lrange(user_key(user, "seq"), 0, -1)
            for user, raw in zip(chunk, pipe.execute(raise_on_error=False), strict=True):
                if isinstance(raw, Exception):
                    self._acted[user] = None
                    self.unreadable_histories += 1
                    if len(self.history_errors) < MAX_HISTORY_ERRORS:
                        self.history_errors.append((user, str(raw)))
                    continue
                stamps: list[float] = []
                self._acted[user] = behaviours(raw, self.item_key, self.types, self.behaviours,
                                               stamps)  # fmt: skip
                self._oldest[user] = (min(stamps, default=math.inf)
                                      if len(stamps) == len(raw) else -math.inf)  # fmt: skip
                # full (the service trims to the newest `keep`), every entry an event's:
                # what came before its oldest may have been trimmed
                if self.keep and len(raw) >= self.keep and len(stamps) == len(raw):
                    self._floor[user] = min(stamps)


# how an answer was served, for OnlineEval's ``by_serving``: with the user's stored
# history and profile; for a user Redis holds nothing of; without Redis (degraded wins)
SERVING = ("full", "cold_start", "degraded")


class OnlineEval:
    """The labelled rows' figures, kept in flat arrays (:meth:`add` each row): rows,
    responses, clicks and ``training.metrics.evaluate`` (AUC, GAUC, logloss, mean
    prediction, observed rate, calibration) over all rows, per model version and per
    way the answer was served (``by_serving``: with the user's history and profile,
    ``full``; for an unknown user, ``cold_start``; without Redis, ``degraded``: the two
    others are not what the model's offline figures measured). A row without a label
    (pending, censored, or its user's history unreadable) is left out."""

    def __init__(self) -> None:
        self._users: dict[str, int] = {}
        self._versions: dict[str, int] = {}
        self._user = array("l")
        self._version = array("H")
        self._serving = array("B")  # index into SERVING
        self._label = array("b")
        self._prob = array("d")
        # (version index, SERVING index) -> its entries' IDs (an entry has one of each)
        self._responses: dict[tuple[int, int], set[str]] = {}

    def add(self, imp: Impression) -> None:
        if imp.label is None:
            return
        version = self._versions.setdefault(f"{imp.model}/{imp.version}", len(self._versions))
        serving = SERVING.index(
            "degraded" if imp.degraded else "cold_start" if imp.cold_start else "full"
        )
        self._responses.setdefault((version, serving), set()).add(imp.entry)
        self._user.append(self._users.setdefault(imp.user_id, len(self._users)))
        self._version.append(version)
        self._serving.append(serving)
        self._label.append(imp.label)
        self._prob.append(imp.probability)

    def add_all(self, rows: Iterable[Impression]) -> OnlineEval:
        for r in rows:
            self.add(r)
        return self

    def summary(self) -> dict[str, Any]:
        """The figures over all rows, per ``"<name>/<version>"`` (``by_version``) and per
        way of serving (``by_serving``, each of :data:`SERVING`, present or not)."""
        users = np.frombuffer(self._user, dtype=np.int_) if self._user else np.empty(0, np.int_)
        labels = np.array(self._label, dtype=np.float64)
        probs = np.frombuffer(self._prob, dtype=np.float64) if self._prob else np.empty(0)
        versions = np.frombuffer(self._version, dtype=np.uint16) if self._version else users
        serving = np.frombuffer(self._serving, dtype=np.uint8) if self._serving else users

        def part(rows: np.ndarray, responses: int) -> dict[str, Any]:
            return _figures(users[rows], labels[rows], probs[rows], responses)

        def responses(pos: int, i: int) -> int:  # of the version (pos 0) or serving (1) i
            return sum(len(ids) for key, ids in self._responses.items() if key[pos] == i)

        out = _figures(users, labels, probs, sum(map(len, self._responses.values())))
        out["by_version"] = {
            name: part(versions == i, responses(0, i))
            for name, i in sorted(self._versions.items())
        }
        out["by_serving"] = {
            name: part(serving == i, responses(1, i)) for i, name in enumerate(SERVING)
        }
        return out


def summary(rows: Iterable[Impression]) -> dict[str, Any]:
    """:meth:`OnlineEval.summary` of ``rows``."""
    return OnlineEval().add_all(rows).summary()


def _figures(
    users: np.ndarray, labels: np.ndarray, probs: np.ndarray, responses: int
) -> dict[str, Any]:
    """``training.metrics.evaluate`` (NumPy only) of the served probabilities against
    the labels (all ``[n]``), NaN as None (one label only: no AUC)."""
    out: dict[str, Any] = {"rows": len(labels), "responses": responses, "clicks": int(labels.sum())}
    if not len(labels):
        return out
    for key, value in evaluate(users, labels, probs).items():
        if key != "n":
            out[key] = None if isinstance(value, float) and math.isnan(value) else value
    return out
