"""Fakes for the centre of the agent: real classes that record their calls (no mock.patch).

`FakeClock` (a monotonic clock the test moves), `FakeUsers` (NSS), `FakeBackend` (jobs and
adoptions in memory), `FakeSessions` (the session connection of a pid), `FakeProcs` (process
identities and pins), `FakePeers` (the source agents' answers over the mesh), `FakeOwners`
(this node's sockets, for the source side), `FakeJournal` (the records). Each stands where
the composition root puts the real one.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import Literal

from callerid.agent import policy
from callerid.agent.backends.base import Job, JobNamespaces
from callerid.agent.journal import DecisionRecord
from callerid.agent.netinfo import Connection, NetinfoError, Owner, Proc, ProcessGone
from callerid.bus.protocol import CallerIdQuery, CallerIdReply, Endpoint


class FakeClock:
    """A clock that moves only when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeUsers:
    """NSS: ``known`` maps a user name to (uid, group names); anyone else does not exist."""

    def __init__(self, known: dict[str, tuple[int, frozenset[str]]]) -> None:
        self.known = known
        self.asked: list[str] = []

    async def facts(self, user: str) -> policy.Facts:
        return self._facts(user)

    def remembered(self, user: str) -> policy.Facts | None:
        """Known users are at hand (the sync path); an unknown one needs NSS (None)."""
        return self._facts(user) if user in self.known else None

    def _facts(self, user: str) -> policy.Facts:
        self.asked.append(user)
        if user not in self.known:
            return policy.Facts(user=user, uid=None)
        uid, groups = self.known[user]
        return policy.Facts(user=user, uid=uid, groups=groups)


class FakeBackend:
    """Jobs in memory; records every call. ``fail`` makes one method raise an exception
    (`BackendError` for the expected failures, anything else for an agent bug)."""

    name = "fake"

    def __init__(
        self,
        jobs: list[Job] | None = None,
        *,
        pid_jobs: dict[int, Job] | None = None,
        fail: dict[str, Exception] | None = None,
        blocking: bool = False,
        later: tuple[int, list[Job]] | None = None,
        ns: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        self.jobs = jobs or []
        self.ns = ns or {}  # job id -> the kinds of its namespaces (fds of this process's own)
        self.handed: list[JobNamespaces] = []  # every JobNamespaces returned, to check closing
        self.later = later  # (n, jobs): these jobs appear from the n-th jobs_of call on
        self.pid_jobs = pid_jobs or {}
        self.fail = fail or {}
        self.blocking = blocking
        self.calls: list[tuple[str, object]] = []
        self.adopted: list[tuple[int, str]] = []

    def _call(self, name: str, arg: object) -> None:
        self.calls.append((name, arg))
        if name in self.fail:
            raise self.fail[name]

    def jobs_of(self, uid: int) -> list[Job]:
        self._call("jobs_of", uid)
        if self.later is not None and self.calls.count(("jobs_of", uid)) >= self.later[0]:
            self.jobs = [*self.jobs, *self.later[1]]
            self.later = None
        return [j for j in self.jobs if j.uid == uid]

    def job_of_pid(self, pid: int) -> Job | None:
        self._call("job_of_pid", pid)
        return self.pid_jobs.get(pid)

    def adopt(self, pid: int, job: Job) -> None:
        self._call("adopt", (pid, job.id))
        self.adopted.append((pid, job.id))
        self.pid_jobs[pid] = job

    def namespaces(self, job: Job) -> JobNamespaces | None:
        self._call("namespaces", job.id)
        kinds = self.ns.get(job.id)
        if not kinds:
            return None
        ns = JobNamespaces((k, os.open(f"/proc/self/ns/{k}", os.O_RDONLY)) for k in kinds)
        self.handed.append(ns)
        return ns

    def close(self) -> None:
        self.calls.append(("close", None))


class FakeSessions:
    """The session connection of every caller: ``conn`` held by ``holder`` (None: there is
    none, as for a caller without an inet connection)."""

    def __init__(self, conn: Connection | None, holder: int = 4242, start: float = 0.0) -> None:
        self.conn = conn
        self.holder = holder
        self.start = start
        self.asked: list[tuple[int, str | None]] = []

    def session_connection(
        self, pid: int, rhost: str | None = None, lent: Sequence[Connection] | None = None
    ) -> tuple[Proc, Connection]:
        self.asked.append((pid, rhost))
        if self.conn is None:
            msg = f"no connection served by an ancestor's listener for pid {pid}"
            raise NetinfoError(msg)
        return Proc(pid=self.holder, ppid=1, comm="sshd", start_time=self.start), self.conn


class FakePin:
    """A pidfd: it holds the process that had the pid when it was made (by its start time);
    that one has exited once the pid names another (or is in ``exiting``)."""

    def __init__(self, procs: FakeProcs, pid: int) -> None:
        self.procs = procs
        self.pid = pid
        self.start = procs.start_time(pid)

    def exited(self) -> bool:
        return self.pid in self.procs.exiting or self.procs.start_time(self.pid) != self.start

    def close(self) -> None:
        self.procs.open_pins.remove(self.pid)


class FakeProcs:
    """Process identities: every pid started at ``default_start`` unless ``starts`` says
    otherwise (None: gone); a pid in ``exiting`` exits while it is being adopted."""

    def __init__(
        self, starts: dict[int, float | None] | None = None, *, default_start: float = 0.0
    ) -> None:
        self.starts = starts or {}
        self.default_start = default_start
        self.exiting: set[int] = set()
        self.open_pins: list[int] = []

    def start_time(self, pid: int) -> float | None:
        return self.starts.get(pid, self.default_start)

    def pin(self, pid: int, start_time: float | None) -> FakePin:
        now = self.start_time(pid)
        if now is None or (start_time is not None and now != start_time):
            raise ProcessGone(pid)
        self.open_pins.append(pid)
        return FakePin(self, pid)

    def hold(self, pid: int) -> FakePin:
        return self.pin(pid, None)


class FakePeers:
    """The mesh: the source agent at each host answers as ``answers`` says, (mesh status,
    reply); a host not listed never answers (the query waits until it is cancelled)."""

    def __init__(self, answers: dict[str, tuple[str, CallerIdReply | None]]) -> None:
        self.answers = answers
        self.asked: list[tuple[str, CallerIdQuery]] = []

    async def __call__(self, host: str, query: CallerIdQuery) -> tuple[str, CallerIdReply | None]:
        self.asked.append((host, query))
        if host not in self.answers:
            await asyncio.Event().wait()
        return self.answers[host]


class FakeOwners:
    """This node's sockets for the source side: ``owner`` holds every asked connection (None:
    no socket matches); ``fail`` makes the look-up raise."""

    def __init__(self, owner: Owner | None, fail: Exception | None = None) -> None:
        self.owner = owner
        self.fail = fail
        self.asked: list[tuple[str, Endpoint, Endpoint, int | None]] = []

    def socket_owner(
        self, proto: Literal["tcp", "udp"], src: Endpoint, dst: Endpoint, *, uid: int | None = None
    ) -> Owner | None:
        self.asked.append((proto, src, dst, uid))
        if self.fail is not None:
            raise self.fail
        return self.owner


class FakeJournal:
    """Keeps the decision records the PAM server hands it."""

    def __init__(self) -> None:
        self.records: list[DecisionRecord] = []

    def record(self, rec: DecisionRecord) -> None:
        self.records.append(rec)
