"""`Memo`: the one bounded memory with an expiry that every cache of the agent uses.

A value is kept for ``ttl_s`` seconds from when it was put (``None``: until it is evicted),
by the injected ``clock``; beyond ``max_entries`` the least recently used entry goes first.
Each user of a memo says, where it makes one, why a remembered fact stays true that long.
Safe to use from several threads (the source side may run in worker threads).

A memo may own what it holds (an open descriptor): ``on_drop`` is called with each value the
memo lets go of by itself (expired, replaced, evicted, cleared or swept; with ``ttl_s`` 0, as
soon as it is put), outside its lock;
a value taken back with `pop` is the caller's again. `sweep` lets expired values go without
waiting for their key to be asked again.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import Generic, TypeVar

__all__ = ["Memo"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Memo(Generic[K, V]):
    """A bounded key -> value memory with a time to live; see the module docstring."""

    __slots__ = ("_clock", "_entries", "_lock", "_on_drop", "max_entries", "ttl_s")

    def __init__(
        self,
        *,
        max_entries: int,
        ttl_s: float | None,
        clock: Callable[[], float],
        on_drop: Callable[[V], None] | None = None,
    ) -> None:
        if max_entries < 1:
            msg = f"max_entries must be at least 1, not {max_entries}"
            raise ValueError(msg)
        if ttl_s is not None and not ttl_s >= 0:
            msg = f"ttl_s must be a number >= 0 or None, not {ttl_s}"
            raise ValueError(msg)
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._on_drop = on_drop
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> V | None:
        """The value remembered for ``key``, or None (never put, expired or evicted)."""
        with self._lock:
            hit = self._entries.get(key)
            if hit is None:
                return None
            if hit[0] > self._clock():
                self._entries.move_to_end(key)
                return hit[1]
            del self._entries[key]
        self._dropped((hit[1],))
        return None

    def put(self, key: K, value: V) -> None:
        """Remember ``value`` for ``key`` from now on (for ``ttl_s``)."""
        self.put_many(((key, value),))

    def put_many(self, items: Iterable[tuple[K, V]]) -> None:
        """Remember each (key, value) of ``items``, all from now on: one clock read and one
        lock for all (a source-side scan remembers every socket of a process at once). With
        ``ttl_s`` 0 nothing is kept: each value is let go of at once."""
        if self.ttl_s == 0:
            self._dropped([value for _key, value in items])
            return
        expires = math.inf if self.ttl_s is None else self._clock() + self.ttl_s
        gone: list[V] = []
        with self._lock:
            entries = self._entries
            for key, value in items:
                old = entries.pop(key, None)
                if old is not None and old[1] is not value:
                    gone.append(old[1])
                entries[key] = (expires, value)
            while len(entries) > self.max_entries:
                gone.append(entries.popitem(last=False)[1][1])
        self._dropped(gone)

    def pop(self, key: K) -> V | None:
        """Forget ``key``; the value it had (even if expired), or None."""
        with self._lock:
            hit = self._entries.pop(key, None)
        return None if hit is None else hit[1]

    def sweep(self) -> None:
        """Let expired values go, from the least recently used on, up to the first that is
        not (one that was used since lives on behind it until it is asked for or swept)."""
        if self._on_drop is None or not self._entries:
            return
        now, gone = self._clock(), []
        with self._lock:
            entries = self._entries
            while entries:
                key, (expires, value) = next(iter(entries.items()))
                if expires > now:
                    break
                del entries[key]
                gone.append(value)
        self._dropped(gone)

    def clear(self) -> None:
        with self._lock:
            gone = [value for _expires, value in self._entries.values()]
            self._entries.clear()
        self._dropped(gone)

    def _dropped(self, values: Iterable[V]) -> None:
        if self._on_drop is not None:
            for value in values:
                self._on_drop(value)
