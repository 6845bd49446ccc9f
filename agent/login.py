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

import dataclasses
import logging
import random
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol

from callerid.agent import policy
from callerid.agent._offload import backend_call
from callerid.agent.backends.base import Backend, BackendError, Job
from callerid.agent.config import PolicyConfig
from callerid.agent.journal import DecisionRecord
from callerid.agent.memo import Memo
from callerid.agent.netinfo import Connection, NetinfoError, Proc
from callerid.agent.pamproto import PamReply, PamRequest

__all__ = [
    "AskSource",
    "Held",
    "LoginFlow",
    "Outcome",
    "Processes",
    "SessionFinder",
    "UserSource",
]

log = logging.getLogger(__name__)

SESSION_MEMORY = 4096  # adopted monitor pids remembered for open_session re-checks


class UserSource(Protocol):
    def facts(self, user: str) -> Awaitable[policy.Facts]:
        """The user's uid (None: no such user) and groups."""
        ...


class SessionFinder(Protocol):
    def session_connection(self, pid: int, rhost: str | None = None) -> tuple[Proc, Connection]:
        """The sshd session process (``pid`` or an ancestor) and the connection it serves;
        NetinfoError when there is none."""
        ...


class Held(Protocol):
    """A process pinned by its identity (`netinfo.Pin`)."""

    def exited(self) -> bool: ...

    def close(self) -> None: ...


class Processes(Protocol):
    """Process identity (`netinfo.ProcReader`): start times, and pins for adoption."""

    def start_time(self, pid: int) -> float | None: ...

    def pin(self, pid: int, start_time: float | None) -> Held:
        """Hold ``pid`` if it is still the process started at ``start_time``; ProcessGone
        (a NetinfoError) when it is not."""
        ...


class AskSource(Protocol):
    def __call__(self, conn: Connection, uid: int) -> Awaitable[tuple[str, str | None]]:
        """(peer status, the job id the source named or None) for ``conn`` and ``uid``."""
        ...


@dataclass(frozen=True, slots=True)
class Outcome:
    reply: PamReply
    record: DecisionRecord


