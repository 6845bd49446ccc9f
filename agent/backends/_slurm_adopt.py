"""The slurm backend's adoption exchange with one extern stepd, written once for all drivers.

An `Adoption` sends its requests as soon as it is made (the PAM server makes it while the
login's decision is still on its stack, before the event loop turns). Its exchange is then a
generator that yields the connection whenever bytes must be exchanged (`Adoption.advance`
says which to drive next), and its caller drives them: a worker thread with `_stepd_io.drive`
(`SlurmBackend.adopt`), the event loop with `_stepd_io.drive_async`
(`SlurmBackend.adopt_async`), or the PAM server's own stack for a bounded while
(`SlurmBackend.adopt_now`), the loop then going on with what is left. Between the yields it
checks the replies, and it raises as `SlurmBackend.adopt` says. `close()` closes the
connection, also when the adoption is given up before its end.

When the step's owner is not remembered for this very socket file, STEP_UID and STATE go
first, and nothing is added before the stepd has said the job is ``job.uid``'s and not ending:
two round trips. When it is (``owner_known``: a stepd's job never changes owner, and a new
stepd, a requeued job's, makes a new socket file), STATE and ADD_EXTERN_PID go with the
handshake at once and the state is checked after: one round trip. STEP_UID is not asked again
then (it would only repeat what that same stepd said); a step found ending has the pid
already (it ends with the step: 22.05 adds it, later releases refuse ADD_EXTERN_PID
themselves), and the login is refused as when the state comes first.

PID_IN_CONTAINER confirms ADD_EXTERN_PID (a stepd with proctrack/pgid accepts a pid it cannot
contain) unless this very stepd has confirmed an adoption before (``contains_known``: a
stepd's proctrack plugin is loaded once, for its life).
"""

from __future__ import annotations

import selectors
from collections.abc import Generator
from pathlib import Path

from callerid.agent.backends import stepd
from callerid.agent.backends._slurm_sockets import StepSocket
from callerid.agent.backends._stepd_io import StepdClosed, StepdConnection, outcome
from callerid.agent.backends.base import BackendError, Job, JobVanished

__all__ = ["Adoption"]


class Adoption:
    """The adoption of ``pid`` into ``job``'s extern step through its stepd socket ``sock``,
    its requests sent (see the module docstring). ``deadline`` (a clock value) bounds all of
    it; a failure to connect is kept and raised by `advance`. ``proc_root`` names a pid that
    is gone in the failure's message. ``no_namespaces``: known, from the same socket file, to
    have none to fetch (`Begun.no_namespaces`)."""

    def __init__(
        self,
        pid: int,
        job: Job,
        sock: StepSocket,
        version: int,
        deadline: float,
        *,
        owner_known: bool,
        contains_known: bool = False,
        proc_root: Path = Path("/proc"),
        no_namespaces: bool = False,
    ) -> None:
        self.pid = pid
        self.job = job
        self.sock = sock
        self.deadline = deadline
        self.no_namespaces = no_namespaces
        self._version = version
        self._contains_known = contains_known
        self._proc = proc_root
        self._conn: StepdConnection | None = None
        self._error: BackendError | None = None
        self._owner: stepd.Reader[int] | None = None
        self._gen: Generator[list[StepdConnection], None, None] | None = None
        self._conns: list[StepdConnection] | None = None
        if pid <= 0:
            self._error = BackendError(f"invalid pid {pid}")
            return
        try:
            conn = StepdConnection(sock.path)
        except BackendError as exc:
            self._error = exc
            return
        self._conn = conn
        self._greeting = conn.queue(stepd.hello(version))
        if not owner_known:
            self._owner = conn.queue(stepd.step_uid())
        self._state = conn.queue(stepd.state())
        self._added = self._add(conn) if owner_known else None
        conn.on_ready(selectors.EVENT_WRITE)  # sent now (a few bytes: the socket takes them)

    def _add(self, conn: StepdConnection) -> tuple[stepd.Reader[int], stepd.Reader[bool] | None]:
        added = conn.queue(stepd.add_extern_pid(self.pid))
        inside = None if self._contains_known else conn.queue(stepd.pid_in_container(self.pid))
        return added, inside

    def advance(self) -> list[StepdConnection] | None:
        """The connections to drive next (the same ones until they are settled), or None once
        the exchange is over; raises as `SlurmBackend.adopt` says when it failed."""
        if self._gen is None:
            self._gen = self._steps()
        elif self._conns is not None and not all(c.settled for c in self._conns):
            return self._conns
        self._conns = next(self._gen, None)
        return self._conns

    def _steps(self) -> Generator[list[StepdConnection], None, None]:
        """The exchange's remaining steps, yielding the connection to drive."""
        if self._error is not None:
            raise self._error
        conn = self._conn
        assert conn is not None
        yield [conn]
        self._check_step(conn)
        if self._added is None:  # the owner was asked first: now the adoption
            self._added = self._add(conn)
            yield [conn]
        _check_adopted(self.pid, self.job, conn, self._added, self._proc)

    def _check_step(self, conn: StepdConnection) -> None:
        """Raise unless the step is ``job.uid``'s (when asked) and not ending. With the owner
        known, a state not answered (the connection failed first) is left to the adoption's
        own check, which says why."""
        pid, job, greeting = self.pid, self.job, self._greeting
        if self._owner is not None:
            uid = outcome(conn, greeting, self._owner, self._version)
            if uid != job.uid:
                msg = f"job {job.id} belongs to uid {uid}, not {job.uid}: not adopting pid {pid}"
                raise BackendError(msg)
        elif not self._state.done:
            if greeting.done and greeting.value < 0:
                outcome(conn, greeting, greeting, self._version)  # raises: refused, says why
            return
        value = outcome(conn, greeting, self._state, self._version)
        step_state = stepd.state_name(value, greeting.value)
        if step_state in ("cancelled", "ending"):
            msg = f"job {job.id} is ending (extern step {step_state})"
            raise JobVanished(msg)

    @property
    def closed(self) -> bool:
        return self._conn is None or self._conn.sock.fileno() < 0

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._gen is not None:
            self._gen.close()
        if self._conn is not None:
            self._conn.close()


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
