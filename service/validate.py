"""Hand-rolled request validation for the hot path (no per-candidate pydantic objects).

Every failure is a :class:`BadRequest` naming the offending field, e.g.
``candidates[3].item_id``. The pydantic models in ``schemas`` document the same
shapes in OpenAPI.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from operator import itemgetter
from typing import Any, NamedTuple, Protocol

import orjson

from service.errors import BadRequest, MalformedJSON

SCALARS = (str, int, float, bool)
# event timestamps are unix seconds: anything from here on is milliseconds (or later)
MAX_TIMESTAMP = 1e12
INT64 = 2**63
# control characters (C0, DEL, C1), lone surrogates: one regex pass, not per-char loops
_BAD_ID = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def has_surrogate(s: str) -> bool:
    """Lone surrogates: the undecodable bytes of ``surrogateescape``, not valid UTF-8."""
    return _SURROGATE.search(s) is not None


# the longest field name (a key's path) an answer names; longer ones are cut: a crafted
# key is not sent back whole
MAX_FIELD = 300
# the longest error detail an answer carries (it may quote a field name, and more)
MAX_DETAIL = 1000


def safe_field(name: str, limit: int = MAX_FIELD) -> str:
    """A field name that can always be serialised (lone surrogates escaped) and is at
    most ``limit`` characters (cut, with "…")."""
    name = name if not has_surrogate(name) else ascii(name)[1:-1]
    return name if len(name) <= limit else name[:limit] + "…"


def check_id(value: Any, field: str, max_len: int) -> str:
    if type(value) is str and 0 < len(value) <= max_len and _BAD_ID.search(value) is None:
        return value  # the common case, checked in one pass
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise BadRequest(f"{field} must be a string or an integer", field)
    s = str(value)
    if not s:
        raise BadRequest(f"{field} must not be empty", field)
    if len(s) > max_len:
        raise BadRequest(f"{field} is longer than {max_len} characters", field)
    if has_surrogate(s):
        raise BadRequest(f"{field} contains unpaired surrogates", field)
    if _BAD_ID.search(s):
        raise BadRequest(f"{field} contains control characters", field)
    return s


# the most keys a features or context object may hold: each is checked in Python on the
# event loop, before the request's deadline runs (90,000 keys in a 1 MB body held it
# 184 ms: a security review, session 47); a model reads a few dozen
MAX_FEATURE_KEYS = 256


def check_features(value: Any, field: str, max_len: int) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{field} must be an object", field)
    if len(value) > MAX_FEATURE_KEYS:
        raise BadRequest(
            f"{field} has {len(value)} keys; the most it may have is {MAX_FEATURE_KEYS}", field
        )
    for k, v in value.items():
        problem = None
        if has_surrogate(k):
            problem = ": key contains unpaired surrogates"
        elif v is None:
            continue
        elif not isinstance(v, SCALARS):
            problem = " must be a string, number or boolean"
        elif isinstance(v, float) and not math.isfinite(v):
            problem = " must be a finite number"
        elif isinstance(v, int) and not isinstance(v, bool) and not -INT64 <= v < INT64:
            problem = " is outside the 64-bit integer range"
        elif isinstance(v, str) and (len(v) > max_len or has_surrogate(v)):
            problem = f" is longer than {max_len} characters or not valid UTF-8"
        if problem is not None:  # the field's name made only for an error (a review)
            where = f"{field}.{safe_field(k)}"
            raise BadRequest(where + problem, where)
    return value


def check_numbers(
    features: list[dict[str, Any] | None],
    context: dict[str, Any],
    dense: tuple[frozenset[str], frozenset[str]],
) -> None:
    """The values the model reads as numbers must be JSON numbers or ``null``: a string
    or a boolean there is a caller bug, never silently the default. ``dense``: the keys
    read as numbers in a candidate's features, and in the context; keys the model does
    not read there are not checked. (:func:`check_features` has already rejected NaN,
    infinities and non-scalars.)"""
    item, user = dense
    for k in user.intersection(context):
        _number(context[k], f"context.{safe_field(k)}")
    if item and any(features):  # one C-level pass when no candidate has features
        for i, f in enumerate(features):
            if f:
                for k in item.intersection(f):
                    _number(f[k], f"candidates[{i}].features.{safe_field(k)}")


def _number(v: Any, where: str) -> None:
    if v is not None and (type(v) is bool or not isinstance(v, int | float)):
        raise BadRequest(f"{where} must be a number (the model reads it as one)", where)


def check_keys(obj: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        name = safe_field(unknown[0]) or '""'
        field = f"{where}.{name}" if where else name
        raise BadRequest(f"unknown field {field!r}", field)


@dataclass
class ScoreInput:
    user_id: str
    item_ids: list[str]
    features: list[dict[str, Any] | None]
    context: dict[str, Any]
    top_k: int | None
    explain: bool
    # item_ids as one buffer, NUL-separated, where the scan found them (not part of what
    # the request says: two parses of one body compare equal with or without it)
    raw_ids: bytes | None = dataclass_field(default=None, compare=False)


def long_integer(body: bytes) -> bool:
    """Whether ``body`` holds an integer literal orjson may not read exactly: one of 20
    digits or more, or a negative one of 19 (orjson reads an integer below -2**63 or of
    2**64 or more as a float, which would lose its digits: ``99999999999999999999999``
    would map as ``99999999999999991611392``, ``-9223372036854775809`` as
    ``-9223372036854775808``, and slip past the 64-bit range check). Such a body is
    parsed by ``json`` instead, exactly. C-level passes find twenty digits in a row, or a
    minus and nineteen, first (about 2 ns a byte each); only then are they looked at as
    tokens, so that digits in a string (a 20-digit ID) or in a fraction or exponent do
    not count."""
    digits = body.translate(_DIGITS_TO_0)
    if digits.find(_TWENTY_0) < 0 and digits.find(_MINUS_19_0) < 0:
        return False
    return any(m.group(1) is not None for m in _INT_TOKEN.finditer(body))


_DIGITS_TO_0 = bytes.maketrans(b"123456789", b"000000000")
_TWENTY_0 = b"0" * 20
_MINUS_19_0 = b"-" + b"0" * 19
# a string (skipped), or an integer literal of 20+ digits or a negative one of 19: not
# part of a number before it (a fraction, an exponent) and not followed by one's
# fraction or exponent. A string left open runs to the end of the body (a lone "\\"
# last included), and the quantifiers are possessive: linear in the body. (With
# backtracking, each quote of an open string full of ``\\"`` began a scan to the end:
# quadratic, a 32 KB body held the event loop 7 s, a 1 MB one would have for hours,
# before any key check.)
_INT_TOKEN = re.compile(
    rb'"(?:[^"\\]++|\\.)*+(?:"|\\?\Z)|(?<![0-9.eE+\-])(-?[0-9]{20,}|-[0-9]{19})(?![0-9.eE])',
    re.S,
)


def parse_json(body: bytes, scanner: Scanner | None = None) -> Any:
    """A request body's JSON; :class:`BadRequest` when empty or when an object in it
    repeats a key (:func:`check_duplicate_keys`, through ``scanner`` where given),
    :class:`MalformedJSON` when it does not parse. Integers are exact however long
    (:func:`long_integer`); the body must be UTF-8 (RFC 8259: no byte-order mark, no
    UTF-16 or UTF-32)."""
    obj = _loads(body)
    check_duplicate_keys(body, obj, scanner)
    return obj


def _loads(body: bytes) -> Any:
    """:func:`parse_json` without the check for repeated keys."""
    if not body:
        raise BadRequest("body is empty; a JSON object is required", "body")
    error: Exception | None = None
    if not long_integer(body):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            error = exc
    try:
        return exact_json(body)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested past Python's limit
        raise MalformedJSON(f"malformed JSON: {error or exc}", "body") from exc


def exact_json(body: bytes) -> Any:
    """``body`` parsed by ``json``: integers exact at any length; NaN/Infinity literals
    are not JSON, but parsed here the checks name the field that holds them, and so are
    surrogates written in UTF-8. UTF-8 only (no byte-order mark): ValueError otherwise."""
    return json.loads(body.decode("utf-8", "surrogatepass"))


def check_duplicate_keys(body: bytes, obj: Any, scanner: Scanner | None) -> None:
    """:class:`BadRequest` naming the path of the first key (in document order) that
    repeats an earlier key of its object, anywhere in ``body`` (parsed: ``obj``), e.g.
    ``context.age`` or ``candidates[3].item_id``. Every parser keeps the last one of a
    repeated key (RFC 8259 leaves it undefined): such a body is refused, never scored
    as some other request. Keys compare by their decoded text.

    ``scanner``'s C walk answers where it is given; where it is not (or it cannot tell),
    two counts of ``:`` prove most bodies free of repeats (:func:`_no_repeats`), and
    only the rest go through :func:`first_duplicate` in Python."""
    path = scanner.duplicate_key(body) if scanner is not None else None
    if path is None:
        path = "" if _no_repeats(body, obj) else first_duplicate(body)
    if path:
        field = safe_field(path)
        raise BadRequest(f"duplicate key {field!r}", field)


def _no_repeats(body: bytes, obj: Any) -> bool:
    """True when no object in ``body`` repeats a key, shown by counting; False when that
    cannot be shown this way. Outside strings a ``:`` is only ever a key's, so ``body``
    holds one per member plus those inside its strings; ``orjson.dumps(obj)`` one per
    member kept plus those inside the strings kept. A repeated key loses a member (and
    what its strings held), so the counts differ; when no string escapes a ``:``
    (``\\u003a``), equal counts mean none was lost. About 2 µs a KB, in C."""
    if b"\\u003" in body:  # an escaped ":" counts on one side only
        return False
    try:
        again = orjson.dumps(obj)
    except orjson.JSONEncodeError:  # a lone surrogate, an integer past 64 bits, 255 levels
        return False
    return body.count(b":") == again.count(b":")


# a string (its quotes kept), or one of the structural characters; numbers and literals
# are not matched (skipped over)
_JSON_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\],]', re.S)


def first_duplicate(body: bytes) -> str:
    """The path of the first key (in document order) in ``body`` (JSON that parsed)
    that repeats an earlier key of its object, as the service names fields (members'
    keys joined by ``.``, array positions as ``[i]``; ``""`` for a repeated top-level
    empty key); "" when none repeats. The Python twin of the C walk
    (``ctr_duplicate_key``): one pass over the body's tokens, no recursion, so any depth
    that parsed; keys decoded as ``json`` decodes them."""
    # per open container: [its keys so far (None for an array), current key or position]
    stack: list[list[Any]] = []
    want_key = False
    for m in _JSON_TOKEN.finditer(body):
        t = m.group()
        c = t[0]
        if c == 0x22:  # a string
            if not want_key:
                continue  # a value
            want_key = False
            raw = t.decode("utf-8", "surrogatepass")
            key = json.loads(raw) if "\\" in raw else raw[1:-1]
            top = stack[-1]
            if key in top[0]:
                return _path(stack, key)
            top[0].add(key)
            top[1] = key
        elif c == 0x7B:  # {
            stack.append([set(), None])
            want_key = True
        elif c == 0x5B:  # [
            stack.append([None, 0])
        elif c == 0x2C:  # ,
            top = stack[-1]
            if top[0] is None:
                top[1] += 1
            else:
                want_key = True
        else:  # } or ]
            stack.pop()
            want_key = False
    return ""


def _path(stack: list[list[Any]], key: str) -> str:
    """``key``'s path in the innermost object of ``stack`` (:func:`first_duplicate`)."""
    parts: list[str] = []
    for keys, at in stack[:-1]:
        parts.append(f"[{at}]" if keys is None else f".{at}" if parts else at)
    parts.append(f".{key}" if parts else key)
    return "".join(parts) or '""'


