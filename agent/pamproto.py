"""The PAM socket line protocol, sans-IO (the contract with pam/pam_callerid.c).

One request line and one reply line per connection, UTF-8, at most MAX_LINE bytes each
including the final newline, ``key=value`` fields separated by single spaces, values
percent-encoded:

    request: CALLERID/1 op=account user=alice service=sshd rhost=10.0.0.1 tty=ssh
    reply:   CALLERID/1 verdict=adopt job=42 reason=callerid msg=...

``op`` is account | open_session | close_session | status (the last from `calleridctl
status`, never from the PAM module: the reply's ``msg`` is the agent's counters as JSON).
Unknown request keys are ignored (forward compatible); missing ``op`` or ``user`` is an
error. ``verdict`` is adopt | allow | deny | error; ``msg`` is shown to the user on deny.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "MAGIC",
    "MAX_LINE",
    "PamProtocolError",
    "PamReply",
    "PamRequest",
    "format_reply",
    "parse_request",
    "pct_decode",
    "pct_encode",
]

MAGIC: Final = "CALLERID/1"
MAX_LINE: Final = 4096
MAX_VALUE: Final = 1024  # bytes of one decoded value
OPS: Final = ("account", "open_session", "close_session", "status")

Op = Literal["account", "open_session", "close_session", "status"]
PamVerdict = Literal["adopt", "allow", "deny", "error"]

_SAFE: Final = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.:/@+,[]"
)
_KEY_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,31}")
_PLAIN: Final = re.compile(r"[\x21-\x24\x26-\x7e]*")  # printable ASCII but '%'
_PLAIN_SAFE: Final = re.compile(r"[A-Za-z0-9\-_.:/@+,\[\]]*")  # all of _SAFE
_USER_RE: Final = re.compile(r"[^\s/:]{1,256}")


class PamProtocolError(ValueError):
    """The request line is malformed (the reply is verdict=error)."""


def pct_encode(value: str) -> str:
    if _PLAIN_SAFE.fullmatch(value):
        return value
    out = []
    for byte in value.encode("utf-8"):
        out.append(chr(byte) if byte in _SAFE else f"%{byte:02X}")
    return "".join(out)


def pct_decode(value: str) -> str:
    if len(value) <= MAX_VALUE and _PLAIN.fullmatch(value):
        return value  # nothing escaped (the usual case): as the slow path would return it
    raw = value.encode("ascii", errors="strict") if value.isascii() else b""
    if not value.isascii():
        msg = "non-ASCII byte in an encoded value"
        raise PamProtocolError(msg)
    out = bytearray()
    i = 0
    while i < len(raw):
        c = raw[i]
        if c == 0x25:  # '%'
            hexpart = raw[i + 1 : i + 3]
            if len(hexpart) != 2 or not all(h in b"0123456789abcdefABCDEF" for h in hexpart):
                msg = "bad percent escape"
                raise PamProtocolError(msg)
            out.append(int(hexpart, 16))
            i += 3
        else:
            if c <= 0x20 or c == 0x7F:
                msg = "control character in a value"
                raise PamProtocolError(msg)
            out.append(c)
            i += 1
        if len(out) > MAX_VALUE:
            msg = "value too long"
            raise PamProtocolError(msg)
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError as exc:
        msg = "value is not UTF-8"
        raise PamProtocolError(msg) from exc


@dataclass(frozen=True, slots=True)
class PamRequest:
    op: Op
    user: str
    service: str = ""
    rhost: str = ""
    tty: str = ""


@dataclass(frozen=True, slots=True)
class PamReply:
    verdict: PamVerdict
    reason: str
    job: str | None = None
    msg: str = ""


def parse_request(line: bytes) -> PamRequest:
    """Parse one request line (with or without its final newline)."""
    if len(line) > MAX_LINE:
        msg = f"request longer than {MAX_LINE} bytes"
        raise PamProtocolError(msg)
    try:
        text = line.decode("ascii").removesuffix("\n")
    except UnicodeDecodeError as exc:
        msg = "request is not ASCII (values must be percent-encoded)"
        raise PamProtocolError(msg) from exc
    parts = text.split(" ")
    if parts[0] != MAGIC:
        msg = f"request does not start with {MAGIC}"
        raise PamProtocolError(msg)
    fields: dict[str, str] = {}
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if not sep or not _KEY_RE.fullmatch(key):
            msg = f"malformed field {part[:40]!r}"
            raise PamProtocolError(msg)
        if key in fields:
            msg = f"duplicate field {key}"
            raise PamProtocolError(msg)
        fields[key] = pct_decode(value)
    op = fields.get("op")
    if op not in OPS:
        msg = f"missing or unknown op {op!r}"
        raise PamProtocolError(msg)
    user = fields.get("user", "")
    if not _USER_RE.fullmatch(user):
        msg = "missing or invalid user"
        raise PamProtocolError(msg)
    return PamRequest(
        op=op,  # type: ignore[arg-type]
        user=user,
        service=fields.get("service", ""),
        rhost=fields.get("rhost", ""),
        tty=fields.get("tty", ""),
    )


def format_reply(reply: PamReply) -> bytes:
    """One reply line, newline-terminated, never longer than MAX_LINE."""
    head = f"{MAGIC} verdict={reply.verdict} reason={pct_encode(reply.reason)}"
    if reply.job is not None:
        head += f" job={pct_encode(reply.job)}"
    room = MAX_LINE - len(head) - len(" msg=") - 1
    msg = pct_encode(reply.msg)
    if len(msg) > room:  # cut whole characters, never inside one's escapes
        parts: list[str] = []
        for ch in reply.msg:
            enc = pct_encode(ch)
            if room < len(enc):
                break
            parts.append(enc)
            room -= len(enc)
        msg = "".join(parts)
    return f"{head} msg={msg}\n".encode("ascii")
