"""A stand-in slurmstepd on a real unix socket, for failure modes a real stepd does not show on
demand (a hung stepd, refusals, closed connections); and a stale stepd socket.

    with FakeStepd(spool / "node_42.4294967292", uid=alice.uid, on_add="close") as fake:
        ...                                   # the backend under test talks to it
        fake.requests, fake.adopted

(Also importable from tests.support.slurm, next to the real cluster `LocalSlurm`.)

The stepd's side of the protocol (`hello_reader`, `request_reader`, `encode_reply`) and
STEP_LIST_PIDS (`list_pids`) live here, beside the sans-IO client codec `stepd` they extend:
only tests speak them.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from callerid.agent.backends import stepd

__all__ = [
    "MAX_PIDS",
    "Behaviour",
    "FakeStepd",
    "encode_reply",
    "hello_reader",
    "list_pids",
    "request_reader",
    "stale_socket",
]

Behaviour = Literal["answer", "refuse", "close", "hang"]

# A STEP_LIST_PIDS reply never lists more pids than the kernel allows (pid_max <= 2**22).
MAX_PIDS = 1 << 22
# Requests whose code is followed by one int32 (a pid).
_WITH_PID = frozenset({stepd.Request.PID_IN_CONTAINER, stepd.Request.ADD_EXTERN_PID})
_INT = struct.Struct("=i")
_UINT = struct.Struct("=I")
_BOOL = struct.Struct("=?")


# --------------------------------------------------------------------------- the stepd's side


def _int32() -> Generator[int, bytes, int]:
    data = yield 4
    value: int = _INT.unpack(data)[0]
    return value


def _pid_list() -> Generator[int, bytes, list[int]]:
    data = yield 4
    count: int = _UINT.unpack(data)[0]
    if count > MAX_PIDS:
        msg = f"STEP_LIST_PIDS reply announces {count} pids (more than {MAX_PIDS})"
        raise stepd.StepdProtocolError(msg)
    data = yield 4 * count
    return list(struct.unpack(f"={count}I", data))


def list_pids() -> stepd.Exchange[list[int]]:
    """STEP_LIST_PIDS: every pid in the step's container (the backend never asks it)."""
    return stepd.Exchange("STEP_LIST_PIDS", _INT.pack(stepd.Request.STEP_LIST_PIDS), _pid_list)


def hello_reader() -> stepd.Reader[int]:
    """Decode a client's handshake (the protocol version it sent)."""
    return stepd.Reader(_int32())


def _request() -> Generator[int, bytes, tuple[stepd.Request, int | None]]:
    code = yield from _int32()
    try:
        request = stepd.Request(code)
    except ValueError:
        msg = f"unknown request code {code}"
        raise stepd.StepdProtocolError(msg) from None
    arg = (yield from _int32()) if request in _WITH_PID else None
    if request == stepd.Request.GETPW:  # mode, uid, name length, name: the mode is the arg
        arg = yield from _int32()
        yield 4
        length = yield from _int32()
        if not 0 <= length <= stepd.MAX_PASSWD_FIELD:
            msg = f"GETPW name length {length}"
            raise stepd.StepdProtocolError(msg)
        yield length
    return request, arg


def _passwd_reply(pw: stepd.StepPasswd | None) -> bytes:
    """GETPW's reply: found, then name, "*", uid, gid, gecos, home, shell (found=0: nothing)."""
    if pw is None:
        return _INT.pack(0)

    def text(value: str) -> bytes:
        return _INT.pack(len(value.encode())) + value.encode()

    head = _INT.pack(1) + text(pw.name) + text("*") + _UINT.pack(pw.uid) + _UINT.pack(pw.gid)
    return head + text("") + text("/nonexistent") + text("/bin/sh")


def request_reader() -> stepd.Reader[tuple[stepd.Request, int | None]]:
    """Decode one client request: its code and its pid argument (or None)."""
    return stepd.Reader(_request())


def encode_reply(request: stepd.Request | str, value: Any) -> bytes:
    """The stepd's reply bytes to ``request`` (or to ``"hello"``) carrying ``value``."""
    if request == "hello" or request in (
        stepd.Request.STATE,
        stepd.Request.DAEMON_PID,
        stepd.Request.ADD_EXTERN_PID,
    ):
        return _INT.pack(value)
    if request == stepd.Request.STEP_UID:
        return _UINT.pack(value)
    if request == stepd.Request.PID_IN_CONTAINER:
        return _BOOL.pack(bool(value))
    if request == stepd.Request.GETPW:  # an int: a bare (bogus) found flag
        return _INT.pack(value) if isinstance(value, int) else _passwd_reply(value)
    if request == stepd.Request.STEP_LIST_PIDS:
        pids = list(value)
        return _UINT.pack(len(pids)) + struct.pack(f"={len(pids)}I", *pids)
    msg = f"no reply encoding for {request!r}"
    raise ValueError(msg)


# --------------------------------------------------------------------------- the stand-in


@dataclass
class _Peer:
    sock: socket.socket
    reader: stepd.Reader[Any] = field(default_factory=hello_reader)
    greeted: bool = False


