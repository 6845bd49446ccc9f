"""The slurm backend's adoption exchange with one extern stepd, written once for both drivers.

`adoption` is a generator: it opens one connection, queues the requests, and yields the
connection whenever bytes must be exchanged; its caller drives them, a worker thread with
`_stepd_io.drive` (`SlurmBackend.adopt`) or the event loop with `_stepd_io.drive_async`
(`SlurmBackend.adopt_async`). Between the yields it checks the replies, and it raises as
`SlurmBackend.adopt` says. Closing the generator early (a cancelled login) closes the connection.

Two round trips when the step's owner is not remembered: STEP_UID and STATE first, and nothing
is added before the stepd has said the job is ``job.uid``'s and not ending. One when it is
remembered for this very socket file (``owner_known``: a stepd's job never changes owner, a new
stepd makes a new file): all four requests go at once and the answers are checked after; a
step found ending then has the pid already (it ends with the step), and the login is refused as
before.

PID_IN_CONTAINER confirms ADD_EXTERN_PID (a stepd with proctrack/pgid accepts a pid it cannot
contain) unless this very stepd has confirmed an adoption before (``contains_known``: a
stepd's proctrack plugin is loaded once, for its life).
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

from callerid.agent.backends import stepd
from callerid.agent.backends._stepd_io import StepdClosed, StepdConnection, outcome
from callerid.agent.backends.base import BackendError, Job, JobVanished

__all__ = ["adoption"]


def adoption(
    pid: int,
    job: Job,
    path: Path,
    version: int,
    *,
    owner_known: bool,
    contains_known: bool = False,
    proc_root: Path,
) -> Generator[list[StepdConnection], None, None]:
    """Adopt ``pid`` into ``job``'s extern step at ``path`` (see the module docstring)."""
    conn = StepdConnection(path)
    inside: stepd.Reader[bool] | None = None
    try:
        greeting = conn.queue(stepd.hello(version))
        owner = conn.queue(stepd.step_uid())
        state = conn.queue(stepd.state())
        if owner_known:
            added = conn.queue(stepd.add_extern_pid(pid))
            if not contains_known:
                inside = conn.queue(stepd.pid_in_container(pid))
        yield [conn]
        _check_step(pid, job, conn, (greeting, owner, state), version)
        if not owner_known:
            added = conn.queue(stepd.add_extern_pid(pid))
            if not contains_known:
                inside = conn.queue(stepd.pid_in_container(pid))
            yield [conn]
    finally:
        conn.close()
    _check_adopted(pid, job, conn, (added, inside), proc_root)


def _check_step(
    pid: int,
    job: Job,
    conn: StepdConnection,
    replies: tuple[stepd.Reader[int], stepd.Reader[int], stepd.Reader[int]],
    version: int,
) -> None:
    """Raise unless the step is ``job.uid``'s and not ending (``replies``: the greeting,
    STEP_UID and STATE)."""
    greeting, owner, state = replies
    uid = outcome(conn, greeting, owner, version)
    if uid != job.uid:
        msg = f"job {job.id} belongs to uid {uid}, not {job.uid}: not adopting pid {pid}"
        raise BackendError(msg)
    step_state = stepd.state_name(outcome(conn, greeting, state, version), greeting.value)
    if step_state in ("cancelled", "ending"):
        msg = f"job {job.id} is ending (extern step {step_state})"
        raise JobVanished(msg)


def _check_adopted(
    pid: int,
    job: Job,
    conn: StepdConnection,
    replies: tuple[stepd.Reader[int], stepd.Reader[bool] | None],
    proc_root: Path,
) -> None:
    """Raise unless ADD_EXTERN_PID said 0 and PID_IN_CONTAINER (if asked) then said yes."""
    added, inside = replies
    if added.done and added.value == 0 and conn.error is None and (inside is None or inside.value):
        return
    gone = "" if (proc_root / str(pid)).exists() else f" (process {pid} is gone)"
    if added.done and added.value != 0:
        msg = f"slurmstepd of job {job.id} refused to adopt pid {pid} (rc {added.value}){gone}"
        raise BackendError(msg)
    if not added.done and isinstance(conn.error, StepdClosed):
        msg = (
            f"slurmstepd of job {job.id} refused to adopt pid {pid}: it closed the "
            f"connection (not root/SlurmUser, or the step is ending){gone}"
        )
        raise BackendError(msg) from conn.error
    if conn.error is not None:
        raise conn.error
    msg = f"slurmstepd of job {job.id} accepted pid {pid} but does not contain it"
    raise BackendError(msg)
