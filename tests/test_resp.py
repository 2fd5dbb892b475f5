"""The cold request path's bulk conversions give exactly what the per-value code gives:
RESP packing (``service.resp``) against redis-py's own ``pack_commands``, HMGET replies
decoded in one pass (``service.store._texts``), and dense columns
(``ctr.encode.dense_column``) against ``to_float`` value by value."""

from __future__ import annotations

import asyncio
import math
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio.connection import Connection

from ctr.encode import dense_column, to_float
from ctr.spec import FeatureSpec
from service.resp import pack_command, pack_commands
from service.store import Reader, _text, _texts, make_client
from tests.redis_proc import RedisProcess, private_redis

ARG = st.one_of(
    st.text(max_size=12),  # any code point, surrogates too
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12),  # ASCII
    st.binary(max_size=12),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True, allow_infinity=True),
)
NAME = st.sampled_from(["HMGET", "LRANGE", "HGETALL", "CONFIG GET", "hmget", "GET\tX"])
COMMAND = st.tuples(NAME, st.lists(ARG, max_size=8)).map(lambda t: (t[0], *t[1]))


def redis_py(commands: list[tuple[Any, ...]], encoding: str, errors: str) -> bytes | type:
    """What redis-py sends for ``commands``, or the type of what it raises."""
    conn = Connection(encoding=encoding, encoding_errors=errors)
    try:
        return b"".join(bytes(c) for c in conn.pack_commands(commands))
    except Exception as exc:
        return type(exc)


def ours(commands: list[tuple[Any, ...]], encoding: str, errors: str) -> bytes | type | None:
    try:
        return pack_commands(commands, encoding, errors)
    except Exception as exc:
        return type(exc)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(COMMAND, min_size=1, max_size=4),
    st.sampled_from([("utf-8", "strict"), ("utf-8", "replace"), ("latin-1", "replace"),
                     ("utf-16", "strict"), ("ascii", "backslashreplace")]),
)  # fmt: skip
def test_packing_is_byte_for_byte_redis_pys(commands: list, encoding: tuple[str, str]) -> None:
    """Same bytes as redis-py, or the same exception, or None (left to redis-py)."""
    got = ours(commands, *encoding)
    if got is None:  # only where a command name holds whitespace
        assert any(cmd[0].split() != [cmd[0]] for cmd in commands)
        return
    assert got == redis_py(commands, *encoding)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(ARG, min_size=17, max_size=24),
    st.lists(st.tuples(st.integers(0, 23), ARG), max_size=2),
    st.sampled_from([("utf-8", "strict"), ("utf-8", "replace"), ("latin-1", "replace")]),
)
def test_long_commands_sharing_arguments_pack_as_redis_py(
    tail: list, changes: list, encoding: tuple[str, str]
) -> None:
    """Past LONG arguments a command's packed tail is reused by the next one when they
    are equal: only equal text may share bytes (1 == 1.0 == True, 0.0 == -0.0)."""
    changed = list(tail)
    for k, value in changes:
        changed[k % len(changed)] = value
    as_float = [float(a) if type(a) is int else a for a in tail]
    cmds = [("HMGET", f"ctr:item:{k}", *t) for k, t in enumerate((tail, tail, changed, as_float))]
    got = ours(cmds, *encoding)
    assert got == redis_py(cmds, *encoding)


