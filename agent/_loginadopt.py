"""An adopt decision carried out (`login.LoginFlow`): where the backend's adoption runs, the
pin checks around it, and what a failure becomes.

Three places, one contract: `Adopter.carry_out` where the backend's calls run (a worker thread
for a blocking backend, else inline), `Adopter.on_loop` on the event loop (`LoopAdoption`),
and `Adopter.now`, the PAM server's own stack for a bounded while, for an adoption already
begun (`LoopAdoption.begin_adoption`). Each adopts only the process the login pinned (checked
before and after, `_loginstate.pinned`), marks "adopt" when the adoption is over either way,
and turns a failure into `policy.after_adopt_failure`'s verdict (logged).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Executor

from callerid.agent import policy
from callerid.agent._joinns import fetch_namespaces
from callerid.agent._loginports import Processes
from callerid.agent._loginstate import Login, pinned
from callerid.agent._offload import shielded_call
from callerid.agent.backends.base import Backend, BackendError, Job, LoopAdoption
from callerid.agent.config import PolicyConfig
from callerid.agent.netinfo import NetinfoError

__all__ = ["Adopter"]

log = logging.getLogger("callerid.agent.login")


class Adopter:
    """Carries adopt decisions out into ``backend``'s jobs (see the module docstring)."""

    def __init__(
        self,
        cfg: PolicyConfig,
        *,
        node: str,
        procs: Processes,
        backend: Backend,
        executor: Executor | None,
        clock: Callable[[], float],
    ) -> None:
        self.cfg = cfg
        self.node = node
        self.procs = procs
        self.backend = backend
        self.executor = executor
        self.clock = clock

    def carry_out(self, login: Login, decision: policy.Decision) -> policy.Decision:
        """Adopt the session process into the decided job (where the backend's calls run),
        then fetch the job's namespaces."""
        if decision.verdict != "adopt":
            return decision
        try:
            with self._adopting(login, decision) as (pid, job):
                self.backend.adopt(pid, job)
        except (BackendError, NetinfoError) as exc:
            return self._failed(login, decision, exc)
        login.fetched = fetch_namespaces(self.backend, decision, login.req.join)
        return decision

    async def on_loop(
        self, login: Login, decision: policy.Decision, lb: LoopAdoption
    ) -> policy.Decision:
        """`carry_out` on the loop (the adoption begun, if it was, taken over); the namespaces
        in a worker only if there may be some."""
        if decision.verdict != "adopt":
            return decision
        begun = login.adopting  # taken over below; it knew whether its job has namespaces
        try:
            with self._adopting(login, decision) as (pid, job):
                await lb.adopt_async(pid, job, login.take_adopting())
        except (BackendError, NetinfoError) as exc:
            return self._failed(login, decision, exc)
        none = begun is not None and begun.job == job and begun.no_namespaces  # no look again
        if login.req.join is not False and not none and not lb.no_namespaces(job):
            login.fetched = await shielded_call(
                self.backend, self.executor, login.give_up,
                fetch_namespaces, self.backend, decision, login.req.join,
            )  # fmt: skip
        return decision

    def now(
        self, login: Login, decision: policy.Decision, lb: LoopAdoption, wait_s: float
    ) -> policy.Decision | None:
        """The begun adoption waited for here, ``wait_s`` at most, if the job is known to have
        no namespaces to fetch: the decision, or the failure's; None when it is left to the
        loop (`on_loop`: not waited for here, or the stepd did not answer in time)."""
        begun, job = login.adopting, decision.job
        if begun is None or job is None or wait_s <= 0:
            return None
        if login.req.join is not False and not begun.no_namespaces:
            return None
        try:  # the pin: checked before anything was sent (`LoginFlow._local_step`), and after
            with self._adopting(login, decision, pending=_NotYet):
                if not lb.adopt_now(begun, wait_s):
                    raise _NotYet
        except _NotYet:
            return None  # its pin closed: the loop pins the process again
        except (BackendError, NetinfoError) as exc:
            return self._failed(login, decision, exc)
        return decision

    def _adopting(
        self,
        login: Login,
        decision: policy.Decision,
        pending: type[Exception] | None = None,
    ) -> _Adopting:
        """Around an adoption of the login's (pinned) process into the decided job; the
        "adopt" mark either way, unless it ends with ``pending`` (not over yet)."""
        return _Adopting(self.procs, login, decision, self.clock, pending)

    def _failed(self, login: Login, decision: policy.Decision, exc: Exception) -> policy.Decision:
        job = decision.job.id if decision.job else "?"
        log.warning("adopting pid %s into job %s failed: %s", login.target_pid, job, exc)
        return policy.after_adopt_failure(decision, self.cfg, self.node)


class _Adopting:
    """`Adopter._adopting`: `pinned` around the adoption of ``(pid, job)`` (what ``with``
    gives), then the "adopt" mark, unless the adoption ends with ``pending``. A class, not a
    generator: every adopted login passes through one."""

    __slots__ = ("_clock", "_login", "_pending", "_pin", "_target")

    def __init__(
        self,
        procs: Processes,
        login: Login,
        decision: policy.Decision,
        clock: Callable[[], float],
        pending: type[Exception] | None,
    ) -> None:
        assert decision.job is not None and login.target_pid is not None
        pid = login.target_pid
        self._target = (pid, decision.job)
        self._login, self._clock, self._pending = login, clock, pending
        sent = login.adopting is not None  # begun: checked alive before its requests went out
        self._pin = pinned(procs, pid, login.target_start, login.take_pin(pid), sent=sent)

    def __enter__(self) -> tuple[int, Job]:
        try:
            self._pin.__enter__()
        except BaseException as exc:
            self._over(exc)
            raise
        return self._target

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        try:
            self._pin.__exit__(exc_type, exc, tb)
        except BaseException as raised:
            self._over(raised)
            raise
        self._over(exc)

    def _over(self, exc: BaseException | None) -> None:
        if exc is None or self._pending is None or not isinstance(exc, self._pending):
            self._login.marks.append(("adopt", self._clock()))


class _NotYet(Exception):
    """The stepd has not answered within the wait on the caller's stack."""
