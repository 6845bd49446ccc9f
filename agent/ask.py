"""Asking the source: the destination's question about a connection, and the peer status.

`SourceAsker(conn, uid)` asks the agent at the connection's remote address which job holds the
ssh client's end, and returns what the journal calls ``CALLERID_PEER_STATUS`` with the job id
the source named (or None):

    found | not_found | error          the source agent's answer
    unreachable | timeout | auth_failed | unknown_peer    why there was none (the mesh client)
    local | local_not_found | local_error   the source is this node: answered without the network

The network question goes through a `PeerAsk` (the mesh client in the daemon, a fake in unit
tests); a source address of this node's own (`LocalAddresses`) is answered by this node's
`SourceAnswer` directly. A link-local source is asked at ``fe80::...%<scope>``: the address
with the interface the connection came in on (`Connection.remote_host`); the query itself
carries no scope.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable
from typing import Protocol

import psutil

from callerid.agent.memo import Memo
from callerid.agent.netinfo import Connection
from callerid.agent.source import SourceAnswer
from callerid.bus.protocol import CallerIdQuery, CallerIdReply
from callerid.bus.transport import MeshClient

__all__ = ["LocalAddresses", "PeerAsk", "SourceAsker", "mesh_asker"]

ADDRESSES_TTL_S = 10.0  # interface addresses re-read at most this often (wildcard listen only)


class PeerAsk(Protocol):
    """Ask the agent at ``host`` a CallerIdQuery; (mesh status, the reply when status is ok)."""

    def __call__(
        self, host: str, query: CallerIdQuery
    ) -> Awaitable[tuple[str, CallerIdReply | None]]: ...


def mesh_asker(client: MeshClient) -> PeerAsk:
    """A `PeerAsk` over ``client``, which gives each query its request id."""

    async def ask(host: str, query: CallerIdQuery) -> tuple[str, CallerIdReply | None]:
        query = CallerIdQuery(client.next_id(), query.proto, query.src, query.dst, query.uid)
        result = await client.query(host, query)
        reply = result.reply if isinstance(result.reply, CallerIdReply) else None
        return result.status, reply

    return ask


class SourceAsker:
    """(peer status, job id or None) for a session connection; see the module docstring."""

    def __init__(
        self, *, ask_peer: PeerAsk, is_local: Callable[[str], bool], local: SourceAnswer
    ) -> None:
        self.ask_peer = ask_peer
        self.is_local = is_local
        self.local = local

    async def __call__(self, conn: Connection, uid: int) -> tuple[str, str | None]:
        query = CallerIdQuery(  # id 0: the mesh client gives the real one
            id=0, proto=conn.proto, src=conn.remote, dst=conn.local, uid=uid
        )
        reply: CallerIdReply | None
        if self.is_local(conn.remote.ip):
            reply = await self.local.answer(query, peer="local")
            status = "local" if reply.status == "found" else f"local_{reply.status}"
        else:
            status, reply = await self.ask_peer(conn.remote_host, query)  # link-local: ip%scope
            if reply is not None and status == "ok":
                status = reply.status  # found | not_found | error
        job = reply.job if reply is not None and reply.status == "found" else None
        return status, job


class LocalAddresses:
    """Is an IP one of this node's own addresses (so a source there is answered locally)?

    With specific listen addresses, those are this node's; with a wildcard, any address of an
    interface in this network namespace (re-read at most every ``ttl_s``: an address added
    since is seen that much later) and loopback are.
    """

    def __init__(
        self, listen: list[str], clock: Callable[[], float], ttl_s: float = ADDRESSES_TTL_S
    ) -> None:
        self.wildcard = any(ipaddress.ip_address(a).is_unspecified for a in listen)
        self.listen = frozenset(str(ipaddress.ip_address(a)) for a in listen)
        self._addrs: Memo[None, frozenset[str]] = Memo(max_entries=1, ttl_s=ttl_s, clock=clock)

    def __call__(self, ip: str) -> bool:
        if not self.wildcard:
            return ip in self.listen
        if ipaddress.ip_address(ip).is_loopback:
            return True
        addrs = self._addrs.get(None)
        if addrs is None:
            addrs = _interface_addresses()
            self._addrs.put(None, addrs)
        return ip in addrs


def _interface_addresses() -> frozenset[str]:
    return frozenset(
        a.address.split("%")[0]
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family in (socket.AF_INET, socket.AF_INET6)
    )
