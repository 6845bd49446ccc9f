"""The PAM socket server: one line in, one line out, for pam_callerid.so and calleridctl.

The socket is a unix stream socket, mode 0600, root only; the line format is pamproto.py's.
One handler per op (`PamServer._dispatch`):

    account        CALLERID/1 op=account user=U service=S rhost=R tty=T
                   [ns=0|1] -> CALLERID/1 verdict=adopt|allow|deny|error reason=W [job=J]
                   [gid=G] [ns=KINDS, with as many fds] msg=M
    open_session   same fields -> verdict=adopt|allow|error (re-adopts a moved session)
    close_session  same fields -> verdict=allow
    status         (calleridctl) -> verdict=allow reason=status msg=<the agent's counters, JSON>

The server takes the caller's pid and uid from SO_PEERCRED, refuses any uid but 0, reads at
most one bounded line, and always answers within ``pam_timeout_ms``: when the decision is not
ready by then (a hung backend), the reply is verdict=error reason=timeout. The job's namespaces
(`login.Outcome.namespaces`) go with an account reply as SCM_RIGHTS, to a root peer only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Callable
from pathlib import Path

from callerid.agent._loginports import LoginHandler, RecordSink
from callerid.agent._loginstate import Outcome, Started
from callerid.agent._pamturns import Turns
from callerid.agent._unixsock import bind_unix, peer_cred, send_with_fds
from callerid.agent.pamproto import (
    MAX_LINE,
    PamProtocolError,
    PamReply,
    PamRequest,
    format_reply,
    parse_request,
)
from callerid.bus.loglimit import LogBudget, QuietLog

__all__ = ["LoginHandler", "PamServer", "RecordSink"]

log = logging.getLogger(__name__)

DISCARD_MAX = 64 * 1024
DISCARD_TIMEOUT_S = 0.05
MAX_ACTIVE = 64  # default bound of decisions worked on at once; later ones wait in order
MAX_CONNECTIONS = 16384  # open client connections; beyond, new ones wait in the backlog
ACCEPT_BATCH = 64  # connections accepted per wake-up of the listening socket
ACCEPT_RETRY_S = 0.1  # pause after accept() failed (out of fds or memory)
RECV_SIZE = MAX_LINE + 1


class PamServer:
    """The PAM socket, served straight from the event loop's selector.

    A login is one short connection carrying one line each way, so connections are accepted
    in batches and read at once (the line is nearly always there already), without asyncio
    transports: per connection this costs one object and one task, and a reader only when the
    line is late. Deadlines and turns are kept by `_pamturns.Turns`; `_PamConnection` holds
    one client's state.
    """

    def __init__(
        self,
        flow: LoginHandler,
        journal: RecordSink,
        *,
        timeout_s: float,
        clock: Callable[[], float],
        allowed_uid: int = 0,
        max_active: int = MAX_ACTIVE,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.flow = flow
        self.turns = Turns(max_active)
        self.max_connections = max_connections
        self.journal = journal
        self.timeout_s = timeout_s
        self.clock = clock
        self.allowed_uid = allowed_uid
        self.in_flight = 0
        self.refused = 0
        self.malformed = 0
        self.accept_errors = 0
        self.status: Callable[[], dict[str, object]] | None = None  # set by the daemon
        # anyone with root can send garbage: such lines are logged within a budget
        self.noisy = QuietLog(
            log, logging.WARNING, "refused or malformed PAM socket requests", LogBudget(clock)
        )
        self._paused = False  # not accepting: max_connections are open
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self, path: Path) -> None:
        self._sock = bind_unix(path)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._accept)
        self.path = path

    async def stop(self) -> None:
        """Stop accepting; requests in flight go on (see `drain`)."""
        if self._sock is not None:
            assert self._loop is not None
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self.noisy.close()

    async def drain(self, deadline_s: float) -> None:
        """Wait (at most ``deadline_s``) until every request in flight has been answered."""
        if self.in_flight:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(deadline_s):
                    await self._idle.wait()

    def _accept(self) -> None:
        assert self._sock is not None and self._loop is not None
        for _ in range(ACCEPT_BATCH):
            if self.in_flight >= self.max_connections:  # the rest wait in the kernel's backlog
                self._loop.remove_reader(self._sock.fileno())
                self._paused = True
                return
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE, ENFILE, ENOMEM: wait a little, do not spin
                self.accept_errors += 1
                self.noisy("cannot accept PAM connections: %s; retrying in %d ms", exc, 100)
                fd = self._sock.fileno()
                self._loop.remove_reader(fd)
                self._loop.call_later(ACCEPT_RETRY_S, self._resume_accept, fd)
                return
            _PamConnection(self, conn, self._loop).begin()

    def _resume_accept(self, fd: int) -> None:
        if self._sock is not None and self._sock.fileno() == fd and self._loop is not None:
            self._loop.add_reader(fd, self._accept)

    def _begin(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def _end(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self._idle.set()
        if self._paused and self.in_flight < self.max_connections and self._sock is not None:
            self._paused = False
            self._resume_accept(self._sock.fileno())

    async def _decide(
        self, req: PamRequest, pid: int, started: float, begun: Started | None = None
    ) -> PamReply | Outcome:
        try:
            return await self._dispatch(req, pid, started, begun)
        except Exception:
            log.exception("internal error deciding for pid %d", pid)
            return self._error_answer(req, pid, started, "agent_error", "internal error")

    async def _dispatch(
        self, req: PamRequest, pid: int, started: float, begun: Started | None
    ) -> PamReply | Outcome:
        """One handler per op; the wire schema of each is in the module docstring."""
        if req.op == "account":  # its record is journaled once the reply is out (_answer)
            return await self.flow.account(req, pid, started, begun)
        if req.op == "open_session":
            return await self.flow.open_session(req, pid)
        if req.op == "status":
            body = self.status() if self.status is not None else {}
            return PamReply("allow", "status", None, json.dumps(body, separators=(",", ":")))
        return self.flow.close_session(pid)

    def _error_answer(
        self, req: PamRequest, pid: int, started: float, reason: str, text: str
    ) -> PamReply:
        """verdict=error from the server itself; a login's is journaled (and, in audit mode,
        let through: the flow says so)."""
        if req.op != "account":
            return PamReply("error", reason)
        outcome = self.flow.error_outcome(req, pid, started, reason, text)
        self.journal.record(outcome.record)
        return outcome.reply


class _PamConnection:
    """One client: read one bounded line, decide, write one line, close.

    States: ``read`` (collecting the line), ``queued`` (waiting for a free decision slot,
    see `_pamturns.Turns`), ``busy`` (deciding), ``discard`` (a refused or malformed client:
    what it sends is read and dropped, bounded in size and time, before the answer, because
    closing a unix socket with unread data resets it and the client would lose the answer),
    ``done``. The deadline (``timeout_s`` from the accept) bounds all of it: a line not
    complete by then gets no answer; a decision not ready gets verdict=error reason=timeout
    (and is cancelled). A client that leaves while its decision runs does not stop it: the
    login's record is still written.
    """

    __slots__ = (
        "buf",
        "deadline",
        "left",
        "loop",
        "pending",
        "pid",
        "reading",
        "req",
        "server",
        "sock",
        "started",
        "state",
        "task",
        "timer",
        "uid",
    )

    def __init__(
        self, server: PamServer, sock: socket.socket, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.server = server
        self.sock = sock
        self.loop = loop
        self.state = "read"
        self.buf = b""
        self.pid = 0
        self.uid = -1
        self.req: PamRequest | None = None
        self.pending: PamReply | None = None  # the answer once discarding ends
        self.left = 0
        self.reading = False
        self.task: asyncio.Task[PamReply | Outcome] | None = None
        self.timer: asyncio.TimerHandle | None = None  # only while discarding
        self.started = server.clock()
        self.deadline = loop.time() + server.timeout_s

    def begin(self) -> None:
        srv = self.server
        srv._begin()
        srv.turns.watch(self, self.loop)
        try:
            self.sock.setblocking(False)
            self.pid, self.uid = peer_cred(self.sock)
        except OSError as exc:
            log.debug("pam connection without credentials: %s", exc)
            self._finish(None)
            return
        if self.uid != srv.allowed_uid:
            srv.refused += 1
            srv.noisy("refused a PAM socket client: pid %d uid %d is not root", self.pid, self.uid)
            self._discard(PamReply("error", "not_root"))
        self._on_readable()

    def _on_readable(self) -> None:
        """Read what is there; wait for more (as a loop reader) only when it is needed."""
        while self.state in ("read", "discard"):
            try:
                data = self.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                if not self.reading:
                    self.loop.add_reader(self.sock.fileno(), self._on_readable)
                    self.reading = True
                return
            except OSError as exc:
                log.debug("pam connection from pid %d ended early: %s", self.pid, exc)
                self._finish(None)
                return
            if not data:
                self._eof()
                return
            self._data(data)
        self._stop_reading()

    def _stop_reading(self) -> None:
        if self.reading:
            self.loop.remove_reader(self.sock.fileno())
            self.reading = False

    def _data(self, data: bytes) -> None:
        if self.state == "discard":
            self.left -= len(data)
            if self.left <= 0 or data.endswith(b"\n"):
                self._finish(self.pending)
            return
        self.buf += data
        end = self.buf.find(b"\n")
        if end < 0 or end >= MAX_LINE:
            if len(self.buf) >= MAX_LINE:
                self._malformed(f"a line longer than {MAX_LINE} bytes")
            return
        try:
            req = parse_request(self.buf[: end + 1])
        except PamProtocolError as exc:
            self._malformed(str(exc), discard=False)
            return
        self.state = "queued"
        self.req = req
        self.server.turns.admit(self)

    def _eof(self) -> None:
        if self.state == "read":
            if self.buf:
                self.server.malformed += 1
                self.server.noisy("pid %d sent a request without a newline", self.pid)
                self._finish(PamReply("error", "bad_request"))
            else:
                self._finish(None)  # connected and closed without a word (a liveness probe)
        elif self.state == "discard":
            self._finish(self.pending)

    def client_gone(self) -> bool:
        """Whether the client closed its end (peeked at, nothing consumed)."""
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False  # still there, waiting for its answer
        except OSError:
            return True  # reset

    def abandon(self) -> None:
        self._finish(None)

    def start(self) -> None:
        assert self.req is not None
        self.state = "busy"
        begun = self._now(self.req) if self.req.op == "account" else None
        if begun is None or isinstance(begun, Started):
            self.task = self.loop.create_task(self._answer(self.req, begun))
            self.task.add_done_callback(self._decided)
            return
        self._answered(begun)  # decided at once: no task, no turn of the loop
        self.server.turns.release()

    def _now(self, req: PamRequest) -> PamReply | Outcome | Started | None:
        """The login as far as it goes without waiting (`LoginFlow.account_now`)."""
        try:
            return self.server.flow.account_now(req, self.pid, self.started)
        except Exception:
            log.exception("internal error deciding for pid %d", self.pid)
            return self.server._error_answer(
                req, self.pid, self.started, "agent_error", "internal error"
            )

    async def _answer(self, req: PamRequest, begun: Started | None) -> PamReply | Outcome:
        """Decide (from where `_now` left it), then `_answered`."""
        answer = await self.server._decide(req, self.pid, self.started, begun)
        self._answered(answer)
        return answer

    def _answered(self, answer: PamReply | Outcome) -> None:
        """Journal the login's record, then send the reply: a login let in always has its
        record, even if the agent dies right after (the audit trail is complete)."""
        if isinstance(answer, Outcome):
            self.server.journal.record(answer.record)
        self._finish(answer)

    def _malformed(self, why: str, *, discard: bool = True) -> None:
        self.server.malformed += 1
        self.server.noisy("pid %d sent a bad request: %s", self.pid, why)
        reply = PamReply("error", "bad_request")
        if discard:
            self._discard(reply)
        else:
            self._finish(reply)

    def _discard(self, reply: PamReply) -> None:
        self.state = "discard"
        self.pending = reply
        self.left = DISCARD_MAX
        self.buf = b""
        # the discarding is bounded by its own short time (and still by the deadline)
        self.timer = self.loop.call_later(DISCARD_TIMEOUT_S, self.expire)

    def _decided(self, _task: asyncio.Task[PamReply | Outcome]) -> None:
        """The decision slot is free again (the task answered, or was cancelled: timeout)."""
        self.server.turns.release()

    def expire(self) -> None:
        if self.state in ("busy", "queued"):
            assert self.req is not None
            if self.task is not None:
                self.task.cancel()
            reply = self.server._error_answer(
                self.req, self.pid, self.started, "timeout", "no decision within the deadline"
            )
            self._finish(reply)
        elif self.state == "discard":
            self._finish(self.pending)
        else:
            self._finish(None)  # no complete line within the deadline: no answer

    def _finish(self, answer: PamReply | Outcome | None) -> None:
        ns = answer.namespaces if isinstance(answer, Outcome) else None
        reply = answer.reply if isinstance(answer, Outcome) else answer
        with ns or contextlib.nullcontext():  # the fds: closed whether they were sent or not
            if self.state == "done":
                return
            self.state = "done"
            self.buf = b""  # the deadline queue keeps this object until its deadline
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self._stop_reading()
            fds = [fd for _, fd in ns.fds] if ns is not None and self.uid == 0 else []
            if ns is not None and not fds:
                reply = PamReply("error", "agent_error")  # never fds to a non-root peer
            if reply is not None:
                # one short line into an empty unix socket buffer: it never blocks; a client
                # that has gone away (EPIPE) or reset the connection just misses its answer
                with contextlib.suppress(OSError):
                    send_with_fds(self.sock, format_reply(reply), fds)
            self.sock.close()
            self.server._end()
