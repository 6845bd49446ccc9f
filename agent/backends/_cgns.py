"""The cgroup backend's namespaces of a job (``backend.cgroup.join_namespaces``).

A cgroup job has no namespace of its own that a resource manager names, so the backend takes
those of the job's *oldest process of its owner* (by start time, ties to the lower pid; the
job's first process, which its later processes and an adopted session descend from or join):
for each configured kind (``namespace_kinds``, in that order), ``/proc/<pid>/ns/<kind>`` is
opened when it differs from the agent's own ``/proc/self/ns/<kind>`` (device and inode);
the same namespace is not handed over. A job whose processes are all in the agent's
namespaces has nothing to join (None), and so has a job without a process of its owner yet.

Pid reuse: the process's start time is read again after its files were opened; a process
that exited or was replaced meanwhile is skipped for the next oldest. Any other failure to open
(permissions, a /proc without ns files) is a BackendError: the login is then denied.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from callerid.agent.backends.base import BackendError, JobNamespaces
from callerid.agent.netinfo import ProcReader

__all__ = ["oldest_owner_namespaces"]

_GONE = (errno.ENOENT, errno.ESRCH)  # the process exited


def oldest_owner_namespaces(
    procs: ProcReader, proc_root: Path, uid: int, pids: Iterable[int], kinds: Sequence[str]
) -> JobNamespaces | None:
    """The namespaces of ``uid``'s oldest process among ``pids`` that differ from the
    agent's (see the module docstring)."""
    starts = {p: t for p in pids if (t := procs.start_time(p)) is not None}
    for pid in sorted(starts, key=lambda p: (starts[p], p)):
        if procs.owner_uid(pid) != uid:
            continue
        try:
            ns = _open(proc_root, pid, kinds)
        except OSError as exc:
            if exc.errno in _GONE:
                continue
            msg = f"cannot open the namespaces of pid {pid}: {exc}"
            raise BackendError(msg) from exc
        if procs.start_time(pid) != starts[pid]:  # exited, or the pid is another process now
            if ns is not None:
                ns.close()
            continue
        return ns
    return None


def _open(proc_root: Path, pid: int, kinds: Sequence[str]) -> JobNamespaces | None:
    fds: list[tuple[str, int]] = []
    try:
        for kind in dict.fromkeys(kinds):  # each kind once, in the configured order
            own = os.stat(proc_root / "self" / "ns" / kind)
            fd = os.open(proc_root / str(pid) / "ns" / kind, os.O_RDONLY | os.O_CLOEXEC)
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino):
                os.close(fd)
                continue
            fds.append((kind, fd))
    except BaseException:
        for _, fd in fds:
            os.close(fd)
        raise
    return JobNamespaces(fds) if fds else None
