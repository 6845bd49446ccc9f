"""cgroup2's ``favordynmods`` for one row of the login benchmark: set, then restored.

With the option on, the global ``cgroup_threadgroup_rwsem`` stays in its slow mode, so a cgroup
migration (every adoption, by callerid or slurmstepd) waits for no RCU grace period
(docs/performance.md, section 2; ``calleridctl doctor`` advises it). `favordynmods()` remounts
the cgroup2 file system with the option added to the options it has, and afterwards with
exactly the options it had. It uses mount(2) itself: ``mount -o remount`` (util-linux) merges
the options it finds in the mount table back in and cannot take the option away again. A
machine where the option is on already is left as it is.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

from callerid.agent.ctl._doctor_kernel import FLAG, parse_mountinfo

__all__ = ["Unavailable", "favordynmods"]

MS_REMOUNT = 32
_GENERIC = {"rw", "ro"}


class Unavailable(Exception):
    """The row cannot be measured here; the message says why."""


def _remount(point: str, options: list[str]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    data = ",".join(options).encode()
    if libc.mount(None, point.encode(), None, MS_REMOUNT, data) != 0:
        err = ctypes.get_errno()
        msg = f"remounting {point} with {','.join(options) or '(no options)'}: {os.strerror(err)}"
        raise Unavailable(msg)


@contextlib.contextmanager
def favordynmods() -> Iterator[str]:
    """favordynmods on the cgroup2 mount while the block runs; yields what was done."""
    features = Path("/sys/kernel/cgroup/features")
    if not features.exists() or FLAG not in features.read_text().split():
        msg = f"this kernel has no {FLAG}"
        raise Unavailable(msg)
    mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    v2 = next((m for m in mounts if m.fstype == "cgroup2"), None)
    if v2 is None:
        msg = "no cgroup2 file system is mounted (cgroup v1 takes the flag only at boot)"
        raise Unavailable(msg)
    if FLAG in v2.options:
        yield f"{FLAG} already on at {v2.point}"
        return
    before = [o for o in v2.super_options if o not in _GENERIC]
    _remount(v2.point, [*before, FLAG])
    try:
        yield f"{FLAG} set on {v2.point} for this row, then the mount's options restored"
    finally:
        _remount(v2.point, before)
