"""A session phase never places a process into a job whose owner is not the PAM user, and an
adoption names only the process that was identified (issue 12, items 1 and 9).

The flow is the real `LoginFlow` with fakes at its edges (tests/fakes.py); pids here are the
fakes' own, nothing real is moved.
"""

from __future__ import annotations

import asyncio
import os
import random
import resource
from collections.abc import Sequence

import pytest

from callerid.agent.backends.base import Job
from callerid.agent.config import parse
from callerid.agent.login import LoginFlow, Outcome
from callerid.agent.netinfo import Connection, Proc, ProcessGone, ProcReader
from callerid.agent.pamproto import PamReply, PamRequest
from callerid.bus.protocol import Endpoint
from tests.fakes import FakeBackend, FakeClock, FakeProcs, FakeSessions, FakeUsers

ALICE, BOB = 1000, 1001
ALICE_JOB = Job("42", ALICE, 100.0)
PID = 4242
CONN = Connection("tcp", Endpoint("10.0.0.2", 22), Endpoint("10.0.0.1", 40022), 7, 0, "ESTABLISHED")
USERS = {"alice": (ALICE, frozenset()), "bob": (BOB, frozenset())}


def flow(procs: FakeProcs, backend: FakeBackend) -> LoginFlow:
    async def never_asked(conn: Connection, uid: int) -> tuple[str, str | None]:
        raise AssertionError("no source question in these cases")

    return LoginFlow(
        parse({"policy": {"no_jobs": "allow", "wait_for_job_ms": 0}}).policy,
        node="b",
        users=FakeUsers(USERS),
        sessions=FakeSessions(CONN, holder=PID, start=procs.start_time(PID) or 0.0),
        procs=procs,
        backend=backend,
        ask_source=never_asked,
        executor=None,
        clock=FakeClock(),
        rng=random.Random(0),
    )


def req(user: str, op: str = "account") -> PamRequest:
    return PamRequest(op, user, "sshd", "10.0.0.1", "ssh")  # type: ignore[arg-type]


def run(coro: object) -> PamReply:
    async def go() -> PamReply:
        got = await coro  # type: ignore[misc]
        return got.reply if hasattr(got, "reply") else got  # type: ignore[no-any-return]

    return asyncio.run(go())


def alice_adopted(procs: FakeProcs, backend: FakeBackend) -> LoginFlow:
    f = flow(procs, backend)
    reply = run(f.account(req("alice"), PID))
    assert (reply.verdict, reply.reason, reply.job) == ("adopt", "single_job", "42")
    assert backend.adopted == [(PID, "42")]
    return f


def test_a_later_login_on_the_pid_decided_otherwise_forgets_the_adoption() -> None:
    """The reported case: alice adopted at pid 4242, her session phase never runs; bob later
    gets pid 4242 and is allowed (no jobs: allow); bob's open_session must not move him."""
    procs, backend = FakeProcs({PID: 1.0}), FakeBackend([ALICE_JOB])
    f = alice_adopted(procs, backend)
    procs.starts[PID] = 2.0  # alice's monitor is gone; bob's process has the pid now
    assert run(f.account(req("bob"), PID)) == PamReply("allow", "no_jobs", None, "")
    assert run(f.open_session(req("bob", "open_session"), PID)) == PamReply("allow", "not_adopted")
    assert backend.adopted == [(PID, "42")]  # bob was never moved into alice's job


def test_a_reused_pid_is_not_the_adopted_process() -> None:
    """Without any login in between: the pid's start time tells it is another process."""
    procs, backend = FakeProcs({PID: 1.0}), FakeBackend([ALICE_JOB])
    f = alice_adopted(procs, backend)
    procs.starts[PID] = 2.0
    reply = run(f.open_session(req("alice", "open_session"), PID))
    assert reply == PamReply("allow", "not_adopted")
    assert backend.adopted == [(PID, "42")]


