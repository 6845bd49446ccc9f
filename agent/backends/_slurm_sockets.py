"""The slurm backend's view of the spool dir: the stepd sockets, and job ids from cgroup paths.

Pure but for `list_step_sockets` (one scandir); re-exported by `slurm`.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from callerid.agent.backends import stepd
from callerid.agent.backends.base import BackendError

__all__ = ["StepSocket", "guess_node_name", "job_from_cgroup", "list_step_sockets"]

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
