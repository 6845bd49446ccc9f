"""The mesh wire protocol, sans-IO: bytes <-> frozen message dataclasses.

No sockets and no zmq here. A message is one msgpack map, sent as one zmq frame:

    CallerIdQuery  {t:"q",    v, id, proto:"tcp"|"udp", src:[ip, port], dst:[ip, port], uid}
    CallerIdReply  {t:"r",    v, id, status:"found"|"not_found"|"error", code, job, node, reason}
    Ping           {t:"ping", v, id}
    Pong           {t:"pong", v, id, node}

``src`` is the end of the connection that opened it (the ssh client, on the source node) and
``dst`` the end that accepted it (sshd, on the destination node); both are the same whichever
node looks at them. ``id`` is the requester's request id (u64), echoed in the answer.

Order of checks (cheap and structural first): frame count, size, msgpack with size limits, map
shape, protocol version, then per-field types, ranges and address syntax. Any failure raises
`ProtocolError` (the peer sent garbage: count it, drop it, never crash); a version we do not
speak raises its subclass `UnsupportedVersion`, which carries the request id so that the server
can answer with an error reply. `LocalProtocolError` means we tried to build a bad message.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Literal

import msgpack

from callerid.bus._zones import is_link_local, split_zone

__all__ = [
    "MAX_MESSAGE_SIZE",
    "PROTOCOL_VERSION",
    "CallerIdQuery",
    "CallerIdReply",
    "Endpoint",
    "ErrorCode",
    "LocalProtocolError",
    "Message",
    "Ping",
    "Pong",
    "ProtocolError",
    "UnsupportedVersion",
    "decode",
    "decode_frames",
    "encode",
    "error_reply",
    "is_link_local",
    "normalize_ip",
    "split_zone",
]

PROTOCOL_VERSION: Final = 1
MAX_MESSAGE_SIZE: Final = 1024  # bytes of one encoded message; a query is ~90 bytes
MAX_NAME_LEN: Final = 64  # node names and job ids
MAX_REASON_LEN: Final = 200
MAX_REQUEST_ID: Final = 2**64 - 1
MAX_UID: Final = 2**32 - 2  # (uid_t)-1 is "no uid"

_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_JOB_RE: Final = re.compile(r"[A-Za-z0-9_.\-]+")


class ProtocolError(Exception):
    """The peer sent something that is not a valid message (counted and dropped)."""


class UnsupportedVersion(ProtocolError):
    """A well-formed message in a protocol version we do not speak."""

    def __init__(self, version: int, request_id: int | None) -> None:
        super().__init__(f"unsupported protocol version {version}; we speak {PROTOCOL_VERSION}")
        self.version = version
        self.request_id = request_id


class LocalProtocolError(Exception):
    """We tried to build or send an invalid message: a bug on our side."""


class ErrorCode:
    """Numeric codes carried in `CallerIdReply.code` (0 unless status is "error")."""

    OK: Final = 0
    BAD_VERSION: Final = 1
    MALFORMED: Final = 2
    INTERNAL: Final = 3
    BACKEND: Final = 4

    NAMES: ClassVar[dict[int, str]] = {
        0: "ok",
        1: "bad_version",
        2: "malformed",
        3: "internal",
        4: "backend",
    }


def normalize_ip(text: str) -> str:
    """Canonical text of an IP literal; IPv4-mapped IPv6 becomes plain IPv4.

    Raises ValueError for anything that is not an IPv4 or IPv6 literal (no zone ids, no names).
    """
    if not isinstance(text, str) or not text or len(text) > 45 or "%" in text:
        msg = f"not an IP address literal: {text!r}"
        raise ValueError(msg)
    return _canonical_ip(text)


@functools.lru_cache(maxsize=8192)
def _canonical_ip(text: str) -> str:
    # every query names two addresses, from a node's few peers: remembered, not re-parsed
    addr = ipaddress.ip_address(text)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One end of a connection; ``ip`` is always in canonical form (see `normalize_ip`)."""

    ip: str
    port: int

    def __post_init__(self) -> None:
        try:
            canon = normalize_ip(self.ip)
        except ValueError as exc:
            raise LocalProtocolError(str(exc)) from exc
        object.__setattr__(self, "ip", canon)
        if not _is_int(self.port) or not 0 <= self.port <= 65535:
            msg = f"port out of range: {self.port!r}"
            raise LocalProtocolError(msg)

    @property
    def family(self) -> int:
        return 6 if ":" in self.ip else 4

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if self.family == 6 else f"{self.ip}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """Parse ``1.2.3.4:22`` or ``[::1]:22``; raises ValueError."""
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit():
            msg = f"expected IP:PORT or [IPv6]:PORT, got {text!r}"
            raise ValueError(msg)
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        try:
            return cls(host, int(port))
        except LocalProtocolError as exc:
            raise ValueError(str(exc)) from exc


@dataclass(frozen=True, slots=True)
class CallerIdQuery:
    """Which job owns the connection src -> dst, if it belongs to ``uid``?"""

    id: int
    proto: Literal["tcp", "udp"]
    src: Endpoint
    dst: Endpoint
    uid: int
    v: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        _check_id(self.id)
        if self.proto not in ("tcp", "udp"):
            msg = f"proto must be tcp or udp, not {self.proto!r}"
            raise LocalProtocolError(msg)
        if not _is_int(self.uid) or not 0 <= self.uid <= MAX_UID:
            msg = f"uid out of range: {self.uid!r}"
            raise LocalProtocolError(msg)
        if self.src.family != self.dst.family:
            msg = "src and dst must be of the same address family"
            raise LocalProtocolError(msg)


Status = Literal["found", "not_found", "error"]


@dataclass(frozen=True, slots=True)
class CallerIdReply:
    """The answer: ``job`` is set only when status is "found"."""

    id: int
    status: Status
    node: str
    job: str | None = None
    reason: str = ""
    code: int = ErrorCode.OK
    v: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        _check_id(self.id)
        if self.status not in ("found", "not_found", "error"):
            msg = f"bad status {self.status!r}"
            raise LocalProtocolError(msg)
        _check_name(self.node, "node")
        if (self.status == "found") != (self.job is not None):
            msg = "job is set exactly when status is found"
            raise LocalProtocolError(msg)
        if self.job is not None and not (
            len(self.job) <= MAX_NAME_LEN and _JOB_RE.fullmatch(self.job)
        ):
            msg = f"bad job id {self.job!r}"
            raise LocalProtocolError(msg)
        if not isinstance(self.reason, str) or len(self.reason) > MAX_REASON_LEN:
            msg = "reason must be a short string"
            raise LocalProtocolError(msg)
        if not _is_int(self.code) or self.code not in ErrorCode.NAMES:
            msg = f"unknown error code {self.code!r}"
            raise LocalProtocolError(msg)
        if (self.status == "error") != (self.code != ErrorCode.OK):
            msg = "code is non-zero exactly when status is error"
            raise LocalProtocolError(msg)


@dataclass(frozen=True, slots=True)
class Ping:
    id: int
    v: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        _check_id(self.id)


@dataclass(frozen=True, slots=True)
class Pong:
    id: int
    node: str
    v: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        _check_id(self.id)
        _check_name(self.node, "node")


Message = CallerIdQuery | CallerIdReply | Ping | Pong


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_id(rid: object) -> None:
    if not _is_int(rid) or not 0 <= rid <= MAX_REQUEST_ID:  # type: ignore[operator]
        msg = f"request id out of range: {rid!r}"
        raise LocalProtocolError(msg)


def _check_name(name: object, what: str) -> None:
    if not isinstance(name, str) or len(name) > MAX_NAME_LEN or not _NAME_RE.fullmatch(name):
        msg = f"bad {what} name {name!r}"
        raise LocalProtocolError(msg)


# --------------------------------------------------------------------------- encoding


def _ep(e: Endpoint) -> list[Any]:
    return [e.ip, e.port]


def encode(msg: Message) -> bytes:
    """One message -> one frame of bytes (at most MAX_MESSAGE_SIZE)."""
    body: dict[str, Any]
    match msg:
        case CallerIdQuery():
            body = {
                "t": "q",
                "v": msg.v,
                "id": msg.id,
                "proto": msg.proto,
                "src": _ep(msg.src),
                "dst": _ep(msg.dst),
                "uid": msg.uid,
            }
        case CallerIdReply():
            body = {
                "t": "r",
                "v": msg.v,
                "id": msg.id,
                "status": msg.status,
                "code": msg.code,
                "job": msg.job,
                "node": msg.node,
                "reason": msg.reason,
            }
        case Ping():
            body = {"t": "ping", "v": msg.v, "id": msg.id}
        case Pong():
            body = {"t": "pong", "v": msg.v, "id": msg.id, "node": msg.node}
        case _:
            raise LocalProtocolError(f"not a message: {msg!r}")  # noqa: EM102
    data: bytes = msgpack.packb(body, use_bin_type=True)
    if len(data) > MAX_MESSAGE_SIZE:
        msg_ = f"encoded message is {len(data)} bytes, over {MAX_MESSAGE_SIZE}"
        raise LocalProtocolError(msg_)
    return data


# --------------------------------------------------------------------------- decoding

_FIELDS: Final[dict[str, frozenset[str]]] = {
    "q": frozenset({"t", "v", "id", "proto", "src", "dst", "uid"}),
    "r": frozenset({"t", "v", "id", "status", "code", "job", "node", "reason"}),
    "ping": frozenset({"t", "v", "id"}),
    "pong": frozenset({"t", "v", "id", "node"}),
}


def decode_frames(frames: list[bytes]) -> Message:
    """Decode a zmq multipart message that must hold exactly one payload frame."""
    if len(frames) != 1:
        msg = f"expected 1 frame, got {len(frames)}"
        raise ProtocolError(msg)
    return decode(frames[0])


def decode(data: bytes) -> Message:
    """One frame -> one message; anything else raises ProtocolError."""
    if not isinstance(data, bytes | bytearray | memoryview):
        msg = "frame is not bytes"
        raise ProtocolError(msg)
    if len(data) > MAX_MESSAGE_SIZE:
        msg = f"message of {len(data)} bytes exceeds {MAX_MESSAGE_SIZE}"
        raise ProtocolError(msg)
    try:
        body = msgpack.unpackb(
            bytes(data),
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=MAX_MESSAGE_SIZE,
            max_bin_len=0,
            max_array_len=16,
            max_map_len=16,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises a zoo of types for bad input
        msg = f"not a msgpack message: {type(exc).__name__}"
        raise ProtocolError(msg) from exc
    if not isinstance(body, dict):
        msg = "message is not a map"
        raise ProtocolError(msg)
    version = body.get("v")
    if not isinstance(version, int) or isinstance(version, bool):
        msg = "missing or non-integer protocol version"
        raise ProtocolError(msg)
    if version != PROTOCOL_VERSION:
        rid = body.get("id")
        ok_id = isinstance(rid, int) and _is_int(rid) and 0 <= rid <= MAX_REQUEST_ID
        raise UnsupportedVersion(version, rid if ok_id else None)
    kind = body.get("t")
    if not isinstance(kind, str) or kind not in _FIELDS:
        msg = f"unknown message type {kind!r}"
        raise ProtocolError(msg)
    if set(body) != _FIELDS[kind]:
        msg = f"{kind}: fields {sorted(body)} != {sorted(_FIELDS[kind])}"
        raise ProtocolError(msg)
    try:
        return _build(kind, body)
    except (LocalProtocolError, TypeError, ValueError) as exc:
        msg = f"{kind}: {exc}"
        raise ProtocolError(msg) from exc


def _endpoint(value: Any) -> Endpoint:
    if not isinstance(value, list) or len(value) != 2:
        msg = "endpoint must be [ip, port]"
        raise ValueError(msg)
    ip, port = value
    if not isinstance(ip, str):
        msg = "endpoint ip must be a string"
        raise ValueError(msg)
    return Endpoint(ip, port)


def _build(kind: str, b: dict[str, Any]) -> Message:
    match kind:
        case "q":
            return CallerIdQuery(
                id=b["id"],
                proto=b["proto"],
                src=_endpoint(b["src"]),
                dst=_endpoint(b["dst"]),
                uid=b["uid"],
            )
        case "r":
            return CallerIdReply(
                id=b["id"],
                status=b["status"],
                code=b["code"],
                job=b["job"],
                node=b["node"],
                reason=b["reason"],
            )
        case "ping":
            return Ping(id=b["id"])
        case _:
            return Pong(id=b["id"], node=b["node"])


def error_reply(request_id: int, node: str, code: int, reason: str) -> CallerIdReply:
    """An error answer; the reason is a short fixed text, never a traceback."""
    return CallerIdReply(
        id=request_id, status="error", node=node, code=code, reason=reason[:MAX_REASON_LEN]
    )
