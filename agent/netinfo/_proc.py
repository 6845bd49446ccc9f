"""The /proc reader of netinfo (and of the whole agent): `ProcReader`, `read_proc`, the errors.

`ProcReader` reads one process's facts (stat, cgroup, owner, network namespace and its socket
tables) with raw os calls, lists pids, and walks a process's fds (`fd_links`: the one fd walk
of the agent), and pins a process by its identity (`Pin`). The session side, the source
side, the login flow and the backends all hold one. The text it
reads is decoded by `_codec`.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import select
from collections.abc import Container, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from callerid.agent.netinfo._codec import parse_stat

__all__ = ["MAX_DEPTH", "NetinfoError", "Pin", "Proc", "ProcReader", "ProcessGone", "read_proc"]

MAX_DEPTH: Final = 512  # bound on ancestor walks (a pid chain cannot really be this long)
_READ_CHUNK: Final = 8192
_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_ONE_RECORD: Final = frozenset({"stat", "cgroup"})  # single_open files (see read_proc)


def read_proc(path: str, *, one_record: bool = False) -> str | None:
    """The text of a /proc file, or None when its process is gone; other OSErrors raise.

    Raw os calls, no buffered file object: a login reads several of these, and open() would
    add an fstat, an ioctl and an lseek to each. ``one_record``: the file is one seq_file
    record (/proc/<pid>/stat, /proc/<pid>/cgroup: single_open), produced whole into the read
    buffer, so a read shorter than asked is the end (one read, not a second one that returns
    nothing); other procfs files may return short reads before their end."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        return None
    try:
        chunks = [os.read(fd, _READ_CHUNK)]
        while chunks[-1] and not (one_record and len(chunks[-1]) < _READ_CHUNK):
            chunks.append(os.read(fd, _READ_CHUNK))
    except ProcessLookupError:
        return None
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", "replace")


class NetinfoError(Exception):
    """A fact could not be established; the message is fit for a log line or journal reason."""


class ProcessGone(NetinfoError):
    """The process vanished (or never existed)."""

    def __init__(self, pid: int) -> None:
        super().__init__(f"process {pid} is gone")
        self.pid = pid


@dataclass(frozen=True, slots=True)
class Proc:
    """A process of a session's chain: ``start_time`` epoch seconds."""

    pid: int
    ppid: int
    comm: str
    start_time: float