class Scanned(NamedTuple):
    """A plain candidate list found in a scoring body's bytes (``NativeCodec.scan``)."""

    rest: bytes  # the body with the list replaced by []
    ids: list[str]  # the candidates' IDs, distinct
    raw: bytes  # the same IDs as one ASCII buffer, NUL-separated


class Scanner(Protocol):
    """What :func:`score_input` needs of ``service.codec.NativeCodec``."""

    def scan(self, body: bytes, max_id_len: int, max_n: int) -> Scanned | None: ...

    def duplicate_key(self, body: bytes) -> str | None:
        """The path of the first repeated key in ``body`` (parsed JSON), "" when no key
        repeats, None when it cannot tell (:func:`check_duplicate_keys` then looks)."""
        ...


def score_input(
    body: bytes, max_candidates: int, max_id_len: int, scanner: Scanner | None
) -> ScoreInput:
    """A scoring request's body, parsed and checked. With a ``scanner``, a plain
    candidate list is found and checked in the raw bytes and the rest of the body parsed
    without it; any other body, or one whose rest does not parse, is parsed whole, so
    the answer (the request, or the error naming a field) is the same either way. A
    body whose objects repeat a key is refused first (:func:`check_duplicate_keys`)."""
    scanned = scanner.scan(body, max_id_len, max_candidates) if scanner is not None else None
    if scanned is not None:
        rest = scanned.rest
        try:  # the scan is kept either way: the list's IDs are strings it checked
            obj = exact_json(rest) if long_integer(rest) else orjson.loads(rest)
        except (ValueError, RecursionError):  # orjson.JSONDecodeError is a ValueError
            scanned = None
        else:  # the plain list repeats no key: the rest's first repeat is the body's
            check_duplicate_keys(rest, obj, scanner)
    if scanned is None:
        return parse_score(parse_json(body, scanner), max_candidates, max_id_len)
    req = parse_score(obj, max_candidates, max_id_len, scanned.ids)
    req.raw_ids = scanned.raw
    return req


