"""Session 18's probe: event-loop CPU of one scoring read (HGETALL profile + LRANGE of
50 behaviours, pipelined) through the service's ``Reader`` against a bare asyncio
protocol that feeds hiredis on a connection taken over from redis-py (a sketch, not the
service's code). Ad hoc; the figures are in docs/benchmarks.md, "Session 18".

    python docs/bench/s18/redis_raw.py [REDIS_URL]   # default redis://127.0.0.1:6379/11

It writes two keys of its own (``s18:probe:*``) in that database.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import hiredis
import orjson
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from service.resp import pack_commands  # noqa: E402
from service.store import Reader, make_client  # noqa: E402


class RawProto(asyncio.Protocol):
    """Replies parsed by hiredis straight from ``data_received``."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiter: asyncio.Future | None = None
        self.want = 0
        self.got: list[Any] = []

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (x := self.reader.gets()) is not False:
            self.got.append(x)
        if len(self.got) >= self.want and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(self.got)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc or ConnectionError("closed"))


async def main(url: str) -> None:
    r = make_client(url, False, 0.5, 0.5, 8)
    await r.delete("s18:probe:profile", "s18:probe:seq")
    await r.hset("s18:probe:profile", mapping={"age": "3", "gender": "1", "city": "77"})
    events = [orjson.dumps({"item_id": f"i{i}", "cat": f"c{i % 7}", "ts": i}) for i in range(50)]
    await r.rpush("s18:probe:seq", *events)
    reader = Reader(r, 8)
    cmds = [("HGETALL", "s18:probe:profile"), ("LRANGE", "s18:probe:seq", -50, -1)]
    conn = r.connection_pool.make_connection()
    await conn.connect()  # redis-py's handshake (AUTH, SELECT), then the socket is ours
    transport = conn._writer.transport  # type: ignore[union-attr]
    proto = RawProto()
    transport.set_protocol(proto)
    loop = asyncio.get_running_loop()

    async def raw() -> list[Any]:
        proto.got, proto.want, proto.waiter = [], len(cmds), loop.create_future()
        transport.write(pack_commands(cmds, "utf-8", "strict"))
        return await proto.waiter

    async def service_reader() -> list[Any]:
        return await reader.run(cmds)

    assert await raw() == await service_reader()
    n = 5000
    for rnd in range(2):
        for name, f in (("bare protocol", raw), ("service Reader", service_reader)):
            c0, w0 = time.thread_time(), time.perf_counter()
            for _ in range(n):
                await f()
            cpu = (time.thread_time() - c0) / n * 1e6
            wall = (time.perf_counter() - w0) / n * 1e6
            print(f"round {rnd}: {name}: CPU {cpu:.1f} us, wall {wall:.1f} us per read")
    await r.delete("s18:probe:profile", "s18:probe:seq")
    transport.close()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1] if len(sys.argv) > 1 else "redis://127.0.0.1:6379/11"))
