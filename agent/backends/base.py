"""The backend interface: where jobs come from and how a process is adopted into one.

A backend is a small synchronous object (the daemon calls it from a worker thread). It is the
only code that writes cgroups or speaks to slurmstepd.
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