def parse_score(
    obj: Any, max_candidates: int, max_id_len: int, scanned: list[str] | None = None
) -> ScoreInput:
    """The scoring body ``obj``, checked. ``scanned``: the candidates' IDs, already
    found and checked in the raw body (``service.codec.NativeCodec.scan``: plain,
    distinct, 1 to ``max_candidates``); ``obj`` then holds ``"candidates": []``."""
    if not isinstance(obj, dict):
        raise BadRequest("body must be a JSON object", "body")
    check_keys(obj, {"user_id", "candidates", "context", "top_k", "explain"}, "")
    if "user_id" not in obj:
        raise BadRequest("user_id is required", "user_id")
    user_id = check_id(obj["user_id"], "user_id", max_id_len)
    if scanned is not None:
        ids, feats = scanned, [None] * len(scanned)
    else:
        if "candidates" not in obj:
            raise BadRequest("candidates is required", "candidates")
        cands = obj["candidates"]
        if not isinstance(cands, list):
            raise BadRequest("candidates must be a list", "candidates")
        if not cands:
            raise BadRequest("candidates must not be empty", "candidates")
        if len(cands) > max_candidates:
            raise BadRequest(
                f"candidates has {len(cands)} items; the maximum is {max_candidates}",
                "candidates",
            )
        plain = _plain_ids(cands, max_id_len)
        if plain is not None:
            ids, feats = plain, [None] * len(plain)
        else:
            ids, feats = _checked_candidates(cands, max_id_len)
    context = obj.get("context")
    context = {} if context is None else check_features(context, "context", max_id_len)
    top_k = obj.get("top_k")
    if type(top_k) is float and top_k.is_integer():
        # JSON Schema's "integer" (the OpenAPI's) admits 2.0: a client that writes every
        # number as a float (JavaScript's JSON of a computed value, some generators) sends it
        top_k = int(top_k)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
        raise BadRequest("top_k must be an integer", "top_k")
    if top_k is not None and top_k <= 0:
        raise BadRequest("top_k must be positive", "top_k")
    explain = obj.get("explain")
    if explain is None:  # absent or null, as top_k and context may be
        explain = False
    if not isinstance(explain, bool):
        raise BadRequest("explain must be a boolean", "explain")
    return ScoreInput(user_id, ids, feats, context, top_k, explain)


