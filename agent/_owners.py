"""The source side of netinfo: which process holds the socket local=src, remote=dst?

An exact NETLINK_SOCK_DIAG lookup gives the inode, owner uid and cgroup id; then only candidate
processes are searched for ``socket:[inode]``: those of the socket's cgroup (cgroup v2), then
those owned by the socket's uid, newest first. /proc/net tables are the fallback when netlink
cannot be used. Every socket seen while searching is remembered (inode -> pid and fd), so a
fan-out's queries read each process once. `NetInfo` (netinfo.py) is built on `SourceSide`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from callerid.agent import _sockdiag as sd
from callerid.agent._procfs import MAX_DEPTH, NetinfoError, ProcessGone, ProcReader
from callerid.bus.protocol import Endpoint

__all__ = ["Owner", "SourceSide"]

log = logging.getLogger("callerid.agent.netinfo")

Proto = Literal["tcp", "udp"]
_MAX_HOLDERS: Final = 1 << 16  # remembered socket holders


@dataclass(frozen=True, slots=True)
class Owner:
    """The process holding a socket; ``uid`` is the socket's owner uid (as sock_diag says)."""

    pid: int
    uid: int
    inode: int
    comm: str


class SourceSide(ProcReader):
    """`socket_owner` and what it remembers (a sock_diag socket per thread, socket holders)."""

    def __init__(
        self,
        proc_root: Path = Path("/proc"),
        *,
        use_netlink: bool = True,
        use_cgroups: bool = True,
        netlink_timeout: float = 1.0,
    ) -> None:
        super().__init__(proc_root)
        self._use_netlink = use_netlink
        self._use_cgroups = use_cgroups
        self._netlink_timeout = netlink_timeout
        self._handlers: dict[str, bool] = {}
        self._cgroups: sd.CgroupProcs | None = None
        self._holders: dict[int, tuple[int, str]] = {}  # socket inode -> (pid, fd) seen holding it
        self._local = threading.local()  # each thread's sock_diag socket
        self._diags: list[sd.SockDiag] = []
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
                comm, _, _ = self._stat(pid)
            except ProcessGone:
                return None
        return Owner(pid=pid, uid=found.uid, inode=found.inode, comm=comm)

    def _find_socket(self, proto: Proto, src: Endpoint, dst: Endpoint) -> sd.DiagSocket | None:
        if self._use_netlink:
            try:
                return self._netlink_socket(proto, src, dst)
            except sd.SockDiagUnavailable as exc:
                with self._lock:
                    if self._use_netlink:
                        log.warning("sock_diag unusable, reading /proc/net instead: %s", exc)
                        self._use_netlink = False
        return self._proc_socket(proto, src, dst)

    def _netlink_socket(self, proto: Proto, src: Endpoint, dst: Endpoint) -> sd.DiagSocket | None:
        families = [socket.AF_INET6] if src.family == 6 else [socket.AF_INET, socket.AF_INET6]
        fallback = None
        diag = self._diag()
        try:
            if proto not in self._handlers:
                self._handlers[proto] = diag.handler_present(proto)
            if not self._handlers[proto]:
                msg = f"the kernel has no sock_diag handler for {proto}"
                raise sd.SockDiagUnavailable(msg)
            for family in families:
                got = diag.lookup(family, proto, (src.ip, src.port), (dst.ip, dst.port))
                match = sd.match_tuple(proto, got, src, dst)
                if match == "exact":
                    return got
                if match == "unconnected" and fallback is None:
                    fallback = got
        except BaseException:
            self._drop_diag(diag)  # a timed-out socket may still get a late answer: a new one
            raise
        return fallback

    def _diag(self) -> sd.SockDiag:
        """This thread's sock_diag socket, kept open (one socket per lookup cost 4 syscalls);
        requests carry increasing sequence numbers and answers to others are skipped."""
        diag: sd.SockDiag | None = getattr(self._local, "diag", None)
        if diag is None:
            diag = sd.SockDiag(self._netlink_timeout)
            self._local.diag = diag
            with self._lock:
                self._diags.append(diag)
        return diag

    def _drop_diag(self, diag: sd.SockDiag) -> None:
        self._local.diag = None
        with self._lock:
            if diag in self._diags:
                self._diags.remove(diag)
        diag.close()

    def _proc_socket(self, proto: Proto, src: Endpoint, dst: Endpoint) -> sd.DiagSocket | None:
        fallback = None
        for name, v6 in ((proto, False), (f"{proto}6", True)):
            if src.family == 6 and not v6:
                continue
            try:
                text = (self._root / "net" / name).read_text()
            except FileNotFoundError:
                continue
            for needle in sd.proc_net_needles(src, dst, v6=v6):
                at = text.find(needle)
                if at < 0:
                    continue
                end = text.find("\n", at)
                line = text[text.rfind("\n", 0, at) + 1 : end if end >= 0 else None]
                try:
                    row = sd.parse_proc_net_line(line)
                except ValueError as exc:
                    msg = f"/proc/net/{name}: {exc}"
                    raise NetinfoError(msg) from exc
                if row is None:
                    continue
                fam = socket.AF_INET6 if v6 else socket.AF_INET
                got = sd.DiagSocket(fam, row.state, row.local, row.remote, row.uid, row.inode, None)
                match = sd.match_tuple(proto, got, src, dst)
                if match == "exact":
                    return got
                if match == "unconnected" and fallback is None:
                    fallback = got
        return fallback

    def _cgroup2_mount(self) -> str | None:
        try:
            text = (self._root / "self" / "mountinfo").read_text()
        except OSError:
            return None
        return next((ln.split()[4] for ln in text.splitlines() if " - cgroup2 " in ln), None)

    def _cgroup_procs(self) -> sd.CgroupProcs:
        with self._lock:
            if self._cgroups is None:
                self._cgroups = sd.CgroupProcs(self._cgroup2_mount())
            return self._cgroups

    def _find_holder(self, sock: sd.DiagSocket) -> tuple[int, str | None] | None:
        """Search only candidates for ``socket:[inode]``: the socket's cgroup, then its uid.

        A holder that changed uid after creating the socket is not found (by design: never
        every /proc/*/fd); vanishing processes are skipped.
        """
        target = f"socket:[{sock.inode}]"
        known = self._holders.get(sock.inode)
        if known is not None and self._link(*known) == target:
            return self._topmost(known[0], target)
        scanned: set[int] = set()
        if self._use_cgroups and sock.cgroup_id is not None:
            for pid in sorted(self._cgroup_procs().pids(sock.cgroup_id) or (), reverse=True):
                scanned.add(pid)
                if self._scan(pid, target):
                    return self._topmost(pid, target)
        procfd = os.open(self._rs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            pids = sorted(self._pids(procfd), reverse=True)  # newest first: ssh just started
            for pid in pids:
                if pid not in scanned and self.owner_uid(pid, procfd) == sock.uid:
                    scanned.add(pid)
                    if self._scan(pid, target):
                        return self._topmost(pid, target)
        finally:
            os.close(procfd)
        log.debug("inode %d: no holder among uid %d processes", sock.inode, sock.uid)
        return None

    def _topmost(self, pid: int, target: str) -> tuple[int, str | None]:
        """Climb from a holder while its parent (of the same uid) holds the same socket too;
        the topmost holder and its comm (None if it could not be read)."""
        uid = self.owner_uid(pid)
        for _ in range(MAX_DEPTH):
            try:
                comm, ppid, _ = self._stat(pid)
            except NetinfoError:
                return pid, None
            if ppid <= 1 or self.owner_uid(ppid) != uid or not self._holds(ppid, target):
                return pid, comm
            pid = ppid
        return pid, None

    def _scan(self, pid: int, target: str) -> bool:
        """Like `_holds`, and remember every socket seen on the way (inode -> pid, fd).

        When mpirun fans out to a thousand nodes, their queries ask for the sockets of
        processes in one job cgroup, one after another; a process read once answers the
        next queries for its other sockets from memory (checked with one readlink).
        """
        found = False
        try:
            dirfd = self._fd_dir(pid)
        except NetinfoError:  # ProcessGone included
            return False
        try:
            for name in os.listdir(dirfd):
                try:
                    link = os.readlink(name, dir_fd=dirfd)
                except OSError:
                    continue
                if link.startswith("socket:["):
                    self._holders[int(link[8:-1])] = (pid, name)
                    found = found or link == target
        except (OSError, ValueError):
            return False
        finally:
            os.close(dirfd)
        if len(self._holders) > _MAX_HOLDERS:
            self._holders.clear()  # a crude bound: the memo refills from the next scans
        return found

    def _link(self, pid: int, fd: str) -> str | None:
        try:
            return os.readlink(f"{self._rs}/{pid}/fd/{fd}")
        except OSError:
            return None

    def _holds(self, pid: int, target: str) -> bool:
        """Whether ``pid`` has an fd linking to ``target``; False if it vanished."""
        try:
            return any(link == target for link in self._fd_links(pid))
        except (OSError, NetinfoError):
            return False


def _close_all(diags: list[sd.SockDiag]) -> None:
    for diag in diags:
        diag.close()
    diags.clear()
