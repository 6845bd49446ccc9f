"""slurmd's 4-tuple -> pid search (src/common/callerid.c), re-implemented in Python.

So that both sides of bench/resolution.py run in the same language: parse /proc/net/tcp then
tcp6 line by line for the 4-tuple's inode, then walk readdir(/proc) in order and stat() every
/proc/<pid>/fd/* until one has that inode.
"""

from __future__ import annotations

import ipaddress
import os

from callerid.bus.protocol import Endpoint


def _hexaddr(text: str) -> bytes:
    raw = bytes.fromhex(text)
    return b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))


def slurm_inode(local: Endpoint, remote: Endpoint) -> int | None:
    """callerid_find_inode_by_conn: /proc/net/tcp, then tcp6, every line parsed and compared."""
    for name, size in (("tcp", 4), ("tcp6", 16)):
        want_l = ipaddress.ip_address(local.ip).packed
        want_r = ipaddress.ip_address(remote.ip).packed
        if len(want_l) != size:
            continue
        with open(f"/proc/net/{name}") as f:
            next(f)
            for line in f:
                fields = line.split()
                la, lp = fields[1].split(":")
                ra, rp = fields[2].split(":")
                if (
                    int(lp, 16) == local.port
                    and int(rp, 16) == remote.port
                    and _hexaddr(la) == want_l
                    and _hexaddr(ra) == want_r
                ):
                    return int(fields[9])
    return None


def slurm_pid(inode: int) -> int | None:
    """find_pid_by_inode: readdir(/proc) order, stat() every fd, first match wins."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fddir = f"/proc/{entry.name}/fd"
        try:
            fds = os.listdir(fddir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.stat(f"{fddir}/{fd}").st_ino == inode:
                    return int(entry.name)
            except OSError:
                continue
    return None


def slurm_owner(local: Endpoint, remote: Endpoint) -> int | None:
    inode = slurm_inode(local, remote)
    return None if inode is None else slurm_pid(inode)
