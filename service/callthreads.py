"""The inference threads: an executor whose asyncio callers get their result with one
hand-off back to the event loop.

``loop.run_in_executor`` on a ``ThreadPoolExecutor`` wraps each call in a
``concurrent.futures.Future`` and chains an asyncio future to it: the worker sets the
first (its condition lock, its callbacks), whose callback schedules the copy onto the
second, which reads the first's state back through four more lock-taking calls. Every
step holds the GIL, and the event loop needs the GIL for everything it does, so under
load these microseconds are taken from the loop (docs/benchmarks.md, "Session 21").
:meth:`CallThreads.call` puts the call on the queue with its asyncio future, and the
worker settles that future with one ``call_soon_threadsafe``.

The semantics are ``run_in_executor``'s: calls run in submission order on ``workers``
threads; a call whose future was cancelled before it started is dropped, one that has
started runs to its end and its result is dropped. :meth:`submit` (the ``Executor``
interface) serves every other caller from the same queue and threads."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from queue import Empty, SimpleQueue
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger("ctr.service")

# (future, its loop or None for a concurrent future, fn, args); None: a thread's stop
_Item = tuple[Any, asyncio.AbstractEventLoop | None, Callable[..., Any], tuple[Any, ...]]


def _settle(
    fut: asyncio.Future[Any] | Future[Any],
    result: Any,
    exc: BaseException | None,
) -> None:
    """The call's outcome into ``fut``, unless its waiter gave up (an asyncio future: on
    its event loop; submit's: on the thread that ran it)."""
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


class CallThreads(Executor):
    """``workers`` threads named ``{name}_{i}`` taking calls from one queue.

    The threads are daemons: one blocked in a graph call does not hold up the
    interpreter's exit. The app's lifespan shuts them down (queued calls run first)."""

    def __init__(self, workers: int, name: str) -> None:
        self._queue: SimpleQueue[_Item | None] = SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def call(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """``fn(*args)`` on a worker; awaited on the running loop."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new calls after shutdown")
            self._queue.put((fut, loop, fn, args))
        return fut

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        fut: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._queue.put((fut, None, functools.partial(fn, *args, **kwargs), ()))
        return fut

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new calls; the queued ones still run (``cancel_futures``: dropped), then
        the threads end (``wait``: joined)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                try:
                    if cancel_futures:
                        self._drop_queued()
                finally:  # whatever happened, every thread gets its stop
                    for _ in self._threads:
                        self._queue.put(None)
        if wait:
            for t in self._threads:
                t.join()

    def _drop_queued(self) -> None:
        """Cancel what no thread has taken yet (under the lock: nothing new comes in)."""
        while True:
            try:
                item = self._queue.get_nowait()
            except Empty:  # a thread may take the last one meanwhile
                return
            if item is None:
                continue
            fut, loop = item[0], item[1]
            if loop is None:
                fut.cancel()
            else:
                with contextlib.suppress(RuntimeError):  # its loop has closed
                    loop.call_soon_threadsafe(fut.cancel)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            fut, loop, fn, args = item
            # the call's arguments are dropped before its waiter is woken (which may run
            # on before this thread gets the GIL back), and not kept while waiting
            del item
            try:
                outcome = self._run(fut, loop, fn, args)
            except BaseException:  # a bug here must not end the thread: calls would hang
                log.exception("inference thread: a call could not be settled")
                outcome = None
            del fn, args
            if outcome is not None and loop is None:  # submit's: settled here
                _settle(fut, *outcome)
            elif outcome is not None:
                with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
                    loop.call_soon_threadsafe(_settle, fut, *outcome)
            del fut, outcome

    @staticmethod
    def _run(
        fut: Any, loop: asyncio.AbstractEventLoop | None, fn: Callable[..., Any], args: tuple
    ) -> tuple[Any, BaseException | None] | None:
        """Runs the call; returns what settles its future (``(result, error)``), or None
        where it was cancelled before it started (nothing is run)."""
        if loop is None:
            if not fut.set_running_or_notify_cancel():
                return None
        elif fut.cancelled():  # its waiter gave up before it started: dropped
            return None
        try:
            return fn(*args), None
        except BaseException as exc:
            return None, exc
