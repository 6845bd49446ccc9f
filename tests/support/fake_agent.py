"""A real unix-socket server that plays the callerid agent for the PAM module tests.

It listens on a stream socket, records every request line together with the SO_PEERCRED
pid/uid/gid of the peer (read before replying, as the real agent must), then behaves as told:

- ``Mode.REPLY``: send ``reply`` as is (any bytes: a valid line, garbage, an overlong line),
  optionally in two halves ``split_delay`` seconds apart (exercises partial reads), with
  ``fds`` attached to its first byte(s) as SCM_RIGHTS when given (the job's namespaces: the
  caller keeps and closes its copies);
- ``Mode.HANG``: never reply and keep the connection open until the agent is stopped;
- ``Mode.CLOSE``: close the connection without a reply;
- ``Mode.NO_ACCEPT``: listen with a backlog of 0 and never accept (a stuck agent whose queue
  is full once one connection waits in it).

`reply_line(verdict, **fields)` builds a well-formed reply with percent-encoded values, and
`pct(value)` is the encoder the module must match (alnum and ``-_.:/@+,[]`` raw, every other
byte as ``%XX``).
"""

from __future__ import annotations

import enum
import os
import selectors
import socket
import struct
import threading
from dataclasses import dataclass
from types import TracebackType

__all__ = ["FakeAgent", "Mode", "Seen", "pct", "reply_line"]

MAX_REQUEST = 8192  # read at most this much of a request (the contract allows 4096)
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.:/@+,[]")


class Mode(enum.Enum):
    REPLY = "reply"
    HANG = "hang"
    CLOSE = "close"
    NO_ACCEPT = "no_accept"


@dataclass(frozen=True, slots=True)
class Seen:
    """One connection as the agent saw it."""

    line: bytes  # everything read up to and including the first newline (or EOF/limit)
    pid: int
    uid: int
    gid: int
    # the sockets lent with the line (SCM_RIGHTS): (family, local, remote) of each
    lent: tuple[tuple[int, object, object], ...] = ()


def _describe(fd: int) -> tuple[int, object, object]:
    """(family, local, remote) of a lent socket (-1 and Nones if it is none); closes it."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        os.close(fd)
        return (-1, None, None)
    with sock:
        try:
            remote: object = sock.getpeername()
        except OSError:
            remote = None
        return (int(sock.family), sock.getsockname(), remote)


def pct(value: str) -> str:
    """Percent-encode like the module: safe bytes raw, everything else %XX (upper-case)."""
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in value.encode("utf-8"))


def reply_line(verdict: str, **fields: str) -> bytes:
    """``CALLERID/1 verdict=V k=v ...\\n`` with percent-encoded values."""
    parts = ["CALLERID/1", f"verdict={pct(verdict)}"]
    parts += [f"{key}={pct(value)}" for key, value in fields.items()]
    return (" ".join(parts) + "\n").encode("ascii")


class FakeAgent:
    """A one-thread unix stream server; use as a context manager."""

    def __init__(
        self,
        path: str,
        mode: Mode = Mode.REPLY,
        reply: bytes = b"",
        split_delay: float = 0.0,
        fds: list[int] | None = None,
    ) -> None:
        self.fds = fds or []
        self.path = path
        self.mode = mode
        self.reply = reply
        self.split_delay = split_delay
        self._seen: list[Seen] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._held: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = socket.socketpair()

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> FakeAgent:
        lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lst.bind(self.path)
        os.chmod(self.path, 0o600)
        lst.listen(0 if self.mode is Mode.NO_ACCEPT else 16)
        self._listener = lst
        if self.mode is not Mode.NO_ACCEPT:
            self._thread = threading.Thread(target=self._serve, name="fake-agent", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(timeout=10)
            assert not self._thread.is_alive(), "fake agent thread did not stop"
        for conn in self._held:
            conn.close()
        if self._listener is not None:
            self._listener.close()
        self._wake_r.close()
        self._wake_w.close()
        if os.path.exists(self.path):
            os.unlink(self.path)

    def __enter__(self) -> FakeAgent:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- what was seen ----------------------------------------------------------------------

    @property
    def seen(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)

    # -- the server -------------------------------------------------------------------------

    def _serve(self) -> None:
        assert self._listener is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in sel.select():
                    if key.fileobj is self._listener:
                        conn, _ = self._listener.accept()
                        self._handle(conn)

    def _handle(self, conn: socket.socket) -> None:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", creds)
        line, lent = self._read_line(conn)
        with self._lock:
            self._seen.append(Seen(line=line, pid=pid, uid=uid, gid=gid, lent=lent))
        if self.mode is Mode.HANG:
            self._held.append(conn)
            return
        try:
            if self.mode is Mode.REPLY:
                self._send_reply(conn)
        except OSError:
            pass  # the module gave up (timeout, overlong reply): that is its right
        finally:
            conn.close()

    def _read_line(
        self, conn: socket.socket
    ) -> tuple[bytes, tuple[tuple[int, object, object], ...]]:
        conn.settimeout(5.0)
        data = b""
        lent: list[tuple[int, object, object]] = []
        try:
            while b"\n" not in data and len(data) < MAX_REQUEST:
                chunk, fds, _flags, _ = socket.recv_fds(conn, MAX_REQUEST - len(data), 16)
                lent.extend(_describe(fd) for fd in fds)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            pass
        return data, tuple(lent)

    def _send_reply(self, conn: socket.socket) -> None:
        if self.fds:
            sent = socket.send_fds(conn, [self.reply], self.fds)
            conn.sendall(self.reply[sent:])
            return
        if self.split_delay <= 0:
            conn.sendall(self.reply)
            return
        half = len(self.reply) // 2
        conn.sendall(self.reply[:half])
        self._stop.wait(self.split_delay)  # simulated latency, not synchronisation
        conn.sendall(self.reply[half:])
