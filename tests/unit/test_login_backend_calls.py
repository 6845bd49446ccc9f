"""LoginFlow around its backend calls: a login given up while a worker thread adopts it (the
namespace fds fetched meanwhile are closed, never leaked: the fetch runs in the adoption's own
worker-thread call), and when the migration primer is asked to begin the kernel's wait."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from callerid.agent.backends.base import Job, JobNamespaces
from callerid.agent.config import parse
from callerid.agent.login import LoginFlow, Outcome, Started
from callerid.agent.netinfo import Connection
from callerid.agent.pamproto import PamRequest
from callerid.bus.protocol import Endpoint
from tests.fakes import FakeBackend, FakeClock, FakeProcs, FakeSessions, FakeUsers

UID = 1000
CONN = Connection("tcp", Endpoint("10.0.0.2", 22), Endpoint("10.0.0.1", 4000), 7, 0, "ESTABLISHED")
JOB = Job("7", UID, 1.0, 1000)


class SlowNamespaces(FakeBackend):
    """A blocking backend whose namespace fetch waits until the test lets it go."""

    def __init__(self) -> None:
        super().__init__([JOB], blocking=True, ns={"7": ("net",)})
        self.fetching = threading.Event()
        self.release = threading.Event()

    def namespaces(self, job: Job) -> JobNamespaces | None:
        self.fetching.set()
        assert self.release.wait(10)
        return super().namespaces(job)


def test_namespaces_fetched_after_the_login_was_cancelled_are_closed() -> None:
    backend = SlowNamespaces()

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as pool:
            flow = _flow(backend, [], executor=pool)
            req = PamRequest(
                op="account", user="alice", rhost="10.0.0.1", service="sshd", join=True
            )
            task = asyncio.ensure_future(flow.account(req, 4242))
            loop = asyncio.get_running_loop()
            assert await loop.run_in_executor(None, backend.fetching.wait, 10)
            task.cancel()
            await asyncio.sleep(0)  # the task sees its cancellation while the worker still runs
            assert task.cancelled() or not task.done()
            backend.release.set()
            for _ in range(1000):  # the worker's done-callback runs on the loop
                if backend.handed and not backend.handed[0].fds:
                    break
                await asyncio.sleep(0.001)

    asyncio.run(scenario())
    assert backend.adopted == [(4242, "7")]
    assert len(backend.handed) == 1
    assert backend.handed[0].fds == ()  # closed by the cancelled login


async def _no_source(conn: Connection, uid: int) -> tuple[str, str | None]:
    return "not_found", None  # the source knows of no job of the user's


def _flow(
    backend: FakeBackend,
    primed: list[int],
    executor: ThreadPoolExecutor | None = None,
) -> LoginFlow:
    return LoginFlow(
        parse({}).policy,
        node="b",
        users=FakeUsers(
            {"alice": (UID, frozenset()), "bob": (UID + 1, frozenset()), "root": (0, frozenset())}
        ),
        sessions=FakeSessions(CONN),
        procs=FakeProcs(),
        backend=backend,
        ask_source=_no_source,
        executor=executor,
        clock=FakeClock(),
        primer=lambda: primed.append(1),
    )


def test_the_primer_runs_once_for_a_login_that_has_a_job_and_never_without() -> None:
    primed: list[int] = []
    flow = _flow(FakeBackend([JOB]), primed)

    async def login(user: str) -> str:
        req = PamRequest(op="account", user=user, rhost="10.0.0.1", service="sshd")
        return (await flow.account(req, 4242)).reply.verdict

    assert asyncio.run(login("alice")) == "adopt"
    assert primed == [1]
    assert asyncio.run(login("bob")) == "deny"  # no job here: no adoption to prepare for
    assert asyncio.run(login("root")) == "allow"  # root: never even listed
    assert primed == [1]


def test_account_now_decides_at_once_or_hands_over() -> None:
    """Single job, user remembered, non-blocking backend: decided and adopted on the spot;
    two jobs: the source is needed, so it comes back Started; a blocking backend: nothing."""
    req = PamRequest(op="account", user="alice", rhost="10.0.0.1", service="sshd")
    one = _flow(FakeBackend([JOB]), [])
    done = one.account_now(req, 4242)
    assert isinstance(done, Outcome) and done.reply.verdict == "adopt"
    assert one.backend.adopted == [(4242, "7")]  # type: ignore[attr-defined]
    two = _flow(FakeBackend([JOB, Job("8", UID, 2.0, 1000)]), [])
    begun = two.account_now(req, 4242)
    assert isinstance(begun, Started)
    finished = asyncio.run(two.account(req, 4242, None, begun))
    assert finished.reply.reason == "unknown_newest"  # the source knew nothing: newest job
    blocking = _flow(FakeBackend([JOB], blocking=True), [])
    assert blocking.account_now(req, 4242) is None
    assert blocking.backend.calls == []  # type: ignore[attr-defined]
