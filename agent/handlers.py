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


async def _discard_input(reader: asyncio.StreamReader) -> None:
    """Read and drop what the client already sent (bounded in size and time): closing a unix
    socket with unread data resets it, and the client would lose our answer."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(DISCARD_TIMEOUT_S):
            left = DISCARD_MAX
            while left > 0 and (chunk := await reader.read(min(left, 4096))):
                left -= len(chunk)
                if chunk.endswith(b"\n"):
                    break


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
        self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_LINE)
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

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.in_flight += 1
        self._idle.clear()
        try:
            reply = await self._one(reader, writer)
            if reply is not None:
                # one short line: the kernel takes it at once (a unix socket buffer holds far
                # more), so no drain() and no wait for the close: both cost a task switch
                writer.write(format_reply(reply))
        except (ConnectionError, OSError) as exc:
            log.debug("pam connection ended early: %s", exc)
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()
            writer.close()

    async def _one(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> PamReply | None:
        started = self.clock()
        pid, uid = peer_cred(writer.get_extra_info("socket"))
        if uid != self.allowed_uid:
            self.refused += 1
            log.warning("refused a PAM socket client: pid %d uid %d is not root", pid, uid)
            await _discard_input(reader)
            return PamReply("error", "not_root")
        try:
            async with asyncio.timeout(self.timeout_s):
                line = await reader.readuntil(b"\n")
                req = parse_request(line)
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                return None  # connected and closed without a word (a liveness probe)
            self.malformed += 1
            log.warning("pid %d sent a request without a newline", pid)
            return PamReply("error", "bad_request")
        except (asyncio.LimitOverrunError, PamProtocolError) as exc:
            self.malformed += 1
            log.warning("pid %d sent a bad request: %s", pid, exc)
            await _discard_input(reader)
            return PamReply("error", "bad_request")
        except TimeoutError:
            return None
        remaining = self.timeout_s - (self.clock() - started)
        try:
            async with asyncio.timeout(remaining):
                return await self._dispatch(req, pid)
        except TimeoutError:
            self._journal_error(req, pid, started, "timeout", "no decision within the deadline")
            return PamReply("error", "timeout")
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
