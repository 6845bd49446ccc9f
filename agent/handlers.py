"""One handler per request type, each with its wire schema; and the PAM unix-socket server.

PAM socket (stream, mode 0600, root only): one line in, one line out (see pamproto.py).

    account        CALLERID/1 op=account user=U service=S rhost=R tty=T
                   -> CALLERID/1 verdict=adopt|allow|deny|error reason=W [job=J] msg=M
    open_session   same fields -> verdict=adopt|allow|error (re-adopts a moved session)
    close_session  same fields -> verdict=allow
    status         (calleridctl) -> verdict=allow reason=status msg=<the agent's counters, JSON>

Mesh (see callerid.bus.protocol):

    CallerIdQuery {id, proto, src, dst, uid} -> CallerIdReply {status found|not_found|error, job}

The server takes the caller's pid and uid from SO_PEERCRED, refuses any uid but 0, reads at
most one bounded line, and always answers within ``pam_timeout_ms``: when the decision is not
ready by then (a hung backend), the reply is verdict=error reason=timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path

from callerid.agent.adoption import Adopter, Outcome
from callerid.agent.journal import Journal
from callerid.agent.pamproto import (
    MAX_LINE,
    PamProtocolError,
    PamReply,
    PamRequest,
    format_reply,
    parse_request,
)

__all__ = [
    "PamServer",
    "handle_account",
    "handle_close_session",
    "handle_open_session",
    "handle_status",
]

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")  # pid, uid, gid
DISCARD_MAX = 64 * 1024
DISCARD_TIMEOUT_S = 0.05


async def handle_account(adopter: Adopter, req: PamRequest, pid: int) -> Outcome:
    """op=account -> the decision for this login (adopt | allow | deny)."""
    return await adopter.account(req, pid)


async def handle_open_session(adopter: Adopter, req: PamRequest, pid: int) -> PamReply:
    """op=open_session -> adopt (still / again in its job) | allow (nothing to do) | error."""
    return await adopter.open_session(req, pid)


def handle_close_session(adopter: Adopter, pid: int) -> PamReply:
    """op=close_session -> allow (forgets the session)."""
    return adopter.close_session(pid)


def handle_status(status: Callable[[], dict[str, object]] | None) -> PamReply:
    """op=status -> allow, msg = the agent's counters as compact JSON (for calleridctl)."""
    body = status() if status is not None else {}
    return PamReply("allow", "status", None, json.dumps(body, separators=(",", ":")))


