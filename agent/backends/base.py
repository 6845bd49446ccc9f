"""The backend interface: where jobs come from and how a process is adopted into one.

A backend is a small synchronous object. It is the only code that writes cgroups or speaks to
slurmstepd. Its ``blocking`` attribute says where the daemon calls it: a backend whose calls
may wait on another process (slurmstepd) is called from worker threads; one that only reads
and writes the kernel's files (cgroupfs, /proc) is called on the event loop. (A cgroup
migration may wait for an RCU grace period, 10-30 ms on some kernels, when the node has been
idle; under load the kernel stays in the fast mode and a write takes tens of microseconds.)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import Final, Protocol, runtime_checkable

__all__ = [
    "NAMESPACE_KINDS",
    "Backend",
    "BackendError",
    "Begun",
    "Job",
    "JobNamespaces",
    "JobVanished",
    "LoopAdoption",
]

# the kinds a job's namespaces may be of (the names of /proc/<pid>/ns/<kind>)
NAMESPACE_KINDS: Final = ("user", "mnt", "pid", "net", "ipc", "uts", "cgroup")


@dataclass(frozen=True, slots=True, order=False)
class Job:
    """A job on this node: its id, owner, start time (epoch seconds, for newest/oldest) and
    group (the gid its processes run with, ``sbatch --gid`` or the submitter's group; None
    when the backend cannot tell). The gid is told to the PAM module on adoption, nothing
    is decided by it."""

    id: str
    uid: int
    start_time: float
    gid: int | None = None

    def sort_key(self) -> tuple[float, int, str]:
        """Newest-last order: by start time, ties broken by the higher (numeric) job id."""
        numeric = int(self.id) if self.id.isdigit() else -1
        return (self.start_time, numeric, self.id)


class JobNamespaces:
    """Open fds of a job's namespaces, handed to the PAM module to enter (setns).

    ``fds`` is an ordered tuple of ``(kind, fd)``, kind in `NAMESPACE_KINDS`, each kind at
    most once, in the order the module enters them (user first when present, the way nsenter
    does; a backend that knows its namespaces' owners may choose another order, the module
    keeps it). The object owns the fds: `close` closes each once (idempotent); whoever holds
    the object last closes it (the PAM server after sending, or whoever drops it).
    Not empty: a job with nothing to join has no `JobNamespaces` (None).
    """

    __slots__ = ("_fds",)

    def __init__(self, fds: Iterable[tuple[str, int]]) -> None:
        pairs = tuple(fds)
        kinds = [k for k, _ in pairs]
        bad = [k for k in kinds if k not in NAMESPACE_KINDS]
        if not pairs or bad or len(set(kinds)) != len(kinds):
            msg = f"bad namespace kinds {kinds!r} (each of {NAMESPACE_KINDS} at most once)"
            raise ValueError(msg)
        if any(type(fd) is not int or fd < 0 for _, fd in pairs):
            msg = f"bad namespace fds {pairs!r}"
            raise ValueError(msg)
        self._fds: tuple[tuple[str, int], ...] = pairs

    @property
    def fds(self) -> tuple[tuple[str, int], ...]:
        return self._fds

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self._fds)

    def close(self) -> None:
        fds, self._fds = self._fds, ()
        for _, fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> JobNamespaces:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"JobNamespaces({self._fds!r})"


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

    def namespaces(self, job: Job) -> JobNamespaces | None:
        """Open fds of the namespaces an adopted session of ``job`` enters, or None: the
        job has none to join, joining is off for this backend, or it cannot tell. Raises
        BackendError when the job has namespaces that cannot be obtained (the login is
        then denied: a session never gets in outside namespaces its job has)."""
        ...

    def close(self) -> None:
        """Release whatever the backend holds."""
        ...


class Begun(Protocol):
    """An adoption whose requests are sent (`LoopAdoption.begin_adoption`)."""

    pid: int
    job: Job
    no_namespaces: bool  # `LoopAdoption.no_namespaces` of its job, known when it was begun

    def close(self) -> None:
        """Close it (idempotent). What was sent before may still be carried out (a stepd that
        has read ADD_EXTERN_PID adopts the pid), as with an adoption cancelled midway."""
        ...


@runtime_checkable
class LoopAdoption(Protocol):
    """What a blocking backend may offer so that a login need not leave the event loop (a
    worker-thread hop costs ~0.2 ms after idle): its jobs when they are known without asking
    anyone, an adoption begun at once and finished in the calling thread for a bounded while
    or by the loop itself, and whether a job is known to have no namespaces to fetch. The
    slurm backend offers it; `login.LoginFlow` uses it."""

    def jobs_now(self, uid: int) -> list[Job] | None:
        """`Backend.jobs_of` when it needs no I/O that may wait; None otherwise."""
        ...

    def begin_adoption(self, pid: int, job: Job) -> Begun:
        """The adoption of ``pid`` into ``job`` begun (what can be sent is sent), for
        `adopt_async` to finish; its bound counts from now. Raises BackendError /
        JobVanished."""
        ...

    def adopt_now(self, begun: Begun, wait_s: float) -> bool:
        """Go on with ``begun`` in the calling thread for at most ``wait_s``: True when it is
        over (adopted; raises as `Backend.adopt` does), False when it is still waiting (for
        `adopt_async` to finish)."""
        ...

    def adopt_async(self, pid: int, job: Job, begun: Begun | None = None) -> Awaitable[None]:
        """`Backend.adopt`, bounded the same, waiting on the event loop; ``begun`` (its own
        `begin_adoption` of ``pid`` into ``job``) is taken over and closed."""
        ...

    def no_namespaces(self, job: Job) -> bool:
        """True when `Backend.namespaces` would return None without asking anyone."""
        ...