_ITEM_ID = itemgetter("item_id")


def _plain_ids(cands: list[Any], max_id_len: int) -> list[str] | None:
    """The common request, checked in a few C-level passes instead of a Python loop per
    candidate: every candidate is ``{"item_id": <str>}``, the IDs are printable, non-empty,
    at most ``max_id_len`` long and distinct. None means "not that case": the per-candidate
    check then runs and names the offending field (a non-printable ID that is still valid,
    e.g. one with a non-ASCII space, also takes that path)."""
    if set(map(type, cands)) != {dict} or set(map(len, cands)) != {1}:
        return None
    try:
        ids = list(map(_ITEM_ID, cands))
    except KeyError:
        return None
    if set(map(type, ids)) != {str} or max(map(len, ids)) > max_id_len:
        return None
    distinct = set(ids)
    if len(distinct) != len(ids) or "" in distinct or not "".join(ids).isprintable():
        return None
    return ids


def _checked_candidates(
    cands: list[Any], max_id_len: int
) -> tuple[list[str], list[dict[str, Any] | None]]:
    """Candidates one by one; the first bad one raises a :class:`BadRequest` naming it."""
    ids: list[str] = []
    feats: list[dict[str, Any] | None] = []
    seen: dict[str, int] = {}
    for i, c in enumerate(cands):
        if type(c) is not dict:
            raise BadRequest(f"candidates[{i}] must be an object", f"candidates[{i}]")
        if len(c) > 2 or (len(c) == 2 and "features" not in c):
            check_keys(c, {"item_id", "features"}, f"candidates[{i}]")
        raw_id = c.get("item_id")
        if raw_id is None:
            raise BadRequest(f"candidates[{i}].item_id is required", f"candidates[{i}].item_id")
        if type(raw_id) is str and 0 < len(raw_id) <= max_id_len and not _BAD_ID.search(raw_id):
            iid = raw_id
        else:
            iid = check_id(raw_id, f"candidates[{i}].item_id", max_id_len)
        if iid in seen:
            where = f"candidates[{i}].item_id"
            raise BadRequest(f"{where} {iid!r} duplicates candidates[{seen[iid]}]", where)
        seen[iid] = i
        f = c.get("features")
        feats.append(
            None if f is None else check_features(f, f"candidates[{i}].features", max_id_len)
        )
        ids.append(iid)
    return ids, feats


