"""The login benchmark's syslog sink: a /dev/log-style listener that timestamps every line.

    python -m bench._syslog_sink SOCKET LOG     (bench/_sshbench.py's SyslogSink starts it)

Binds the datagram socket SOCKET (mode 0666), prints "ready", then appends every datagram to
LOG as "<epoch seconds, microseconds> <message>", until it is killed.

The sink must neither slow down nor skew what it times (sshd's and the PAM modules' own log
lines, bench/login.py's rows 2):

- Each line's time is the kernel's, taken when its sender wrote it (SO_TIMESTAMPNS: an
  AF_UNIX datagram is stamped in the sender's `sendmsg`), not when the sink got round to it.
- The sink never takes a CPU from the processes measured: it runs under SCHED_IDLE and reads
  whatever has queued up in one go (one file write per batch).
- Its senders never wait for it: the socket's queue holds QUEUE datagrams instead of the
  kernel's default (``net.unix.max_dgram_qlen``, 10 where no systemd raised it to 512; a
  syslog(3) writer blocks on a full queue). The length is the sysctl's value when the socket
  is made, so the sysctl is raised for that one call and set back at once; where it cannot
  be written (not root) the default stays and the sink says so on stderr.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import time
from pathlib import Path

QUEUE = 65536
SO_TIMESTAMPNS = 35  # asm-generic (x86-64, arm64); the control message has the same number
_TIMESPEC = struct.Struct("qq")
_ANC = socket.CMSG_SPACE(_TIMESPEC.size)
_QLEN = Path("/proc/sys/net/unix/max_dgram_qlen")


def _socket() -> socket.socket:
    """A datagram socket whose queue holds QUEUE datagrams (see the module docstring)."""
    try:
        old = _QLEN.read_text()
        _QLEN.write_text(str(QUEUE))
    except OSError as exc:
        print(f"syslog sink: default queue length kept ({exc})", file=sys.stderr)
        return socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        return socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    finally:
        _QLEN.write_text(old)


def _line(data: bytes, anc: list[tuple[int, int, bytes]]) -> str:
    """One datagram as a line: the time its sender wrote it, then its text."""
    stamp = None
    for level, kind, cdata in anc:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(cdata) >= _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack_from(cdata)
            stamp = f"{sec}.{nsec // 1000:06d}"
    if stamp is None:
        stamp = f"{time.time():.6f}"
    return f"{stamp} {data.decode('utf-8', 'replace').rstrip(chr(10))}\n"


def main(path: str, out: str) -> None:
    s = _socket()
    s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    s.bind(path)
    os.chmod(path, 0o666)
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    print("ready", flush=True)
    with open(out, "a") as f:
        while True:
            batch = [_line(*s.recvmsg(65536, _ANC)[:2])]
            while True:
                try:
                    data, anc, _flags, _addr = s.recvmsg(65536, _ANC, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                batch.append(_line(data, anc))
            f.write("".join(batch))
            f.flush()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
