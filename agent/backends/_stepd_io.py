"""The slurmstepd socket adapter: non-blocking connections driven by one selector.

`StepdConnection` queues `stepd.Exchange` requests on one unix-socket connection and decodes
the replies in order; `drive` exchanges bytes on any number of them until each is settled or
one deadline passes (Slurm sets no timeout on these sockets, so we bound every call). The
codec itself is `stepd` (sans-IO); the backend that uses this is `slurm`.

File descriptors the stepd passes (SCM_RIGHTS, GET_NS_FD/GET_NS_FDS) are received with
MSG_CMSG_CLOEXEC and kept in arrival order until `StepdConnection.take_fds`; `close` closes
any not taken, so no error path leaks one.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import functools
import os
import select
import selectors
import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from callerid.agent._unixsock import passed_fds
from callerid.agent.backends import stepd
from callerid.agent.backends.base import BackendError, JobVanished

__all__ = [
    "StaleSocket",
    "StepdClosed",
    "StepdConnection",
    "StepdTimeout",
    "drive",
    "drive_async",
    "outcome",
]

T = TypeVar("T")

_STALE_ERRNOS = frozenset({errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR})
_CLOSED_ERRNOS = frozenset({errno.EPIPE, errno.ECONNRESET})
_RECV_SIZE = 65536
_FD_SIZE = array.array("i").itemsize
_ANC_SIZE = socket.CMSG_SPACE(stepd.MAX_NS_FDS * _FD_SIZE)


class StaleSocket(JobVanished):
    """The stepd socket file is gone, or nothing listens on it any more (the step ended)."""


class StepdClosed(BackendError):
    """The stepd closed the connection before answering (a 26.05 refusal, or it is exiting)."""

    def __init__(self, message: str, waiting_for: str) -> None:
        super().__init__(message)
        self.waiting_for = waiting_for


class StepdTimeout(BackendError):
    """The stepd did not answer before the deadline."""


class StepdConnection:
    """A non-blocking connection to one slurmstepd: queued requests, replies decoded in order.

    `queue()` adds a request and returns its reply `Reader`; `drive()` does the I/O. Failures
    are kept in `error` (the connection is then settled).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.error: BackendError | None = None
        self._out = bytearray()
        self._readers: list[tuple[str, stepd.Reader[Any]]] = []
        self._fds: list[int] = []
        # non-blocking from its creation (SOCK_NONBLOCK: no ioctl of its own)
        kind = socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        self.sock = socket.socket(socket.AF_UNIX, kind)
        try:
            self.sock.connect(str(path))
        except OSError as exc:
            self.sock.close()
            if exc.errno in _STALE_ERRNOS:
                msg = f"stale slurmstepd socket {path}: {exc.strerror}"
                raise StaleSocket(msg) from exc
            if exc.errno == errno.EAGAIN:
                msg = f"slurmstepd {path} is busy (its listen queue is full)"
                raise BackendError(msg) from exc
            msg = f"cannot connect to slurmstepd {path}: {exc.strerror or exc}"
            raise BackendError(msg) from exc

    def queue(self, exchange: stepd.Exchange[T]) -> stepd.Reader[T]:
        """Send ``exchange`` after what is queued already; its reply comes in that order."""
        reader = exchange.reader()
        self._out += exchange.data
        self._readers.append((exchange.name, reader))
        return reader

    @property
    def waiting_for(self) -> str | None:
        """The name of the first request still without a complete reply."""
        return next((name for name, r in self._readers if not r.done), None)

    @property
    def settled(self) -> bool:
        return self.error is not None or (not self._out and self.waiting_for is None)

    @property
    def events(self) -> int:
        ev = selectors.EVENT_WRITE if self._out else 0
        return ev | (selectors.EVENT_READ if self.waiting_for is not None else 0)

    def fail(self, error: BackendError) -> None:
        if self.error is None:
            self.error = error

    def on_ready(self, mask: int) -> None:
        """Do the I/O the selector reported ready; failures go to `error`."""
        try:
            if mask & selectors.EVENT_WRITE and self._out:
                sent = self.sock.send(self._out)
                del self._out[:sent]
            if mask & selectors.EVENT_READ and self.waiting_for is not None:
                self._receive()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno in _CLOSED_ERRNOS:
                self._closed()
            else:
                self.fail(BackendError(f"slurmstepd {self.path}: {exc.strerror}"))
        except stepd.StepdProtocolError as exc:
            self.fail(BackendError(f"slurmstepd {self.path} sent garbage: {exc}"))

    def take_fds(self) -> list[int]:
        """The fds received so far, in order; the caller owns (and closes) them now."""
        fds, self._fds = self._fds, []
        return fds

    def _receive(self) -> None:
        data, anc, flags, _addr = self.sock.recvmsg(_RECV_SIZE, _ANC_SIZE, socket.MSG_CMSG_CLOEXEC)
        self._fds.extend(passed_fds(anc)[0])  # other control data: none is expected, ignored
        if flags & socket.MSG_CTRUNC:
            msg = f"slurmstepd {self.path} passed more file descriptors than expected"
            raise stepd.StepdProtocolError(msg)
        if not data:
            self._closed()
            return
        for _name, reader in self._readers:
            if data and not reader.done:
                data = data[reader.feed(data) :]
        if data:
            msg = f"slurmstepd {self.path} sent {len(data)} bytes nobody asked for"
            raise stepd.StepdProtocolError(msg)

    def _closed(self) -> None:
        waiting = self.waiting_for or "a reply"
        msg = f"slurmstepd {self.path} closed the connection instead of answering {waiting}"
        self.fail(StepdClosed(msg, waiting))

    def close(self) -> None:
        """Close the connection and every received fd not taken."""
        for fd in self.take_fds():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.sock.close()