@dataclass
class EventInput:
    user_id: str
    event_id: str
    item_id: str
    features: dict[str, Any]
    type: str
    timestamp: float


def parse_event(obj: Any, max_id_len: int) -> EventInput:
    if not isinstance(obj, dict):
        raise BadRequest("body must be a JSON object", "body")
    check_keys(obj, {"user_id", "event_id", "item_id", "features", "type", "timestamp"}, "")
    for name in ("user_id", "event_id", "item_id", "timestamp"):
        if name not in obj:
            raise BadRequest(f"{name} is required", name)
    user_id = check_id(obj["user_id"], "user_id", max_id_len)
    event_id = check_id(obj["event_id"], "event_id", max_id_len)
    item_id = check_id(obj["item_id"], "item_id", max_id_len)
    f = obj.get("features")
    features = {} if f is None else check_features(f, "features", max_id_len)
    etype = obj.get("type", "click")
    if not isinstance(etype, str) or not etype or len(etype) > 32 or has_surrogate(etype):
        raise BadRequest("type must be a non-empty string of at most 32 characters", "type")
    if _BAD_ID.search(etype):  # as in IDs: a type is matched and stored as sent
        raise BadRequest("type contains control characters", "type")
    ts = obj["timestamp"]
    # no math.isfinite: an integer past a float's range would raise there; the range
    # check alone refuses NaN, infinities and huge integers (int and float compare exactly)
    bad = isinstance(ts, bool) or not isinstance(ts, int | float)
    if bad or not 0 <= ts < MAX_TIMESTAMP:
        raise BadRequest(
            "timestamp must be a non-negative number of unix seconds below 1e12 "
            "(milliseconds are rejected)",
            "timestamp",
        )
    return EventInput(user_id, event_id, item_id, features, etype, float(ts))
