"""Private part of `callerid.bus.transport`: the values a `MeshClient` takes and gives.

Its settings (`ClientSettings`, or any `PeerSettings` such as the agent's `PeerConfig`), the
outcome of each query (`QueryResult`) and its counters (`ClientStats`); where a host is
reached (`reach`). Pure values, no I/O.
Import them from `transport`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from callerid.bus.protocol import CallerIdReply, Pong, is_link_local, normalize_ip, split_zone

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


def reach(host: str) -> tuple[str, str]:
    """(the address, the address to connect to) of a host: an IP literal, with its zone for a
    link-local one (``fe80::1%eth0`` or ``fe80::1%3``); the peer table knows the address,
    libzmq connects over the zone's interface. ValueError when unusable."""
    addr, zone = split_zone(host)
    try:
        ip = normalize_ip(addr)
    except ValueError:
        msg = f"not an IP address: {host!r}"
        raise ValueError(msg) from None
    if not is_link_local(ip):
        return ip, ip  # a zone means nothing off a link-local address
    if zone is None:
        msg = f"link-local address {ip} without its interface (fe80::...%eth0)"
        raise ValueError(msg)
    return ip, f"{ip}%{zone}"
