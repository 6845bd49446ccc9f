"""The agent's unix socket: made root-only from birth, who is calling (SO_PEERCRED), requests
that carry fds (SCM_RIGHTS: the session's socket, lent by the caller) and replies that carry
fds (the job's namespaces, to root only)."""

from __future__ import annotations

import array
import contextlib
import os
import socket
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["LENT_MAX", "bind_unix", "passed_fds", "peer_cred", "recv_lent", "send_with_fds"]

_UCRED = struct.Struct("3i")  # pid, uid, gid
BACKLOG = 512
LENT_MAX = 4  # fds taken with a request (the module lends one); more: none are used
_INT_SIZE = array.array("i").itemsize
_LENT_SPACE = socket.CMSG_SPACE(LENT_MAX * _INT_SIZE)
# plain ints: an operation on the socket module's flag enums builds an enum member each time
_RECV_FLAGS = int(socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
_CTRUNC = int(socket.MSG_CTRUNC)
_DONTWAIT = int(socket.MSG_DONTWAIT)


def passed_fds(anc: Iterable[tuple[int, int, bytes]]) -> tuple[list[int], bool]:
    """The fds of recvmsg's ancillary data (SCM_RIGHTS), in order, and whether other control
    data came too."""
    fds: list[int] = []
    other = False
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", payload[: len(payload) - len(payload) % _INT_SIZE]))
        else:
            other = True
    return fds, other


def recv_lent(sock: socket.socket, size: int) -> tuple[bytes, list[int] | None]:
    """recv() that also takes the fds the caller passed with the bytes (SCM_RIGHTS,
    close-on-exec), for the caller to close; never waits (BlockingIOError). The fds are None
    when none came, or when they came truncated or with other control data (what did come
    is closed here then)."""
    data, anc, flags, _ = sock.recvmsg(size, _LENT_SPACE, _RECV_FLAGS)
    if not anc:
        return data, None
    fds, other = passed_fds(anc)
    if other or flags & _CTRUNC:  # truncated: the kernel closed what did not fit
        for fd in fds:
            os.close(fd)
        return data, None
    return data, fds


def peer_cred(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a unix socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, _gid = _UCRED.unpack(raw)
    return pid, uid


def send_with_fds(sock: socket.socket, data: bytes, fds: Sequence[int]) -> int:
    """Send ``data`` with ``fds`` attached to its bytes (SCM_RIGHTS; none: a plain send),
    never waiting (BlockingIOError). The caller keeps its copies of the fds (and closes
    them)."""
    if not fds:
        return sock.send(data, _DONTWAIT)
    rights = array.array("i", fds).tobytes()
    return sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)], _DONTWAIT)


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
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock
