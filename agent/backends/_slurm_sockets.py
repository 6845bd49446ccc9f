"""The slurm backend's view of the spool dir: the stepd sockets, and job ids from cgroup paths.

Pure but for `list_step_sockets` (one scandir) and `SpoolListing` (which remembers it);
re-exported by `slurm`.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from callerid.agent.backends import stepd
from callerid.agent.backends.base import BackendError

__all__ = [
    "SpoolListing",
    "StepSocket",
    "guess_node_name",
    "job_from_cgroup",
    "list_step_sockets",
]

log = logging.getLogger(__name__)

_SOCKET_NAME = re.compile(r"(?P<node>.+)_(?P<job>\d+)\.(?P<step>\d+)(?:\.(?P<het>\d+))?")
_CGROUP_JOB = re.compile(r"/job_(\d+)/step_[^/]+(?:/|$)")


@dataclass(frozen=True, slots=True)
class StepSocket:
    """One stepd socket file in the spool dir."""

    path: Path
    node: str
    job: str
    step: int
    ctime: float
    inode: int

    @property
    def is_extern(self) -> bool:
        return self.step == stepd.EXTERN_STEP

    @property
    def identity(self) -> tuple[str, int, float]:
        """The socket file's identity: a new stepd of the same step makes a new file."""
        return (str(self.path), self.inode, self.ctime)


def list_step_sockets(spool_dir: Path) -> list[StepSocket]:
    """Every stepd socket in ``spool_dir`` (any node name); [] when the dir does not exist."""
    found = []
    try:
        entries = list(os.scandir(spool_dir))
    except FileNotFoundError:
        log.warning("slurm spool dir %s does not exist: no jobs", spool_dir)
        return []
    except OSError as exc:
        msg = f"cannot list the slurm spool dir {spool_dir}: {exc.strerror}"
        raise BackendError(msg) from exc
    for entry in entries:
        m = _SOCKET_NAME.fullmatch(entry.name)
        if m is None or m.group("het"):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # the step ended meanwhile
        if stat.S_ISSOCK(st.st_mode):
            found.append(
                StepSocket(
                    Path(entry.path), m["node"], m["job"], int(m["step"]), st.st_ctime, st.st_ino
                )
            )
    return sorted(found, key=lambda s: (not s.is_extern, int(s.job), s.step))


RACY_S = 1.0  # a listing read this soon after the dir's last change is not remembered


class SpoolListing:
    """`list_step_sockets` of one spool dir, read again only when the dir has changed.

    How it stays true: a stepd socket is created, removed or renamed only as an entry of the
    spool dir, and every such change sets the dir's mtime to the time of the change. So while
    the dir's identity and mtime (st_dev, st_ino, st_mtime_ns: one stat) are what they were
    when the listing was read, it lists what is there. Timestamps are coarse (a kernel tick):
    a change in the same tick as the one before it would leave the mtime as it was; so a
    listing is remembered only when it began at least `RACY_S` after the dir's last change
    (the "racily clean" rule of git's index): any later change then has a later mtime. A step
    whose socket is still listed can still have ended meanwhile; the connect to it fails, as
    it would have with a fresh listing a moment earlier (callers treat that as a stale socket).
    """

    def __init__(self, spool_dir: Path, wall: Callable[[], float] = time.time) -> None:
        self.spool_dir = spool_dir
        self._wall = wall
        self._lock = threading.Lock()
        self._key: tuple[int, int, int] | None = None
        self._sockets: list[StepSocket] = []

    def sockets(self) -> list[StepSocket]:
        """Every stepd socket in the spool dir (a copy: callers may filter it)."""
        try:
            st = os.stat(self.spool_dir)
        except OSError:
            return list_step_sockets(self.spool_dir)  # missing: it logs and says so
        key = (st.st_dev, st.st_ino, st.st_mtime_ns)
        with self._lock:
            if key == self._key:
                return list(self._sockets)
        began = self._wall()
        found = list_step_sockets(self.spool_dir)
        quiet = began - st.st_mtime_ns / 1e9 >= RACY_S
        with self._lock:
            self._key, self._sockets = (key, found) if quiet else (None, [])
        return list(found)


def guess_node_name(nodes: Iterable[str], hostname: str) -> str:
    """This node's NodeName from the node names of the sockets present and the short hostname.

    The hostname, unless the sockets belong to exactly one other name (and none to it).
    """
    names = set(nodes)
    if hostname in names or len(names) != 1:
        return hostname
    return names.pop()


def job_from_cgroup(text: str) -> str | None:
    """The Slurm job id a /proc/<pid>/cgroup text shows (``.../job_<J>/step_...``), or None.

    None too when lines disagree (then the stepds are asked instead).
    """
    found = {m.group(1) for line in text.splitlines() if (m := _CGROUP_JOB.search(line))}
    return found.pop() if len(found) == 1 else None
