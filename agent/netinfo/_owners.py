"""The source side of netinfo: which process holds the socket local=src, remote=dst?

An exact NETLINK_SOCK_DIAG lookup gives the inode, owner uid and cgroup id; then only candidate
processes are searched for ``socket:[inode]``: those of the socket's cgroup (cgroup v2), then
those owned by the socket's uid, newest first. /proc/net tables are the fallback when netlink
cannot be used. Every socket seen while searching is remembered (inode -> pid and fd), so a
fan-out's queries read each process once. `SocketOwners` holds a `ProcReader` for /proc.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from callerid.agent.memo import Memo
from callerid.agent.netinfo._codec import (
    DiagSocket,
    Proto,
    SockDiagUnavailable,
    best_match,
    is_real_end,
    line_with,
    parse_proc_net_line,
    proc_net_needles,
)
from callerid.agent.netinfo._netlink import CgroupProcs, SockDiag
from callerid.agent.netinfo._proc import MAX_DEPTH, NetinfoError, ProcessGone, ProcReader
from callerid.bus.protocol import Endpoint, is_link_local

__all__ = ["Owner", "SocketOwners"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Owner:
    """The process holding a socket; ``uid`` is the socket's owner uid (as sock_diag says)."""

    pid: int
    uid: int
    inode: int
    comm: str


