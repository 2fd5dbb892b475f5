"""The inference threads (``service.callthreads``): ``run_in_executor``'s semantics with
one hand-off back to the loop. Results and errors come back to the awaiting request,
calls run in order on the named threads, a call whose waiter gave up before it started is
dropped and one that had started runs to its end, and the ``Executor`` interface that
other callers use shares the queue."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from collections.abc import Iterator

import pytest

from service.callthreads import CallThreads


@pytest.fixture
def threads() -> Iterator[CallThreads]:
    pool = CallThreads(1, "ort")
    yield pool
    pool.shutdown(wait=True)


def test_results_and_errors_come_back_to_the_awaiting_coroutine(threads: CallThreads) -> None:
    async def main() -> None:
        assert await threads.call(lambda a, b: a + b, 2, 3) == 5
        name = await threads.call(lambda: threading.current_thread().name)
        assert name == "ort_0"
        with pytest.raises(ZeroDivisionError):
            await threads.call(lambda: 1 / 0)
        # in submission order, on the one thread
        seen: list[int] = []
        await asyncio.gather(*(threads.call(seen.append, k) for k in range(50)))
        assert seen == list(range(50))

    asyncio.run(main())


def test_a_call_whose_waiter_gave_up_before_it_started_is_dropped(
    threads: CallThreads,
) -> None:
    ran: list[str] = []

    async def main() -> None:
        gate = threading.Event()
        busy = threads.call(gate.wait, 10)  # the thread is taken
        queued = threads.call(ran.append, "queued")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(queued, 0.05)  # as a request past its deadline
        assert queued.cancelled()
        gate.set()
        assert await busy is True
        await threads.call(ran.append, "after")

    asyncio.run(main())
    assert ran == ["after"]


def test_a_started_call_runs_to_its_end_and_its_result_is_dropped(
    threads: CallThreads,
) -> None:
    ended = threading.Event()
    started = threading.Event()

    def slow() -> str:
        started.set()
        ended.wait(10)
        return "late"

    async def main() -> None:
        call = threads.call(slow)
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        call.cancel()  # the waiter gives up while the call runs
        ended.set()
        # the next call runs after it: the thread was not lost, and settling the
        # cancelled future raised nothing on the loop
        assert await threads.call(lambda: "next") == "next"
        assert call.cancelled()

    errors: list[object] = []
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert errors == []


def test_no_call_keeps_its_arguments_once_it_has_ended(threads: CallThreads) -> None:
    class Feeds:
        pass

    async def main() -> weakref.ref[Feeds]:
        feeds = Feeds()
        ref = weakref.ref(feeds)
        await threads.call(lambda f: None, feeds)
        return ref

    ref = asyncio.run(main())
    gc.collect()
    assert ref() is None  # the idle thread does not hold the last call's feeds


def test_submit_shares_the_queue_and_shutdown_runs_what_was_queued() -> None:
    pool = CallThreads(2, "ort")
    assert pool.submit(pow, 2, 10).result(5) == 1024
    with pytest.raises(ValueError):
        pool.submit(int, "x").result(5)
    gate = threading.Event()
    busy = [pool.submit(gate.wait, 10) for _ in range(2)]
    queued = pool.submit(lambda: "queued")
    threading.Timer(0.05, gate.set).start()
    pool.shutdown(wait=True)  # the queued call still runs, then the threads end
    assert all(f.result(0) for f in busy) and queued.result(0) == "queued"
    assert not any(t.is_alive() for t in pool._threads)
    with pytest.raises(RuntimeError):
        pool.submit(lambda: None)

    async def late() -> None:
        pool.call(lambda: None)

    with pytest.raises(RuntimeError):
        asyncio.run(late())


def test_shutdown_can_drop_what_was_queued() -> None:
    pool = CallThreads(1, "ort")
    gate, started = threading.Event(), threading.Event()

    def hold() -> bool:
        started.set()
        return gate.wait(10)

    async def main() -> None:
        busy = pool.submit(hold)
        assert await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        queued = pool.submit(lambda: "queued")
        queued_call = pool.call(lambda: "queued call")
        threading.Timer(0.05, gate.set).start()
        pool.shutdown(wait=True, cancel_futures=True)
        assert busy.result(0) is True
        assert queued.cancelled()
        with pytest.raises(asyncio.CancelledError):
            await queued_call  # cancelled on its loop
        assert not any(t.is_alive() for t in pool._threads)

    asyncio.run(main())


def test_a_call_that_ends_after_its_loop_has_closed_leaves_the_thread_serving(
    threads: CallThreads,
) -> None:
    gate, started = threading.Event(), threading.Event()

    def hold() -> str:
        started.set()
        gate.wait(10)
        return "late"

    async def leave() -> None:
        threads.call(hold)
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)

    asyncio.run(leave())  # the loop closes with the call still running
    gate.set()
    assert threads.submit(lambda: "next").result(5) == "next"


def test_a_failure_to_settle_is_logged_and_the_thread_serves_on(
    threads: CallThreads, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:  # not a future: settling it fails in the thread, not in the call
        def set_running_or_notify_cancel(self) -> bool:
            raise RuntimeError("not a future")

    with caplog.at_level("ERROR", "ctr.service"):
        threads._queue.put((Broken(), None, lambda: None, ()))
        assert threads.submit(lambda: "next").result(5) == "next"
    assert "could not be settled" in caplog.text
