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

What a request's values may hold, once percent-decoded (anything else is a `PamProtocolError`,
which the server answers with ``bad_request`` and one log line, before any NSS look-up):

- ``user``: a login name: 1 to MAX_USER (255) bytes of UTF-8 (LOGIN_NAME_MAX is 256 with its
  NUL), every character printable (`str.isprintable`: no C0, DEL or C1 control, no format
  character such as U+202E, nothing unassigned), no whitespace at all, no ``/`` or ``:``.
  The PAM module sends PAM_USER as it is, so an impossible name comes only from a confused or
  hostile client: it is refused here rather than reaching getpwnam (which raises on a NUL).
- ``service``, ``rhost``, ``tty`` and every other value: at most MAX_VALUE (1024) bytes;
  ``service``, ``rhost`` and ``tty`` must hold no control character (C0, DEL, C1: they end up
  in logs and journal fields), other characters are allowed (a PAM_RHOST may be any text).
  Values of unknown keys are decoded (a bad escape is an error) and otherwise ignored.

A reply always fits the module's parser (pam/codec.c ``cid_parse_reply``): one ASCII line of at
most MAX_LINE bytes, every value percent-encoded, no encoded NUL (a NUL in ``reason`` or
``msg`` is sent as ``?``), ``job`` only when it is a job id the module accepts
(``[A-Za-z0-9_.-]{1,64}``: any other is left out rather than turn a decision into garbage),
``reason`` and ``msg`` cut at whole characters to fit.

``gid`` (the adopted job's group, canonical decimal 0..MAX_GID) is sent only with
verdict=adopt; the module exports it as SLURM_JOB_GID and CALLERID_JOB_GID. Both ways
compatible: a module that does not know the key ignores it (unknown reply keys are ignored,
their values only percent-decoded), and a module that knows it takes its absence as "no group
to tell" (pam/client.h ``cid_valid_gid``).

Namespaces (docs/architecture.md, "Joining the job's namespaces"). An account request may say
``ns=1`` (the module enters the job's namespaces) or ``ns=0`` (its ``join_container=0``: it
will not); a module without namespace support says nothing (`PamRequest.join` None); any
other value is a `PamProtocolError`. An adopt reply may name ``ns=KIND[,KIND...]`` (kinds of
NS_KINDS, each at most once, in the order the module enters them); the server sends exactly
that many fds with the line (SCM_RIGHTS), in that order. A module without namespace support
ignores the key (and the kernel closes fds it does not take), which is why they are sent only
to a module that said ``ns=1``; the module rejects a reply whose fds do not match the key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

from callerid.agent.netinfo import Connection

__all__ = [
    "MAGIC",
    "MAX_LINE",
    "NS_KINDS",
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
MAX_USER: Final = 255  # bytes of a user name (LOGIN_NAME_MAX, 256, counts the NUL)
MAX_REASON: Final = 256  # encoded bytes of a reply's reason (reasons are short tokens)
MAX_GID: Final = 2**32 - 2  # (gid_t)-1 means "no group" to the kernel: never sent
OPS: Final = ("account", "open_session", "close_session", "status")
NS_KINDS: Final = ("user", "mnt", "pid", "net", "ipc", "uts", "cgroup")  # backends.base

Op = Literal["account", "open_session", "close_session", "status"]
PamVerdict = Literal["adopt", "allow", "deny", "error"]

_SAFE: Final = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.:/@+,[]"
)
_KEY_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,31}")
_PLAIN: Final = re.compile(r"[\x21-\x24\x26-\x7e]*")  # printable ASCII but '%'
_PLAIN_SAFE: Final = re.compile(r"[A-Za-z0-9\-_.:/@+,\[\]]*")  # all of _SAFE
_USER_BAD: Final = re.compile(r"[\s/:]")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL, C1
_JOB_RE: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}")  # pam/client.h cid_valid_job


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
    join: bool | None = None  # ns=1 / ns=0: the module enters namespaces / will not; None: silent
    # the session's socket(s) the caller lent with the line (SCM_RIGHTS, read by the server);
    # None: none came (an older module, or sshd named none): the agent walks the caller's fds
    lent: tuple[Connection, ...] | None = None


