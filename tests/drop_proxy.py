"""A TCP proxy in front of a real Redis that forwards every command and every reply
(RESP2 or 3), but can drop the invalidation messages (``__redis__:invalidate``) Redis
sends: a stand-in for a proxy or a Redis look-alike that accepts ``CLIENT TRACKING``
and never delivers what it promised. It runs its own event loop in a thread, so a
service under ``TestClient`` and a tracker under ``asyncio.run`` can both go through
it."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import hiredis

from tests.redis_proc import free_port

INVALIDATE = b"__redis__:invalidate"


def resp(value: Any) -> bytes:
    """``value`` as hiredis parsed it, written back as RESP2 (statuses as bulk strings,
    which every client reads the same)."""
    if isinstance(value, hiredis.ReplyError):
        return b"-" + str(value).encode() + b"\r\n"
    if isinstance(value, bytes):
        return b"$%d\r\n%s\r\n" % (len(value), value)
    if isinstance(value, int):
        return b":%d\r\n" % value
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, list):
        return b"*%d\r\n" % len(value) + b"".join(resp(v) for v in value)
    raise TypeError(f"no RESP2 for {value!r}")


def invalidation(msg: Any) -> bool:
    return isinstance(msg, list) and len(msg) == 3 and msg[:2] == [b"message", INVALIDATE]


class DropProxy:
    """``url`` reaches the Redis on ``port`` through this proxy; while ``drop`` is set,
    the invalidation messages are dropped (``dropped`` counts them)."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.port = free_port()
        self.drop = False
        self.dropped = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> DropProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", self.port), self._loop
        ).result(5)
        return self

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            cw.close()
            return

        tracking = False  # this connection has subscribed to the invalidations

        async def up() -> None:  # commands: byte for byte
            nonlocal tracking
            while data := await cr.read(65536):
                # each command is answered before the next is sent (service.tracking
                # waits for each reply), so every byte after this is on the channel
                tracking = tracking or INVALIDATE in data
                sw.write(data)
                await sw.drain()

        async def down() -> None:  # replies: raw, or one by one once tracking
            reader = hiredis.Reader()
            while data := await sr.read(65536):
                if not tracking:
                    cw.write(data)
                    await cw.drain()
                    continue
                reader.feed(data)
                out = []
                while (msg := reader.gets()) is not False:
                    if self.drop and invalidation(msg):
                        self.dropped += 1
                        continue
                    out.append(resp(msg))
                if out:
                    cw.write(b"".join(out))
                    await cw.drain()

        tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            cw.close()
            sw.close()
