"""Codecs for `netinfo`: NETLINK_SOCK_DIAG messages, /proc/net/{tcp,udp}[6] rows, /proc/<pid>/stat.

Pure byte and text work, one small netlink client (`SockDiag`) and the resolver of a socket's
cgroup id to that cgroup's pids (`CgroupProcs`); nothing here reads /proc.

sock_diag exact lookup (SOCK_DIAG_BY_FAMILY *without* NLM_F_DUMP): the request carries a full
``inet_diag_sockid`` and the kernel answers with one ``inet_diag_msg`` or with NLMSG_ERROR
(-ENOENT when no socket matches). Two kernel quirks handled here:

* TCP looks the id up as (local=idiag_src, remote=idiag_dst), but UDP swaps them "for
  historical reasons" (net/ipv4/udp_diag.c), so a UDP request names the remote end first.
* The lookup falls back to listening / unconnected sockets bound to the local port, so every
  answer is checked against the asked 4-tuple by the caller (`DiagSocket.local/remote`).

/proc/net rows print each 32-bit word of an address in host byte order:
``0100007F:08FB`` is 127.0.0.1:2299 on a little-endian machine; tcp6 rows have four words.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import logging
import os
import socket
import struct
import sys
from dataclasses import dataclass
from typing import Final, Literal

from callerid.bus.protocol import Endpoint, LocalProtocolError, normalize_ip

__all__ = [
    "TCP_STATES",
    "CgroupProcs",
    "DiagSocket",
    "NetlinkError",
    "ProcFormatError",
    "ProcNetRow",
    "SockDiag",
    "SockDiagUnavailable",
    "build_request",
    "decode_proc_addr",
    "encode_proc_addr",
    "match_tuple",
    "parse_proc_net_line",
    "parse_replies",
    "parse_stat",
    "parse_status_euid",
    "proc_net_needles",
]

log = logging.getLogger(__name__)

Proto = Literal["tcp", "udp"]

NETLINK_SOCK_DIAG: Final = 4
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

RECV_BUFSIZE: Final = 16384  # one answer is < 200 bytes; a probe dump answer is one NLMSG_DONE
MAX_RECV_PER_REQUEST: Final = 8  # bound on datagrams read while waiting for our sequence number

# Kernel TCP states (include/net/tcp_states.h); UDP uses 1 (connected) and 7 (unconnected).
TCP_STATES: Final[dict[int, str]] = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
    12: "NEW_SYN_RECV",
}


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


def parse_status_euid(text: str) -> int:
    """The effective uid (second number of the ``Uid:`` line) of /proc/<pid>/status."""
    for line in text.splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[2])
    msg = "no Uid line in /proc status"
    raise ProcFormatError(msg)


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
) -> bytes:
    """A SOCK_DIAG_BY_FAMILY request: exact (default) or a dump; ``src``/``dst`` = (16B, port)."""
    body = (
        _REQ_HEAD.pack(family, protocol, 0, states)
        + _SOCKID.pack(src[1], dst[1], src[0], dst[0])
        + _IF_COOKIE.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    )
    flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else 0)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, flags, seq, 0) + body


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


# --------------------------------------------------------------------------- client


class SockDiag:
    """A short-lived NETLINK_SOCK_DIAG socket (one per resolution: threads never share one)."""

    def __init__(self, timeout: float = 1.0) -> None:
        try:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
        except OSError as exc:
            msg = f"cannot open NETLINK_SOCK_DIAG socket: {exc}"
            raise SockDiagUnavailable(msg) from exc
        self._sock.settimeout(timeout)
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> SockDiag:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _roundtrip(self, request_for_seq: bytes, seq: int, dump: bool) -> list[DiagSocket]:
        """Send one request, read its answer; NetlinkError passes through for the caller."""
        try:
            self._sock.sendto(request_for_seq, (0, 0))
            found: list[DiagSocket] = []
            for _ in range(MAX_RECV_PER_REQUEST):
                got, done = parse_replies(self._sock.recv(RECV_BUFSIZE), seq)
                found.extend(got)
                if done or (found and not dump):
                    return found
        except (OSError, TimeoutError) as exc:  # includes socket timeout
            msg = f"sock_diag request failed: {exc}"
            raise SockDiagUnavailable(msg) from exc
        msg = f"no answer to sock_diag request {seq} after {MAX_RECV_PER_REQUEST} datagrams"
        raise SockDiagUnavailable(msg)

    def lookup(
        self, family: int, proto: Proto, local: tuple[str, int], remote: tuple[str, int]
    ) -> DiagSocket | None:
        """Exact lookup of the socket whose local end is ``local``; None on ENOENT.

        The answer may be a listening or unconnected socket on the local port: check it.
        Raises SockDiagUnavailable when the kernel refuses (EPERM, EINVAL, EOPNOTSUPP ...).
        """
        self._seq += 1
        first = (ip_bytes(family, local[0]), local[1])
        second = (ip_bytes(family, remote[0]), remote[1])
        if proto == "udp":  # udp_dump_one() reads the id with src and dst swapped
            first, second = second, first
        req = build_request(self._seq, family, IPPROTO[proto], first, second)
        try:
            found = self._roundtrip(req, self._seq, dump=False)
        except NetlinkError as exc:
            if exc.errno == errno.ENOENT:
                return None
            msg = f"sock_diag refused a {proto} lookup: {exc}"
            raise SockDiagUnavailable(msg) from exc
        return found[0] if found else None

    def handler_present(self, proto: Proto) -> bool:
        """Whether the kernel has a sock_diag handler for ``proto`` (a dump matching no state).

        Without one (e.g. no udp_diag module) every exact lookup says ENOENT, which would read
        as "not found"; callers probe once and fall back to /proc/net instead.
        """
        self._seq += 1
        zero = (bytes(16), 0)
        req = build_request(
            self._seq, socket.AF_INET, IPPROTO[proto], zero, zero, dump=True, states=0
        )
        try:
            self._roundtrip(req, self._seq, dump=True)
        except NetlinkError as exc:
            if exc.errno == errno.ENOENT:
                return False
            msg = f"sock_diag refused a {proto} dump: {exc}"
            raise SockDiagUnavailable(msg) from exc
        return True


# --------------------------------------------------------------------------- matching

_UNSPECIFIED: Final = frozenset({"0.0.0.0", "::"})


def match_tuple(
    proto: Proto, got: DiagSocket | None, src: Endpoint, dst: Endpoint
) -> Literal["exact", "unconnected", "no"]:
    """How a looked-up socket relates to local=src, remote=dst (lookups fall back to listeners).

    An unconnected UDP socket bound to ``src`` is the one that sends from it ("unconnected").
    """
    if got is None:
        return "no"
    try:
        local = Endpoint(normalize_ip(got.local[0]), got.local[1])
        remote = Endpoint(normalize_ip(got.remote[0]), got.remote[1])
    except (LocalProtocolError, ValueError):
        return "no"
    if local == src and remote == dst:
        return "exact"
    if (
        proto == "udp"
        and remote.port == 0
        and local.port == src.port
        and (local.ip in _UNSPECIFIED or local.ip == src.ip)
    ):
        return "unconnected"
    return "no"


def proc_net_needles(src: Endpoint, dst: Endpoint, *, v6: bool) -> list[str]:
    """Text to find in a /proc/net table: the exact row, then an unconnected UDP sender."""
    local = encode_proc_addr(src.ip, src.port, v6=v6)
    remote = encode_proc_addr(dst.ip, dst.port, v6=v6)
    zero = "0" * (32 if v6 else 8)
    wild = encode_proc_addr("::" if v6 else "0.0.0.0", src.port, v6=v6)
    return [f" {local} {remote} ", f" {local} {zero}:0000 ", f" {wild} {zero}:0000 "]


# --------------------------------------------------------------------------- socket cgroup


class CgroupProcs:
    """cgroup v2 id (INET_DIAG_CGROUP_ID) -> its pids, via open_by_handle_at(2) on cgroup2.

    A kernfs file handle is the 64-bit cgroup id (FILEID_KERNFS); needs CAP_DAC_READ_SEARCH.
    """

    FILEID_KERNFS: Final = 0xFE

    def __init__(self, mount: str | None) -> None:
        self._mount_fd = -1
        self.root_id = -1
        self._open_by_handle = None
        if mount is None:
            return
        try:
            self._open_by_handle = ctypes.CDLL(None, use_errno=True).open_by_handle_at
            self._mount_fd = os.open(mount, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self.root_id = os.fstat(self._mount_fd).st_ino
        except (OSError, AttributeError) as exc:
            log.debug("cgroup v2 candidate lookup unavailable: %s", exc)
            self._open_by_handle = None

    def close(self) -> None:
        if self._mount_fd >= 0:
            os.close(self._mount_fd)
            self._mount_fd = -1
        self._open_by_handle = None

    def pids(self, cgroup_id: int) -> list[int] | None:
        """Pids in that exact cgroup, or None when it cannot be opened (gone, no permission)."""
        if self._open_by_handle is None or cgroup_id == self.root_id:
            return None
        handle = struct.pack("=Ii", 8, self.FILEID_KERNFS) + struct.pack("=Q", cgroup_id)
        buf = ctypes.create_string_buffer(handle, len(handle))
        fd = self._open_by_handle(self._mount_fd, buf, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if fd < 0:
            log.debug("cgroup id %d: %s", cgroup_id, os.strerror(ctypes.get_errno()))
            return None
        try:
            procs = os.open("cgroup.procs", os.O_RDONLY | os.O_CLOEXEC, dir_fd=fd)
            with os.fdopen(procs) as f:
                return [int(x) for x in f.read().split()]
        except OSError:
            return None
        finally:
            os.close(fd)
