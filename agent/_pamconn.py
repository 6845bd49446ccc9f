"""One PAM socket client of `pamserver.PamServer`: read one bounded line (and the session's
socket lent with it), decide, write one line, close."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import socket
from typing import TYPE_CHECKING

from callerid.agent._loginstate import Outcome, Started
from callerid.agent._unixsock import peer_cred, recv_lent, send_with_fds
from callerid.agent.netinfo import Connection, lent_connections
from callerid.agent.pamproto import (
    MAX_LINE,
    PamProtocolError,
    PamReply,
    PamRequest,
    format_reply,
    parse_request,
)

if TYPE_CHECKING:
    from callerid.agent.pamserver import PamServer

__all__ = ["PamConnection"]

log = logging.getLogger("callerid.agent.pamserver")

# a login alone in flight may have its slurm adoption waited for on the loop's own stack this
# long at most (`LoginFlow.account_now`): the stepd answers in 0.1-0.5 ms, and going back to
# the selector to be woken again cost the login 0.06-0.1 ms more (docs/performance.md,
# section 12); with other logins in flight, the loop serves them meanwhile instead
ADOPT_WAIT_S = 0.002
DISCARD_MAX = 64 * 1024
DISCARD_TIMEOUT_S = 0.05
RECV_SIZE = MAX_LINE + 1
# the client's end closed or reset (POLLHUP and POLLERR are always reported)
_GONE = select.POLLRDHUP | select.POLLHUP | select.POLLERR


class PamConnection:
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
        "lent",
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
        self.lent: tuple[Connection, ...] | None = None  # the socket(s) lent, read
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
        """Take the connection just accepted: its credentials, then what it sent."""
        srv = self.server
        srv._begin()
        srv.turns.watch(self, self.loop)
        try:  # the socket stays in blocking mode: every call on it says MSG_DONTWAIT
            self.pid, self.uid = peer_cred(self.sock)
        except OSError as exc:
            log.debug("pam connection without credentials: %s", exc)
            self._finish(None)
            return
        if self.uid != srv.allowed_uid:
            srv.refused += 1
            srv.noisy("refused a PAM socket client: pid %d uid %d is not root", self.pid, self.uid)
            self._discard(PamReply("error", "not_root"))
        self._on_readable(first=True)

    def _on_readable(self, *, first: bool = False) -> None:
        """Read what is there; wait for more (as a loop reader) only when it is needed.

        ``first``: right after the accept. The client writes its line a few microseconds after
        its connect; when the connect woke the agent on the client's own CPU and the agent
        preempted it before it could (under ``scheduling: normal``; under the default batch
        policy the agent does not preempt it), the CPU is yielded once (sched_yield) for the
        client to write, saving the agent a second wake-up for this login."""
        while self.state in ("read", "discard"):
            try:
                data, fds = recv_lent(self.sock, RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                if first:
                    first = False
                    os.sched_yield()
                    continue
                if not self.reading:
                    self.loop.add_reader(self.sock.fileno(), self._on_readable)
                    self.reading = True
                return
            except OSError as exc:
                log.debug("pam connection from pid %d ended early: %s", self.pid, exc)
                self._finish(None)
                return
            if fds is not None:
                self._lend(fds)
            if not data:
                self._eof()
                return
            self._data(data)
        self._stop_reading()

    def _lend(self, fds: list[int]) -> None:
        """Read the socket(s) a root caller lent with its line's first bytes (they name
        its connection, `PamRequest.lent`); close anything else (`lent_connections` closes
        what it reads)."""
        if self.uid == self.server.allowed_uid and self.state == "read" and self.lent is None:
            self.lent = lent_connections(fds)
            return
        for fd in fds:
            os.close(fd)

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
            req = parse_request(self.buf[: end + 1], self.lent)
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
        """Whether the client closed its end or reset it (one poll, nothing consumed: data
        it sent meanwhile does not count; without an error to raise when it is still there,
        waiting for its answer, as a peeking recv would)."""
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLRDHUP)
        return any(ev & _GONE for _fd, ev in poller.poll(0))

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
            alone = self.server.in_flight == 1
            wait_s = ADOPT_WAIT_S if alone else 0.0
            return self.server.flow.account_now(req, self.pid, self.started, wait_s)
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
