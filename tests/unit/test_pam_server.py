"""The PAM socket server on a real unix socket, with a stand-in login flow: deadlines, refusals,
probes, malformed input and the bound on decisions worked on at once."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from callerid.agent._pamconn import ADOPT_WAIT_S
from callerid.agent.journal import DecisionRecord, Journal
from callerid.agent.login import Outcome
from callerid.agent.pamproto import PamReply, PamRequest
from callerid.agent.pamserver import PamServer

LINE = b"CALLERID/1 op=account user=alice service=sshd rhost=10.0.0.1 tty=ssh\n"


def record(req: PamRequest, pid: int, decision: str, reason: str) -> DecisionRecord:
    return DecisionRecord(decision, reason, req.user, None, pid, None, None, None, None, 0, reason)


class Adopter:
    """Decides by awaiting ``gate`` (set: answer at once); counts decisions running at once."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.running = 0
        self.most = 0
        self.order: list[int] = []
        self.cancelled = 0
        self.requests: list[PamRequest] = []
        self.waits: list[float] = []  # what each account_now was allowed to wait

    def account_now(self, req: PamRequest, pid: int, received: float | None, wait_s: float) -> None:
        self.waits.append(wait_s)  # and nothing done: every decision is a task here

    async def account(
        self, req: PamRequest, pid: int, received: float | None = None, started: object = None
    ) -> Outcome:
        self.requests.append(req)
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1
        self.order.append(pid)
        return Outcome(PamReply("allow", "root"), record(req, pid, "allow", "root"))

    def error_outcome(
        self, req: PamRequest, pid: int, started: float, reason: str, text: str
    ) -> Outcome:
        return Outcome(PamReply("error", reason), record(req, pid, "error", reason))


async def serve(
    tmp_path: Path, body: Callable[[PamServer, Adopter, str], Awaitable[Any]], **kw: Any
) -> tuple[Any, PamServer, io.StringIO]:
    adopter = Adopter()
    out = io.StringIO()
    journal = Journal(stream=out, socket_path=str(tmp_path / "no-journald"))
    kw.setdefault("timeout_s", 0.5)
    server = PamServer(adopter, journal, clock=time.monotonic, **kw)  # type: ignore[arg-type]
    path = tmp_path / "agent.sock"
    await server.start(path)
    try:
        return await body(server, adopter, str(path)), server, out
    finally:
        await server.stop()


async def exchange(path: str, payload: bytes, *, close_write: bool = True) -> bytes:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(payload)
    if close_write:
        writer.write_eof()
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))  # type: ignore[arg-type]


def test_a_decision_not_ready_by_the_deadline_is_an_error_and_is_journaled(
    tmp_path: Path,
) -> None:
    async def body(server: PamServer, adopter: Adopter, path: str) -> tuple[bytes, float]:
        adopter.gate.clear()  # the backend hangs
        t0 = time.monotonic()
        reply = await exchange(path, LINE)
        return reply, time.monotonic() - t0

    (reply, took), server, out = run(serve(tmp_path, body))
    assert reply == b"CALLERID/1 verdict=error reason=timeout msg=\n"
    assert 0.45 <= took < 2.0
    assert "CALLERID_DECISION=error CALLERID_REASON=timeout" in out.getvalue()
    assert server.in_flight == 0


def test_a_line_not_complete_by_the_deadline_gets_no_answer(tmp_path: Path) -> None:
    async def body(server: PamServer, adopter: Adopter, path: str) -> tuple[bytes, float]:
        t0 = time.monotonic()
        reply = await exchange(path, b"CALLERID/1 op=acc", close_write=False)
        return reply, time.monotonic() - t0

    (reply, took), server, out = run(serve(tmp_path, body))
    assert reply == b""  # closed without a word
    assert 0.45 <= took < 2.0
    assert out.getvalue() == "" and server.in_flight == 0 and adopter_untouched(server)


def adopter_untouched(server: PamServer) -> bool:
    adopter: Adopter = server.flow  # type: ignore[assignment]
    return adopter.most == 0