class ProcReader:
    """Facts about processes under ``proc_root``."""

    def __init__(self, proc_root: Path = Path("/proc")) -> None:
        self.root = proc_root
        self._rs = str(proc_root)
        self._btime: float | None = None

    def pid_dir(self, pid: int) -> str:
        """/proc/<pid> as a string (for the calls that take a path)."""
        return f"{self._rs}/{pid}"

    def _read(self, pid: int, name: str) -> str:
        """/proc/<pid>/<name>; ProcessGone if the process is gone."""
        try:
            text = read_proc(f"{self._rs}/{pid}/{name}", one_record=name in _ONE_RECORD)
        except OSError as exc:
            msg = f"cannot read /proc/{pid}/{name}: {exc.strerror}"
            raise NetinfoError(msg) from exc
        if text is None:
            raise ProcessGone(pid)
        return text

    def boot_time(self) -> float:
        """Boot time, epoch seconds (/proc/stat's btime, read once: it would drift)."""
        if self._btime is None:
            for line in (self.root / "stat").read_text().splitlines():
                if line.startswith("btime "):
                    self._btime = float(line.split()[1])
                    break
            else:
                msg = f"no btime in {self.root}/stat"
                raise NetinfoError(msg)
        return self._btime

    def stat(self, pid: int) -> tuple[str, int, int]:
        """(comm, ppid, start ticks) of ``pid``; ProcessGone if it is gone."""
        try:
            return parse_stat(self._read(pid, "stat"))
        except ValueError as exc:
            msg = f"/proc/{pid}/stat: {exc}"
            raise NetinfoError(msg) from exc

    def _start(self, ticks: int) -> float:
        return self.boot_time() + ticks / _CLK_TCK

    def proc(self, pid: int) -> Proc:
        """``pid``'s facts (one file read); ProcessGone if it does not exist."""
        if pid <= 0:
            raise ProcessGone(pid)
        comm, ppid, ticks = self.stat(pid)
        return Proc(pid=pid, ppid=ppid, comm=comm, start_time=self._start(ticks))

    def start_time(self, pid: int) -> float | None:
        """Start of ``pid`` (epoch seconds), or None when it is gone or unreadable."""
        try:
            return self._start(self.stat(pid)[2])
        except NetinfoError:
            return None

    def hold(self, pid: int) -> Pin:
        """Hold whatever process has ``pid`` now (a pidfd; its identity not checked: a start
        time read *after* this names the held process, if it is alive once done with); see
        `Pin`. ProcessGone when there is none."""
        try:
            fd = os.pidfd_open(pid)
        except OSError as exc:
            if exc.errno in (errno.ESRCH, errno.EINVAL):
                raise ProcessGone(pid) from exc
            msg = f"cannot open a pidfd on {pid}: {exc.strerror}"
            raise NetinfoError(msg) from exc
        return Pin(pid, fd)

    def pin(self, pid: int, start_time: float | None) -> Pin:
        """Hold ``pid`` if it is still the process that started at ``start_time`` (None:
        whatever process has the pid now); ProcessGone when it is not. See `Pin`."""
        held = self.hold(pid)
        if start_time is not None and self.start_time(pid) != start_time:
            held.close()
            raise ProcessGone(pid)
        return held

    def owner_uid(self, pid: int, dirfd: int | None = None) -> int | None:
        """Owner of /proc/<pid>: the effective uid; ``dirfd`` (open /proc) saves a path walk."""
        try:
            if dirfd is None:
                return os.stat(f"{self._rs}/{pid}").st_uid
            return os.stat(str(pid), dir_fd=dirfd).st_uid
        except OSError:
            return None

    def effective_gid(self, pid: int) -> int | None:
        """``pid``'s effective gid (/proc/<pid>/status ``Gid:``), or None when it is gone."""
        text = read_proc(f"{self._rs}/{pid}/status")
        line = next((x for x in (text or "").splitlines() if x.startswith("Gid:")), "")
        fields = line.split()  # "Gid:", real, effective, saved, fs
        return int(fields[2]) if len(fields) > 2 and fields[2].isdigit() else None

    def cgroup_text(self, pid: int) -> str | None:
        """/proc/<pid>/cgroup as it is, or None when the process is gone."""
        return read_proc(f"{self._rs}/{pid}/cgroup", one_record=True)

    def pids_of_uid(self, uid: int, *, skip: Container[int] = ()) -> Iterator[int]:
        """Pids whose /proc/<pid> is owned by ``uid`` (its effective uid, if dumpable), newest
        (highest) first, but not those in ``skip`` (not even looked at); /proc stays open
        while the caller goes through them (one path walk fewer per pid)."""
        dirfd = os.open(self._rs, _DIR_FLAGS)
        try:
            pids = sorted((int(n) for n in os.listdir(dirfd) if n.isdigit()), reverse=True)
            for pid in pids:
                if pid not in skip and self.owner_uid(pid, dirfd) == uid:
                    yield pid
        finally:
            os.close(dirfd)

    # ------------------------------------------------------------------ fds

    def fd_links(self, pid: int) -> Iterator[tuple[str, str]]:
        """(fd name, link target) of each of /proc/<pid>/fd/*; fds closed meanwhile are skipped.

        The directory is opened once and read relative to it (readlink with dir_fd is ~30%
        faster than by path). Raises ProcessGone if the process is gone, NetinfoError if its fds
        cannot be listed, OSError if listing fails midway."""
        try:
            dirfd = os.open(f"{self._rs}/{pid}/fd", _DIR_FLAGS)
        except (FileNotFoundError, ProcessLookupError) as exc:
            raise ProcessGone(pid) from exc
        except OSError as exc:
            msg = f"cannot list /proc/{pid}/fd: {exc.strerror}"
            raise NetinfoError(msg) from exc
        try:
            for name in os.listdir(dirfd):
                try:
                    yield name, os.readlink(name, dir_fd=dirfd)
                except OSError:
                    continue
        finally:
            os.close(dirfd)

    def fd_link(self, pid: int, fd: str) -> str | None:
        """The target of /proc/<pid>/fd/<fd>, or None (closed, or the process is gone)."""
        try:
            return os.readlink(f"{self._rs}/{pid}/fd/{fd}")
        except OSError:
            return None

    # ------------------------------------------------------------------ network namespaces

    def netns(self, pid: int) -> str:
        """An id of ``pid``'s network namespace (one of its own if it cannot be read)."""
        try:
            return os.readlink(f"{self._rs}/{pid}/ns/net")
        except OSError:
            return f"pid:{pid}"  # unknown: never share tables with another process

    def net_tables(self, pid: int, names: tuple[str, ...]) -> dict[str, str]:
        """/proc/<pid>/net/<name> of ``pid``'s namespace for each name (missing ones are empty);
        ProcessGone if the process is gone."""
        out = {}
        for name in names:
            try:
                out[name] = (self.root / str(pid) / "net" / name).read_text()
            except FileNotFoundError:
                if not (self.root / str(pid)).exists():
                    raise ProcessGone(pid) from None
                out[name] = ""  # e.g. IPv6 disabled
            except ProcessLookupError as exc:
                raise ProcessGone(pid) from exc
        return out

    def own_net_table(self, name: str) -> str | None:
        """/proc/net/<name> of the agent's own namespace, or None if there is none."""
        try:
            return (self.root / "net" / name).read_text()
        except FileNotFoundError:
            return None

    def link_scopes(self, ip: str, pid: int | None = None) -> list[int]:
        """Indexes of the interfaces carrying the IPv6 address ``ip`` in ``pid``'s network
        namespace (None: the agent's), from /proc/net/if_inet6 (rows: 32 hex digits of address,
        ifindex in hex, prefix length, scope, flags, name); ProcessGone if ``pid`` is gone."""
        if pid is None:
            text = self.own_net_table("if_inet6") or ""
        else:
            text = self.net_tables(pid, ("if_inet6",))["if_inet6"]
        want = ipaddress.IPv6Address(ip).packed.hex()
        rows = (line.split() for line in text.splitlines())
        return [int(f[1], 16) for f in rows if len(f) >= 6 and f[0].lower() == want]

    def cgroup2_mount(self) -> str | None:
        """Where cgroup v2 is mounted (the agent's /proc/self/mountinfo), or None."""
        try:
            text = (self.root / "self" / "mountinfo").read_text()
        except OSError:
            return None
        return next((ln.split()[4] for ln in text.splitlines() if " - cgroup2 " in ln), None)


