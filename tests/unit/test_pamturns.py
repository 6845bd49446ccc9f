"""`_pamturns.Turns`: decisions that end within their own start (decided at once) free their
turn without recursion, however many wait behind them."""

from __future__ import annotations

import sys

from callerid.agent._pamturns import Turns


class AtOnce:
    """A request decided the moment it starts: it releases its turn inside `start`."""

    def __init__(self, turns: Turns, pid: int, started: list[int]) -> None:
        self.turns, self.pid, self.started = turns, pid, started
        self.state = "read"
        self.deadline = 0.0

    def start(self) -> None:
        self.state = "done"
        self.started.append(self.pid)
        self.turns.release()

    def expire(self) -> None:
        raise AssertionError("not expected")

    def client_gone(self) -> bool:
        return False

    def abandon(self) -> None:
        raise AssertionError("not expected")


def test_a_long_queue_of_decisions_made_at_once_is_worked_through_in_order() -> None:
    turns = Turns(max_active=1)
    started: list[int] = []
    blocker = AtOnce(turns, 0, started)
    blocker.start = lambda: started.append(0)  # type: ignore[method-assign]  # holds its turn
    turns.admit(blocker)
    n = sys.getrecursionlimit() * 3  # deeper than recursion could go
    for pid in range(1, n + 1):
        w = AtOnce(turns, pid, started)
        w.state = "queued"
        turns.admit(w)
    assert len(turns.queued) == n
    turns.release()  # the blocker ends: every queued one runs, each ending at once
    assert started == list(range(n + 1))
    assert turns.active == 0 and not turns.queued