class FakeStepd:
    """A stand-in slurmstepd on a real unix socket, served by a thread.

    ``on_hello``: "answer" (reply ``version``), "refuse" (reply -1 and close), "hang" (accept,
    never answer). ``on_add``: how ADD_EXTERN_PID is met: "answer" (rc 0, the pid is recorded in
    `adopted`), "refuse" (rc -1, as 22.05 does), "close" (close without a reply, as 26.05 does),
    "hang". STEP_UID answers ``uid``; PID_IN_CONTAINER answers whether the pid was adopted (or
    is in ``pids``; ``contains=False``: adopted pids are not, as with proctrack/pgid);
    STEP_LIST_PIDS lists those; DAEMON_PID answers the serving thread's id (not
    the test's pid); STATE ``state`` (2: running); GETPW the job's entry with ``gid`` (None:
    "not found", as a stepd without a complete entry answers), met as ``on_getpw`` says.
    """

    def __init__(
        self,
        path: Path,
        *,
        uid: int,
        version: int = stepd.PROTOCOL_22_05,
        on_hello: Behaviour = "answer",
        on_add: Behaviour = "answer",
        pids: tuple[int, ...] = (),
        state: int = 2,
        gid: int | None = None,
        on_getpw: Behaviour = "answer",
        contains: bool = True,
    ) -> None:
        self.path, self.uid, self.version = path, uid, version
        self.contains = contains
        self.on_hello, self.on_add = on_hello, on_add
        self.gid, self.on_getpw = gid, on_getpw
        self.adopted: list[int] = []
        self.pids = list(pids)
        self.state = state
        self.requests: list[tuple[stepd.Request, int | None]] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(16)
        self._listener.setblocking(False)
        self._stop = threading.Event()
        self._peers: list[_Peer] = []
        self._thread = threading.Thread(target=self._serve, name=f"fake-stepd {path.name}")
        self._thread.start()

    def __enter__(self) -> FakeStepd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving, close every connection and remove the socket file."""
        self._stop.set()
        self._thread.join(timeout=10)
        self._listener.close()
        for peer in self._peers:
            peer.sock.close()
        self.path.unlink(missing_ok=True)

    def _serve(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ, None)
            while not self._stop.is_set():
                for key, _mask in sel.select(timeout=0.05):
                    if key.data is None:
                        self._accept(sel)
                    else:
                        self._on_data(sel, key.data)

    def _accept(self, sel: selectors.BaseSelector) -> None:
        with contextlib.suppress(BlockingIOError):
            conn, _ = self._listener.accept()
            peer = _Peer(conn)
            self._peers.append(peer)
            sel.register(conn, selectors.EVENT_READ, peer)

    def _drop(self, sel: selectors.BaseSelector, peer: _Peer) -> None:
        sel.unregister(peer.sock)
        peer.sock.close()

    def _on_data(self, sel: selectors.BaseSelector, peer: _Peer) -> None:
        try:
            data = peer.sock.recv(4096)
        except ConnectionResetError:
            data = b""
        if not data:
            self._drop(sel, peer)
            return
        while data:
            data = data[peer.reader.feed(data) :]
            if not peer.reader.done:
                return
            try:
                answered = self._answer(sel, peer)
            except (BrokenPipeError, ConnectionResetError):  # the client left: so does a stepd
                if peer.sock.fileno() >= 0:
                    self._drop(sel, peer)
                return
            if not answered:
                return
            peer.reader = request_reader()

    def _answer(self, sel: selectors.BaseSelector, peer: _Peer) -> bool:
        """Reply to the message just decoded; False once the connection is closed or hung."""
        if not peer.greeted:
            peer.greeted = True
            return self._act(sel, peer, self.on_hello, "hello", self.version)
        request, arg = peer.reader.value
        self.requests.append((request, arg))
        if request == stepd.Request.ADD_EXTERN_PID:
            ok = self._act(sel, peer, self.on_add, request, 0)
            if ok and self.on_add == "answer":
                self.adopted.append(arg)
            return ok
        if request == stepd.Request.GETPW and self.on_getpw != "answer":
            return self._act(sel, peer, self.on_getpw, request, 0)
        if request == stepd.Request.GETPW:
            pw = None if self.gid is None else stepd.StepPasswd("fake", self.uid, self.gid)
            peer.sock.sendall(encode_reply(request, pw))
            return True
        value: object = {
            stepd.Request.STEP_UID: self.uid,
            stepd.Request.PID_IN_CONTAINER: (arg in self.adopted and self.contains)
            or arg in self.pids,
            stepd.Request.STEP_LIST_PIDS: self.pids + self.adopted,
            stepd.Request.DAEMON_PID: self._thread.native_id,
            stepd.Request.STATE: self.state,
        }[request]
        peer.sock.sendall(encode_reply(request, value))
        return True

    def _act(
        self,
        sel: selectors.BaseSelector,
        peer: _Peer,
        how: Behaviour,
        request: stepd.Request | str,
        value: int,
    ) -> bool:
        if how == "answer":
            peer.sock.sendall(encode_reply(request, value))
            return True
        if how == "refuse":
            peer.sock.sendall(encode_reply(request, -1))
            if request == "hello":
                self._drop(sel, peer)
                return False
            return True
        if how == "close":
            self._drop(sel, peer)
            return False
        sel.unregister(peer.sock)  # hang: keep the connection open, never read or answer
        return False


def stale_socket(path: Path) -> None:
    """Leave a socket file at ``path`` whose listener is gone (connect: ECONNREFUSED)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))
        s.listen(1)
