"""Pure codecs of netinfo: NETLINK_SOCK_DIAG messages, /proc/net rows, /proc/<pid>/stat.

Byte and text work only, no I/O: the netlink client is `_netlink`, the /proc reader `_proc`.

sock_diag exact lookup (SOCK_DIAG_BY_FAMILY *without* NLM_F_DUMP): the request carries a full
``inet_diag_sockid`` and the kernel answers with one ``inet_diag_msg`` or with NLMSG_ERROR
(-ENOENT when no socket matches). Two kernel quirks handled here:

* TCP looks the id up as (local=idiag_src, remote=idiag_dst), but UDP swaps them "for
  historical reasons" (net/ipv4/udp_diag.c), so a UDP request names the remote end first
  (`lookup_request`).
* The lookup falls back to listening / unconnected sockets bound to the local port, so every
  answer is checked against the asked 4-tuple by the caller (`match_tuple`).

/proc/net rows print each 32-bit word of an address in host byte order:
``0100007F:08FB`` is 127.0.0.1:2299 on a little-endian machine; tcp6 rows have four words.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

from callerid.bus.protocol import Endpoint, LocalProtocolError, normalize_ip

__all__ = [
    "TCP_STATES",
    "UNSPECIFIED",
    "DiagSocket",
    "NetlinkError",
    "ProcFormatError",
    "ProcNetRow",
    "Proto",
    "SockDiagUnavailable",
    "best_match",
    "build_request",
    "decode_proc_addr",
    "encode_proc_addr",
    "is_real_end",
    "line_with",
    "lookup_request",
    "match_tuple",
    "parse_proc_net_line",
    "parse_replies",
    "parse_stat",
    "probe_request",
    "proc_net_needles",
    "row_inode",
    "state_name",
]

Proto = Literal["tcp", "udp"]

SOCK_DIAG_BY_FAMILY: Final = 20
NLM_F_REQUEST: Final = 0x01
NLM_F_ROOT: Final = 0x100
NLM_F_MATCH: Final = 0x200
NLM_F_DUMP: Final = NLM_F_ROOT | NLM_F_MATCH
NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3
INET_DIAG_NOCOOKIE: Final = 0xFFFFFFFF
INET_DIAG_CGROUP_ID: Final = 21
ALL_STATES: Final = 0xFFFFFFFF

IPPROTO: Final[dict[str, int]] = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}

_NLMSGHDR: Final = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_REQ_HEAD: Final = struct.Struct("=BBBxI")  # family, protocol, ext, pad, states
_SOCKID: Final = struct.Struct("!HH16s16s")  # sport, dport (network order), src, dst
_IF_COOKIE: Final = struct.Struct("=III")  # if, cookie[2]
_MSG_HEAD: Final = struct.Struct("=BBBB")  # family, state, timer, retrans
_MSG_TAIL: Final = struct.Struct("=IIIII")  # expires, rqueue, wqueue, uid, inode
_RTA: Final = struct.Struct("=HH")
DIAG_MSG_LEN: Final = _MSG_HEAD.size + _SOCKID.size + _IF_COOKIE.size + _MSG_TAIL.size  # 72

# Kernel TCP states (include/net/tcp_states.h); UDP uses 1 (connected) and 7 (unconnected).
TCP_STATES: Final[dict[int, str]] = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
    6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING",
    12: "NEW_SYN_RECV",
}  # fmt: skip


class NetlinkError(Exception):
    """The kernel answered NLMSG_ERROR (or a failed dump) with ``errno``."""

    def __init__(self, err: int) -> None:
        super().__init__(f"sock_diag: {errno.errorcode.get(err, str(err))} ({err})")
        self.errno = err


class SockDiagUnavailable(Exception):
    """sock_diag cannot be used here (no kernel support, no permission, garbled answers)."""


def state_name(proto: Proto, state: int) -> str:
    """Human name of a kernel socket state; unconnected UDP sockets are "UNCONN"."""
    if proto == "udp" and state == 7:
        return "UNCONN"
    return TCP_STATES.get(state, f"UNKNOWN({state})")


# --------------------------------------------------------------------------- addresses


def _pad16(packed: bytes) -> bytes:
    return packed + bytes(16 - len(packed))


def ip_bytes(family: int, ip: str) -> bytes:
    """The 16-byte address field of an inet_diag_sockid (IPv4 in the first 4 bytes)."""
    if family == socket.AF_INET:
        return _pad16(socket.inet_pton(socket.AF_INET, ip))
    if ":" not in ip:  # ask AF_INET6 for an IPv4-mapped socket
        return b"\0" * 10 + b"\xff\xff" + socket.inet_pton(socket.AF_INET, ip)
    return socket.inet_pton(socket.AF_INET6, ip)


def _ip_text(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    return str(ipaddress.IPv6Address(raw))  # RFC 5952 text, as normalize_ip writes it


def _swap_words(raw: bytes) -> bytes:
    """Host-order 32-bit words <-> network order (a no-op on big-endian hosts)."""
    if sys.byteorder == "big":
        return raw
    return b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))


def decode_proc_addr(text: str) -> tuple[str, int]:
    """``0100007F:08FB`` -> ("127.0.0.1", 2299); 32 hex digits decode as IPv6 (not normalised)."""
    hexaddr, _, hexport = text.partition(":")
    raw = _swap_words(bytes.fromhex(hexaddr))
    if len(raw) == 4:
        ip = str(ipaddress.IPv4Address(raw))
    elif len(raw) == 16:
        ip = str(ipaddress.IPv6Address(raw))
    else:
        msg = f"bad /proc/net address {text!r}"
        raise ValueError(msg)
    return ip, int(hexport, 16)


def encode_proc_addr(ip: str, port: int, *, v6: bool) -> str:
    """Inverse of `decode_proc_addr`; ``v6`` writes an IPv4 address as IPv4-mapped (tcp6 rows)."""
    packed = ipaddress.ip_address(ip).packed
    if v6 and len(packed) == 4:
        packed = b"\0" * 10 + b"\xff\xff" + packed
    return f"{_swap_words(packed).hex().upper()}:{port:04X}"


# --------------------------------------------------------------------------- /proc/net rows


@dataclass(frozen=True, slots=True)
class ProcNetRow:
    """One row of /proc/net/{tcp,udp}[6], addresses decoded but not normalised."""

    local: tuple[str, int]
    remote: tuple[str, int]
    state: int
    uid: int
    inode: int


def parse_proc_net_line(line: str) -> ProcNetRow | None:
    """One data row; None for the header line. Raises ValueError on a malformed row."""
    fields = line.split()
    if not fields or fields[0] == "sl":
        return None
    if len(fields) < 10 or not fields[0].endswith(":"):
        msg = f"malformed /proc/net row: {line.strip()[:80]!r}"
        raise ValueError(msg)
    return ProcNetRow(
        local=decode_proc_addr(fields[1]),
        remote=decode_proc_addr(fields[2]),
        state=int(fields[3], 16),
        uid=int(fields[7]),
        inode=int(fields[9]),
    )


def row_inode(line: str) -> int:
    """The inode column of a row, without decoding the rest (-1 for the header)."""
    fields = line.split(maxsplit=10)
    if len(fields) < 10 or fields[0] == "sl":
        return -1
    return int(fields[9])


# --------------------------------------------------------------------------- /proc/<pid>


class ProcFormatError(ValueError):
    """A /proc file did not have the expected shape."""


def parse_stat(text: str) -> tuple[str, int, int]:
    """/proc/<pid>/stat -> (comm, ppid, starttime in clock ticks); comm may hold ") (" etc."""
    head, sep, rest = text.rpartition(")")
    _, lp, comm = head.partition("(")
    fields = rest.split()
    if not sep or not lp or len(fields) < 20:
        msg = f"malformed /proc stat line: {text[:80]!r}"
        raise ProcFormatError(msg)
    return comm, int(fields[1]), int(fields[19])


# --------------------------------------------------------------------------- netlink codec


@dataclass(frozen=True, slots=True)
class DiagSocket:
    """One ``inet_diag_msg``: local/remote as (ip text, port), IPv4-mapped not yet folded."""

    family: int
    state: int
    local: tuple[str, int]
    remote: tuple[str, int]
    uid: int
    inode: int
    cgroup_id: int | None


def build_request(
    seq: int,
    family: int,
    protocol: int,
    src: tuple[bytes, int],
    dst: tuple[bytes, int],
    *,
    dump: bool = False,
    states: int = ALL_STATES,
    ifindex: int = 0,
) -> bytes:
    """A SOCK_DIAG_BY_FAMILY request: exact (default) or a dump; ``src``/``dst`` = (16B, port).
    A socket bound to an interface (link-local) is matched only when asked with its ``ifindex``."""
    body = (
        _REQ_HEAD.pack(family, protocol, 0, states)
        + _SOCKID.pack(src[1], dst[1], src[0], dst[0])
        + _IF_COOKIE.pack(ifindex, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    )
    flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else 0)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, flags, seq, 0) + body


def lookup_request(
    seq: int,
    family: int,
    proto: Proto,
    local: tuple[str, int],
    remote: tuple[str, int],
    *,
    ifindex: int = 0,
) -> bytes:
    """An exact lookup of the socket local=``local``, remote=``remote`` (text ip, port), bound
    to interface ``ifindex`` (0: none; see `build_request`)."""
    first = (ip_bytes(family, local[0]), local[1])
    second = (ip_bytes(family, remote[0]), remote[1])
    if proto == "udp":  # udp_dump_one() reads the id with src and dst swapped
        first, second = second, first
    return build_request(seq, family, IPPROTO[proto], first, second, ifindex=ifindex)


def probe_request(seq: int, proto: Proto) -> bytes:
    """A dump matching no state: answered NLMSG_DONE if the kernel has a handler for ``proto``,
    -ENOENT if not."""
    zero = (bytes(16), 0)
    return build_request(seq, socket.AF_INET, IPPROTO[proto], zero, zero, dump=True, states=0)


def _parse_diag_msg(payload: bytes) -> DiagSocket:
    if len(payload) < DIAG_MSG_LEN:
        msg = f"short inet_diag_msg ({len(payload)} bytes)"
        raise SockDiagUnavailable(msg)
    family, state, _timer, _retrans = _MSG_HEAD.unpack_from(payload, 0)
    sport, dport, src, dst = _SOCKID.unpack_from(payload, _MSG_HEAD.size)
    off = _MSG_HEAD.size + _SOCKID.size + _IF_COOKIE.size
    _exp, _rq, _wq, uid, inode = _MSG_TAIL.unpack_from(payload, off)
    if family not in (socket.AF_INET, socket.AF_INET6):
        msg = f"inet_diag_msg with family {family}"
        raise SockDiagUnavailable(msg)
    return DiagSocket(
        family=family,
        state=state,
        local=(_ip_text(family, src), sport),
        remote=(_ip_text(family, dst), dport),
        uid=uid,
        inode=inode,
        cgroup_id=_cgroup_attr(payload[DIAG_MSG_LEN:]),
    )


def _cgroup_attr(attrs: bytes) -> int | None:
    """The INET_DIAG_CGROUP_ID attribute (Linux >= 5.7), if present."""
    off = 0
    while off + _RTA.size <= len(attrs):
        length, kind = _RTA.unpack_from(attrs, off)
        if length < _RTA.size or off + length > len(attrs):
            return None
        if kind == INET_DIAG_CGROUP_ID and length >= _RTA.size + 8:
            value: int = struct.unpack_from("=Q", attrs, off + _RTA.size)[0]
            return value
        off += (length + 3) & ~3
    return None


def parse_replies(data: bytes, seq: int) -> tuple[list[DiagSocket], bool]:
    """Decode one datagram: (sockets of request ``seq``, done?). Other sequences are skipped.

    Raises NetlinkError for an NLMSG_ERROR (or a failed dump), SockDiagUnavailable for garbage.
    An exact lookup is done after its first message; a dump after NLMSG_DONE.
    """
    found: list[DiagSocket] = []
    done = False
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, kind, _flags, mseq, _pid = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size or off + length > len(data):
            msg = f"truncated netlink message ({length} bytes at {off})"
            raise SockDiagUnavailable(msg)
        payload = data[off + _NLMSGHDR.size : off + length]
        off += (length + 3) & ~3
        if mseq != seq:
            continue
        if kind in (NLMSG_ERROR, NLMSG_DONE):
            err = struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else 0
            if err < 0:
                raise NetlinkError(-err)
            done = True
        elif kind == SOCK_DIAG_BY_FAMILY:
            found.append(_parse_diag_msg(payload))
        else:
            msg = f"unexpected netlink message type {kind}"
            raise SockDiagUnavailable(msg)
    return found, done


# --------------------------------------------------------------------------- matching

UNSPECIFIED: Final = frozenset({"0.0.0.0", "::"})  # a socket bound to any address
_ESTABLISHED: Final = 1  # TCP_ESTABLISHED; a connected UDP socket has this state too


def is_real_end(e: Endpoint) -> bool:
    """Whether ``e`` can be the end of an established connection: a specific address and a
    port (a listener's or an unconnected socket's remote end is ``0.0.0.0:0`` / ``[::]:0``)."""
    return e.port != 0 and e.ip not in UNSPECIFIED


def match_tuple(
    proto: Proto, got: DiagSocket | None, src: Endpoint, dst: Endpoint
) -> Literal["exact", "unconnected", "no"]:
    """How a looked-up socket relates to local=src, remote=dst (lookups fall back to listeners).

    Only an established connection matches: a TCP socket in ESTABLISHED, a connected UDP
    socket, or an unconnected UDP socket bound to ``src`` (the one that sends from it,
    "unconnected"); and only when both asked ends are real (`is_real_end`): ``dst=[::, 0]``
    would otherwise name a listener.
    """
    if got is None or not (is_real_end(src) and is_real_end(dst)):
        return "no"
    try:
        local = Endpoint(normalize_ip(got.local[0]), got.local[1])
        remote = Endpoint(normalize_ip(got.remote[0]), got.remote[1])
    except (LocalProtocolError, ValueError):
        return "no"
    if local == src and remote == dst:
        return "exact" if got.state == _ESTABLISHED else "no"
    if (
        proto == "udp"
        and remote.port == 0
        and local.port == src.port
        and (local.ip in UNSPECIFIED or local.ip == src.ip)
    ):
        return "unconnected"
    return "no"


def best_match(
    proto: Proto, candidates: Iterable[DiagSocket | None], src: Endpoint, dst: Endpoint
) -> DiagSocket | None:
    """The first candidate that is exactly local=src, remote=dst, else the first unconnected
    UDP sender from ``src`` (`match_tuple`), else None; stops at an exact one."""
    fallback = None
    for got in candidates:
        match = match_tuple(proto, got, src, dst)
        if match == "exact":
            return got
        if match == "unconnected" and fallback is None:
            fallback = got
    return fallback


def proc_net_needles(src: Endpoint, dst: Endpoint, *, v6: bool) -> list[str]:
    """Text to find in a /proc/net table: the exact row, then an unconnected UDP sender."""
    local = encode_proc_addr(src.ip, src.port, v6=v6)
    remote = encode_proc_addr(dst.ip, dst.port, v6=v6)
    zero = "0" * (32 if v6 else 8)
    wild = encode_proc_addr("::" if v6 else "0.0.0.0", src.port, v6=v6)
    return [f" {local} {remote} ", f" {local} {zero}:0000 ", f" {wild} {zero}:0000 "]


def line_with(text: str, needle: str) -> str | None:
    """The line of ``text`` where ``needle`` first occurs, or None."""
    at = text.find(needle)
    if at < 0:
        return None
    end = text.find("\n", at)
    return text[text.rfind("\n", 0, at) + 1 : end if end >= 0 else None]
