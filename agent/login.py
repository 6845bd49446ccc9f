"""One login, decided and carried out: the destination-side flow of DESIGN.md, in one place.

`LoginFlow.account()` gathers the facts `policy.decide` asks for, in its order (the user, the
user's local jobs, the session connection and the source agent's answer), adopts the sshd
session process into the chosen job, and returns the PAM reply with the journal record. The
agent runs it for every login; `calleridctl explain` runs the same flow with a backend whose
adoption does nothing (`backends.DryRun`), so the two cannot disagree.

Each fact comes from a piece passed in: `UserSource` (NSS), the `Backend` (jobs, adoption),
`SessionFinder` (netinfo: which connection the sshd process serves) and `AskSource` (the
source agent, or this node: `ask.SourceAsker`). Nothing here reads the clock except through
the injected ``clock``. Where the work runs: see `_offload`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import TypeVar

from callerid.agent import policy
from callerid.agent._jobwait import await_named_job, named_job_missing
from callerid.agent._joinns import namespace_verdict
from callerid.agent._loginadopt import Adopter
from callerid.agent._loginports import AskSource, Held, Processes, SessionFinder, UserSource
from callerid.agent._loginrecord import decided, failed
from callerid.agent._loginsession import SESSION_MEMORY, AdoptedSessions
from callerid.agent._loginstate import Login, Outcome, Started
from callerid.agent._offload import backend_call, shielded_call
from callerid.agent.backends.base import (
    Backend,
    BackendError,
    Begun,
    Job,
    JobNamespaces,
    LoopAdoption,
)
from callerid.agent.config import Mode, PolicyConfig
from callerid.agent.netinfo import NetinfoError
from callerid.agent.pamproto import PamReply, PamRequest

__all__ = [
    "AskSource",
    "Held",
    "LoginFlow",
    "Outcome",
    "Processes",
    "SessionFinder",
    "Started",
    "UserSource",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

DEADLINE_SLACK_S = 0.2  # a wait for a named job ends this long before the PAM deadline


class LoginFlow:
    """The destination side of a login: account, and the session phase's re-check."""

    def __init__(
        self,
        cfg: PolicyConfig,
        *,
        node: str,
        users: UserSource,
        sessions: SessionFinder,
        procs: Processes,
        backend: Backend,
        ask_source: AskSource,
        executor: Executor | None,
        clock: Callable[[], float],
        rng: random.Random | None = None,
        max_sessions: int = SESSION_MEMORY,
        mode: Mode = "enforce",
        deadline_s: float | None = None,
        primer: Callable[[], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.deadline_s = deadline_s  # the PAM server's answer deadline (pam_timeout_ms)
        self.primer = primer  # begins the adoption's kernel wait early (backends._primer)
        self._on_loop = backend if backend.blocking and isinstance(backend, LoopAdoption) else None
        self.mode = mode  # audit: a login enforce would deny (or fail) is let through
        self.node = node
        self.users = users
        self.sessions = sessions
        self.procs = procs
        self.backend = backend
        self.ask_source = ask_source
        self.executor = executor
        self.clock = clock
        self.rng = rng or random.Random()  # noqa: S311 - job choice, not crypto
        self.adopter = Adopter(
            cfg, node=node, procs=procs, backend=backend, executor=executor, clock=clock
        )
        self.sessions_adopted = AdoptedSessions(
            users=users, procs=procs, backend=backend, executor=executor, clock=clock,
            max_sessions=max_sessions,
        )  # fmt: skip

    def account_now(
        self, req: PamRequest, caller_pid: int, received: float | None = None, wait_s: float = 0.0
    ) -> Outcome | Started | None:
        """The account phase as far as it goes without waiting (longer than ``wait_s``), on
        the caller's stack.

        With the user remembered, and a backend that does not block or offers `LoopAdoption`
        and knows the jobs at once, a login the policy decides from local facts is decided
        here: carried out too when the backend does not block (its Outcome), else its adoption
        begun; that one is waited for here, ``wait_s`` at most, when the job is known to have
        no namespaces to fetch (its Outcome), and otherwise comes back `Started` for `account`
        to finish on the loop. One that needs the source comes back `Started` (facts, jobs and
        session found) as well. None: nothing was done (NSS or a worker thread must be
        asked): use `account`. Saves the login a turn of the event loop, or every turn.
        """
        lb = self._on_loop
        facts = None if self.backend.blocking and lb is None else self.users.remembered(req.user)
        if facts is None:
            return None
        login = self._login(req, caller_pid, received)
        login.facts = facts
        self._mark(login, "user")
        now: Outcome | Started | None = None
        try:
            step = self._local_step(login, early_pin=True) if lb is None else self._on(login, lb)
            if step is None or isinstance(step, Outcome):
                now = step
            elif lb is not None and isinstance(step, policy.Decision) and step.verdict == "adopt":
                done = self.adopter.now(login, step, lb, wait_s)
                now = Started(login, step) if done is None else self._conclude(login, done)
            elif step is policy.Need.CALLERID:
                now = Started(login, step)  # `account` takes the login (its pin) over
            else:
                assert isinstance(step, policy.Decision)
                now = self._conclude(login, step)
            return now
        finally:
            if not isinstance(now, Started):
                login.release()  # the login has ended here (what was not handed to an adoption)

    async def account(
        self,
        req: PamRequest,
        caller_pid: int,
        received: float | None = None,
        started: Started | None = None,
    ) -> Outcome:
        """Decide one login (PAM account phase) and carry the decision out (from where
        `account_now` left it, if ``started``).

        With a blocking backend the local work takes at most two worker-thread hops (facts,
        and the adoption with the job's namespaces when no peer is needed; the adoption after
        a peer query); with a non-blocking one it all runs on the loop. The peer query runs on
        the loop. The record's latency counts from ``received`` (when the request arrived) if
        given.
        """
        login = started.login if started is not None else self._login(req, caller_pid, received)
        try:
            return await self._account(login, started.step if started is not None else None)
        finally:
            login.release()  # on the loop: whoever used the pin (the loop) is done with it

    async def _account(self, login: Login, begun: policy.Need | policy.Decision | None) -> Outcome:
        """`account` from where `account_now` left it (``begun``: the source is to be asked,
        or the decision's adoption finished on the loop), or from the start."""
        step: policy.Decision | policy.Need | Outcome | None = begun
        if step is None:
            login.facts = await self.users.facts(login.req.user)
            self._mark(login, "user")
            step = await self._local(login)
            if isinstance(step, Outcome):
                return step
        elif isinstance(step, policy.Decision):
            assert self._on_loop is not None
            step = await self.adopter.on_loop(login, step, self._on_loop)
        if step is policy.Need.CALLERID:
            await self._ask_source(login)
            self._mark(login, "source")
            if named_job_missing(login.facts):  # else no wait to start at all
                await self._await_named_job(login)
            step = policy.decide(login.facts, self.cfg, self.node, self.rng)
            assert isinstance(step, policy.Decision)
            if self._on_loop is not None:
                step = await self.adopter.on_loop(login, step, self._on_loop)
            else:
                step = await self._backend(login, self.adopter.carry_out, login, step)
        assert isinstance(step, policy.Decision)
        return self._conclude(login, step)

    def _login(self, req: PamRequest, caller_pid: int, received: float | None) -> Login:
        started = self.clock() if received is None else received
        return Login(req, caller_pid, started, policy.Facts(user=req.user, uid=None))

    def _conclude(self, login: Login, decision: policy.Decision) -> Outcome:
        """The outcome of a decided (and carried out) login; the session memory updated."""
        step, ns = namespace_verdict(decision, login.fetched, login.req.join, self.node)
        if step.verdict == "adopt" and step.job is not None and login.target_pid is not None:
            self.sessions_adopted.remember(login.target_pid, login.target_start, step.job)
        else:
            self.sessions_adopted.forget(login.caller_pid, login.target_pid)
        outcome = self._outcome(login, step, ns)
        if log.isEnabledFor(logging.DEBUG):  # one line per login: the record, and its timings
            steps = " ".join(f"{k}={(t - login.started) * 1e3:.2f}" for k, t in login.marks)
            log.debug("pid %d: %s; timings (ms since request): %s", login.caller_pid,
                      outcome.record.message, steps)  # fmt: skip
        return outcome

    async def _backend(self, login: Login, fn: Callable[..., _T], *args: object) -> _T:
        """A call of the backend for ``login`` (`_offload.shielded_call`)."""
        return await shielded_call(self.backend, self.executor, login.give_up, fn, *args)

    def _mark(self, login: Login, what: str) -> None:
        login.marks.append((what, self.clock()))

    async def _local(self, login: Login) -> policy.Decision | policy.Need | Outcome:
        """`_local_step` where the backend's calls run; with a `LoopAdoption` backend that
        knows the jobs at once, on the loop, the adoption driven by the loop."""
        lb = self._on_loop
        if lb is not None:
            step = self._on(login, lb)
            if step is not None:
                if isinstance(step, policy.Decision):
                    step = await self.adopter.on_loop(login, step, lb)
                return step
        # the early pin only where the loop both opens and uses it
        local_step = functools.partial(self._local_step, early_pin=not self.backend.blocking)
        found = await self._backend(login, local_step, login)
        assert found is not None  # only a jobs_now that cannot tell gives None
        return found

    def _on(self, login: Login, lb: LoopAdoption) -> policy.Decision | policy.Need | Outcome | None:
        """`_local_step` on the loop: jobs from ``lb.jobs_now``, an adoption begun, not done."""
        return self._local_step(
            login, jobs_now=lb.jobs_now, adopt=False, early_pin=True, begin=lb.begin_adoption
        )

    def _local_step(
        self,
        login: Login,
        *,
        jobs_now: Callable[[int], list[Job] | None] | None = None,
        adopt: bool = True,
        early_pin: bool = False,
        begin: Callable[[int, Job], Begun] | None = None,
    ) -> policy.Decision | policy.Need | Outcome | None:
        """Local jobs and the session connection, as the policy asks; a final adopt decision
        is carried out here too (unless ``adopt`` is false). With ``jobs_now``, the jobs come
        from it, and None is returned at once (nothing done) when it cannot tell.
        ``early_pin``: the caller is held before its identity is read (`_find_session`); only
        on the event loop, where the login's end closes the pin. ``begin``: an adopt decision's
        adoption is begun (`LoopAdoption.begin_adoption`) once the session is found, if the
        early pin holds its process and it is alive (the pin is checked before anything is
        sent); otherwise, or if that fails, the adoption begins later and fails as it says."""
        step = policy.decide(login.facts, self.cfg, self.node, self.rng)
        if step is policy.Need.JOBS:
            assert login.facts.uid is not None
            try:
                jobs = (jobs_now or self.backend.jobs_of)(login.facts.uid)
                if jobs is None:
                    return None
            except BackendError as exc:
                log.error("listing the jobs of uid %d failed: %s", login.facts.uid, exc)
                return self._error(login, "backend_error", f"cannot list jobs: {exc}")
            login.facts = login.facts.with_jobs(tuple(jobs))
            if jobs and self.primer is not None:
                self.primer()  # an adoption is likely: its kernel wait starts now
            self._mark(login, "jobs")
            step = policy.decide(login.facts, self.cfg, self.node, self.rng)
        if step is policy.Need.CALLERID:
            self._find_session(login, early_pin)
        elif isinstance(step, policy.Decision) and step.verdict == "adopt":
            self._find_session(login, early_pin)
            pin, pid = login.pin, login.target_pid
            if begin and step.job and pin and pin.pid == pid and not pin.exited():
                with contextlib.suppress(BackendError):
                    login.adopting = begin(pid, step.job)
            if adopt:
                step = self.adopter.carry_out(login, step)
        return step

    def _find_session(self, login: Login, early_pin: bool = False) -> None:
        """The process to adopt: the sshd monitor holding the connection (or the caller).

        ``early_pin``: the caller is held (`Processes.hold`) before its identity (start time)
        is read here; if it is the process adopted, the adoption uses that pin and need not
        read its start time again (`netinfo.Pin`)."""
        if early_pin:
            with contextlib.suppress(NetinfoError):  # gone: the finding says so
                login.pin = self.procs.hold(login.caller_pid)
        try:
            holder, conn = self.sessions.session_connection(
                login.caller_pid, login.req.rhost or None, login.req.lent
            )
        except NetinfoError as exc:
            log.info(
                "pid %d: no session connection (%s); adopting the caller", login.caller_pid, exc
            )
            login.target_pid = login.caller_pid
            login.target_start = self.procs.start_time(login.caller_pid)
            login.peer_status = "no_connection"
            return
        login.target_pid = holder.pid
        login.target_start = holder.start_time
        login.conn = conn
        self._mark(login, "session")

    async def _ask_source(self, login: Login) -> None:
        if login.conn is None or login.facts.uid is None:
            login.facts = login.facts.with_callerid()
            return
        status, job = await self.ask_source(login.conn, login.facts.uid)
        login.peer_status = status
        login.facts = login.facts.with_callerid(job, status)

    async def _await_named_job(self, login: Login) -> None:
        """The job-start race (`_jobwait`), never closer than DEADLINE_SLACK_S to the PAM
        deadline."""
        bound_ms = self.cfg.wait_for_job_ms
        if self.deadline_s is not None:  # never past the PAM deadline
            left = self.deadline_s - (self.clock() - login.started) - DEADLINE_SLACK_S
            bound_ms = min(bound_ms, int(left * 1000))

        def list_jobs(uid: int) -> Awaitable[list[Job]]:
            return backend_call(self.backend, self.executor, self.backend.jobs_of, uid)

        login.facts, login.waited_ms = await await_named_job(
            login.facts, user=login.req.user, bound_ms=bound_ms, clock=self.clock,
            list_jobs=list_jobs,
        )  # fmt: skip

    def _outcome(
        self, login: Login, d: policy.Decision, ns: JobNamespaces | None = None
    ) -> Outcome:
        return decided(login, d, ns, node=self.node, mode=self.mode, now=self.clock())

    def error_outcome(
        self, req: PamRequest, caller_pid: int, started: float, reason: str, text: str
    ) -> Outcome:
        """A login the PAM server ends itself with verdict=error (timeout, internal error)."""
        login = Login(req, caller_pid, started, policy.Facts(user=req.user, uid=None))
        login.peer_status = ""
        return self._error(login, reason, text)

    def _error(self, login: Login, reason: str, text: str) -> Outcome:
        return failed(login, reason, text, node=self.node, mode=self.mode, now=self.clock())

    async def open_session(self, req: PamRequest, caller_pid: int) -> PamReply:
        return await self.sessions_adopted.open_session(req, caller_pid)

    def close_session(self, caller_pid: int) -> PamReply:
        return self.sessions_adopted.close_session(caller_pid)
