"""Sans-IO codec for the slurmstepd unix-socket protocol (no sockets here: bytes in, bytes out).

Every slurmstepd listens on ``<SlurmdSpoolDir>/<NodeName>_<jobid>.<stepid>``. The protocol
(Slurm 22.05 to 26.05 alike; reference/slurm.md section 4) has no framing and no
authentication of its own: the stepd reads the peer's credentials with SO_PEERCRED, and every
integer is a native-endian C type (``int``, ``pid_t``, ``uid_t``: 4 bytes; ``bool``: 1 byte).

1. Handshake: the client writes an int32 protocol version; the stepd checks only that it is
   ``>=`` its minimum and answers its own version, or ``-1`` (and closes).
2. Requests: an int32 request code, then the request's arguments; the stepd answers each in
   turn, so several requests may be pipelined on one connection. An unknown code ends the
   connection.

Client side: each request function (`hello`, `step_uid`, `add_extern_pid` ...) returns an
`Exchange`: the bytes to send, and `Exchange.reader()`, a small incremental parser of the reply
(`Reader`: `needed` says how many more bytes it wants, `feed()` takes them, `value` is the
result). Malformed input raises `StepdProtocolError`. Only what the backend asks is here; the
stepd's side (for the test stand-in) is in tests/support/fake_stepd.py.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = [
    "DEFAULT_PROTOCOL_VERSION",
    "EXTERN_STEP",
    "GET_NS_FDS_SINCE",
    "KNOWN_VERSIONS",
    "MAX_NS_FDS",
    "MAX_PASSWD_FIELD",
    "PROTOCOL_22_05",
    "PROTOCOL_26_05",
    "Exchange",
    "Reader",
    "Request",
    "StepPasswd",
    "StepdProtocolError",
    "add_extern_pid",
    "daemon_pid",
    "get_ns_fd",
    "get_ns_fds",
    "getpw",
    "hello",
    "ns_kind",
    "pid_in_container",
    "state",
    "state_name",
    "step_uid",
    "version_name",
]

T = TypeVar("T")

# Protocol versions (src/common/slurm_protocol_common.h): <major index> << 8.
PROTOCOL_22_05 = 38 << 8  # 9728; a 22.05 stepd accepts >= 20.11 = 36 << 8
PROTOCOL_26_05 = 45 << 8  # 11520; a 26.05 stepd accepts >= 24.11 = 42 << 8
KNOWN_VERSIONS = {
    36 << 8: "20.11",
    37 << 8: "21.08",
    PROTOCOL_22_05: "22.05",
    39 << 8: "23.02",
    40 << 8: "23.11",
    41 << 8: "24.05",
    42 << 8: "24.11",
    43 << 8: "25.05",
    44 << 8: "25.11",
    PROTOCOL_26_05: "26.05",
}
# What we send: the newest version we know. A stepd only checks ``sent >= its minimum``.
DEFAULT_PROTOCOL_VERSION = PROTOCOL_26_05

# The extern step's id (slurm/slurm.h), as it appears in socket names.
EXTERN_STEP = 0xFFFFFFFC  # 4294967292, SLURM_EXTERN_CONT

_INT = struct.Struct("=i")
_UINT = struct.Struct("=I")


class StepdProtocolError(Exception):
    """The peer sent bytes that are not a valid message of this protocol."""


class Request(enum.IntEnum):
    """Request codes (``step_msg_t``, src/common/stepd_api.h; same in 26.05).

    STEP_LIST_PIDS only for the tests' captures of a real stepd. GET_NS_FD (22.05 on) and
    GET_NS_FDS (25.11 on) pass the job's namespace fds (SCM_RIGHTS)."""

    STATE = 5
    PID_IN_CONTAINER = 8
    DAEMON_PID = 9
    STEP_LIST_PIDS = 15
    STEP_UID = 20
    ADD_EXTERN_PID = 22
    GETPW = 24
    GET_NS_FD = 26
    GET_NS_FDS = 28


# GET_NS_FDS exists from 25.11 (namespace/*); before, GET_NS_FD (job_container/*) passes one fd.
GET_NS_FDS_SINCE = 44 << 8
# At most this many fds in a GET_NS_FDS reply (namespace/linux passes 3: pid, user, mnt).
MAX_NS_FDS = 8
# The byte each passed fd rides on (src/common/fd.c send_fd_over_socket: one '\0').
_FD_MARKER = b"\x00"
# CLONE_NEW* flags (a GET_NS_FDS entry's type) -> /proc/<pid>/ns/<kind> names.
_NS_KINDS = {
    0x00020000: "mnt",
    0x02000000: "cgroup",
    0x04000000: "uts",
    0x08000000: "ipc",
    0x10000000: "user",
    0x20000000: "pid",
    0x40000000: "net",
    0x00000080: "time",
}


