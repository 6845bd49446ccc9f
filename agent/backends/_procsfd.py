"""The cgroup backend's writes to ``cgroup.procs``, through descriptors kept open a while.

An adoption is one write of the pid to the extern step's ``cgroup.procs``; opening that file
walks the whole cgroupfs path each time (a storm adopts into the same few jobs again and
again). `ProcsWriter` keeps each file it opened, for ``ttl_s`` and at most ``max_open`` of
them (least recently used first out: a `Memo` that owns them). How it stays right: a
descriptor names the cgroup it was opened on, not its path; once that cgroup is removed (the
job ended), a write through it fails (ENODEV) and the file is opened again by its path, which
names the cgroup there now, or nothing (the job has ended: JobVanished). The TTL (each write
sweeps expired descriptors first) keeps a removed cgroup from being pinned in the kernel by
our descriptor for long. Event-loop only, like the backend.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from callerid.agent.backends.base import BackendError, Job, JobVanished
from callerid.agent.memo import Memo

__all__ = ["ProcsWriter"]

_STALE = frozenset({errno.ENODEV, errno.ENOENT, errno.ESTALE})


class ProcsWriter:
    """``write(extern, pid, job)``: move ``pid`` into the cgroup ``extern``."""

    def __init__(self, *, ttl_s: float, max_open: int, clock: Callable[[], float]) -> None:
        # path -> its open descriptor (`Memo` owns them: closed as they expire or go)
        self._open: Memo[str, int] = Memo(
            max_entries=max_open, ttl_s=ttl_s, clock=clock, on_drop=os.close
        )

    def write(self, extern: str, pid: int, job: Job) -> None:
        path = f"{extern}/cgroup.procs"
        self._open.sweep()
        fd = self._open.get(path)
        if fd is not None:
            try:
                os.write(fd, str(pid).encode())
                return
            except OSError as exc:
                self._open.pop(path)  # ours again: closed here
                os.close(fd)
                if exc.errno not in _STALE:
                    raise _write_error(exc, pid, extern) from exc
        fd = _open(path, extern, job)
        try:
            os.write(fd, str(pid).encode())
        except OSError as exc:
            os.close(fd)
            raise _write_error(exc, pid, extern) from exc
        self._open.put(path, fd)  # with ttl_s 0: closed at once

    def close(self) -> None:
        self._open.clear()

    def __len__(self) -> int:
        return len(self._open)


def _open(path: str, extern: str, job: Job) -> int:
    try:
        return os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        msg = f"job {job.id} no longer exists ({extern})"
        raise JobVanished(msg) from exc
    except OSError as exc:
        msg = f"cannot open {path}: {exc.strerror}"
        raise BackendError(msg) from exc


def _write_error(exc: OSError, pid: int, extern: str) -> BackendError:
    if exc.errno == errno.ESRCH:
        return BackendError(f"process {pid} vanished")
    return BackendError(f"cannot move process {pid} into {extern}: {exc.strerror}")