def drive(
    conns: Iterable[StepdConnection],
    deadline: float,
    clock: Callable[[], float],
    *,
    expire: bool = True,
) -> bool:
    """Exchange bytes on every connection until each is settled or ``deadline`` passes, in the
    calling thread (it waits in poll(2)); whether all are settled (always, with ``expire``).

    ``deadline`` is a ``clock()`` value; ``clock`` counts seconds as `time.monotonic` does (the
    wait is in real seconds). A connection still waiting then fails with `StepdTimeout`; the
    others are unaffected. ``expire=False``: it is left waiting instead (for a later `drive`
    or `drive_async` to go on with).
    """
    pending = {c.sock.fileno(): c for c in conns if not c.settled}
    poller = select.poll()
    for fd, conn in pending.items():
        poller.register(fd, _poll_events(conn.events))
    while pending:
        remaining = deadline - clock()
        if remaining <= 0:
            if not expire:
                return False
            for conn in pending.values():
                what = conn.waiting_for or "the connection"
                conn.fail(StepdTimeout(f"slurmstepd {conn.path}: no answer to {what} in time"))
            return True
        for fd, revents in poller.poll(remaining * 1000):
            conn = pending[fd]
            conn.on_ready(_selector_events(revents))
            if conn.settled:
                poller.unregister(fd)
                del pending[fd]
            else:
                poller.modify(fd, _poll_events(conn.events))
    return True


def _poll_events(events: int) -> int:
    return (select.POLLIN if events & selectors.EVENT_READ else 0) | (
        select.POLLOUT if events & selectors.EVENT_WRITE else 0
    )


def _selector_events(revents: int) -> int:
    """poll(2)'s events as the selector's: a hang-up or error is read (recv tells which)."""
    read = revents & (select.POLLIN | select.POLLHUP | select.POLLERR)
    return (selectors.EVENT_READ if read else 0) | (
        selectors.EVENT_WRITE if revents & select.POLLOUT else 0
    )


async def drive_async(
    conns: Iterable[StepdConnection], deadline: float, clock: Callable[[], float]
) -> None:
    """`drive` on the running event loop: the loop watches the connections' fds, nothing
    blocks it; the same one deadline, the same `StepdTimeout` for a connection still waiting
    then. The fds are unwatched however it ends (a cancelled wait included).

    The requests are sent at once (a unix socket takes a few at any time; what it does not
    take waits for the loop), so the usual exchange watches one fd for reading, once."""
    loop = asyncio.get_running_loop()
    conns = list(conns)
    for conn in conns:
        if not conn.settled and conn.events & selectors.EVENT_WRITE:
            conn.on_ready(selectors.EVENT_WRITE)
    pending = [c for c in conns if not c.settled]
    if not pending:
        return
    done: asyncio.Future[bool] = loop.create_future()  # True: all settled; False: deadline
    watched: dict[int, int] = {}  # fd -> the events the loop watches for it

    def watch(conn: StepdConnection) -> None:
        fd = conn.sock.fileno()
        want, have = (0 if conn.settled else conn.events), watched.get(fd, 0)
        if want != have:
            _rewatch(loop, fd, have, want, functools.partial(ready, conn))
            watched[fd] = want
        if conn.settled and conn in pending:
            pending.remove(conn)
            if not pending and not done.done():
                done.set_result(True)

    def ready(conn: StepdConnection, mask: int) -> None:
        conn.on_ready(mask)
        watch(conn)

    expiry = loop.call_later(max(0.0, deadline - clock()), _expire, done)
    try:
        for conn in list(pending):
            watch(conn)
        if not await done:
            for conn in pending:
                what = conn.waiting_for or "the connection"
                conn.fail(StepdTimeout(f"slurmstepd {conn.path}: no answer to {what} in time"))
    finally:
        expiry.cancel()
        for fd, have in watched.items():
            _rewatch(loop, fd, have, 0, None)


def _rewatch(
    loop: asyncio.AbstractEventLoop,
    fd: int,
    have: int,
    want: int,
    ready: Callable[[int], None] | None,
) -> None:
    """Change what the loop watches ``fd`` for from ``have`` to ``want`` (selector events)."""
    for event, add, remove in (
        (selectors.EVENT_READ, loop.add_reader, loop.remove_reader),
        (selectors.EVENT_WRITE, loop.add_writer, loop.remove_writer),
    ):
        if have & event and not want & event:
            remove(fd)
        elif want & event and not have & event:
            assert ready is not None
            add(fd, ready, event)


def _expire(done: asyncio.Future[bool]) -> None:
    if not done.done():
        done.set_result(False)


def outcome(
    conn: StepdConnection, greeting: stepd.Reader[int], reader: stepd.Reader[T], version: int
) -> T:
    """The value of ``reader``, or the most telling error (a refused handshake first)."""
    if greeting.done and greeting.value < 0:
        msg = (
            f"slurmstepd {conn.path} refused our protocol version {version} "
            f"({stepd.version_name(version)}); set backend.slurm.protocol_version"
        )
        raise BackendError(msg)
    if conn.error is not None:
        raise conn.error
    return reader.value