@dataclass(slots=True)
class _Login:
    """Mutable scratch state of one login while its facts are gathered."""

    req: PamRequest
    caller_pid: int
    started: float
    facts: policy.Facts
    target_pid: int | None = None
    target_start: float | None = None  # the target's start time: its identity with the pid
    conn: Connection | None = None
    peer_status: str = "skipped"
    marks: list[tuple[str, float]] = dataclasses.field(default_factory=list)


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
    ) -> None:
        self.cfg = cfg
        self.node = node
        self.users = users
        self.sessions = sessions
        self.procs = procs
        self.backend = backend
        self.ask_source = ask_source
        self.executor = executor
        self.clock = clock
        self.rng = rng or random.Random()  # noqa: S311 - job choice, not crypto
        # monitor pid -> (its start time, the job it was adopted into), for open_session. True
        # only for that very process: open_session checks the start time (a pid is reused
        # once its process is gone) and the job's owner against the session's user; a later
        # login on the pid decided otherwise forgets it; so do close_session and the bound.
        self.adopted: Memo[int, tuple[float | None, Job]] = Memo(
            max_entries=max_sessions, ttl_s=None, clock=clock
        )

    async def account(
        self, req: PamRequest, caller_pid: int, received: float | None = None
    ) -> Outcome:
        """Decide one login (PAM account phase) and carry the decision out.

        With a blocking backend the local work takes at most two worker-thread hops (facts,
        and the adoption when no peer is needed; the adoption after a peer query); with a
        non-blocking one it all runs on the loop. The peer query runs on the loop. The
        record's latency counts from ``received`` (when the request arrived) if given.
        """
        started = self.clock() if received is None else received
        login = _Login(req, caller_pid, started, policy.Facts(user=req.user, uid=None))
        login.facts = await self.users.facts(req.user)
        self._mark(login, "user")
        step = await backend_call(self.backend, self.executor, self._local_step, login)
        if isinstance(step, Outcome):
            return step
        if step is policy.Need.CALLERID:
            await self._ask_source(login)
            self._mark(login, "source")
            step = policy.decide(login.facts, self.cfg, self.node, self.rng)
            assert isinstance(step, policy.Decision)
            step = await backend_call(self.backend, self.executor, self._carry_out, login, step)
        assert isinstance(step, policy.Decision)
        if step.verdict == "adopt" and step.job is not None and login.target_pid is not None:
            self.adopted.put(login.target_pid, (login.target_start, step.job))
        else:
            self.adopted.pop(caller_pid)
            if login.target_pid is not None:
                self.adopted.pop(login.target_pid)
        if log.isEnabledFor(logging.DEBUG):
            steps = " ".join(f"{k}={(t - login.started) * 1e3:.2f}" for k, t in login.marks)
            log.debug("pid %d timings (ms since request): %s", caller_pid, steps)
        return self._outcome(login, step)

    def _mark(self, login: _Login, what: str) -> None:
        login.marks.append((what, self.clock()))

    def _local_step(self, login: _Login) -> policy.Decision | policy.Need | Outcome:
        """Local jobs and the session connection, as the policy asks; a final adopt decision
        is carried out here too."""
        step = policy.decide(login.facts, self.cfg, self.node, self.rng)
        if step is policy.Need.JOBS:
            assert login.facts.uid is not None
            try:
                jobs = self.backend.jobs_of(login.facts.uid)
            except BackendError as exc:
                log.error("listing the jobs of uid %d failed: %s", login.facts.uid, exc)
                return self._error(login, "backend_error", f"cannot list jobs: {exc}")
            login.facts = login.facts.with_jobs(tuple(jobs))
            self._mark(login, "jobs")
            step = policy.decide(login.facts, self.cfg, self.node, self.rng)
        if step is policy.Need.CALLERID:
            self._find_session(login)
        elif isinstance(step, policy.Decision) and step.verdict == "adopt":
            self._find_session(login)
            step = self._carry_out(login, step)
        return step

    def _find_session(self, login: _Login) -> None:
        """The process to adopt: the sshd monitor holding the connection (or the caller)."""
        try:
            holder, conn = self.sessions.session_connection(
                login.caller_pid, login.req.rhost or None
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

    async def _ask_source(self, login: _Login) -> None:
        if login.conn is None or login.facts.uid is None:
            login.facts = login.facts.with_callerid()
            return
        status, job = await self.ask_source(login.conn, login.facts.uid)
        login.peer_status = status
        login.facts = login.facts.with_callerid(job, status)

    def _carry_out(self, login: _Login, decision: policy.Decision) -> policy.Decision:
        """Adopt the session process into the decided job."""
        if decision.verdict != "adopt":
            return decision
        assert decision.job is not None and login.target_pid is not None
        try:
            self._adopt(login.target_pid, login.target_start, decision.job)
        except (BackendError, NetinfoError) as exc:
            log.warning(
                "adopting pid %d into job %s failed: %s", login.target_pid, decision.job.id, exc
            )
            return policy.after_adopt_failure(decision, self.cfg, self.node)
        finally:
            self._mark(login, "adopt")
        return decision

    def _adopt(self, pid: int, start: float | None, job: Job) -> None:
        """Adopt the process ``pid`` started at ``start`` into ``job``, and only that process
        (see `netinfo.Pin`): NetinfoError if it is gone, BackendError if it exits meanwhile."""
        held = self.procs.pin(pid, start)
        try:
            self.backend.adopt(pid, job)
            if held.exited():
                msg = f"process {pid} exited while it was being adopted"
                raise BackendError(msg)
        finally:
            held.close()

    def _outcome(self, login: _Login, d: policy.Decision) -> Outcome:
        job = d.job.id if d.job else None
        uid = login.facts.uid
        who = f"{login.req.user} (uid {uid})" if uid is not None else login.req.user
        where = f" from {login.conn.remote}" if login.conn else ""
        what = {"adopt": f"adopted into job {job}", "allow": "allowed", "deny": "denied"}[d.verdict]
        record = self._record(login, d.verdict, d.reason, job, f"{who}{where} {what} ({d.reason})")
        log.debug("%s", record.message)  # the journal record is the log line
        return Outcome(PamReply(d.verdict, d.reason, job, d.user_message), record)

    def error_record(
        self, req: PamRequest, caller_pid: int, started: float, reason: str, text: str
    ) -> DecisionRecord:
        """The record of a login the PAM server answered with verdict=error itself."""
        login = _Login(req, caller_pid, started, policy.Facts(user=req.user, uid=None))
        login.peer_status = ""
        return self._error(login, reason, text).record

    def _error(self, login: _Login, reason: str, text: str) -> Outcome:
        """verdict=error: the PAM module's on_error= decides (default deny)."""
        record = self._record(login, "error", reason, None, f"{login.req.user}: {text} ({reason})")
        return Outcome(PamReply("error", reason), record)

    def _record(
        self, login: _Login, decision: str, reason: str, job: str | None, message: str
    ) -> DecisionRecord:
        conn = login.conn
        return DecisionRecord(
            decision=decision,
            reason=reason,
            user=login.req.user,
            uid=login.facts.uid,
            pid=login.target_pid if login.target_pid is not None else login.caller_pid,
            job=job,
            src=str(conn.remote) if conn else None,
            dst=str(conn.local) if conn else None,
            peer_status=login.peer_status or None,
            latency_us=int((self.clock() - login.started) * 1e6),
            message=message,
            service=login.req.service or None,
            node=self.node,
        )

    async def open_session(self, req: PamRequest, caller_pid: int) -> PamReply:
        """Session phase: make sure a session adopted at account time is still in its job.

        Something between the account and session phases (a misplaced pam_systemd) may have
        moved the monitor out of the job; it is put back, but only the very process adopted
        at account time (same pid and start time) and only into a job of the session's user.
        """
        hit = self.adopted.get(caller_pid)
        if hit is None:
            return PamReply("allow", "not_adopted")
        start, job = hit
        facts = await self.users.facts(req.user)
        if facts.uid != job.uid or self.procs.start_time(caller_pid) != start:
            self.adopted.pop(caller_pid)
            log.warning(
                "pid %d: session of %s (uid %s) is not the one adopted into job %s (uid %d) "
                "at account time; not touched", caller_pid, req.user, facts.uid, job.id, job.uid,
            )  # fmt: skip
            return PamReply("allow", "not_adopted")
        backend = self.backend
        current = await backend_call(backend, self.executor, backend.job_of_pid, caller_pid)
        if current is not None and current.id == job.id:
            return PamReply("adopt", "still_in_job", job.id)
        try:
            await backend_call(backend, self.executor, self._adopt, caller_pid, start, job)
        except (BackendError, NetinfoError) as exc:
            log.warning("re-adopting pid %d into job %s failed: %s", caller_pid, job.id, exc)
            return PamReply("error", "readopt_failed")
        log.warning(
            "pid %d had left job %s before the session opened; re-adopted", caller_pid, job.id
        )
        return PamReply("adopt", "readopted", job.id)

    def close_session(self, caller_pid: int) -> PamReply:
        self.adopted.pop(caller_pid)
        return PamReply("allow", "closed")