class SocketOwners:
    """`socket_owner` and what it keeps (a sock_diag socket per thread, socket holders)."""

    def __init__(
        self,
        procs: ProcReader,
        *,
        use_netlink: bool = True,
        use_cgroups: bool = True,
        netlink_timeout: float = 1.0,
        max_holders: int = 65536,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._procs = procs
        self._use_netlink = use_netlink
        self._use_cgroups = use_cgroups
        self._netlink_timeout = netlink_timeout
        self._handlers: dict[str, bool] = {}
        self._cgroups: CgroupProcs | None = None
        # Socket inode -> (pid, fd name) seen holding it. Not true for ever (the fd may be
        # closed, its number reused), so every use checks it first with one readlink of that
        # fd: a link to the same socket:[inode] is the fact itself, whatever its age.
        self._holders: Memo[int, tuple[int, str]] = Memo(
            max_entries=max_holders, ttl_s=None, clock=clock
        )
        self._lock = threading.Lock()
        self._local = threading.local()  # each thread's sock_diag socket
        self._diags: list[SockDiag] = []
        weakref.finalize(self, _close_all, self._diags)  # closed with the object if not before

    def close(self) -> None:
        """Release the cgroup2 mount fd and the sock_diag sockets (reopened if used again)."""
        with self._lock:
            if self._cgroups is not None:
                self._cgroups.close()
                self._cgroups = None
            for diag in self._diags:
                diag.close()
            self._diags.clear()
        self._local = threading.local()

    def socket_owner(
        self, proto: Proto, src: Endpoint, dst: Endpoint, *, uid: int | None = None
    ) -> Owner | None:
        """The process holding the socket local=``src``, remote=``dst`` on this node, or None.

        With ``uid``, a socket owned by another uid is not looked for any further (the
        answer would not be given anyway, and root's many processes are not scanned).
        """
        if not (is_real_end(src) and is_real_end(dst)):
            return None  # a listener's or an unbound end: never an established connection
        found = self._find_socket(proto, src, dst)
        if found is None or found.inode == 0:  # no such socket, or no file (TIME_WAIT, closed)
            return None
        if uid is not None and found.uid != uid:
            log.debug(
                "inode %d belongs to uid %d, not %d: not searched", found.inode, found.uid, uid
            )
            return None
        holder = self._find_holder(found)
        if holder is None:
            return None
        pid, comm = holder
        if comm is None:
            try:
                comm, _, _ = self._procs.stat(pid)
            except ProcessGone:
                return None
        return Owner(pid=pid, uid=found.uid, inode=found.inode, comm=comm)

    def _find_socket(self, proto: Proto, src: Endpoint, dst: Endpoint) -> DiagSocket | None:
        if self._use_netlink:
            try:
                return self._netlink_socket(proto, src, dst)
            except SockDiagUnavailable as exc:
                with self._lock:
                    if self._use_netlink:
                        log.warning("sock_diag unusable, reading /proc/net instead: %s", exc)
                        self._use_netlink = False
        return self._proc_socket(proto, src, dst)

    def _netlink_socket(self, proto: Proto, src: Endpoint, dst: Endpoint) -> DiagSocket | None:
        families = [socket.AF_INET6] if src.family == 6 else [socket.AF_INET, socket.AF_INET6]
        diag = self._diag()
        try:
            if proto not in self._handlers:
                self._handlers[proto] = diag.handler_present(proto)
            if not self._handlers[proto]:
                msg = f"the kernel has no sock_diag handler for {proto}"
                raise SockDiagUnavailable(msg)
            local, remote = (src.ip, src.port), (dst.ip, dst.port)
            found = (
                diag.lookup(family, proto, local, remote, ifindex=ifindex)
                for family in families
                for ifindex in self._scopes(src)
            )
            return best_match(proto, found, src, dst)
        except BaseException:
            self._drop_diag(diag)  # a timed-out socket may still get a late answer: a new one
            raise

    def _scopes(self, src: Endpoint) -> list[int]:
        """The interfaces to look a socket up on: none (0) but for a link-local ``src``, whose
        socket is bound to its interface: each interface of this namespace carrying ``src``
        (the wire's endpoints carry no scope; one address may be on several links)."""
        return self._procs.link_scopes(src.ip) if is_link_local(src.ip) else [0]

    def _diag(self) -> SockDiag:
        """This thread's sock_diag socket, kept open (one socket per lookup cost 4 syscalls);
        requests carry increasing sequence numbers and answers to others are skipped."""
        diag: SockDiag | None = getattr(self._local, "diag", None)
        if diag is None:
            diag = SockDiag(self._netlink_timeout)
            self._local.diag = diag
            with self._lock:
                self._diags.append(diag)
        return diag

    def _drop_diag(self, diag: SockDiag) -> None:
        self._local.diag = None
        with self._lock:
            if diag in self._diags:
                self._diags.remove(diag)
        diag.close()

    def _proc_socket(self, proto: Proto, src: Endpoint, dst: Endpoint) -> DiagSocket | None:
        return best_match(proto, self._proc_rows(proto, src, dst), src, dst)

    def _proc_rows(self, proto: Proto, src: Endpoint, dst: Endpoint) -> Iterator[DiagSocket]:
        """The /proc/net rows that may be the socket, best first (tables read as needed)."""
        for name, v6 in ((proto, False), (f"{proto}6", True)):
            if src.family == 6 and not v6:
                continue
            text = self._procs.own_net_table(name)
            if text is None:
                continue
            fam = socket.AF_INET6 if v6 else socket.AF_INET
            for needle in proc_net_needles(src, dst, v6=v6):
                line = line_with(text, needle)
                try:
                    row = None if line is None else parse_proc_net_line(line)
                except ValueError as exc:
                    msg = f"/proc/net/{name}: {exc}"
                    raise NetinfoError(msg) from exc
                if row is not None:
                    yield DiagSocket(
                        fam, row.state, row.local, row.remote, row.uid, row.inode, None
                    )

    def _cgroup_procs(self) -> CgroupProcs:
        with self._lock:
            if self._cgroups is None:
                self._cgroups = CgroupProcs(self._procs.cgroup2_mount())
            return self._cgroups

    def _find_holder(self, sock: DiagSocket) -> tuple[int, str | None] | None:
        """Search only candidates for ``socket:[inode]``: the socket's cgroup, then its uid.

        A holder that changed uid after creating the socket is not found (by design: never
        every /proc/*/fd); vanishing processes are skipped.
        """
        target = f"socket:[{sock.inode}]"
        known = self._holders.get(sock.inode)
        if known is not None and self._procs.fd_link(*known) == target:
            return self._topmost(known[0], target)
        scanned: set[int] = set()
        if self._use_cgroups and sock.cgroup_id is not None:
            for pid in sorted(self._cgroup_procs().pids(sock.cgroup_id) or (), reverse=True):
                scanned.add(pid)
                if self._scan(pid, target):
                    return self._topmost(pid, target)
        for pid in self._procs.pids_of_uid(sock.uid, skip=scanned):  # newest: ssh just started
            if self._scan(pid, target):
                return self._topmost(pid, target)
        log.debug("inode %d: no holder among uid %d processes", sock.inode, sock.uid)
        return None

    def _topmost(self, pid: int, target: str) -> tuple[int, str | None]:
        """Climb from a holder while its parent (of the same uid) holds the same socket too;
        the topmost holder and its comm (None if it could not be read)."""
        uid = self._procs.owner_uid(pid)
        for _ in range(MAX_DEPTH):
            try:
                comm, ppid, _ = self._procs.stat(pid)
            except NetinfoError:
                return pid, None
            if ppid <= 1 or self._procs.owner_uid(ppid) != uid or not self._holds(ppid, target):
                return pid, comm
            pid = ppid
        return pid, None

    def _scan(self, pid: int, target: str) -> bool:
        """Like `_holds`, and remember every socket seen on the way (inode -> pid, fd).

        When mpirun fans out to a thousand nodes, their queries ask for the sockets of
        processes in one job cgroup, one after another; a process read once answers the
        next queries for its other sockets from memory (checked with one readlink).
        """
        want = int(target[8:-1])
        try:
            seen = [
                (int(link[8:-1]), (pid, name))
                for name, link in self._procs.fd_links(pid)
                if link.startswith("socket:[")
            ]
        except (OSError, ValueError, NetinfoError):  # ProcessGone included
            return False
        self._holders.put_many(seen)
        return any(inode == want for inode, _ in seen)

    def _holds(self, pid: int, target: str) -> bool:
        """Whether ``pid`` has an fd linking to ``target``; False if it vanished."""
        try:
            return any(link == target for _, link in self._procs.fd_links(pid))
        except (OSError, NetinfoError):
            return False


def _close_all(diags: list[SockDiag]) -> None:
    for diag in diags:
        diag.close()
    diags.clear()
