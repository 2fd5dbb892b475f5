"""Redis protocol (RESP) requests, packed in a few passes instead of per argument.

redis-py's ``pack_command`` encodes each argument through its ``Encoder`` and grows the
buffer with one ``join`` per argument (the buffer is copied each time until it reaches
6,000 bytes). A cold scoring request sends one ``HMGET`` per item feature with N item IDs
each, so at N = 500 that is 1,000 arguments and about a third of the request's event-loop
CPU. :func:`pack_commands` gives exactly the same bytes: arguments that are all text and
ASCII (the usual item IDs) in one f-string pass and one ``encode``, others argument by
argument as redis-py does.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

# encodings in which an ASCII string's bytes are its characters, one each
_ASCII_SAFE = frozenset({"utf-8", "ascii"})
_TEXT = frozenset({str})


@lru_cache(maxsize=8)
def ascii_safe(encoding: str) -> bool:
    """Whether ``encoding`` writes an ASCII string as its characters, one byte each."""
    try:
        return codecs.lookup(encoding).name in _ASCII_SAFE
    except LookupError:
        return False


def _bulk(arg: Any, encoding: str, errors: str) -> bytes | None:
    """One argument as redis-py's ``Encoder`` would send it, or None for a type this
    module leaves to redis-py (which raises its own error for it)."""
    t = type(arg)
    if t is str:
        b = arg.encode(encoding, errors)
    elif t is bytes:
        b = arg
    elif t is int or t is float:
        b = repr(arg).encode()
    else:
        return None
    return b"$%d\r\n%b\r\n" % (len(b), b)


# a command with more arguments than this after its key keeps its packed arguments for
# the next command, which may send the same ones (one HMGET per item feature, each with
# the same candidate IDs)
LONG = 16


def _pack_args(args: Sequence[Any], encoding: str, errors: str) -> bytes | None:
    """Arguments as consecutive RESP bulk strings: all text and ASCII in one f-string
    pass, others one by one (None for a type left to redis-py)."""
    if ascii_safe(encoding) and _TEXT.issuperset(map(type, args)):
        text = "".join([f"${len(a)}\r\n{a}\r\n" for a in args])
        if text.isascii():
            return text.encode("ascii")
    parts = []
    for a in args:
        one = _bulk(a, encoding, errors)
        if one is None:
            return None
        parts.append(one)
    return b"".join(parts)


def pack_command(
    args: Sequence[Any], encoding: str, errors: str, memo: list[Any] | None = None
) -> bytes | None:
    """``args`` (command name first) as one RESP array, byte for byte what redis-py's
    ``Connection.pack_command`` sends; None where this module does not pack it (a
    command name with whitespace in it, an argument of another type): leave it to
    redis-py then. ``memo`` (a list, empty at first) carries a long command's packed
    arguments after its key to the next call, which reuses them if its own are equal."""
    name = args[0] if args else None
    if type(name) is not str or name.split() != [name]:
        return None
    # redis-py sends the command name as UTF-8 whatever the connection's encoding
    head = b"*%d\r\n" % len(args) + (_bulk(name.encode(), encoding, errors) or b"")
    if memo is None or len(args) <= 2 + LONG:
        rest = _pack_args(args[1:], encoding, errors)
        return None if rest is None else head + rest
    key, tail = _pack_args(args[1:2], encoding, errors), args[2:]
    # only text is memoised: equal numbers of other types are not the same bytes
    # (1 == 1.0 == True, 0.0 == -0.0)
    text = _TEXT.issuperset(map(type, tail))
    if text and memo and memo[0] == tail:
        packed = memo[1]
    else:
        packed = _pack_args(tail, encoding, errors)
        memo[:] = [tail, packed] if text else []
    return None if key is None or packed is None else head + key + packed


def pack_commands(commands: Sequence[Sequence[Any]], encoding: str, errors: str) -> bytes | None:
    """Several commands for one pipelined write (see :func:`pack_command`); None if
    any of them is left to redis-py."""
    out = []
    memo: list[Any] = []
    for cmd in commands:
        one = pack_command(cmd, encoding, errors, memo)
        if one is None:
            return None
        out.append(one)
    return b"".join(out)