def test_a_liveness_probe_gets_no_answer_and_leaves_nothing(tmp_path: Path) -> None:
    async def body(server: PamServer, adopter: Adopter, path: str) -> bytes:
        return await exchange(path, b"")

    reply, server, out = run(serve(tmp_path, body))
    assert out.getvalue() == ""  # nothing to journal
    assert reply == b"" and server.in_flight == 0 and server.malformed == 0


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"garbage\n", b"bad_request"),
        (b"CALLERID/1 op=account user=x" + b"x" * 9000 + b"\n", b"bad_request"),
        (b"CALLERID/1 op=account user=x", b"bad_request"),  # EOF without a newline
    ],
)
def test_malformed_input_gets_bad_request(tmp_path: Path, payload: bytes, reason: bytes) -> None:
    async def body(server: PamServer, adopter: Adopter, path: str) -> bytes:
        return await exchange(path, payload)

    reply, server, _ = run(serve(tmp_path, body))
    assert reply.startswith(b"CALLERID/1 verdict=error reason=" + reason)
    assert server.malformed == 1 and server.in_flight == 0


def test_a_client_of_another_uid_is_refused_after_its_input_is_read(tmp_path: Path) -> None:
    async def body(server: PamServer, adopter: Adopter, path: str) -> bytes:
        return await exchange(path, LINE, close_write=False)

    reply, server, _ = run(serve(tmp_path, body, allowed_uid=os.getuid() + 4242))
    assert reply.startswith(b"CALLERID/1 verdict=error reason=not_root")
    assert server.refused == 1 and adopter_untouched(server)


def test_at_most_max_active_decisions_run_at_once_and_the_rest_wait_in_order(
    tmp_path: Path,
) -> None:
    n = 10

    async def body(server: PamServer, adopter: Adopter, path: str) -> list[bytes]:
        adopter.gate.clear()
        socks = []
        for _ in range(n):  # one at a time, so that they arrive in a known order
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            await asyncio.get_running_loop().sock_connect(s, path)
            s.sendall(LINE)
            socks.append(s)
            while server.in_flight < len(socks) or (
                server.turns.active + len(server.turns.queued)
            ) < len(socks):
                await asyncio.sleep(0.001)
        assert server.turns.active == 3 and len(server.turns.queued) == n - 3
        adopter.gate.set()
        replies = [await asyncio.get_running_loop().sock_recv(s, 4096) for s in socks]
        for s in socks:
            s.close()
        return replies

    replies, server, _ = run(serve(tmp_path, body, timeout_s=5.0, max_active=3))
    adopter: Adopter = server.flow  # type: ignore[assignment]
    assert replies == [b"CALLERID/1 verdict=allow reason=root msg=\n"] * n
    assert adopter.most == 3
    assert len(adopter.order) == n and server.in_flight == 0 and server.turns.active == 0


def test_only_a_login_alone_in_flight_may_be_waited_for_on_the_loop(tmp_path: Path) -> None:
    """A slurm adoption may be waited for on the loop's stack (ADOPT_WAIT_S) only while no
    other login is in flight: the loop serves the others meanwhile instead."""

    async def body(server: PamServer, adopter: Adopter, path: str) -> list[bytes]:
        adopter.gate.clear()
        first = asyncio.ensure_future(exchange(path, LINE))
        while len(adopter.waits) < 1:
            await asyncio.sleep(0.001)
        second = asyncio.ensure_future(exchange(path, LINE))
        while len(adopter.waits) < 2:
            await asyncio.sleep(0.001)
        adopter.gate.set()
        return list(await asyncio.gather(first, second))

    replies, server, _ = run(serve(tmp_path, body, timeout_s=5.0))
    adopter: Adopter = server.flow  # type: ignore[assignment]
    assert replies == [b"CALLERID/1 verdict=allow reason=root msg=\n"] * 2
    assert adopter.waits == [ADOPT_WAIT_S, 0.0]


