"""The destination side of netinfo: which connection does the sshd session that called PAM hold?

`SessionFinder.session_connection` walks from the caller up its ancestors to the first process
holding an established connection whose local port is served by a listener held by one of
*its* ancestors (sshd's listener, or pid 1 for socket activation). Each process's sockets are
read from its fds (pidfd_getfd, `_sockfd`) or else looked up in that process's own network
namespace (/proc/<pid>/net/...). It holds a `ProcReader` for every /proc read.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from callerid.agent.netinfo import _sockfd
from callerid.agent.netinfo._codec import (
    UNSPECIFIED,
    ProcNetRow,
    Proto,
    parse_proc_net_line,
    row_inode,
    state_name,
)
from callerid.agent.netinfo._listeners import HeldListeners
from callerid.agent.netinfo._proc import MAX_DEPTH, NetinfoError, Proc, ProcessGone, ProcReader
from callerid.bus.protocol import Endpoint, is_link_local, normalize_ip, split_zone

__all__ = ["Connection", "SessionFinder", "lent_connections"]

log = logging.getLogger(__name__)

_TABLES: Final[tuple[tuple[Proto, str], ...]] = (
    ("tcp", "tcp"),
    ("tcp", "tcp6"),
    ("udp", "udp"),
    ("udp", "udp6"),
)
_TABLE_NAMES: Final = tuple(name for _, name in _TABLES)


@dataclass(frozen=True, slots=True)
class Connection:
    """One inet socket as its holder sees it (``local`` is this node's end).

    ``scope`` is the index of the interface a link-local (fe80::/10) connection runs over, in
    the holder's network namespace (0 otherwise, or when it could not be told): the endpoints
    never carry it, and a link-local address names a host only together with it.
    """

    proto: Proto
    local: Endpoint
    remote: Endpoint
    inode: int
    uid: int
    state: str
    scope: int = 0

    @property
    def remote_host(self) -> str:
        """The remote address to reach it by from this node: ``fe80::1%3`` with a scope."""
        return f"{self.remote.ip}%{self.scope}" if self.scope else self.remote.ip


def _endpoint(addr: tuple[str, int]) -> Endpoint:
    """An endpoint of an address without its zone, if any (Endpoint makes the IP canonical)."""
    return Endpoint(split_zone(addr[0])[0], addr[1])


def _connection(proto: Proto, row: ProcNetRow) -> Connection:
    return Connection(
        proto=proto,
        local=_endpoint(row.local),
        remote=_endpoint(row.remote),
        inode=row.inode,
        uid=row.uid,
        state=state_name(proto, row.state),
    )


def _is_connected(c: Connection) -> bool:
    if c.proto == "tcp":
        return c.state == "ESTABLISHED"
    return c.remote.port != 0


def _is_listener(c: Connection) -> bool:
    if c.proto == "tcp":
        return c.state == "LISTEN"
    return c.remote.port == 0


@dataclass(slots=True)
class _Member:
    """One process of a caller's chain, read at once (the caller may exit right after)."""

    info: Proc
    inodes: frozenset[int]
    netns: str
    conns: list[Connection] | None = None  # read from the fds directly (None: use tables)


class _Chain:
    """A caller and its ancestors (below pid 1), each read only when first needed."""

    def __init__(
        self, finder: SessionFinder, members: list[_Member], tables: dict[str, dict[str, str]]
    ) -> None:
        self.finder = finder
        self.members = members
        self.tables = tables

    def get(self, i: int) -> _Member | None:
        while len(self.members) <= i:
            last = self.members[-1]
            if last.info.ppid <= 1 or len(self.members) >= MAX_DEPTH:
                return None
            try:
                self.members.append(self.finder._ancestor(last.info.ppid, self.tables))
            except ProcessGone:
                return None  # a parent exiting mid-walk ends the chain
        return self.members[i]

    def served_above(self, i: int, holder: _Member, conns: list[Connection]) -> list[Connection]:
        """Those of ``conns`` (held by member ``i``) that the nearest ancestor with a matching
        listener (in ``holder``'s netns) serves; ancestors are read only this far."""
        j = i + 1
        while (m := self.get(j)) is not None:
            listeners = self.finder._listeners([m], holder, self.tables)
            chosen = [c for c in conns if _served(c, listeners)]
            if chosen:
                return chosen
            j += 1
        return []

    def topmost(self, i: int, inode: int) -> _Member:
        """Climb from member ``i`` while the parent holds the same socket.

        sshd runs keyboard-interactive PAM in a forked helper that inherits the connection
        socket; the session lives in the helper's parent, the monitor, which is what must be
        adopted (adopting the short-lived helper would let the session escape).
        """
        while (parent := self.get(i + 1)) is not None and inode in parent.inodes:
            i += 1
        member = self.get(i)
        assert member is not None
        return member


def lent_connections(fds: list[int]) -> tuple[Connection, ...]:
    """The inet connections among sockets a PAM caller lent with its request (SCM_RIGHTS);
    every fd is closed here. What `SessionFinder.session_connection` takes as ``lent``."""
    return tuple(_from_facts(f) for f in _sockfd.lent_facts(fds))


def _from_facts(f: _sockfd.SockFacts) -> Connection:
    proto: Proto = "tcp" if f.proto == "tcp" else "udp"
    remote = _endpoint(f.remote)
    scope = f.scope if is_link_local(remote.ip) else 0
    return Connection(proto, _endpoint(f.local), remote, f.inode, f.uid, f.state, scope)


class SessionFinder:
    """`session_connection`: the sshd session of a PAM caller and the connection it serves."""

    def __init__(
        self,
        procs: ProcReader,
        *,
        clock: Callable[[], float],
        use_pidfd: bool = True,
        listener_ttl_s: float = 5.0,
        max_listeners: int = 1024,
    ) -> None:
        self._procs = procs
        self._use_pidfd = use_pidfd and procs.root == Path("/proc")
        # listening ancestors (sshd's listener, pid 1), each held by a pidfd (`_listeners`)
        self._listeners_seen: HeldListeners[_Member] = HeldListeners(
            ttl_s=listener_ttl_s, max_entries=max_listeners, clock=clock
        )

    def close(self) -> None:
        """Forget the remembered listeners (and close their pidfds)."""
        self._listeners_seen.clear()

    # ------------------------------------------------------------------ sockets of a process

    def _socket_fds(self, pid: int) -> dict[int, int]:
        """fd number -> socket inode, for every socket fd of ``pid``."""
        out: dict[int, int] = {}
        for name, target in self._procs.fd_links(pid):
            if target.startswith("socket:[") and name.isdigit():
                out[int(name)] = int(target[8:-1])
        return out

    def _fd_connections(self, pid: int, fds: dict[int, int]) -> list[Connection] | None:
        """The inet sockets of ``pid`` read through pidfd_getfd; None when unavailable."""
        if not self._use_pidfd or not fds:
            return None
        try:
            inet = _sockfd.inet_fds(self._procs.pid_dir(pid), sorted(fds))
            return [_from_facts(f) for f in _sockfd.socket_facts(pid, inet)] if inet else []
        except ProcessLookupError as exc:
            raise ProcessGone(pid) from exc
        except _sockfd.Unsupported as exc:
            log.info("pidfd_getfd unavailable (%s): reading /proc/<pid>/net instead", exc)
            self._use_pidfd = False
            return None

    # ------------------------------------------------------------------ destination side

    def _member(
        self, pid: int, tables: dict[str, dict[str, str]], info: Proc | None = None
    ) -> _Member:
        """Read one process of the chain: facts, socket inodes, netns (and its tables, once)."""
        if info is None:
            info = self._procs.proc(pid)
        fds = self._socket_fds(pid)
        inodes = frozenset(fds.values())
        netns = self._procs.netns(pid)
        conns = self._fd_connections(pid, fds)
        if conns is None and inodes and netns not in tables:
            tables[netns] = self._procs.net_tables(pid, _TABLE_NAMES)
        return _Member(info, inodes, netns, conns)

    def _ancestor(self, pid: int, tables: dict[str, dict[str, str]]) -> _Member:
        """A caller's ancestor; one that listens is remembered, held by a pidfd taken before
        it is read (`_listeners`; only where its sockets are read from its fds)."""
        if not self._use_pidfd:
            return self._member(pid, tables)
        member = self._listeners_seen.get(pid)
        if member is not None:
            return member
        pin = self._procs.hold(pid)  # ProcessGone: the chain ends there
        try:
            member = self._member(pid, tables)
        except BaseException:
            pin.close()
            raise
        if member.conns is not None and any(_is_listener(c) for c in member.conns):
            self._listeners_seen.put(pid, member, pin)
        else:
            pin.close()
        return member

    def _chain(self, pid: int, lent: Sequence[Connection] | None = None) -> _Chain:
        """The caller (read at once: it may exit any moment), then ancestors as needed."""
        tables: dict[str, dict[str, str]] = {}
        if lent is None:
            return _Chain(self, [self._member(pid, tables)], tables)
        procs = self._procs
        conns = list(lent)
        first = _Member(procs.proc(pid), frozenset(c.inode for c in conns), procs.netns(pid), conns)
        return _Chain(self, [first], tables)

    def session_connection(
        self, pid: int, rhost: str | None = None, lent: Sequence[Connection] | None = None
    ) -> tuple[Proc, Connection]:
        """The sshd session process (``pid`` or an ancestor) and the connection it serves.

        A connection qualifies when it is established (UDP: connected), comes from ``rhost``
        (if that is an IP literal) and its local port is listened on by an ancestor in the same
        network namespace, or by pid 1 (systemd socket activation). The nearest process with
        exactly one qualifying connection wins; if its parent holds the same socket (sshd's
        forked PAM helper), the topmost such holder is returned. Raises ProcessGone if ``pid``
        is gone, NetinfoError if nothing qualifies or one process holds several ("ambiguous").
        ``lent``: the socket(s) ``pid`` lent with its request as its session's (`lent_connections`:
        the one sshd names), taken in place of what it holds; its fds are then not walked.
        """
        chain = self._chain(pid, lent)
        want = _rhost_ip(rhost)
        init: list[_Member] | None = None  # pid 1, read only when needed
        i = 0
        while (m := chain.get(i)) is not None:
            i += 1
            conns = [c for c in self._connections(chain.tables, m) if _is_connected(c)]
            conns = [c for c in conns if want is None or c.remote.ip == want]
            if not conns:
                continue
            chosen = chain.served_above(i - 1, m, conns)
            if not chosen:
                if init is None:
                    init = self._init_member(chain.tables)
                chosen = [c for c in conns if _served(c, self._listeners(init, m, chain.tables))]
            if len(chosen) == 1:
                top = chain.topmost(i - 1, chosen[0].inode)
                return top.info, self._scoped(m, chosen[0])
            if len(chosen) > 1:
                listed = ", ".join(f"{c.proto} {c.local}<-{c.remote}" for c in chosen)
                msg = f"ambiguous: pid {m.info.pid} holds {len(chosen)} connections: {listed}"
                raise NetinfoError(msg)
        hint = f" from {want}" if want else ""
        msg = f"no connection{hint} served by an ancestor's listener for pid {pid} or its parents"
        raise NetinfoError(msg)

    def _scoped(self, holder: _Member, conn: Connection) -> Connection:
        """``conn`` with the scope of a link-local connection read from /proc/net (which has
        none): the one interface of the holder's namespace carrying its local address. Only
        link-local connections pay this read; 0 is kept when it cannot be told."""
        if conn.scope or not is_link_local(conn.remote.ip):
            return conn
        try:
            scopes = self._procs.link_scopes(conn.local.ip, holder.info.pid)
        except NetinfoError as exc:
            log.debug("scope of %s unknown: %s", conn.remote, exc)
            return conn
        if len(scopes) != 1:
            log.info("link-local %s on %d interfaces: scope unknown", conn.local, len(scopes))
            return conn
        return dataclasses.replace(conn, scope=scopes[0])

    def _init_member(self, tables: dict[str, dict[str, str]]) -> list[_Member]:
        try:
            return [self._ancestor(1, tables)]
        except NetinfoError as exc:
            log.debug("pid 1 not readable for listeners: %s", exc)
            return []

    def _connections(self, tables: dict[str, dict[str, str]], m: _Member) -> list[Connection]:
        if m.conns is not None:
            return m.conns
        return _rows(tables[m.netns], m.inodes) if m.inodes else []

    def _listeners(
        self, holders: list[_Member], conn_holder: _Member, tables: dict[str, dict[str, str]]
    ) -> list[Connection]:
        """Listening sockets of ``holders`` in the namespace of ``conn_holder``."""
        out: list[Connection] = []
        for m in holders:
            if m.netns == conn_holder.netns:
                out.extend(c for c in self._connections(tables, m) if _is_listener(c))
        return out


def _rows(tables: dict[str, str], inodes: frozenset[int]) -> list[Connection]:
    """Rows of ``tables`` whose inode is one of ``inodes`` (others are not decoded)."""
    found: dict[int, Connection] = {}
    for proto, name in _TABLES:
        for line in tables[name].splitlines():
            try:
                if row_inode(line) not in inodes:
                    continue
                row = parse_proc_net_line(line)
            except ValueError as exc:
                msg = f"/proc/net/{name}: {exc}"
                raise NetinfoError(msg) from exc
            if row is not None and row.inode not in found:
                found[row.inode] = _connection(proto, row)
    return list(found.values())


def _rhost_ip(rhost: str | None) -> str | None:
    if not rhost:
        return None
    try:
        return normalize_ip(split_zone(rhost)[0])  # sshd writes a link-local one with its zone
    except ValueError:
        log.debug("rhost %r is not an IP literal; not filtering on it", rhost)
        return None


def _served(conn: Connection, listeners: list[Connection]) -> bool:
    return any(
        lis.proto == conn.proto
        and lis.local.port == conn.local.port
        and (lis.local.ip in UNSPECIFIED or lis.local.ip == conn.local.ip)
        for lis in listeners
    )
