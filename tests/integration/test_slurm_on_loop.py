"""A single-job login with the slurm backend, kept on the event loop (`LoopAdoption`).

Real SlurmBackend, real unix sockets to a fake slurmstepd (tests/support/fake_stepd.py), the
real LoginFlow; the worker pool is one that fails the test if anything is handed to it. Once
the step's owner is remembered, the login's jobs, session and adoption need no thread; before
that (the owner must be asked, which may wait) the worker does it all, as it always did. A
hung stepd is bounded by the backend's timeout on the loop too, and leaves nothing watched.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest

from callerid.agent import policy
from callerid.agent.backends import stepd
from callerid.agent.backends._slurm_adopt import Adoption
from callerid.agent.backends.base import Job, LoopAdoption
from callerid.agent.backends.slurm import SlurmBackend, StepdTimeout
from callerid.agent.config import SlurmBackendConfig, parse
from callerid.agent.login import LoginFlow, Outcome, Started
from callerid.agent.netinfo import Connection
from callerid.agent.pamproto import PamRequest
from callerid.bus.protocol import Endpoint
from tests.fakes import FakeClock, FakeProcs, FakeSessions, FakeUsers
from tests.support.fake_stepd import FakeStepd, encode_reply
from tests.support.poll import async_wait_for, wait_for

T = TypeVar("T")
UID = 4242
EXTERN = stepd.EXTERN_STEP
CONN = Connection("tcp", Endpoint("10.0.0.2", 22), Endpoint("10.0.0.1", 4000), 7, 0, "ESTABLISHED")


class CountingPool(ThreadPoolExecutor):
    """A real pool that counts what it is given."""

    def __init__(self) -> None:
        super().__init__(2)
        self.used = 0

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        self.used += 1
        return super().submit(fn, *args, **kwargs)


def _backend(spool: Path, timeout_ms: int = 2000) -> SlurmBackend:
    cfg = SlurmBackendConfig(spool_dir=spool, node_name="fake", timeout_ms=timeout_ms)
    return SlurmBackend(cfg)


def _flow(backend: SlurmBackend, pool: CountingPool, pid: int) -> LoginFlow:
    return LoginFlow(
        parse({}).policy,
        node="b",
        users=FakeUsers({"alice": (UID, frozenset())}),
        sessions=FakeSessions(CONN, holder=pid),
        procs=FakeProcs(),
        backend=backend,
        ask_source=_no_source,
        executor=pool,
        clock=FakeClock(),
    )


# join=False: the fake stepd speaks no namespace requests (test_slurm_backend covers those)
REQ = PamRequest(op="account", user="alice", rhost="10.0.0.1", service="sshd", join=False)


def _login(backend: SlurmBackend, pool: CountingPool, pid: int) -> str:
    out = asyncio.run(_flow(backend, pool, pid).account(REQ, pid))
    return f"{out.reply.verdict}/{out.reply.reason}/{out.reply.job}"


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _no_source(conn: Connection, uid: int) -> tuple[str, str | None]:
    raise AssertionError("a single job needs no source")


def test_the_slurm_backend_offers_the_loop_path(spool: Path) -> None:
    assert isinstance(_backend(spool), LoopAdoption)


def test_a_known_owner_keeps_the_login_on_the_loop(spool: Path) -> None:
    with FakeStepd(spool / f"fake_7.{EXTERN}", uid=UID) as fake, CountingPool() as pool:
        backend = _backend(spool)
        assert backend.jobs_now(UID) is None  # not asked yet: the loop cannot tell
        assert _login(backend, pool, os.getpid()) == "adopt/single_job/7"
        first = pool.used
        assert first >= 1  # the owner had to be asked: in the worker
        fake.requests.clear()
        assert [j.id for j in backend.jobs_now(UID) or []] == ["7"]
        assert _login(backend, pool, os.getpid()) == "adopt/single_job/7"
        assert pool.used == first  # no thread at all this time
        asked = [r for r, _arg in fake.requests]
        assert asked == [
            stepd.Request.STATE,
            stepd.Request.ADD_EXTERN_PID,
        ]  # one round trip (STEP_UID: remembered; PID_IN_CONTAINER: this stepd confirmed the
        # first adoption)
        assert fake.adopted == [os.getpid(), os.getpid()]


def test_a_known_owner_login_sends_its_adoption_before_the_loop_turns(spool: Path) -> None:
    """`account_now` (the PAM server calls it as the request line is read) decides, finds the
    session and sends the stepd everything at once; no event loop exists until `account`
    finishes the login. The connection is closed when it is done."""
    pid = os.getpid()
    fds = _open_fds()
    with FakeStepd(spool / f"fake_7.{EXTERN}", uid=UID) as fake, CountingPool() as pool:
        backend = _backend(spool)
        backend.jobs_of(UID)  # the owner remembered
        flow = _flow(backend, pool, pid)
        started = flow.account_now(REQ, pid)
        assert isinstance(started, Started) and isinstance(started.step, policy.Decision)
        assert started.step.verdict == "adopt"
        wait_for(lambda: fake.adopted == [pid], what="the stepd to get ADD_EXTERN_PID")
        out = asyncio.run(flow.account(REQ, pid, None, started))
        assert (out.reply.verdict, out.reply.job) == ("adopt", "7")
        assert pool.used == 0
    assert _open_fds() == fds  # the fake's own fds closed with it


def test_a_begun_adoption_given_up_is_closed(spool: Path) -> None:
    """A login ended between its adoption's start and its end (cancelled at the PAM
    deadline) releases it: the connection is closed, nothing waits for it."""
    pid = os.getpid()
    fds = _open_fds()
    with FakeStepd(spool / f"fake_7.{EXTERN}", uid=UID, on_add="hang"), CountingPool() as pool:
        backend = _backend(spool)
        backend.jobs_of(UID)
        started = _flow(backend, pool, pid).account_now(REQ, pid)
        assert isinstance(started, Started)
        begun = started.login.adopting
        assert isinstance(begun, Adoption) and not begun.closed
        started.login.release()
        assert started.login.adopting is None
        assert begun.closed
    assert _open_fds() == fds


def test_a_lone_login_is_adopted_before_its_caller_returns(spool: Path) -> None:
    """With a wait allowed (the PAM server allows one to a login alone in flight) and a job
    known to have no namespaces, `account_now` finishes the adoption itself: an Outcome, and
    no event loop, thread or task at all."""
    pid = os.getpid()
    fds = _open_fds()
    with FakeStepd(spool / f"fake_7.{EXTERN}", uid=UID) as fake, CountingPool() as pool:
        backend = _backend(spool)
        backend.jobs_of(UID)
        out = _flow(backend, pool, pid).account_now(REQ, pid, None, 1.0)
        assert isinstance(out, Outcome)
        assert (out.reply.verdict, out.reply.reason, out.reply.job) == ("adopt", "single_job", "7")
        assert fake.adopted == [pid] and pool.used == 0
    assert _open_fds() == fds


def test_a_job_that_may_have_namespaces_is_not_waited_for_on_the_callers_stack(
    spool: Path,
) -> None:
    """Its namespaces are fetched in a worker after the adoption, so `account_now` leaves the
    begun adoption to the loop even with a wait allowed."""
    pid = os.getpid()
    with FakeStepd(spool / f"fake_7.{EXTERN}", uid=UID), CountingPool() as pool:
        backend = _backend(spool)
        backend.jobs_of(UID)
        joining = dataclasses.replace(REQ, join=True)
        started = _flow(backend, pool, pid).account_now(joining, pid, None, 1.0)
        assert isinstance(started, Started) and isinstance(started.login.adopting, Adoption)
        assert not started.login.adopting.no_namespaces
        started.login.release()


def test_an_adoption_not_answered_within_the_wait_is_finished_on_the_loop(spool: Path) -> None:
    """`adopt_now` waits its bound and leaves the exchange open; `adopt_async` goes on with it
    on the same connection (a stepd answering late, by hand here)."""
    path, pid, job = spool / f"fake_7.{EXTERN}", os.getpid(), Job("7", UID, 0.0)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)
        backend = _backend(spool)
        begun = backend.begin_adoption(pid, job)  # owner not known: hello, STEP_UID, STATE
        conn, _ = listener.accept()
        with conn:
            assert len(conn.recv(64)) == 12
            t0 = time.monotonic()
            assert backend.adopt_now(begun, 0.05) is False
            assert 0.05 <= time.monotonic() - t0 < 1.0 and not begun.closed
            conn.sendall(
                encode_reply("hello", stepd.PROTOCOL_22_05)
                + encode_reply(stepd.Request.STEP_UID, UID)
                + encode_reply(stepd.Request.STATE, 2)
            )

            async def finish() -> None:
                loop = asyncio.get_running_loop()
                conn.setblocking(False)
                task = asyncio.ensure_future(backend.adopt_async(pid, job, begun))
                got = b""
                while len(got) < 16:  # ADD_EXTERN_PID and PID_IN_CONTAINER, each with the pid
                    got += await loop.sock_recv(conn, 64)
                await loop.sock_sendall(
                    conn,
                    encode_reply(stepd.Request.ADD_EXTERN_PID, 0)
                    + encode_reply(stepd.Request.PID_IN_CONTAINER, True),
                )
                await asyncio.wait_for(task, 5)

            asyncio.run(finish())
            assert begun.closed


def test_no_namespaces_is_known_only_without_asking(spool: Path) -> None:
    off = SlurmBackendConfig(spool_dir=spool, node_name="fake", join_container=False)
    assert SlurmBackend(off).no_namespaces(Job("7", UID, 0.0))
    with FakeStepd(spool / f"fake_7.{EXTERN}", uid=UID):
        assert not _backend(spool).no_namespaces(Job("7", UID, 0.0))  # it would have to ask


def test_a_hung_stepd_is_bounded_on_the_loop_and_left_unwatched(spool: Path) -> None:
    with FakeStepd(spool / f"fake_7.{EXTERN}", uid=UID, on_add="hang"):
        backend = _backend(spool, timeout_ms=300)
        (job,) = backend.jobs_of(UID)  # owner remembered: the adoption goes out at once

        async def adopt() -> tuple[BaseException | None, float]:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            try:
                await backend.adopt_async(os.getpid(), job)
            except StepdTimeout as exc:
                return exc, loop.time() - t0
            return None, loop.time() - t0

        err, took = asyncio.run(adopt())
        assert isinstance(err, StepdTimeout)
        assert 0.3 <= took < 1.0


def test_a_cancelled_adoption_closes_its_connection(spool: Path) -> None:
    before = _open_fds()
    with FakeStepd(spool / f"fake_7.{EXTERN}", uid=UID, on_add="hang") as fake:
        backend = _backend(spool, timeout_ms=5000)
        job = Job("7", UID, 0.0)

        async def cancel_midway() -> None:
            task = asyncio.ensure_future(backend.adopt_async(os.getpid(), job))
            added = (stepd.Request.ADD_EXTERN_PID, os.getpid())
            await async_wait_for(lambda: added in fake.requests, what="ADD_EXTERN_PID, held")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(cancel_midway())
    assert _open_fds() == before  # the fake's own fds are closed too
