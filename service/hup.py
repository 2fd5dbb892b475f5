"""SIGHUP before the app's lifespan takes it over: noted, not fatal.

``ctr serve`` installs :func:`install` first thing, before the imports and the model
load that precede the lifespan's own handler (which replaces this one and reads
:data:`pending`: a SIGHUP noted here becomes a reload once the first load is done).
Without it the signal's default action would end the process.

With several workers each worker is a new interpreter (uvicorn spawns them), which
starts with the default action again. So ``ctr serve`` blocks SIGHUP in the thread that
spawns them (:func:`block_for_workers`): a worker inherits the blocked signal, a SIGHUP
sent to it while it imports waits, pending, and :func:`take_over` (from ``create_app``,
in the worker) installs :func:`install`'s handler and unblocks it, so that it is noted
then. The parent's own SIGHUP (uvicorn restarts its workers) reaches it through a thread
that leaves it unblocked."""

from __future__ import annotations

import signal
import threading
from types import FrameType

pending = False


def _note(signum: int, frame: FrameType | None) -> None:
    global pending
    pending = True


def install() -> None:
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, _note)


def block_for_workers() -> None:
    """In ``ctr serve``'s main thread, before uvicorn spawns the workers from it: block
    SIGHUP there (and so in every worker spawned), leaving it to a thread started first,
    which keeps it unblocked and so takes this process's own SIGHUPs (Python runs their
    handler in the main thread all the same)."""
    if not hasattr(signal, "pthread_sigmask"):
        return
    threading.Thread(target=threading.Event().wait, name="ctr-sighup", daemon=True).start()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})


def take_over() -> None:
    """In a worker that starts with SIGHUP blocked (:func:`block_for_workers`): note
    SIGHUP from now on and unblock it, so that one sent while the worker was importing
    is noted now. Anywhere else (SIGHUP not blocked, not the main thread): nothing."""
    if not hasattr(signal, "pthread_sigmask"):
        return
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.SIGHUP not in signal.pthread_sigmask(signal.SIG_BLOCK, []):
        return
    install()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
