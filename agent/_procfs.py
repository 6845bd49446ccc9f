"""Process facts read from /proc: the base of `NetInfo` (see netinfo.py).

`ProcReader` reads one process's stat/status/cgroup files with raw os calls, lists pids and
fd links; `ProcessGone` and `NetinfoError` are the errors of all of netinfo. The backends use
it too (`read_proc`, `ProcReader.start_time`, `.owner_uid`, `.cgroup_text`): one reader of
/proc for the whole agent.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from callerid.agent import _sockdiag as sd

__all__ = ["NetinfoError", "Proc", "ProcInfo", "ProcReader", "ProcessGone", "read_proc"]

MAX_DEPTH: Final = 512  # bound on ancestor walks (a pid chain cannot really be this long)
_READ_CHUNK: Final = 8192
_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


def read_proc(path: str) -> str | None:
    """The text of a /proc file, or None when its process is gone; other OSErrors raise.

    Raw os calls, no buffered file object: a login reads several of these, and open() would
    add an fstat, an ioctl and an lseek to each."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        return None
    try:
        chunks = [os.read(fd, _READ_CHUNK)]
        while chunks[-1]:
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


@dataclass(frozen=True, slots=True)
class ProcInfo:
    """A process: ``uid`` is its effective uid, ``start_time`` epoch seconds."""

    pid: int
    ppid: int
    uid: int
    comm: str
    start_time: float


class ProcReader:
    """Facts about processes under ``proc_root``."""

    def __init__(self, proc_root: Path = Path("/proc")) -> None:
        self._root = proc_root
        self._rs = str(proc_root)
        self._btime: float | None = None
        self._lock = threading.Lock()

    def _read(self, pid: int, name: str) -> str:
        """/proc/<pid>/<name>; ProcessGone if the process is gone."""
        try:
            text = read_proc(f"{self._rs}/{pid}/{name}")
        except OSError as exc:
            msg = f"cannot read /proc/{pid}/{name}: {exc.strerror}"
            raise NetinfoError(msg) from exc
        if text is None:
            raise ProcessGone(pid)
        return text

    def boot_time(self) -> float:
        """Boot time, epoch seconds (/proc/stat's btime, read once: it would drift)."""
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
        return self.boot_time() + ticks / _CLK_TCK

    def _brief(self, pid: int) -> Proc:
        """`process` without the uid (one file read instead of two): a chain member's facts."""
        if pid <= 0:
            raise ProcessGone(pid)
        comm, ppid, ticks = self._stat(pid)
        return Proc(pid=pid, ppid=ppid, comm=comm, start_time=self._start(ticks))

    def ancestors(self, pid: int) -> list[ProcInfo]:
        """``pid`` first, then its parents up to (excluding) pid 1 / 0."""
        chain = [self.process(pid)]
        while chain[-1].ppid > 1 and len(chain) < MAX_DEPTH:
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

    def owner_uid(self, pid: int, dirfd: int | None = None) -> int | None:
        """Owner of /proc/<pid>: the effective uid; ``dirfd`` (open /proc) saves a path walk."""
        try:
            if dirfd is None:
                return os.stat(f"{self._rs}/{pid}").st_uid
            return os.stat(str(pid), dir_fd=dirfd).st_uid
        except OSError:
            return None

    def start_time(self, pid: int) -> float | None:
        """Start of ``pid`` (epoch seconds), or None when it is gone or unreadable."""
        try:
            return self._start(self._stat(pid)[2])
        except NetinfoError:
            return None

    def cgroup_text(self, pid: int) -> str | None:
        """/proc/<pid>/cgroup as it is, or None when the process is gone."""
        return read_proc(f"{self._rs}/{pid}/cgroup")

    def pids_of_uid(self, uid: int) -> list[int]:
        """Pids whose /proc/<pid> is owned by ``uid`` (its effective uid, if dumpable)."""
        return sorted(p for p in self._pids() if self.owner_uid(p) == uid)

    def _fd_dir(self, pid: int) -> int:
        """An open /proc/<pid>/fd (readlink relative to it is ~30% faster); the caller closes
        it. ProcessGone if the process is gone, NetinfoError if it cannot be opened."""
        try:
            return os.open(f"{self._rs}/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError) as exc:
            raise ProcessGone(pid) from exc
        except OSError as exc:
            msg = f"cannot list /proc/{pid}/fd: {exc.strerror}"
            raise NetinfoError(msg) from exc

    def _fd_links(self, pid: int) -> Iterator[str]:
        """Targets of /proc/<pid>/fd/*; fds closed meanwhile are skipped. Raises as `_fd_dir`."""
        dirfd = self._fd_dir(pid)
        try:
            for name in os.listdir(dirfd):
                try:
                    yield os.readlink(name, dir_fd=dirfd)
                except OSError:
                    continue
        finally:
            os.close(dirfd)
