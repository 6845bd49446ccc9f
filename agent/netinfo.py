"""Process and socket facts: the one module that reads /proc and speaks NETLINK_SOCK_DIAG.

Two questions are answered here, both synchronous (the daemon calls them from worker threads):

* Destination side, `NetInfo.session_connection`: which inet connection does the sshd session
  that called PAM hold? Walk from the caller up its ancestors to the first process holding an
  established connection whose local port is served by a listener held by one of *its*
  ancestors (sshd's listener, or pid 1 for socket activation). Each process's sockets are
  looked up in that process's own network namespace (/proc/<pid>/net/...).
* Source side, `NetInfo.socket_owner`: which process owns the socket local=src, remote=dst?
  An exact sock_diag lookup gives the inode, owner uid and cgroup id; then only candidate
  processes are searched for ``socket:[inode]``: those of the socket's cgroup (cgroup v2), then
  those owned by the socket's uid, newest first. /proc/net tables are the fallback when netlink
  cannot be used. The byte codecs live in `_sockdiag`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from callerid.agent import _sockdiag as sd
from callerid.agent import _sockfd
from callerid.bus.protocol import Endpoint, normalize_ip

__all__ = ["Connection", "NetInfo", "NetinfoError", "Owner", "Proc", "ProcInfo", "ProcessGone"]

log = logging.getLogger(__name__)

Proto = Literal["tcp", "udp"]
_TABLES: Final[tuple[tuple[Proto, str], ...]] = (
    ("tcp", "tcp"),
    ("tcp", "tcp6"),
    ("udp", "udp"),
    ("udp", "udp6"),
)
_MAX_HOLDERS: Final = 1 << 16  # remembered socket holders (source side)
_MAX_DEPTH: Final = 512  # bound on ancestor walks (a pid chain cannot really be this long)
_UNSPECIFIED: Final = frozenset({"0.0.0.0", "::"})
_READ_CHUNK: Final = 8192
LISTENER_TTL_S: Final = 5.0  # how long a listening ancestor's sockets are remembered
_MAX_LISTENERS: Final = 1024
_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


class NetinfoError(Exception):
    """A fact could not be established; the message is fit for a log line or journal reason."""


class ProcessGone(NetinfoError):
    """The process vanished (or never existed)."""

    def __init__(self, pid: int) -> None:
        super().__init__(f"process {pid} is gone")
        self.pid = pid


@dataclass(frozen=True, slots=True)
class Connection:
    """One inet socket as its holder sees it (``local`` is this node's end)."""

    proto: Proto
    local: Endpoint
    remote: Endpoint
    inode: int
    uid: int
    state: str


@dataclass(frozen=True, slots=True)
class Proc:
    """A process of a session's chain: ``start_time`` epoch seconds."""

    pid: int
    ppid: int
    comm: str
    start_time: float


@dataclass(frozen=True, slots=True)
class ProcInfo:
    """A process: ``uid`` is its effective uid, ``start_time`` epoch seconds."""

    pid: int
    ppid: int
    uid: int
    comm: str
    start_time: float


@dataclass(frozen=True, slots=True)
class Owner:
    """The process holding a socket; ``uid`` is the socket's owner uid (as sock_diag says)."""

    pid: int
    uid: int
    inode: int
    comm: str


def _endpoint(addr: tuple[str, int]) -> Endpoint:
    return Endpoint(normalize_ip(addr[0]), addr[1])


def _connection(proto: Proto, row: sd.ProcNetRow) -> Connection:
    return Connection(
        proto=proto,
        local=_endpoint(row.local),
        remote=_endpoint(row.remote),
        inode=row.inode,
        uid=row.uid,
        state=sd.state_name(proto, row.state),
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
        self, ni: NetInfo, members: list[_Member], tables: dict[str, dict[str, str]]
    ) -> None:
        self.ni = ni
        self.members = members
        self.tables = tables

    def get(self, i: int) -> _Member | None:
        while len(self.members) <= i:
            last = self.members[-1]
            if last.info.ppid <= 1 or len(self.members) >= _MAX_DEPTH:
                return None
            try:
                self.members.append(self.ni._ancestor(last.info.ppid, self.tables))
            except ProcessGone:
                return None  # a parent exiting mid-walk ends the chain
        return self.members[i]

    def served_above(self, i: int, holder: _Member, conns: list[Connection]) -> list[Connection]:
        """Those of ``conns`` (held by member ``i``) that the nearest ancestor with a matching
        listener (in ``holder``'s netns) serves; ancestors are read only this far."""
        j = i + 1
        while (m := self.get(j)) is not None:
            listeners = self.ni._listeners([m], holder, self.tables)
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


def _from_facts(f: _sockfd.SockFacts) -> Connection:
    proto: Proto = "tcp" if f.proto == "tcp" else "udp"
    return Connection(proto, _endpoint(f.local), _endpoint(f.remote), f.inode, f.uid, f.state)


class NetInfo:
    """Reads process and socket facts from ``proc_root`` (and netlink unless disabled)."""

    def __init__(
        self,
        proc_root: Path = Path("/proc"),
        *,
        use_netlink: bool = True,
        use_cgroups: bool = True,
        use_pidfd: bool = True,
        netlink_timeout: float = 1.0,
    ) -> None:
        self._root = proc_root
        self._rs = str(proc_root)
        self._use_netlink = use_netlink
        self._use_cgroups = use_cgroups
        self._use_pidfd = use_pidfd and proc_root == Path("/proc")
        self._netlink_timeout = netlink_timeout
        self._handlers: dict[str, bool] = {}
        self._btime: float | None = None
        self._cgroups: sd.CgroupProcs | None = None
        self._lock = threading.Lock()
        self._holders: dict[int, tuple[int, str]] = {}  # socket inode -> (pid, fd) seen holding it
        self._local = threading.local()  # each thread's sock_diag socket
        self._diags: list[sd.SockDiag] = []
        self._listeners_seen: dict[tuple[int, float], tuple[float, _Member]] = {}
        weakref.finalize(self, _close_all, self._diags)  # closed with the object if not before

    def close(self) -> None:
        """Release the cgroup2 mount fd held for the cgroup fast path (reopened if used again)."""
        with self._lock:
            if self._cgroups is not None:
                self._cgroups.close()
                self._cgroups = None
            for diag in self._diags:
                diag.close()
            self._diags.clear()
        self._local = threading.local()

    # ------------------------------------------------------------------ processes

    def _read(self, pid: int, name: str) -> str:
        """A /proc/<pid> file's text: raw os calls, no buffered file object (a login reads
        several of these; open() would add an fstat, an ioctl and an lseek to each)."""
        try:
            fd = os.open(f"{self._rs}/{pid}/{name}", os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError) as exc:
            raise ProcessGone(pid) from exc
        except OSError as exc:
            msg = f"cannot read /proc/{pid}/{name}: {exc.strerror}"
            raise NetinfoError(msg) from exc
        try:
            chunks = [os.read(fd, _READ_CHUNK)]
            while len(chunks[-1]) == _READ_CHUNK:
                chunks.append(os.read(fd, _READ_CHUNK))
        except ProcessLookupError as exc:
            raise ProcessGone(pid) from exc
        except OSError as exc:
            msg = f"cannot read /proc/{pid}/{name}: {exc.strerror}"
            raise NetinfoError(msg) from exc
        finally:
            os.close(fd)
        return b"".join(chunks).decode("utf-8", "replace")

    def _boot_time(self) -> float:
        if self._btime is None:
            for line in (self._root / "stat").read_text().splitlines():
                if line.startswith("btime "):
                    self._btime = float(line.split()[1])
                    break
            else:
                msg = f"no btime in {self._root}/stat"
                raise NetinfoError(msg)
        return self._btime

    def _stat(self, pid: int) -> tuple[str, int, int]:
        """(comm, ppid, start ticks) of ``pid``."""
        try:
            return sd.parse_stat(self._read(pid, "stat"))
        except ValueError as exc:
            msg = f"/proc/{pid}/stat: {exc}"
            raise NetinfoError(msg) from exc

    def process(self, pid: int) -> ProcInfo:
        """Facts about ``pid``; ProcessGone if it does not exist."""
        if pid <= 0:
            raise ProcessGone(pid)
        comm, ppid, ticks = self._stat(pid)
        try:
            uid = sd.parse_status_euid(self._read(pid, "status"))
        except ValueError as exc:
            msg = f"/proc/{pid}/status: {exc}"
            raise NetinfoError(msg) from exc
        return ProcInfo(pid=pid, ppid=ppid, uid=uid, comm=comm, start_time=self._start(ticks))

    def _start(self, ticks: int) -> float:
        return self._boot_time() + ticks / _CLK_TCK

    def _brief(self, pid: int) -> Proc:
        """`process` without the uid (one file read instead of two): a chain member's facts."""
        if pid <= 0:
            raise ProcessGone(pid)
        comm, ppid, ticks = self._stat(pid)
        return Proc(pid=pid, ppid=ppid, comm=comm, start_time=self._start(ticks))

    def ancestors(self, pid: int) -> list[ProcInfo]:
        """``pid`` first, then its parents up to (excluding) pid 1 / 0."""
        chain = [self.process(pid)]
        while chain[-1].ppid > 1 and len(chain) < _MAX_DEPTH:
            try:
                chain.append(self.process(chain[-1].ppid))
            except ProcessGone:
                break  # a parent exiting mid-walk ends the chain
        return chain

    def cgroup_paths(self, pid: int) -> dict[str, str]:
        """/proc/<pid>/cgroup as {controllers: path}; the cgroup v2 entry ``0::`` has key ""."""
        paths: dict[str, str] = {}
        for line in self._read(pid, "cgroup").splitlines():
            parts = line.split(":", 2)
            if len(parts) == 3:
                paths[parts[1]] = parts[2]
        return paths

    def _pids(self, dirfd: int | None = None) -> list[int]:
        return [int(n) for n in os.listdir(self._rs if dirfd is None else dirfd) if n.isdigit()]

    def _owner_uid(self, pid: int, dirfd: int | None = None) -> int | None:
        """Owner of /proc/<pid>: the effective uid; ``dirfd`` (open /proc) saves a path walk."""
        try:
            if dirfd is None:
                return os.stat(f"{self._rs}/{pid}").st_uid
            return os.stat(str(pid), dir_fd=dirfd).st_uid
        except OSError:
            return None

    def pids_of_uid(self, uid: int) -> list[int]:
        """Pids whose /proc/<pid> is owned by ``uid`` (its effective uid, if dumpable)."""
        return sorted(p for p in self._pids() if self._owner_uid(p) == uid)

    # ------------------------------------------------------------------ sockets of a process

    def _fd_links(self, pid: int) -> Iterator[str]:
        """Targets of /proc/<pid>/fd/* (readlink relative to the open directory: ~30% faster).

        Raises OSError if the fd directory cannot be opened; fds closed meanwhile are skipped.
        """
        dirfd = os.open(f"{self._rs}/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for name in os.listdir(dirfd):
                try:
                    yield os.readlink(name, dir_fd=dirfd)
                except OSError:
                    continue
        finally:
            os.close(dirfd)

    def _socket_fds(self, pid: int) -> dict[int, int]:
        """fd number -> socket inode, for every socket fd of ``pid``."""
        out: dict[int, int] = {}
        try:
            dirfd = os.open(f"{self._rs}/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError) as exc:
            raise ProcessGone(pid) from exc
        except OSError as exc:
            msg = f"cannot list /proc/{pid}/fd: {exc.strerror}"
            raise NetinfoError(msg) from exc
        try:
            for name in os.listdir(dirfd):
                try:
                    target = os.readlink(name, dir_fd=dirfd)
                except OSError:
                    continue
                if target.startswith("socket:[") and name.isdigit():
                    out[int(name)] = int(target[8:-1])
        finally:
            os.close(dirfd)
        return out

    def _socket_inodes(self, pid: int) -> frozenset[int]:
        return frozenset(self._socket_fds(pid).values())

    def _fd_connections(self, pid: int, fds: dict[int, int]) -> list[Connection] | None:
        """The inet sockets of ``pid`` read through pidfd_getfd; None when unavailable."""
        if not self._use_pidfd or not fds:
            return None
        try:
            inet = _sockfd.inet_fds(f"{self._rs}/{pid}", sorted(fds))
            return [_from_facts(f) for f in _sockfd.socket_facts(pid, inet)] if inet else []
        except ProcessLookupError as exc:
            raise ProcessGone(pid) from exc
        except _sockfd.Unsupported as exc:
            log.info("pidfd_getfd unavailable (%s): reading /proc/<pid>/net instead", exc)
            self._use_pidfd = False
            return None

    def _scan(self, pid: int, target: str) -> bool:
        """Like `_holds`, and remember every socket seen on the way (inode -> pid, fd).

        When mpirun fans out to a thousand nodes, their queries ask for the sockets of
        processes in one job cgroup, one after another; a process read once answers the
        next queries for its other sockets from memory (checked with one readlink).
        """
        found = False
        try:
            dirfd = os.open(f"{self._rs}/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
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
        except OSError:
            return False

    def _netns(self, pid: int) -> str:
        try:
            return os.readlink(f"{self._rs}/{pid}/ns/net")
        except OSError:
            return f"pid:{pid}"  # unknown: never share tables with another process

    def _tables(self, pid: int) -> dict[str, str]:
        """The four socket tables of ``pid``'s network namespace (missing ones are empty)."""
        out = {}
        for _, name in _TABLES:
            try:
                out[name] = (self._root / str(pid) / "net" / name).read_text()
            except FileNotFoundError:
                if not (self._root / str(pid)).exists():
                    raise ProcessGone(pid) from None
                out[name] = ""  # e.g. IPv6 disabled
            except ProcessLookupError as exc:
                raise ProcessGone(pid) from exc
        return out

    # ------------------------------------------------------------------ destination side

    def _member(
        self, pid: int, tables: dict[str, dict[str, str]], info: Proc | None = None
    ) -> _Member:
        """Read one process of the chain: facts, socket inodes, netns (and its tables, once)."""
        if info is None:
            info = self._brief(pid)
        fds = self._socket_fds(pid)
        inodes = frozenset(fds.values())
        netns = self._netns(pid)
        conns = self._fd_connections(pid, fds)
        if conns is None and inodes and netns not in tables:
            tables[netns] = self._tables(pid)
        return _Member(info, inodes, netns, conns)

    def _ancestor(self, pid: int, tables: dict[str, dict[str, str]]) -> _Member:
        """A caller's ancestor. One that listens (sshd's listener, pid 1) is remembered for
        LISTENER_TTL_S by pid and start time: every login asks about the same listener, and
        what it listens on does not change between logins (a login on a port it stopped
        listening on a moment ago was still accepted by it)."""
        info = self._brief(pid)
        key = (pid, info.start_time)
        now = time.monotonic()
        hit = self._listeners_seen.get(key)
        if hit is not None and now < hit[0]:
            return hit[1]
        member = self._member(pid, tables, info)
        if member.conns is not None and any(_is_listener(c) for c in member.conns):
            if len(self._listeners_seen) >= _MAX_LISTENERS:
                self._listeners_seen.clear()
            self._listeners_seen[key] = (now + LISTENER_TTL_S, member)
        return member

    def _chain(self, pid: int) -> _Chain:
        """The caller (read at once: it may exit any moment), then ancestors as needed."""
        tables: dict[str, dict[str, str]] = {}
        return _Chain(self, [self._member(pid, tables)], tables)

    def session_connection(self, pid: int, rhost: str | None = None) -> tuple[Proc, Connection]:
        """The sshd session process (``pid`` or an ancestor) and the connection it serves.

        A connection qualifies when it is established (UDP: connected), comes from ``rhost``
        (if that is an IP literal) and its local port is listened on by an ancestor in the same
        network namespace, or by pid 1 (systemd socket activation). The nearest process with
        exactly one qualifying connection wins; if its parent holds the same socket (sshd's
        forked PAM helper), the topmost such holder is returned. Raises ProcessGone if ``pid``
        is gone, NetinfoError if nothing qualifies or one process holds several ("ambiguous").
        """
        chain = self._chain(pid)
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
                return top.info, chosen[0]
            if len(chosen) > 1:
                listed = ", ".join(f"{c.proto} {c.local}<-{c.remote}" for c in chosen)
                msg = f"ambiguous: pid {m.info.pid} holds {len(chosen)} connections: {listed}"
                raise NetinfoError(msg)
        hint = f" from {want}" if want else ""
        msg = f"no connection{hint} served by an ancestor's listener for pid {pid} or its parents"
        raise NetinfoError(msg)

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

    # ------------------------------------------------------------------ source side

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
                if pid not in scanned and self._owner_uid(pid, procfd) == sock.uid:
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
        uid = self._owner_uid(pid)
        for _ in range(_MAX_DEPTH):
            try:
                comm, ppid, _ = self._stat(pid)
            except NetinfoError:
                return pid, None
            if ppid <= 1 or self._owner_uid(ppid) != uid or not self._holds(ppid, target):
                return pid, comm
            pid = ppid
        return pid, None


def _close_all(diags: list[sd.SockDiag]) -> None:
    for diag in diags:
        diag.close()
    diags.clear()


def _rows(tables: dict[str, str], inodes: frozenset[int]) -> list[Connection]:
    """Rows of ``tables`` whose inode is one of ``inodes`` (others are not decoded)."""
    found: dict[int, Connection] = {}
    for proto, name in _TABLES:
        for line in tables[name].splitlines():
            try:
                if sd.row_inode(line) not in inodes:
                    continue
                row = sd.parse_proc_net_line(line)
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
        return normalize_ip(rhost)
    except ValueError:
        log.debug("rhost %r is not an IP literal; not filtering on it", rhost)
        return None


def _served(conn: Connection, listeners: list[Connection]) -> bool:
    return any(
        lis.proto == conn.proto
        and lis.local.port == conn.local.port
        and (lis.local.ip in _UNSPECIFIED or lis.local.ip == conn.local.ip)
        for lis in listeners
    )