def test_queued_requests_are_still_bounded_by_their_deadline(
    tmp_path: Path,
) -> None:

    async def body(server: PamServer, adopter: Adopter, path: str) -> list[bytes]:
        adopter.gate.clear()  # the one active decision hangs: the queued one must not wait
        return list(await asyncio.gather(exchange(path, LINE), exchange(path, LINE)))

    replies, server, out = run(serve(tmp_path, body, max_active=1))
    assert replies == [b"CALLERID/1 verdict=error reason=timeout msg=\n"] * 2
    assert out.getvalue().count("CALLERID_REASON=timeout") == 2
    adopter: Adopter = server.flow  # type: ignore[assignment]
    assert adopter.cancelled == 1 and server.turns.active == 0 and not server.turns.queued


async def one_decided_one_queued(
    server: PamServer, adopter: Adopter, path: str
) -> tuple[asyncio.Future[bytes], asyncio.StreamWriter]:
    """With ``max_active=1``: a first request whose decision hangs (until the gate opens),
    and a second one queued behind it (its writer, still open)."""
    adopter.gate.clear()
    first = asyncio.ensure_future(exchange(path, LINE, close_write=False))
    while server.turns.active < 1:
        await asyncio.sleep(0.001)
    _reader, writer = await asyncio.open_unix_connection(path)
    writer.write(LINE)
    await writer.drain()
    while len(server.turns.queued) < 1:
        await asyncio.sleep(0.001)
    return first, writer


def test_a_queued_request_whose_client_left_is_not_decided(
    tmp_path: Path,
) -> None:

    async def body(server: PamServer, adopter: Adopter, path: str) -> bytes:
        first, writer = await one_decided_one_queued(server, adopter, path)
        writer.close()  # gives up before its turn
        await writer.wait_closed()
        adopter.gate.set()
        return await first

    reply, server, out = run(serve(tmp_path, body, timeout_s=5.0, max_active=1))
    adopter: Adopter = server.flow  # type: ignore[assignment]
    assert reply == b"CALLERID/1 verdict=allow reason=root msg=\n"
    assert len(adopter.order) == 1 and server.turns.abandoned == 1
    assert server.in_flight == 0 and server.turns.active == 0 and not server.turns.queued
    assert out.getvalue().count("CALLERID_DECISION=") == 1  # only the decided one


def test_open_connections_are_bounded_and_the_rest_wait_in_the_backlog(tmp_path: Path) -> None:
    async def body(server: PamServer, adopter: Adopter, path: str) -> tuple[int, bytes, float]:
        most = 0

        async def sample() -> None:
            nonlocal most
            while True:
                most = max(most, server.in_flight)
                await asyncio.sleep(0.002)

        sampler = asyncio.create_task(sample())
        idle = []
        for _ in range(5):  # connected, never a word: each holds a connection to its deadline
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            await asyncio.get_running_loop().sock_connect(s, path)
            idle.append(s)
        t0 = time.monotonic()
        reply = await exchange(path, LINE)  # waits in the backlog until idle ones expire
        took = time.monotonic() - t0
        sampler.cancel()
        for s in idle:
            s.close()
        return most, reply, took

    (most, reply, took), _, _ = run(serve(tmp_path, body, timeout_s=0.3, max_connections=3))
    assert most == 3  # never more open at once
    assert reply == b"CALLERID/1 verdict=allow reason=root msg=\n"
    assert took >= 0.2  # it was accepted only once idle connections had expired