def peer_cred(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a unix socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, _gid = _UCRED.unpack(raw)
    return pid, uid


def bind_unix(path: Path) -> socket.socket:
    """A listening unix stream socket at ``path``, mode 0600 from birth (no chmod race)."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if path.is_socket():
            path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(512)
    sock.setblocking(False)
    return sock


class PamServer:
    """The PAM socket: one `_PamConnection` per client, on the event loop.

    A plain asyncio Protocol rather than streams: a login storm is thousands of one-line
    connections, and per connection this keeps one object, one timer and one task.
    """

    def __init__(
        self,
        adopter: Adopter,
        journal: Journal,
        *,
        timeout_s: float,
        clock: Callable[[], float],
        allowed_uid: int = 0,
    ) -> None:
        self.adopter = adopter
        self.journal = journal
        self.timeout_s = timeout_s
        self.clock = clock
        self.allowed_uid = allowed_uid
        self.in_flight = 0
        self.refused = 0
        self.malformed = 0
        self.status: Callable[[], dict[str, object]] | None = None  # set by the daemon
        self._server: asyncio.Server | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self, path: Path) -> None:
        sock = bind_unix(path)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _PamConnection(self), sock=sock)
        self.path = path

    async def stop(self) -> None:
        """Stop accepting; requests in flight go on (see `drain`)."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def drain(self, deadline_s: float) -> None:
        """Wait (at most ``deadline_s``) until every request in flight has been answered."""
        if self.in_flight:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(deadline_s):
                    await self._idle.wait()

    def _begin(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def _end(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self._idle.set()

    async def _decide(self, req: PamRequest, pid: int, started: float) -> PamReply:
        try:
            return await self._dispatch(req, pid)
        except Exception:
            log.exception("internal error deciding for pid %d", pid)
            self._journal_error(req, pid, started, "agent_error", "internal error")
            return PamReply("error", "agent_error")

    async def _dispatch(self, req: PamRequest, pid: int) -> PamReply:
        if req.op == "account":
            outcome = await handle_account(self.adopter, req, pid)
            self.journal.record(outcome.record)
            return outcome.reply
        if req.op == "open_session":
            return await handle_open_session(self.adopter, req, pid)
        if req.op == "status":
            return handle_status(self.status)
        return handle_close_session(self.adopter, pid)

    def _journal_error(
        self, req: PamRequest, pid: int, started: float, reason: str, text: str
    ) -> None:
        if req.op != "account":
            return
        self.journal.record(self.adopter.error_record(req, pid, started, reason, text))


class _PamConnection(asyncio.Protocol):
    """One client: read one bounded line, decide, write one line, close.

    States: ``read`` (collecting the line), ``busy`` (deciding), ``discard`` (a refused or
    malformed client: what it sends is read and dropped, bounded in size and time, before
    the answer, because closing a unix socket with unread data resets it and the client
    would lose the answer), ``done``. The deadline (``timeout_s`` from the accept) bounds all
    of it: a line not complete by then gets no answer; a decision not ready gets
    verdict=error reason=timeout (and is cancelled).
    """

    def __init__(self, server: PamServer) -> None:
        self.server = server
        self.state = "read"
        self.buf = b""
        self.pid = 0
        self.req: PamRequest | None = None
        self.pending: PamReply | None = None  # the answer once discarding ends
        self.left = 0
        self.task: asyncio.Task[PamReply] | None = None
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.started = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        srv = self.server
        self.transport = transport
        self.started = srv.clock()
        srv._begin()
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(srv.timeout_s, self._expired)
        try:
            self.pid, uid = peer_cred(transport.get_extra_info("socket"))
        except OSError as exc:
            log.debug("pam connection without credentials: %s", exc)
            self._finish(None)
            return
        if uid != srv.allowed_uid:
            srv.refused += 1
            log.warning("refused a PAM socket client: pid %d uid %d is not root", self.pid, uid)
            self._discard(PamReply("error", "not_root"))

    def data_received(self, data: bytes) -> None:
        if self.state == "discard":
            self.left -= len(data)
            if self.left <= 0 or data.endswith(b"\n"):
                self._finish(self.pending)
            return
        if self.state != "read":
            return  # anything after the request line is ignored
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
        self.state = "busy"
        self.req = req
        self.task = asyncio.get_running_loop().create_task(
            self.server._decide(req, self.pid, self.started)
        )
        self.task.add_done_callback(self._decided)

    def eof_received(self) -> bool:
        if self.state == "read":
            if self.buf:
                self.server.malformed += 1
                log.warning("pid %d sent a request without a newline", self.pid)
                self._finish(PamReply("error", "bad_request"))
            else:
                self._finish(None)  # connected and closed without a word (a liveness probe)
        elif self.state == "discard":
            self._finish(self.pending)
        return True  # half-closed: the answer can still be written

    def connection_lost(self, exc: Exception | None) -> None:
        # a decision in progress goes on (the login's record is still written)
        if self.state in ("read", "discard"):
            self._finish(None)
        self.transport = None

    def _malformed(self, why: str, *, discard: bool = True) -> None:
        self.server.malformed += 1
        log.warning("pid %d sent a bad request: %s", self.pid, why)
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
        if self.timer is not None:  # the discarding is bounded by its own short time
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(DISCARD_TIMEOUT_S, self._expired)

    def _decided(self, task: asyncio.Task[PamReply]) -> None:
        if self.state != "busy" or task.cancelled():
            return
        self._finish(task.result())

    def _expired(self) -> None:
        self.timer = None
        if self.state == "busy":
            assert self.req is not None and self.task is not None
            self.task.cancel()
            self.server._journal_error(
                self.req, self.pid, self.started, "timeout", "no decision within the deadline"
            )
            self._finish(PamReply("error", "timeout"))
        elif self.state == "discard":
            self._finish(self.pending)
        else:
            self._finish(None)  # no complete line within the deadline: no answer

    def _finish(self, reply: PamReply | None) -> None:
        if self.state == "done":
            return
        self.state = "done"
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None:
            if reply is not None:
                # one short line: the kernel takes it at once (a unix socket buffer holds far
                # more), so no wait for the write or the close
                self.transport.write(format_reply(reply))
            self.transport.close()
        self.server._end()