def test_packing_big_and_plain_commands() -> None:
    """The scoring request's own commands, and arguments past redis-py's 6,000-byte
    chunking, come out as one buffer with redis-py's bytes."""
    ids = [f"item-{k:06d}" for k in range(1000)]
    cmds = [
        ("HGETALL", "{u:u1}:profile"),
        ("LRANGE", "{u:u1}:seq", -50, -1),
        ("HMGET", "ctr:item:cate_id", *ids),
        ("HMGET", "ctr:item:price", "x" * 9000, "ü", b"\x00\xff"),
    ]
    packed = pack_commands(cmds, "utf-8", "strict")
    assert packed is not None and packed == redis_py(cmds, "utf-8", "strict")
    assert pack_command(("HMGET", "k", *ids), "utf-8", "strict") == redis_py(
        [("HMGET", "k", *ids)], "utf-8", "strict"
    )
    # one HMGET per feature with the same IDs: packed once, sent in each; a same-length
    # list that differs (by one ID, by a non-ASCII one, by a type) is packed anew
    other = [*ids[:-1], "item-x"]
    for cmds in (
        [("HMGET", f"ctr:item:{f}", *ids) for f in ("a", "b", "c")],
        [("HMGET", "ctr:item:a", *ids), ("HMGET", "ctr:item:b", *other)],
        [("HMGET", "ctr:item:a", *ids), ("HMGET", "ctr:item:b", *ids[:-1], "ü")],
        [("HMGET", "ctr:item:a", *ids), ("HMGET", "ctr:item:b", *ids[:-1], 7)],
        [("HMGET", "ctr:item:a", *ids), ("GET", "x"), ("HMGET", "ctr:item:ü", *ids)],
        [("HMGET", "a", *[1] * 20), ("HMGET", "b", *[1.0] * 20), ("HMGET", "c", *[0.0] * 20),
         ("HMGET", "d", *[-0.0] * 20)],
    ):  # fmt: skip
        assert pack_commands(cmds, "utf-8", "strict") == redis_py(cmds, "utf-8", "strict")
    # not ours to pack: redis-py splits a name with a space, and raises for other types
    assert pack_command(("CONFIG GET", "x"), "utf-8", "strict") is None
    assert pack_command(("GET", None), "utf-8", "strict") is None
    assert pack_command(("GET", True), "utf-8", "strict") is None


@pytest.fixture(scope="module")
def rp() -> Iterator[RedisProcess]:
    with private_redis() as proc:
        yield proc


def test_reader_round_trip_with_odd_ids(rp: RedisProcess) -> None:
    """Through a real Redis: IDs with spaces, CRLF, NUL, non-ASCII and 10 kB, read back by
    the scoring request's reader (packed here, not by redis-py)."""
    ids = ["plain", "with space", "crlf\r\nx", "nul\x00x", "ü-ñ", "k" * 10_000, ""]
    values = [f"v{k}" for k in range(len(ids))]
    r = rp.client()
    r.delete("ctr:item:t")
    r.hset("ctr:item:t", mapping=dict(zip(ids, values, strict=True)))

    async def go() -> list:
        client = make_client(rp.url, False, 1.0, 1.0, 2)
        reader = Reader(client, 2)
        try:
            return await reader.run([("HMGET", "ctr:item:t", *ids, "absent")])
        finally:
            await reader.aclose()
            await client.aclose()

    (reply,) = asyncio.run(go())
    assert _texts(reply) == [*values, None]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(st.none(), st.binary(max_size=8)), max_size=20))
def test_hmget_replies_decode_as_value_by_value(vals: list[bytes | None]) -> None:
    """NULs, invalid UTF-8 (surrogate-escaped), empty values and absent fields."""
    assert _texts(vals) == [None if v is None else _text(v) for v in vals]


def bits(x: float) -> bytes:
    return struct.pack("<d", x)


DENSE = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", " 1.5 ", "1_0", "nan", "-inf", "1e39", "-0.0", "0x10", "abc", "١٢"]),
    st.integers(-(10**40), 10**40),
    st.booleans(),
    st.text(max_size=6),
)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(DENSE, max_size=20),
    st.booleans(),
    st.floats(-10, 10, allow_nan=False),
)
def test_dense_column_is_to_float_value_by_value(vals: list, log1p: bool, default: float) -> None:
    """Bit for bit (the sign of zero included), whatever the value's type."""
    spec = FeatureSpec(name="price", kind="dense", side="item", log1p=log1p, default=default)
    got = dense_column(vals, spec)
    want = [to_float(v, spec) for v in vals]
    assert [bits(x) for x in got] == [bits(x) for x in want]
    assert all(math.isfinite(x) for x in got)
