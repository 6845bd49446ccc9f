"""journald's native protocol, sent without blocking the event loop for long (`NativeSender`).

The bytes are those libsystemd's sd_journal_send writes (`encode_entry`): one `FIELD=value`
line per field, and the binary-safe form (name, newline, 64-bit little-endian length, value)
for a value that contains a newline. See `journal.py` for when and why records are dropped.
"""

from __future__ import annotations

import errno
import select
import socket
import struct
from collections.abc import Mapping
from typing import Final

__all__ = ["JOURNAL_SOCKET", "SEND_GRACE_S", "NativeSender", "encode_entry"]

JOURNAL_SOCKET: Final = "/run/systemd/journal/socket"
SEND_GRACE_S: Final = 0.002
"""The longest a record waits for room in journald's queue (not at all while losing)."""
SEND_BUFFER: Final = 8 * 1024 * 1024  # as libsystemd asks for its journal socket
_RECONNECT_ERRNOS: Final = frozenset({errno.ECONNREFUSED, errno.ENOTCONN, errno.ENOENT})
_LE64: Final = struct.Struct("<Q")


def encode_entry(message: str, fields: Mapping[str, str]) -> bytes:
    """One journal entry in journald's native protocol (MESSAGE first, then ``fields``)."""
    out = bytearray()
    for name, value in (("MESSAGE", message), *fields.items()):
        data = value.encode("utf-8", "replace")
        if b"\n" in data:  # the binary-safe form: name, newline, length, value
            out += name.encode() + b"\n" + _LE64.pack(len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


class NativeSender:
    """Sends entries to journald's socket at ``path`` without blocking the caller for long.

    The datagram socket is connected (so that poll reports room in journald's queue) and
    non-blocking. A full queue waits at most ``grace_s`` for room (0 while the journal is
    already losing records: ``hurry``), then raises BlockingIOError; a journald that has
    gone away (ECONNREFUSED, ENOENT) gets one new connection and one more try. Not
    thread-safe; `close()` releases the socket.
    """

    def __init__(self, path: str = JOURNAL_SOCKET, *, grace_s: float = SEND_GRACE_S) -> None:
        self.path = path
        self.grace_s = grace_s
        self.hurry = False  # set by Journal while records are being lost
        self._sock: socket.socket | None = None

    def __call__(self, message: str, /, **fields: str) -> None:
        data = encode_entry(message, fields)
        try:
            self._send(data)
        except OSError as exc:
            self.close()
            if exc.errno not in _RECONNECT_ERRNOS:
                raise
            self._send(data)  # journald restarted: a new socket, one more try

    def _send(self, data: bytes) -> None:
        sock = self._socket()
        try:
            sock.send(data)
        except BlockingIOError:
            if self.hurry or self.grace_s <= 0:
                raise
            ready = select.poll()
            ready.register(sock.fileno(), select.POLLOUT)
            if not ready.poll(max(1, int(self.grace_s * 1000))):
                raise
            sock.send(data)

    def _socket(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            try:
                sock.setblocking(False)
                for opt in (32, socket.SO_SNDBUF):  # SO_SNDBUFFORCE (root), else the capped one
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, opt, SEND_BUFFER)
                        break
                    except OSError:
                        continue
                sock.connect(self.path)
            except BaseException:
                sock.close()
                raise
            self._sock = sock
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
