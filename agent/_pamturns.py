"""The PAM server's waiting room: every request's deadline, and whose turn it is to be decided.

Deadlines all have the same length, so they expire in arrival order: one queue and one timer
serve every connection (`watch`, `_sweep`), not a timer per connection. At most
``max_active`` decisions are worked on at once (`admit`, `release`): under a login storm this
keeps each decision short (its peer query is not stuck behind a thousand others in the loop)
while the rest wait in arrival order at no cost, each still bounded by its own deadline.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Protocol

__all__ = ["Turns", "Waiter"]

log = logging.getLogger("callerid.agent.pamserver")


class Waiter(Protocol):
    """A request as the waiting room sees it (`_pamconn.PamConnection`)."""

    state: str  # "queued" while waiting its turn, "done" once answered
    deadline: float  # loop time
    pid: int

    def start(self) -> None:
        """Its turn: start deciding."""

    def expire(self) -> None:
        """Its deadline passed before it was done."""

    def client_gone(self) -> bool:
        """Whether the client has closed its end (given up)."""
        ...

    def abandon(self) -> None:
        """Close it undecided."""


class Turns:
    def __init__(self, max_active: int) -> None:
        self.max_active = max_active
        self.active = 0
        self.abandoned = 0  # queued requests whose client left before their turn
        self.queued: collections.deque[Waiter] = collections.deque()
        self._deadlines: collections.deque[Waiter] = collections.deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._releasing = False  # a release() is starting the next ones (see release)

    def watch(self, w: Waiter, loop: asyncio.AbstractEventLoop) -> None:
        """Expire ``w`` at its deadline (unless it is done by then)."""
        self._deadlines.append(w)
        if self._sweeper is None:
            self._sweeper = loop.call_at(w.deadline, self._sweep, loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sweeper = None
        now = loop.time()
        while self._deadlines:
            head = self._deadlines[0]
            if head.state != "done" and head.deadline > now:
                self._sweeper = loop.call_at(head.deadline, self._sweep, loop)
                return
            self._deadlines.popleft()
            if head.state != "done":
                head.expire()

    def admit(self, w: Waiter) -> None:
        """Start deciding for ``w`` now, or queue it behind the decisions in progress."""
        if self.active < self.max_active:
            self.active += 1
            w.start()
        else:
            self.queued.append(w)

    def release(self) -> None:
        """A decision ended: start the next queued one still waiting (one whose client has
        gone meanwhile, having given up on its own deadline, is dropped undecided: under
        overload, work nobody waits for would only make the queue longer). A decision that
        ends within its own start (decided at once) releases from inside this loop: that
        inner call only counts, and this loop goes on, so a queue of such decisions is
        worked through without recursion."""
        self.active -= 1
        if self._releasing:
            return
        self._releasing = True
        try:
            while self.queued and self.active < self.max_active:
                w = self.queued.popleft()
                if w.state != "queued":
                    continue
                if w.client_gone():
                    self.abandoned += 1
                    log.debug("pid %d gave up before its turn; not decided", w.pid)
                    w.abandon()
                    continue
                self.active += 1
                w.start()
        finally:
            self._releasing = False
