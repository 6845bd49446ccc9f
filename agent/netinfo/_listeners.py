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

from callerid.agent.memo import Memo
from callerid.agent.netinfo._proc import Pin

__all__ = ["HeldListeners"]

T = TypeVar("T")


class HeldListeners(Generic[T]):
    """pid -> what was read of it, with its pin, for ``ttl_s`` and while it lives; at most
    ``max_entries`` (`Memo`, which owns the pins: each is closed when its entry goes)."""

    def __init__(self, *, ttl_s: float, max_entries: int, clock: Callable[[], float]) -> None:
        self._memo: Memo[int, tuple[T, Pin]] = Memo(
            max_entries=max_entries, ttl_s=ttl_s, clock=clock, on_drop=lambda hit: hit[1].close()
        )

    def get(self, pid: int) -> T | None:
        hit = self._memo.get(pid)
        if hit is None:
            return None
        if hit[1].exited():  # its pid may name another process from now on
            self._memo.pop(pid)
            hit[1].close()
            return None
        return hit[0]

    def put(self, pid: int, value: T, pin: Pin) -> None:
        """Remember ``value`` read of ``pid`` after ``pin`` was taken (the pin is ours now:
        closed at once with ``ttl_s`` 0)."""
        self._memo.put(pid, (value, pin))

    def clear(self) -> None:
        self._memo.clear()

    def __len__(self) -> int:
        return len(self._memo)