def test_a_session_of_another_user_is_never_moved_into_the_job() -> None:
    """Even the same process (same start time): the job's owner must be the session's user."""
    procs, backend = FakeProcs({PID: 1.0}), FakeBackend([ALICE_JOB])
    f = alice_adopted(procs, backend)
    backend.pid_jobs.clear()  # as if it had been moved out
    reply = run(f.open_session(req("bob", "open_session"), PID))
    assert reply == PamReply("allow", "not_adopted")
    assert backend.adopted == [(PID, "42")]
    assert run(f.open_session(req("alice", "open_session"), PID)) == PamReply(
        "allow", "not_adopted"
    )  # forgotten after the mismatch


def test_the_adopted_session_moved_out_is_put_back() -> None:
    procs, backend = FakeProcs({PID: 1.0}), FakeBackend([ALICE_JOB])
    f = alice_adopted(procs, backend)
    assert run(f.open_session(req("alice", "open_session"), PID)) == PamReply(
        "adopt", "still_in_job", "42"
    )
    backend.pid_jobs.clear()
    assert run(f.open_session(req("alice", "open_session"), PID)) == PamReply(
        "adopt", "readopted", "42"
    )
    assert backend.adopted == [(PID, "42"), (PID, "42")]
    assert procs.open_pins == []  # every pin closed


def test_a_process_that_exits_during_its_adoption_fails_it() -> None:
    procs, backend = FakeProcs({PID: 1.0}), FakeBackend([ALICE_JOB])
    procs.exiting.add(PID)
    reply = run(flow(procs, backend).account(req("alice"), PID))
    assert (reply.verdict, reply.reason) == ("deny", "adopt_failed")
    assert procs.open_pins == []


class ReplacingSessions(FakeSessions):
    """Finds the session of the process started at 1.0, which is then replaced under its pid
    (the pid reused by a process started at 2.0) before the adoption."""

    def __init__(self, procs: FakeProcs) -> None:
        super().__init__(CONN, holder=PID, start=1.0)
        self.procs = procs

    def session_connection(
        self, pid: int, rhost: str | None = None, lent: Sequence[Connection] | None = None
    ) -> tuple[Proc, Connection]:
        found = super().session_connection(pid, rhost, lent)
        self.procs.starts[PID] = 2.0
        return found


@pytest.mark.parametrize("path", ["account_now", "account", "worker"])
def test_a_process_replaced_before_the_write_is_not_adopted(path: str) -> None:
    """The session finder saw start 1.0; by the adoption the pid has another process. Held
    since before the finding (on the loop: the early pin) or pinned for the write (a worker
    thread's path): either way nothing is written, and no pin is left open."""
    procs = FakeProcs({PID: 1.0})
    backend = FakeBackend([ALICE_JOB], blocking=path == "worker")
    f = flow(procs, backend)
    f.sessions = ReplacingSessions(procs)
    if path == "account_now":
        out = f.account_now(req("alice"), PID)
        assert isinstance(out, Outcome)
        reply = out.reply
    else:
        reply = run(f.account(req("alice"), PID))
    assert (reply.verdict, reply.reason) == ("deny", "adopt_failed")
    assert backend.adopted == []  # nothing written
    assert procs.open_pins == []


def test_the_real_pin_holds_this_process_and_refuses_another_start_time() -> None:
    procs = ProcReader()
    me = os.getpid()
    start = procs.start_time(me)
    held = procs.pin(me, start)
    try:
        assert not held.exited()
    finally:
        held.close()
    with pytest.raises(ProcessGone):
        procs.pin(me, (start or 0.0) + 1.0)


def test_a_pin_works_past_fd_1024() -> None:
    """select() cannot watch an fd number >= 1024; a loaded agent holds more than that."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 2048), hard))
    procs = ProcReader()
    me = os.getpid()
    fd = os.open("/dev/null", os.O_RDONLY)
    high = os.dup2(fd, 1500)
    os.close(fd)
    try:
        held = procs.pin(me, procs.start_time(me))
        os.dup2(held.fd, 1600)
        os.close(held.fd)
        held.fd = 1600
        try:
            assert not held.exited()
        finally:
            held.close()
    finally:
        os.close(high)
