"""Job backends: where jobs come from and how a process is adopted into one.

`make_backend` builds the configured backend (``cgroup`` or ``slurm``, imported only when
chosen); `DryRun` wraps one so that everything but adoption is real (``calleridctl explain``).
The interface and its errors are in `base`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from callerid.agent.backends.base import (
    Backend,
    BackendError,
    Job,
    JobNamespaces,
    JobVanished,
)
from callerid.agent.config import BackendConfig

__all__ = [
    "Backend",
    "BackendError",
    "DryRun",
    "Job",
    "JobNamespaces",
    "JobVanished",
    "make_backend",
]


def make_backend(
    cfg: BackendConfig,
    *,
    proc_root: Path = Path("/proc"),
    clock: Callable[[], float] = time.monotonic,
) -> Backend:
    """The backend ``cfg.type`` names, built from its section of ``cfg``.

    ``clock`` (seconds, as `time.monotonic`) ages the backend's memories and, for ``slurm``,
    bounds its calls. Raises BackendError when the configuration does not fit this node.
    """
    if cfg.type == "cgroup":
        from callerid.agent.backends.cgroup import CgroupBackend

        return CgroupBackend(cfg.cgroup, proc_root=proc_root, clock=clock)
    from callerid.agent.backends.slurm import SlurmBackend

    return SlurmBackend(cfg.slurm, proc_root=proc_root, clock=clock)


class DryRun:
    """A backend that answers as ``backend`` does but never adopts: a dry run of a login."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.name = backend.name
        self.blocking = backend.blocking

    def jobs_of(self, uid: int) -> list[Job]:
        return self.backend.jobs_of(uid)

    def job_of_pid(self, pid: int) -> Job | None:
        return self.backend.job_of_pid(pid)

    def adopt(self, pid: int, job: Job) -> None:
        """Nothing: the process stays where it is."""

    def namespaces(self, job: Job) -> JobNamespaces | None:
        return self.backend.namespaces(job)

    def close(self) -> None:
        self.backend.close()
