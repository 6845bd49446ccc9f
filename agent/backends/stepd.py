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
    "KNOWN_VERSIONS",
    "PROTOCOL_22_05",
    "PROTOCOL_26_05",
    "Exchange",
    "Reader",
    "Request",
    "StepdProtocolError",
    "add_extern_pid",
    "daemon_pid",
    "hello",
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

    STEP_LIST_PIDS only for the tests' captures of a real stepd."""

    STATE = 5
    PID_IN_CONTAINER = 8
    DAEMON_PID = 9
    STEP_LIST_PIDS = 15
    STEP_UID = 20
    ADD_EXTERN_PID = 22


# slurmstepd_state_t: 26.05 inserted CANCELLED=3 before ENDING.
_STATES_OLD = ("not_running", "starting", "running", "ending")
_STATES_NEW = ("not_running", "starting", "running", "cancelled", "ending")
_CANCELLED_SINCE = PROTOCOL_26_05


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


# --------------------------------------------------------------------------- client side


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


def _pack_pid(code: Request, pid: int) -> bytes:
    if not 0 < pid < 2**31:
        msg = f"invalid pid {pid}"
        raise ValueError(msg)
    return _INT.pack(code) + _INT.pack(pid)
