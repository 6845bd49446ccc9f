"""The slurm backend's namespace fetch: a job's namespace fds from its extern stepd.

What pam_slurm_adopt does with ``join_container=true`` (contribs/pam/pam_slurm_adopt.c), on
one connection to the job's extern step, after our own owner check (STEP_UID):

- a stepd of 25.11 or later (namespace/tmpfs, namespace/linux): GET_NS_FDS, a count and per
  namespace its CLONE_NEW* type and the fd (SCM_RIGHTS), in the order pam_slurm_adopt enters
  them (namespace/linux: pid, user, mnt); count 0 when no namespace plugin runs;
- an older one (job_container/tmpfs): GET_NS_FD, the job's mount namespace (the
  ``<BasePath>/<job>/.ns`` bind mount the stepd holds open); 0 when no container plugin runs
  (or ``BasePath=none``), -1 when the stepd could not open it.

Each fd must be a namespace of the type the stepd named (checked with NS_GET_NSTYPE); every
fd is closed on every failure. A job with no namespaces gives None.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable
from pathlib import Path

from callerid.agent.backends import stepd
from callerid.agent.backends._stepd_io import StepdClosed, StepdConnection, drive, outcome
from callerid.agent.backends.base import BackendError, Job, JobNamespaces

__all__ = ["fetch_namespaces", "namespace_kind_of"]

_NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3), linux/nsfs.h


def namespace_kind_of(fd: int) -> str | None:
    """The kind ("mnt", "pid" ...) of the namespace ``fd`` refers to; None if it is none."""
    try:
        flag = fcntl.ioctl(fd, _NS_GET_NSTYPE)
    except OSError:
        return None
    return stepd.ns_kind(flag)


def fetch_namespaces(
    path: Path, job: Job, version: int, deadline: float, clock: Callable[[], float]
) -> JobNamespaces | None:
    """``job``'s namespaces from the extern stepd at ``path`` (see the module doc)."""
    conn = StepdConnection(path)
    try:
        greeting = conn.queue(stepd.hello(version))
        owner = conn.queue(stepd.step_uid())
        drive([conn], deadline, clock)
        uid = outcome(conn, greeting, owner, version)
        if uid != job.uid:
            msg = f"job {job.id} belongs to uid {uid}, not {job.uid}: not entering its namespaces"
            raise BackendError(msg)
        fds_since = greeting.value >= stepd.GET_NS_FDS_SINCE
        reply = conn.queue(stepd.get_ns_fds() if fds_since else stepd.get_ns_fd())
        drive([conn], deadline, clock)
        if not reply.done and isinstance(conn.error, StepdClosed):
            msg = f"slurmstepd of job {job.id} closed the connection instead of passing namespaces"
            raise BackendError(msg) from conn.error
        types = outcome(conn, greeting, reply, version)
        fds = conn.take_fds()
    finally:
        conn.close()
    if types is None:
        msg = f"slurmstepd of job {job.id} could not open the job's namespace (reply -1)"
        raise BackendError(msg)
    try:
        return _namespaces(job, types, fds)
    except BaseException:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise


def _namespaces(job: Job, types: tuple[int, ...], fds: list[int]) -> JobNamespaces | None:
    """The received ``fds`` checked against the announced ``types`` (0: any namespace)."""
    if len(fds) != len(types):
        msg = f"slurmstepd of job {job.id} announced {len(types)} namespace fds, passed {len(fds)}"
        raise BackendError(msg)
    if not fds:
        return None
    pairs = []
    for announced, fd in zip(types, fds, strict=True):
        kind = namespace_kind_of(fd)
        if kind is None or (announced != 0 and stepd.ns_kind(announced) != kind):
            msg = (
                f"slurmstepd of job {job.id} passed fd of kind {kind or 'not a namespace'} "
                f"for namespace type {announced:#x}"
            )
            raise BackendError(msg)
        pairs.append((kind, fd))
    try:
        return JobNamespaces(pairs)
    except ValueError as exc:
        msg = f"slurmstepd of job {job.id} passed unusable namespaces: {exc}"
        raise BackendError(msg) from exc
