"""The netlink and cgroupfs edge of netinfo: a NETLINK_SOCK_DIAG client and a socket's cgroup.

`SockDiag` sends the requests `_codec` builds and decodes the answers with it; `CgroupProcs`
turns a socket's cgroup id (INET_DIAG_CGROUP_ID) into that cgroup's pids.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import struct
from typing import Final

from callerid.agent.netinfo._codec import (
    DiagSocket,
    NetlinkError,
    Proto,
    SockDiagUnavailable,
    lookup_request,
    parse_replies,
    probe_request,
)

__all__ = ["CgroupProcs", "SockDiag"]

log = logging.getLogger(__name__)

NETLINK_SOCK_DIAG: Final = 4
RECV_BUFSIZE: Final = 16384  # one answer is < 200 bytes; a probe dump answer is one NLMSG_DONE
MAX_RECV_PER_REQUEST: Final = 8  # bound on datagrams read while waiting for our sequence number


class SockDiag:
    """A NETLINK_SOCK_DIAG socket; not shared between threads (each keeps its own)."""

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

    def _ask(self, request: bytes, what: str, *, dump: bool) -> list[DiagSocket] | None:
        """The answer to ``request`` (sent with the current sequence number); None on ENOENT.
        Raises SockDiagUnavailable when the kernel refuses (EPERM, EINVAL, EOPNOTSUPP ...)."""
        try:
            return self._roundtrip(request, self._seq, dump=dump)
        except NetlinkError as exc:
            if exc.errno == errno.ENOENT:
                return None
            msg = f"sock_diag refused a {what}: {exc}"
            raise SockDiagUnavailable(msg) from exc

    def lookup(
        self,
        family: int,
        proto: Proto,
        local: tuple[str, int],
        remote: tuple[str, int],
        *,
        ifindex: int = 0,
    ) -> DiagSocket | None:
        """Exact lookup of the socket whose local end is ``local``; None on ENOENT.

        The answer may be a listening or unconnected socket on the local port: check it. A
        link-local socket is found only with the ``ifindex`` it is bound to.
        """
        self._seq += 1
        req = lookup_request(self._seq, family, proto, local, remote, ifindex=ifindex)
        found = self._ask(req, f"{proto} lookup", dump=False)
        return found[0] if found else None

    def handler_present(self, proto: Proto) -> bool:
        """Whether the kernel has a sock_diag handler for ``proto`` (a dump matching no state).

        Without one (e.g. no udp_diag module) every exact lookup says ENOENT, which would read
        as "not found"; callers probe once and fall back to /proc/net instead.
        """
        self._seq += 1
        return self._ask(probe_request(self._seq, proto), f"{proto} dump", dump=True) is not None


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
