"""The state of one login in `login.LoginFlow`: its scratch facts, and what comes out of it.

Re-exported by `login` (`Outcome`, `Started`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from callerid.agent import policy
from callerid.agent._joinns import Fetched
from callerid.agent.backends.base import BackendError, Begun, JobNamespaces
from callerid.agent.journal import DecisionRecord
from callerid.agent.netinfo import Connection, ProcessGone
from callerid.agent.pamproto import PamReply, PamRequest

if TYPE_CHECKING:
    from callerid.agent._loginports import Held, Processes

__all__ = ["Login", "Outcome", "Started", "pinned"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """The reply and record of a login; ``namespaces``: the job's, sent with the reply (their
    kinds are the reply's ``ns``) and closed by whoever sends or drops it (the PAM server)."""

    reply: PamReply
    record: DecisionRecord
    namespaces: JobNamespaces | None = None


@dataclass(frozen=True, slots=True)
class Started:
    """A login `LoginFlow.account_now` took as far as it could without waiting: the source is
    to be asked (``step`` `policy.Need.CALLERID`), or the decision's adoption is begun on a
    `LoopAdoption` backend and is to be finished on the loop (``step`` the decision)."""

    login: Login
    step: policy.Need | policy.Decision


@dataclass(slots=True)
class Login:
    """Mutable scratch state of one login while its facts are gathered."""

    req: PamRequest
    caller_pid: int
    started: float
    facts: policy.Facts
    target_pid: int | None = None
    target_start: float | None = None  # the target's start time: its identity with the pid
    conn: Connection | None = None
    peer_status: str = "skipped"
    waited_ms: int | None = None  # waited for the job the source named (wait_for_job_ms)
    fetched: Fetched | None = None  # the job's namespaces, asked for after the adoption
    marks: list[tuple[str, float]] = dataclasses.field(default_factory=list)
    # the caller, held (pidfd) since before its identity was read: see `LoginFlow._find_session`
    pin: Held | None = None
    adopting: Begun | None = None  # begun once its process was found (`LoginFlow._local_step`)

    def take_pin(self, pid: int) -> Held | None:
        """The early pin if it holds ``pid`` (the caller handing it over), else None (and
        it is closed: the adoption is of another process)."""
        pin, self.pin = self.pin, None
        if pin is not None and pin.pid != pid:
            pin.close()
            return None
        return pin

    def take_adopting(self) -> Begun | None:
        """The adoption begun, handed over to whoever finishes it (and closes it)."""
        begun, self.adopting = self.adopting, None
        return begun

    def release(self) -> None:
        """Close the early pin and the begun adoption if they were not handed over
        (idempotent)."""
        if self.pin is not None:
            self.pin.close()
            self.pin = None
        if self.adopting is not None:
            self.adopting.close()
            self.adopting = None

    def give_up(self) -> None:
        """The login was cancelled (PAM deadline): fds a worker fetched meanwhile are closed."""
        if self.fetched is not None:
            self.fetched.drop()


class pinned:  # a context manager, named as contextlib's are
    """Around the adoption of the process ``pid`` started at ``start``, and only that process
    (see `netinfo.Pin`): NetinfoError if it is gone, BackendError if it exits meanwhile.
    ``held``: ``pid`` held since before ``start`` was read (taken over, closed here): if it
    is alive now, it still holds the pid and ``start`` is its own, which is what `pin` checks
    by reading the start time again; one poll instead of that read. ``sent``: the adoption's
    requests went out already, ``held`` found alive just before (`LoginFlow._local_step`, a
    begun adoption): a poll now would stop nothing, and the one after still tells an exit.

    A class, not a generator: every adopted login passes through one (~1 us less)."""

    __slots__ = ("_held", "_pid", "_procs", "_sent", "_start")

    def __init__(
        self,
        procs: Processes,
        pid: int,
        start: float | None,
        held: Held | None = None,
        *,
        sent: bool = False,
    ) -> None:
        self._procs, self._pid, self._start, self._held = procs, pid, start, held
        self._sent = sent and held is not None

    def __enter__(self) -> None:
        held = self._held
        if held is None:
            self._held = self._procs.pin(self._pid, self._start)
        elif not self._sent and held.exited():
            held.close()
            raise ProcessGone(self._pid)

    def __exit__(self, exc_type: type[BaseException] | None, *_exc: object) -> None:
        held = self._held
        assert held is not None
        try:
            if exc_type is None and held.exited():
                msg = f"process {self._pid} exited while it was being adopted"
                raise BackendError(msg)
        finally:
            held.close()
