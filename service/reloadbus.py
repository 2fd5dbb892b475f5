"""Reload broadcast: ``POST /admin/reload`` on one worker reaches every worker.

Each uvicorn worker is its own process with its own loaded model, and a request reaches
one of them. So after a worker has loaded a version for ``/admin/reload``, it publishes
that version number on a Redis channel (``CTR_RELOAD_CHANNEL``); every other worker of
the deployment subscribes to it and loads the same version (not "latest": a version
written in between does not split the workers). A worker that fails to load it logs the
error and serves on, as after a failed local reload.

* **Who listens.** The channel is ``<CTR_RELOAD_CHANNEL>:<hash>`` of the model store and
  model name (``CTR_MODELS_DIR``, ``CTR_MODEL_NAME``), so other deployments on the same
  Redis neither hear it nor count as receivers; the message names both too, and the
  worker that sent it ignores its own.
* **A listener that was disconnected** (Redis restarted, network) catches up when it
  subscribes again: the publisher also keeps the last message in a key
  (``<channel>:last``, one per deployment), and a message newer than the listener's own
  last load is applied.
* **Redis down.** The local reload still happens; the answer says that no other worker
  was reached (``peers_notified: null``).
* **Redis Cluster.** Pub/sub messages reach every node's subscribers, so the bus uses a
  plain connection to the first node in ``CTR_REDIS_URL``.

A worker (re)started later loads ``CTR_MODEL_VERSION``, like any fresh start.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger("ctr.service.reload")

ERRORS = (RedisError, OSError, asyncio.TimeoutError)
LAST_TTL_S = 7 * 24 * 3600  # the catch-up record outlives any reconnect worth catching up


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def first_node(url: str) -> str:
    """A plain Redis URL for the first node of a (possibly comma-separated) URL list."""
    part = url.split(",")[0]
    return part if "://" in part else "redis://" + part


class ReloadBus:
    """Publishes this worker's reloads; applies the other workers' through ``apply``.

    ``apply(version)`` loads and swaps in a version (the app's serialized reload)."""

    def __init__(
        self,
        url: str,
        channel: str,
        models_dir: str,
        model_name: str,
        timeout_s: float,
        connect_timeout_s: float,
        apply: Callable[[str], Awaitable[Any]],
        retry_s: float = 0.5,
    ) -> None:
        # one channel and one record per deployment: the store's path and the model name,
        # hashed to a short suffix, so a publish counts this deployment's workers only
        where = os.path.abspath(models_dir)
        digest = hashlib.sha1(f"{where}\0{model_name}".encode()).hexdigest()[:16]
        self.channel = f"{channel}:{digest}"
        self.last_key = f"{channel}:last:{digest}"
        self.deployment = {"models_dir": where, "model": model_name}
        self.token = uuid.uuid4().hex  # this worker
        self.timeout_s = timeout_s
        self.apply = apply
        self.retry_s = retry_s
        self.loaded_at = time.time()  # wall clock: compared across processes
        self.subscribed = False
        self.applied = 0  # peers' reloads applied here (for tests and /v1/models)
        self.client = Redis.from_url(
            first_node(url),
            socket_timeout=timeout_s,
            socket_connect_timeout=connect_timeout_s,
            max_connections=4,
        )
        self.task: asyncio.Task[None] | None = None
        self.closing = False

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._listen(), name="reload-bus")

    def mark_loaded(self) -> None:
        """This worker has just loaded a model: messages from before now are stale."""
        self.loaded_at = time.time()

    async def publish(self, version: str) -> int | None:
        """Tell the other workers to load ``version``; how many were reached (``None``
        when Redis could not be)."""
        msg = orjson.dumps(
            {**self.deployment, "version": version, "origin": self.token, "at": time.time()}
        )
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self.client.pipeline(transaction=False) as pipe:
                    pipe.set(self.last_key, msg, ex=LAST_TTL_S)
                    pipe.publish(self.channel, msg)
                    _, receivers = await pipe.execute()
        except ERRORS as exc:
            log.warning("reload not broadcast (redis): %s", type(exc).__name__)
            return None
        # the count includes this worker's own subscription, when it has one
        return max(int(receivers) - (1 if self.subscribed else 0), 0)

    async def _handle(self, raw: bytes | str | None, live: bool) -> None:
        """Apply a message: a live one always (unless it is this worker's own or another
        deployment's), a caught-up one only if it is newer than this worker's last load."""
        try:
            msg = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            msg = None
        if not isinstance(msg, dict) or not isinstance(msg.get("version"), str):
            log.warning("ignored a malformed reload message on %s", self.channel)
            return
        if msg.get("origin") == self.token:
            return
        if {k: msg.get(k) for k in self.deployment} != self.deployment:
            return  # another deployment on the same Redis
        at = msg.get("at")
        if not live and (not isinstance(at, int | float) or at <= self.loaded_at):
            return  # this worker loaded a model after that message was sent
        log.info("reloading version %s, as another worker did", msg["version"])
        with contextlib.suppress(Exception):  # the apply callback logs its own failures
            await self.apply(msg["version"])
            self.applied += 1

    async def _listen(self) -> None:
        """Subscribe, catch up, then apply messages; on a Redis error, wait and retry."""
        delay = self.retry_s
        while not self.closing:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self.subscribed = True
                delay = self.retry_s
                # what was published while this worker was not listening
                last = await self.client.get(self.last_key)
                if last is not None:
                    await self._handle(last, live=False)
                quiet = 0
                while not self.closing:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        quiet += 1
                        if quiet % 5 == 0:  # a silently dead connection fails the ping
                            await pubsub.ping()
                        continue
                    if message.get("type") == "message":
                        await self._handle(message.get("data"), live=True)
            except ERRORS as exc:
                # a cancellation that met a client timeout can come out as TimeoutError
                if self.closing or _cancelling():
                    raise asyncio.CancelledError() from exc
                log.warning("reload bus: %s; retrying in %.1f s", type(exc).__name__, delay)
            finally:
                self.subscribed = False
                with contextlib.suppress(*ERRORS, RuntimeError):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def aclose(self) -> None:
        self.closing = True
        if self.task is not None:
            self.task.cancel()
            # the loop also stops on `closing`, should a cancellation be swallowed inside
            # the client; bounded either way
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self.task, 5.0)
        await self.client.aclose()
        with contextlib.suppress(*ERRORS):
            await self.client.connection_pool.disconnect()
