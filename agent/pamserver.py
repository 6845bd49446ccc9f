"""The PAM socket server: one line in, one line out, for pam_callerid.so and calleridctl.

The socket is a unix stream socket, mode 0600, root only; the line format is pamproto.py's.
One handler per op (`PamServer._dispatch`):

    account        CALLERID/1 op=account user=U service=S rhost=R tty=T
                   [ns=0|1] -> CALLERID/1 verdict=adopt|allow|deny|error reason=W [job=J]
                   [gid=G] [ns=KINDS, with as many fds] msg=M
    open_session   same fields -> verdict=adopt|allow|error (re-adopts a moved session)
    close_session  same fields -> verdict=allow
    status         (calleridctl) -> verdict=allow reason=status msg=<the agent's counters, JSON>

An account request may carry the session's socket as SCM_RIGHTS (pam_callerid.so lends the
one sshd names in SSH_CONNECTION, when it holds it; at most LENT_MAX fds are taken): from a
root caller it is read at once (`PamRequest.lent`) and closed, and names the session's
connection without a walk of the caller's fds.

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
from callerid.agent._pamconn import PamConnection
from callerid.agent._pamturns import Turns
from callerid.agent._unixsock import bind_unix
from callerid.agent.pamproto import PamReply, PamRequest
from callerid.bus.loglimit import LogBudget, QuietLog

__all__ = ["LoginHandler", "PamServer", "RecordSink"]

log = logging.getLogger(__name__)

MAX_ACTIVE = 64  # default bound of decisions worked on at once; later ones wait in order
MAX_CONNECTIONS = 16384  # open client connections; beyond, new ones wait in the backlog
ACCEPT_BATCH = 64  # connections accepted per wake-up of the listening socket
ACCEPT_RETRY_S = 0.1  # pause after accept() failed (out of fds or memory)


class PamServer:
    """The PAM socket, served straight from the event loop's selector.

    A login is one short connection carrying one line each way, so connections are accepted
    in batches and read at once (the line is nearly always there already), without asyncio
    transports: per connection this costs one object and one task, and a reader only when the
    line is late. Deadlines and turns are kept by `_pamturns.Turns`; `_pamconn.PamConnection`
    holds one client's state.
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
            PamConnection(self, conn, self._loop).begin()

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
