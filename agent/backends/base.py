"""The backend interface: where jobs come from and how a process is adopted into one.

A backend is a small synchronous object. It is the only code that writes cgroups or speaks to
slurmstepd. Its ``blocking`` attribute says where the daemon calls it: a backend whose calls
may wait on another process (slurmstepd) is called from worker threads; one that only reads
and writes the kernel's files (cgroupfs, /proc) is called on the event loop. (A cgroup
migration may wait for an RCU grace period, 10-30 ms on some kernels, when the node has been
idle; under load the kernel stays in the fast mode and a write takes tens of microseconds.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["Backend", "BackendError", "Job", "JobVanished"]


@dataclass(frozen=True, slots=True, order=False)
class Job:
    """A job on this node: its id, owner and start time (epoch seconds, for newest/oldest)."""

    id: str
    uid: int
    start_time: float

    def sort_key(self) -> tuple[float, int, str]:
        """Newest-last order: by start time, ties broken by the higher (numeric) job id."""
        numeric = int(self.id) if self.id.isdigit() else -1
        return (self.start_time, numeric, self.id)


class BackendError(Exception):
    """The backend could not answer or act; the message is fit for a log line."""


class JobVanished(BackendError):
    """The job (or its extern step) no longer exists."""


class Backend(Protocol):
    name: str
    blocking: bool  # True: its calls may wait on another process (run them in threads)

    def jobs_of(self, uid: int) -> list[Job]:
        """The running jobs of ``uid`` on this node (any order)."""
        ...

    def job_of_pid(self, pid: int) -> Job | None:
        """The job that process ``pid`` belongs to, or None."""
        ...

    def adopt(self, pid: int, job: Job) -> None:
        """Move ``pid`` into ``job``'s extern step; raises BackendError / JobVanished."""
        ...

    def close(self) -> None:
        """Release whatever the backend holds."""
        ...
