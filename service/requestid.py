"""Request IDs: 32 hex characters, unique across the workers of a deployment.

``uuid.uuid4().hex`` reads the kernel's random source on every request (3 µs here), and
that system call lets go of the GIL: the ORT thread, waiting for it with a finished
graph call, takes it then, and the event loop waits to get it back. Instead each process
draws its random bits once (again in a forked child) and counts: the ID is 64 random
bits, then the count passed through a random bijection of 64-bit numbers (an odd
multiplier and a mask), so the IDs do not plainly show a worker's request count. Two
processes share an ID only if their first 64 random bits match."""

from __future__ import annotations

import itertools
import os

_MASK = (1 << 64) - 1


class RequestIds:
    """``next()``: this process's next request ID."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.prefix = os.urandom(8).hex()
        words = os.urandom(16)
        self.mult = int.from_bytes(words[:8], "little") | 1  # odd: a bijection mod 2**64
        self.xor = int.from_bytes(words[8:], "little")
        self.count = itertools.count()

    def next(self) -> str:
        return f"{self.prefix}{((next(self.count) * self.mult) & _MASK) ^ self.xor:016x}"


REQUEST_IDS = RequestIds()
