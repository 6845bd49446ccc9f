"""One login, decided and carried out: the destination-side flow of DESIGN.md.

`Adopter.account()` gathers the facts `policy.decide` asks for (user, local jobs, the source
agent's answer), adopts the sshd session process into the chosen job, and returns the PAM
reply together with the journal record. `Adopter.answer()` is the source side: which job owns
this connection, told only when the job belongs to the uid in the query.

Where the work runs: reading /proc and sock_diag, and a non-blocking backend's (cgroup) calls,
are done right on the event loop: they are quick reads and writes of the kernel's files, a
thread hop costs more than they do, and under a login storm threads mostly fight over the GIL
(measured: 2.5x the CPU per decision with 8 worker threads). What may wait on another process
runs in the executor passed in: NSS look-ups (sssd/LDAP; answers are then remembered for
``USER_TTL_S``) and a blocking backend's calls (slurmstepd RPCs). Nothing here reads the clock
except through the injected ``clock``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import grp
import logging
import os
import pwd
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol, TypeVar

from callerid.agent import policy
from callerid.agent.backends.base import Backend, BackendError, Job
from callerid.agent.config import Config
from callerid.agent.journal import DecisionRecord
from callerid.agent.netinfo import Connection, NetInfo, NetinfoError, Owner
from callerid.agent.pamproto import PamReply, PamRequest
from callerid.bus.protocol import CallerIdQuery, CallerIdReply, ErrorCode, error_reply

__all__ = ["Adopter", "Outcome", "PeerAsk"]

log = logging.getLogger(__name__)
T = TypeVar("T")

SESSION_MEMORY = 4096  # adopted monitor pids remembered for open_session re-checks
USER_TTL_S = 60.0  # how long a user's uid and groups are remembered (sssd keeps them longer)
USER_MEMORY = 4096


class PeerAsk(Protocol):
    """Ask the agent at ``host`` a CallerIdQuery; returns (peer status, reply or None).

    The asker sets the request id (it owns the connection the reply comes back on)."""

    def __call__(
        self, host: str, query: CallerIdQuery
    ) -> Awaitable[tuple[str, CallerIdReply | None]]: ...


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
    conn: Connection | None = None
    peer_status: str = "skipped"
    marks: list[tuple[str, float]] = dataclasses.field(default_factory=list)


class Adopter:
    def __init__(
        self,
        cfg: Config,
        *,
        node: str,
        netinfo: NetInfo,
        backend: Backend,
        ask_peer: PeerAsk,
        is_local: Callable[[str], bool],
        executor: Executor | None,
        clock: Callable[[], float],
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.node = node
        self.netinfo = netinfo
        self.backend = backend
        self.ask_peer = ask_peer
        self.is_local = is_local
        self.executor = executor
        self.clock = clock
        self.rng = rng or random.Random()  # noqa: S311 - job choice, not crypto
        self.sessions: OrderedDict[int, Job] = OrderedDict()
        self._users: OrderedDict[str, tuple[float, policy.Facts]] = OrderedDict()

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ------------------------------------------------------------------ destination side

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        """A backend call: on the loop when the backend never waits, else in a thread."""
        if self.backend.blocking:
            return await self._run(fn, *args)
        return fn(*args)

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
        login.facts = await self._user(req.user)
        self._mark(login, "user")
        step = await self._call(self._local_step, login)
        if isinstance(step, Outcome):
            return step
        if step is policy.Need.CALLERID:
            await self._ask_source(login)
            self._mark(login, "source")
            step = policy.decide(login.facts, self.cfg.policy, self.node, self.rng)
            assert isinstance(step, policy.Decision)
            step = await self._call(self._carry_out, login, step)
        assert isinstance(step, policy.Decision)
        if step.verdict == "adopt" and step.job is not None and login.target_pid is not None:
            self.sessions[login.target_pid] = step.job
            while len(self.sessions) > SESSION_MEMORY:
                self.sessions.popitem(last=False)
        if log.isEnabledFor(logging.DEBUG):
            steps = " ".join(f"{k}={(t - login.started) * 1e3:.2f}" for k, t in login.marks)
            log.debug("pid %d timings (ms since request): %s", caller_pid, steps)
        return self._outcome(login, step)

    def _mark(self, login: _Login, what: str) -> None:
        login.marks.append((what, self.clock()))

    def _local_step(self, login: _Login) -> policy.Decision | policy.Need | Outcome:
        """Local jobs and the session connection, as the policy asks; a final adopt decision
        is carried out here too."""
        step = policy.decide(login.facts, self.cfg.policy, self.node, self.rng)
        if step is policy.Need.JOBS:
            assert login.facts.uid is not None
            try:
                jobs = self.backend.jobs_of(login.facts.uid)
            except BackendError as exc:
                log.error("listing the jobs of uid %d failed: %s", login.facts.uid, exc)
                return self._error(login, "backend_error", f"cannot list jobs: {exc}")
            login.facts = login.facts.with_jobs(tuple(jobs))
            self._mark(login, "jobs")
            step = policy.decide(login.facts, self.cfg.policy, self.node, self.rng)
        if step is policy.Need.CALLERID:
            self._find_session(login)
        elif isinstance(step, policy.Decision) and step.verdict == "adopt":
            self._find_session(login)
            step = self._carry_out(login, step)
        return step

    async def _user(self, user: str) -> policy.Facts:
        """The user's uid and groups: remembered for USER_TTL_S, else asked of NSS in a thread
        (with sssd or LDAP a look-up may wait on the network). Unknown users are not
        remembered: they may be created any moment."""
        now = self.clock()
        hit = self._users.get(user)
        if hit is not None and now - hit[0] < USER_TTL_S:
            return hit[1]
        facts = await self._run(self._user_facts, user)
        if facts.uid is not None:
            self._users[user] = (now, facts)
            self._users.move_to_end(user)
            while len(self._users) > USER_MEMORY:
                self._users.popitem(last=False)
        return facts

    def forget_users(self) -> None:
        """Drop the remembered users (SIGHUP: the policy's groups may have changed, or NSS)."""
        self._users.clear()

    def _user_facts(self, user: str) -> policy.Facts:
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            return policy.Facts(user=user, uid=None)
        groups: frozenset[str] = frozenset()
        if self.cfg.policy.exempt_groups and not (self.cfg.policy.ignore_root and pw.pw_uid == 0):
            groups = _group_names(user, pw.pw_gid)
        return policy.Facts(user=user, uid=pw.pw_uid, groups=groups)

    def _find_session(self, login: _Login) -> None:
        """The process to adopt: the sshd monitor holding the connection (or the caller)."""
        try:
            holder, conn = self.netinfo.session_connection(
                login.caller_pid, login.req.rhost or None
            )
        except NetinfoError as exc:
            log.info(
                "pid %d: no session connection (%s); adopting the caller", login.caller_pid, exc
            )
            login.target_pid = login.caller_pid
            login.peer_status = "no_connection"
            return
        login.target_pid = holder.pid
        login.conn = conn
        self._mark(login, "session")

    async def _ask_source(self, login: _Login) -> None:
        conn = login.conn
        if conn is None or login.facts.uid is None:
            login.facts = login.facts.with_callerid()
            return
        query = CallerIdQuery(  # id 0: the mesh client gives the real one (ask_peer)
            id=0, proto=conn.proto, src=conn.remote, dst=conn.local, uid=login.facts.uid
        )
        reply: CallerIdReply | None
        if self.is_local(conn.remote.ip):
            reply = await self.answer(query, peer="local")
            status = "local" if reply.status == "found" else f"local_{reply.status}"
        else:
            status, reply = await self.ask_peer(conn.remote.ip, query)
            if reply is not None and status == "ok":
                status = reply.status  # found | not_found | error
        job = reply.job if reply is not None and reply.status == "found" else None
        login.peer_status = status
        login.facts = login.facts.with_callerid(job, status)

    def _carry_out(self, login: _Login, decision: policy.Decision) -> policy.Decision:
        """Adopt the session process into the decided job."""
        if decision.verdict != "adopt":
            return decision
        assert decision.job is not None and login.target_pid is not None
        try:
            self.backend.adopt(login.target_pid, decision.job)
        except BackendError as exc:
            log.warning(
                "adopting pid %d into job %s failed: %s", login.target_pid, decision.job.id, exc
            )
            return policy.after_adopt_failure(decision, self.cfg.policy, self.node)
        finally:
            self._mark(login, "adopt")
        return decision

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
        moved the monitor out of the job; it is put back.
        """
        job = self.sessions.get(caller_pid)
        if job is None:
            return PamReply("allow", "not_adopted")
        current = await self._call(self.backend.job_of_pid, caller_pid)
        if current is not None and current.id == job.id:
            return PamReply("adopt", "still_in_job", job.id)
        try:
            await self._call(self.backend.adopt, caller_pid, job)
        except BackendError as exc:
            log.warning("re-adopting pid %d into job %s failed: %s", caller_pid, job.id, exc)
            return PamReply("error", "readopt_failed")
        log.warning(
            "pid %d had left job %s before the session opened; re-adopted", caller_pid, job.id
        )
        return PamReply("adopt", "readopted", job.id)

    def close_session(self, caller_pid: int) -> PamReply:
        self.sessions.pop(caller_pid, None)
        return PamReply("allow", "closed")

    # ------------------------------------------------------------------ source side

    async def answer(self, query: CallerIdQuery, peer: str) -> CallerIdReply:
        """Which job owns src -> dst on this node? Told only if it belongs to query.uid."""
        t0 = self.clock()
        try:
            owner, job = await self._call(self._owner_and_job, query)
        except (BackendError, NetinfoError) as exc:
            log.warning("query %d from %s: lookup failed: %s", query.id, peer, exc)
            return error_reply(query.id, self.node, ErrorCode.BACKEND, "lookup failed")
        if owner is None:
            reason = "no such connection"
        elif job is None:
            reason = "connection not in a job"
        elif job.uid != query.uid:
            log.info(
                "query %d from %s: %s -> %s is in job %s of uid %d, not uid %d: not told",
                query.id,
                peer,
                query.src,
                query.dst,
                job.id,
                job.uid,
                query.uid,
            )
            reason = "no such connection"  # the same words: never reveal another user's job
        else:
            log.debug("query %d from %s: job %s (%.2f ms)", query.id, peer, job.id, self._ms(t0))
            return CallerIdReply(id=query.id, status="found", node=self.node, job=job.id)
        log.debug("query %d from %s: %s (%.2f ms)", query.id, peer, reason, self._ms(t0))
        return CallerIdReply(id=query.id, status="not_found", node=self.node, reason=reason)

    def _owner_and_job(self, query: CallerIdQuery) -> tuple[Owner | None, Job | None]:
        """The socket's owner process and its job (in one worker-thread hop if blocking)."""
        owner = self.netinfo.socket_owner(query.proto, query.src, query.dst, uid=query.uid)
        return owner, (self.backend.job_of_pid(owner.pid) if owner else None)

    def _ms(self, since: float) -> float:
        return (self.clock() - since) * 1e3


def _group_names(user: str, gid: int) -> frozenset[str]:
    names = set()
    for g in os.getgrouplist(user, gid):
        try:
            names.add(grp.getgrgid(g).gr_name)
        except KeyError:
            continue
    return frozenset(names)