class Pin:
    """A process held by its identity while something is done to it by pid.

    A cgroup write (``cgroup.procs``) and slurmstepd's ADD_EXTERN_PID name a process by its
    pid, and a pid is reused once its process has exited and been reaped. The login flow
    identified the sshd process by pid *and* start time; `ProcReader.pin` opens a pidfd on the
    pid and then checks the start time again: if it still matches, the pidfd refers to that
    very process (it held the pid all along: a pid belongs to one process until that one is
    reaped). After the adoption `exited()` polls the pidfd: a process still alive after the
    write was alive during it, so the pid named it and no other. Only a process that exited
    meanwhile leaves the question open; the adoption is then reported as failed.

    `ProcReader.hold` is the same pidfd opened *before* the start time is read (the login
    flow pins its caller so, and reads it once): if the held process is alive after the
    adoption, it held the pid from the hold through the read to the write, so the start time
    read was its own.
    """

    __slots__ = ("fd", "pid")

    def __init__(self, pid: int, fd: int) -> None:
        self.pid = pid
        self.fd = fd

    def exited(self) -> bool:
        """Whether the process has exited since it was pinned (its pidfd polls readable)."""
        poller = select.poll()  # not select(): the agent may hold more than 1024 fds
        poller.register(self.fd, select.POLLIN)
        return bool(poller.poll(0))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
