"""Process facts read from /proc: the base of `NetInfo` (see netinfo.py).

`ProcReader` reads one process's stat/status/cgroup files with raw os calls, lists pids and
fd links; `ProcessGone` and `NetinfoError` are the errors of all of netinfo.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from callerid.agent import _sockdiag as sd

__all__ = ["NetinfoError", "Proc", "ProcInfo", "ProcReader", "ProcessGone"]

MAX_DEPTH: Final = 512  # bound on ancestor walks (a pid chain cannot really be this long)
_READ_CHUNK: Final = 8192
_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


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
