"""Private part of `callerid.bus.transport`: the values a `MeshClient` takes and gives.

Its settings (`ClientSettings`, or any `PeerSettings` such as the agent's `PeerConfig`), the
outcome of each query (`QueryResult`) and its counters (`ClientStats`). Pure values, no I/O.
Import them from `transport`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from callerid.bus.protocol import CallerIdReply, Pong

QueryStatus = Literal["ok", "unreachable", "auth_failed", "timeout", "unknown_peer", "error"]


class PeerSettings(Protocol):
    """What the client needs of `callerid.agent.config.PeerConfig` (matches it)."""

    @property
    def timeout_ms(self) -> int: ...
    @property
    def connect_timeout_ms(self) -> int: ...
    @property
    def unreachable_ttl_s(self) -> float: ...
    @property
    def pool_size(self) -> int: ...


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """Defaults equal to the config defaults (peer.*)."""

    timeout_ms: int = 500
    connect_timeout_ms: int = 300
    unreachable_ttl_s: float = 30.0
    pool_size: int = 256


@dataclass(frozen=True, slots=True)
class QueryResult:
    """Outcome of one query or ping; ``reply`` is set only when status is "ok"."""

    status: QueryStatus
    reply: CallerIdReply | Pong | None
    elapsed_s: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(slots=True)
class ClientStats:
    sockets_opened: int = 0
    sockets_closed: int = 0
    negative_cache_hits: int = 0
    stalled_fast_fails: int = 0  # queries answered "timeout" at once: the peer is silent
    malformed: int = 0