def test_bad_requests_are_logged_within_a_budget(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def body(server: PamServer, adopter: Adopter, path: str) -> list[bytes]:
        return [await exchange(path, b"garbage\n") for _ in range(50)]

    caplog.set_level("WARNING", logger="callerid.agent.pamserver")
    replies, server, _ = run(serve(tmp_path, body))
    assert all(r.startswith(b"CALLERID/1 verdict=error reason=bad_request") for r in replies)
    assert server.malformed == 50
    lines = [r for r in caplog.records if r.name == "callerid.agent.pamserver"]
    assert 1 <= len(lines) <= 5  # the budget's burst; the rest are counted, said later
    assert server.noisy.budget.suppressed == 50 - len(lines)


async def lend(path: str, payload: bytes, fds: list[int]) -> bytes:
    """One exchange whose request lends ``fds`` (SCM_RIGHTS on its first bytes), as
    pam_callerid.so lends the session's socket."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.setblocking(False)
        await loop.sock_connect(s, path)
        sent = socket.send_fds(s, [payload], fds)
        if sent < len(payload):
            await loop.sock_sendall(s, payload[sent:])
        reply = b""
        while chunk := await asyncio.wait_for(loop.sock_recv(s, 4096), 5):
            reply += chunk
        return reply


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_inet_sockets_lent_with_a_request_name_its_connections_and_are_closed(
    tmp_path: Path,
) -> None:
    """Of what a root caller lends, the inet sockets are read into `PamRequest.lent` (a
    pipe and a unix socket are not); the agent keeps none of the fds."""
    with (
        socket.create_server(("127.0.0.1", 0)) as lst,
        socket.create_connection(lst.getsockname()[:2]) as tcp,
        socket.socket(socket.AF_UNIX) as unix,
    ):
        r, w = os.pipe()
        try:
            before = open_fds()

            async def body(server: PamServer, adopter: Adopter, path: str) -> bytes:
                return await lend(path, LINE, [r, unix.fileno(), tcp.fileno()])

            reply, server, _ = run(serve(tmp_path, body))
            after = open_fds()
        finally:
            os.close(r)
            os.close(w)
        local, remote = tcp.getsockname(), tcp.getpeername()
    assert reply.startswith(b"CALLERID/1 verdict=allow")
    (req,) = server.flow.requests  # type: ignore[attr-defined]
    assert req.lent is not None
    assert [(c.proto, c.local.port, c.remote.port, c.state) for c in req.lent] == [
        ("tcp", local[1], remote[1], "ESTABLISHED")
    ]
    assert after == before


def test_more_fds_than_lent_max_or_from_another_uid_are_closed_and_not_used(
    tmp_path: Path,
) -> None:
    """Past LENT_MAX (4) fds the kernel truncates what is lent: none is used (the agent walks
    the caller's fds instead). A refused caller's fds are closed unread."""
    with contextlib.ExitStack() as stack:
        socks = [
            stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) for _ in range(6)
        ]
        fds = [s.fileno() for s in socks]
        before = open_fds()

        async def body(server: PamServer, adopter: Adopter, path: str) -> bytes:
            return await lend(path, LINE, fds)

        async def one(server: PamServer, adopter: Adopter, path: str) -> bytes:
            return await lend(path, LINE, fds[:1])

        reply, server, _ = run(serve(tmp_path, body))
        refused, refusing, _ = run(serve(tmp_path, one, allowed_uid=os.getuid() + 4242))
        after = open_fds()
    assert reply.startswith(b"CALLERID/1 verdict=allow")
    (req,) = server.flow.requests  # type: ignore[attr-defined]
    assert req.lent is None
    assert refused.startswith(b"CALLERID/1 verdict=error reason=not_root")
    assert refusing.refused == 1 and after == before


def test_a_queued_client_still_there_is_decided_even_if_it_sent_more(tmp_path: Path) -> None:
    """What makes a queued client gone is its end closed or reset (`client_gone` polls for
    it), not bytes it sent after its line: those are left unread."""

    async def body(server: PamServer, adopter: Adopter, path: str) -> bytes:
        first, writer = await one_decided_one_queued(server, adopter, path)
        writer.write(b"more after the line\n")  # not read: the line was
        await writer.drain()
        adopter.gate.set()
        try:  # its answer: the agent closes a socket with bytes unread, which resets it
            return await first
        finally:
            writer.close()

    reply, server, out = run(serve(tmp_path, body, timeout_s=5.0, max_active=1))
    adopter: Adopter = server.flow  # type: ignore[assignment]
    assert reply == b"CALLERID/1 verdict=allow reason=root msg=\n"
    assert len(adopter.order) == 2 and server.turns.abandoned == 0
    assert out.getvalue().count("CALLERID_DECISION=") == 2
