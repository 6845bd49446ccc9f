"""The listening ancestors `SessionFinder` remembers, each held by a pidfd.

Every login asks about the same listener (sshd's, or pid 1 for socket activation), and what it
listens on does not change between logins (a login on a port it stopped listening on a moment
ago was still accepted by it), so a listener read once is remembered for ``ttl_s``. How the
memory stays true of that very process: the pidfd is opened *before* the process is read
(`ProcReader.hold`), and an entry is used only while the pidfd says the process lives. A
process alive now has held its pid since before it was read, so the pid still names what was
read; once it has exited (its pid may be reused), the entry is dropped. One poll per login
instead of reading the listener's /proc/<pid>/stat for its start time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from callerid.agent.netinfo._proc import Pin

__all__ = ["HeldListeners"]

T = TypeVar("T")


class HeldListeners(Generic[T]):
    """pid -> what was read of it, with its pin, for ``ttl_s`` and while it lives; at most
    ``max_entries`` (the oldest go first). Owns the pins: each is closed when its entry goes."""

    def __init__(self, *, ttl_s: float, max_entries: int, clock: Callable[[], float]) -> None:
        self._ttl = ttl_s
        self._max = max_entries
        self._clock = clock
        self._by_pid: dict[int, tuple[T, Pin, float]] = {}

    def get(self, pid: int) -> T | None:
        hit = self._by_pid.get(pid)
        if hit is None:
            return None
        value, pin, until = hit
        if self._clock() >= until or pin.exited():
            self._drop(pid)
            return None
        return value

    def put(self, pid: int, value: T, pin: Pin) -> None:
        """Remember ``value`` read of ``pid`` after ``pin`` was taken (the pin is ours now)."""
        self._drop(pid)
        if self._ttl <= 0:
            pin.close()
            return
        while len(self._by_pid) >= self._max:
            self._drop(next(iter(self._by_pid)))
        self._by_pid[pid] = (value, pin, self._clock() + self._ttl)

    def clear(self) -> None:
        for pid in list(self._by_pid):
            self._drop(pid)

    def __len__(self) -> int:
        return len(self._by_pid)

    def _drop(self, pid: int) -> None:
        hit = self._by_pid.pop(pid, None)
        if hit is not None:
            hit[1].close()
