"""Fakes for the centre of the agent: real classes that record their calls (no mock.patch).

`FakeClock` (a monotonic clock the test moves), `FakeBackend` (jobs and adoptions in memory),
`FakeSessions` (the session connection of a pid), `FakePeers` (the source agents' answers),
`FakeUsers` (NSS). Each stands where the daemon's composition root puts the real one.
"""

from __future__ import annotations


class FakeClock:
    """A clock that moves only when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
