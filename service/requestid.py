"""Request IDs: 32 hex characters, unique across the workers of a deployment.

``uuid.uuid4().hex`` reads the kernel's random source on every request (3 µs here), and
that system call lets go of the GIL: the ORT thread, waiting for it with a finished
graph call, takes it then, and the event loop waits to get it back. Instead each process
draws 64 random bits once (again in a forked child) and counts: the ID is those bits,
then the count, in hex. Two processes share an ID only if their 64 random bits match."""

from __future__ import annotations

import itertools
import os


class RequestIds:
    """``next()``: this process's next request ID."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.count = itertools.count()

    def next(self) -> str:
        return f"{self.prefix}{next(self.count):016x}"


REQUEST_IDS = RequestIds()