@dataclass(frozen=True, slots=True)
class PamReply:
    verdict: PamVerdict
    reason: str
    job: str | None = None
    msg: str = ""
    gid: int | None = None  # the adopted job's group: sent with verdict=adopt only
    ns: tuple[str, ...] = ()  # the kinds of the fds sent with the line (verdict=adopt only)

    def __post_init__(self) -> None:
        if self.ns and (
            self.verdict != "adopt"
            or len(set(self.ns)) != len(self.ns)
            or any(k not in NS_KINDS for k in self.ns)
        ):
            msg = f"namespaces {self.ns!r} with verdict {self.verdict}"
            raise ValueError(msg)


# The line pam_callerid.so sends, its fields in its order and no value escaped: a user of
# printable ASCII but "/", ":" and "%", other values of printable ASCII but "%". Every line it
# matches, `_parse_fields` parses to the same request (tests/unit/test_pamproto.py).
_COMMON: Final = re.compile(
    rb"CALLERID/1 op=(account|open_session|close_session) user=([\x21-\x24\x26-\x2e\x30-\x39"
    rb"\x3b-\x7e]{1,255}) service=([\x21-\x24\x26-\x7e]{0,1024}) rhost=([\x21-\x24\x26-\x7e]"
    rb"{0,1024}) tty=([\x21-\x24\x26-\x7e]{0,1024})(?: ns=([01]))?\n?"
)


def parse_request(line: bytes, lent: tuple[Connection, ...] | None = None) -> PamRequest:
    """Parse one request line (with or without its final newline); ``lent``: what came with
    it (`PamRequest.lent`)."""
    common = _COMMON.fullmatch(line)
    if common is not None:  # the module's own line: one match instead of a field walk
        op, user, service, rhost, tty, ns = common.groups()
        join = None if ns is None else ns == b"1"
        the_op: Op = op.decode()  # type: ignore[assignment]  # one of OPS: the pattern says so
        return PamRequest(
            the_op, user.decode(), service.decode(), rhost.decode(), tty.decode(), join, lent
        )
    return _parse_fields(line, lent)


def _parse_fields(line: bytes, lent: tuple[Connection, ...] | None) -> PamRequest:
    """`parse_request` of any line: every field decoded and checked."""
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
    if not _valid_user(user):
        msg = "missing or invalid user"
        raise PamProtocolError(msg)
    service, rhost, tty = (fields.get(k, "") for k in ("service", "rhost", "tty"))
    for key, value in (("service", service), ("rhost", rhost), ("tty", tty)):
        if _CONTROL.search(value):
            msg = f"control character in {key}"
            raise PamProtocolError(msg)
    ns = fields.get("ns")
    if ns not in (None, "0", "1"):
        msg = "ns must be 0 or 1"
        raise PamProtocolError(msg)
    join = None if ns is None else ns == "1"
    return PamRequest(op, user, service, rhost, tty, join, lent)  # type: ignore[arg-type]


def _valid_user(user: str) -> bool:
    """A name that could be a login name (see the module docstring)."""
    if not user or len(user) > MAX_USER or _USER_BAD.search(user) or not user.isprintable():
        return False
    return user.isascii() or len(user.encode("utf-8")) <= MAX_USER


def format_reply(reply: PamReply) -> bytes:
    """One reply line, newline-terminated, never longer than MAX_LINE, always one the PAM
    module parses (see the module docstring)."""
    head = f"{MAGIC} verdict={reply.verdict} reason={_encode_cut(reply.reason, MAX_REASON)}"
    if reply.job is not None and _JOB_RE.fullmatch(reply.job):
        head += f" job={reply.job}"
    if reply.verdict == "adopt" and _valid_gid(reply.gid):
        head += f" gid={reply.gid}"
    if reply.ns:
        head += f" ns={','.join(reply.ns)}"
    msg = _encode_cut(reply.msg, MAX_LINE - len(head) - len(" msg=") - 1)
    return f"{head} msg={msg}\n".encode("ascii")


def _valid_gid(gid: int | None) -> bool:
    """A gid the module accepts (anything else is left out, as a bad job id is)."""
    return type(gid) is int and 0 <= gid <= MAX_GID


def _encode_cut(value: str, room: int) -> str:
    """`pct_encode` of value with NUL as '?', cut at whole characters to at most room bytes."""
    value = value.replace("\0", "?")
    enc = pct_encode(value)
    if len(enc) <= room:
        return enc
    parts: list[str] = []  # cut whole characters, never inside one's escapes
    for ch in value:
        one = pct_encode(ch)
        if room < len(one):
            break
        parts.append(one)
        room -= len(one)
    return "".join(parts)