# GETPW modes (stepd_getpw_mode_t): ALWAYS answers whoever asks (the others need the caller's
# pid in the job, as nss_slurm does).
_GETPW_MATCH_ALWAYS = 1
# A GETPW reply's strings are a user name, "*", gecos, home and shell: bounded well above any
# real one (LOGIN_NAME_MAX, PATH_MAX) so a garbled length cannot make us read forever.
MAX_PASSWD_FIELD = 4096

# slurmstepd_state_t: 22.05 has ENDING=3; 24.11 (source and real stepd) and 26.05 have
# CANCELLED=3 before ENDING=4 (the releases in between were not checked).
_STATES_OLD = ("not_running", "starting", "running", "ending")
_STATES_NEW = ("not_running", "starting", "running", "cancelled", "ending")
_CANCELLED_SINCE = 42 << 8  # 24.11


def version_name(version: int) -> str:
    """A protocol version as a release name (``9728`` -> ``"22.05"``), or the raw number."""
    return KNOWN_VERSIONS.get(version, f"{version} (0x{version:04x})")


def state_name(value: int, version: int) -> str:
    """The name of a STATE reply from a stepd speaking ``version`` (its handshake reply)."""
    names = _STATES_NEW if version >= _CANCELLED_SINCE else _STATES_OLD
    return names[value] if 0 <= value < len(names) else f"unknown({value})"


# --------------------------------------------------------------------------- incremental parsing

# A parser is a generator: it yields how many bytes it needs next, is sent exactly that many,
# and returns the decoded value.
Parse = Generator[int, bytes, T]


class Reader(Generic[T]):
    """Incremental decoder of one message: feed it bytes until `done`, then read `value`."""

    def __init__(self, parse: Parse[T]) -> None:
        self._gen = parse
        self._buf = bytearray()
        self._need = 0
        self._done = False
        self._value: T | None = None
        self._advance(b"", first=True)

    @property
    def done(self) -> bool:
        return self._done

    @property
    def needed(self) -> int:
        """How many more bytes this message needs at least (0 once done)."""
        return 0 if self._done else self._need - len(self._buf)

    @property
    def value(self) -> T:
        if not self._done:
            msg = "the message is incomplete"
            raise RuntimeError(msg)
        return self._value  # type: ignore[return-value]

    def feed(self, data: bytes) -> int:
        """Consume bytes from the start of ``data``; return how many were taken.

        Never takes more than the message needs, so the rest belongs to the next message.
        """
        taken = 0
        while not self._done and taken < len(data):
            chunk = data[taken : taken + self.needed]
            taken += len(chunk)
            self._buf += chunk
            if len(self._buf) == self._need:
                whole, self._buf = bytes(self._buf), bytearray()
                self._advance(whole)
        return taken

    def _advance(self, data: bytes, *, first: bool = False) -> None:
        try:
            need = next(self._gen) if first else self._gen.send(data)
            while need == 0:  # e.g. an empty list: no bytes to wait for
                need = self._gen.send(b"")
        except StopIteration as stop:
            self._done, self._value = True, stop.value
            return
        self._need = need


def _int32() -> Parse[int]:
    data = yield 4
    value: int = _INT.unpack(data)[0]
    return value


def _uint32() -> Parse[int]:
    data = yield 4
    value: int = _UINT.unpack(data)[0]
    return value


def _bool() -> Parse[bool]:
    data = yield 1
    if data not in (b"\x00", b"\x01"):
        msg = f"invalid bool byte {data!r}"
        raise StepdProtocolError(msg)
    return data == b"\x01"


def _passwd() -> Parse[StepPasswd | None]:
    found = yield from _int32()
    if found == 0:
        return None
    if found != 1:
        msg = f"invalid GETPW found flag {found}"
        raise StepdProtocolError(msg)
    name = yield from _string()
    yield from _string()  # the password field, always "*"
    uid = yield from _uint32()
    gid = yield from _uint32()
    for _ in range(3):  # gecos, home, shell
        yield from _string()
    return StepPasswd(name, uid, gid)


def _ns_fd() -> Parse[tuple[int, ...] | None]:
    """GET_NS_FD's reply: int32 n (the stepd's own fd number); n > 0: one marker byte with the
    fd attached follows. () = no namespace, None = the stepd failed (-1: ``.ns`` unopenable).
    The one entry's type is 0: job_container/tmpfs passes its mount namespace."""
    number = yield from _int32()
    if number == 0:
        return ()
    if number < 0:
        return None
    yield from _fd_marker()
    return (0,)


def _ns_fds() -> Parse[tuple[int, ...] | None]:
    """GET_NS_FDS's reply: int32 count, then per fd an int32 CLONE_NEW* type and a marker byte
    with the fd attached. () = no namespaces. (The stepd closes the connection on failure.)"""
    count = yield from _int32()
    if not 0 <= count <= MAX_NS_FDS:
        msg = f"invalid namespace fd count {count}"
        raise StepdProtocolError(msg)
    types = []
    for _ in range(count):
        kind = yield from _int32()
        yield from _fd_marker()
        types.append(kind)
    return tuple(types)


