"""Private part of `callerid.bus.transport`: the client's negative cache of dead hosts.

A peer (ip, port) where nothing listens is remembered for ``ttl_s`` seconds, so that queries
for it fail at once instead of trying to connect again. Pure: no sockets, and time comes
only from the injected clock. Bounded by ``max_size`` entries: expired ones go first, then
the oldest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

MAX_DEAD_HOSTS: Final = 4096  # bound of the negative cache

Key = tuple[str, int]


class DeadHosts:
    """The (ip, port) pairs with no agent, each until its deadline; ``ttl_s <= 0`` disables."""

    def __init__(
        self, ttl_s: float, clock: Callable[[], float], *, max_size: int = MAX_DEAD_HOSTS
    ) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._max_size = max_size
        self._until: dict[Key, float] = {}

    def __len__(self) -> int:
        return len(self._until)

    def __contains__(self, key: Key) -> bool:
        """Whether ``key`` is still dead now; an expired entry is forgotten."""
        until = self._until.get(key)
        if until is None:
            return False
        if self._clock() < until:
            return True
        del self._until[key]
        return False

    def add(self, key: Key) -> None:
        """Remember ``key`` as dead for ``ttl_s`` from now."""
        if self._ttl_s <= 0:
            return
        now = self._clock()
        if len(self._until) >= self._max_size:
            self._until = {k: t for k, t in self._until.items() if t > now}
            while len(self._until) >= self._max_size:
                del self._until[next(iter(self._until))]
        self._until[key] = now + self._ttl_s