def _fd_marker() -> Parse[None]:
    data = yield 1
    if data != _FD_MARKER:
        msg = f"invalid fd marker byte {data!r}"
        raise StepdProtocolError(msg)


def _string() -> Parse[str]:
    length = yield from _int32()
    if not 0 <= length <= MAX_PASSWD_FIELD:
        msg = f"invalid GETPW string length {length}"
        raise StepdProtocolError(msg)
    data = yield length
    return data.decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- client side


@dataclass(frozen=True, slots=True)
class StepPasswd:
    """A GETPW reply: the job's user name, uid and gid (the job's group, ``sbatch --gid``)."""

    name: str
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class Exchange(Generic[T]):
    """One request: what to send, and how to decode the reply."""

    name: str
    data: bytes
    parser: Callable[[], Parse[T]]

    def reader(self) -> Reader[T]:
        return Reader(self.parser())


def hello(version: int = DEFAULT_PROTOCOL_VERSION) -> Exchange[int]:
    """The handshake; the reply is the stepd's own protocol version, or -1 (refused)."""
    return Exchange("hello", _INT.pack(version), _int32)


def step_uid() -> Exchange[int]:
    """STEP_UID: the uid owning the job (any caller may ask)."""
    return Exchange("STEP_UID", _INT.pack(Request.STEP_UID), _uint32)


def add_extern_pid(pid: int) -> Exchange[int]:
    """ADD_EXTERN_PID: adopt ``pid`` into the extern step. Reply 0 = done, -1 = refused.

    Only root or SlurmUser may ask; a 26.05 stepd closes the connection instead of answering
    -1 (also when the step is already ending).
    """
    return Exchange("ADD_EXTERN_PID", _pack_pid(Request.ADD_EXTERN_PID, pid), _int32)


def pid_in_container(pid: int) -> Exchange[bool]:
    """PID_IN_CONTAINER: whether ``pid`` is in the step's process-tracking container."""
    return Exchange("PID_IN_CONTAINER", _pack_pid(Request.PID_IN_CONTAINER, pid), _bool)


def daemon_pid() -> Exchange[int]:
    """DAEMON_PID: the pid of the slurmstepd process itself."""
    return Exchange("DAEMON_PID", _INT.pack(Request.DAEMON_PID), _int32)


def state() -> Exchange[int]:
    """STATE: the step's state (decode with `state_name` and the handshake's version)."""
    return Exchange("STATE", _INT.pack(Request.STATE), _int32)


def getpw() -> Exchange[StepPasswd | None]:
    """GETPW in mode ALWAYS: the job's passwd entry, whose gid is the job's group (the step's
    ``gid``: ``sbatch --gid`` or the submitter's group); None when the stepd has no complete
    entry (it answers "not found" then). Any caller may ask (22.05 to 26.05). Mode ALWAYS
    ignores the uid and name asked about: sent as (uid_t)-1 and no name."""
    data = _INT.pack(Request.GETPW) + _INT.pack(_GETPW_MATCH_ALWAYS) + _UINT.pack(2**32 - 1)
    return Exchange("GETPW", data + _INT.pack(0), _passwd)


def get_ns_fd() -> Exchange[tuple[int, ...] | None]:
    """GET_NS_FD (22.05 to 25.05, job_container/*): the job's mount namespace fd. The reply
    value is the type of each fd the connection received (SCM_RIGHTS, in order): ``(0,)`` one
    fd of unspecified type, ``()`` no container (no plugin, or BasePath=none), None: the
    stepd could not open it. Any caller may ask (26.05: the job's owner or root)."""
    return Exchange("GET_NS_FD", _INT.pack(Request.GET_NS_FD), _ns_fd)


def get_ns_fds() -> Exchange[tuple[int, ...] | None]:
    """GET_NS_FDS (25.11 on, namespace/*): the job's namespace fds, in the order
    pam_slurm_adopt enters them; the value is each one's CLONE_NEW* type (`ns_kind`), ``()``
    when the job has none. Only the job's owner or root may ask."""
    return Exchange("GET_NS_FDS", _INT.pack(Request.GET_NS_FDS), _ns_fds)


def ns_kind(clone_flag: int) -> str | None:
    """A CLONE_NEW* flag as the namespace's /proc name ("mnt", "pid" ...), None if unknown."""
    return _NS_KINDS.get(clone_flag)


def _pack_pid(code: Request, pid: int) -> bytes:
    if not 0 < pid < 2**31:
        msg = f"invalid pid {pid}"
        raise ValueError(msg)
    return _INT.pack(code) + _INT.pack(pid)
