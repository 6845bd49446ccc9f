"""`calleridctl doctor`: the kernel's price of one adoption (a write to cgroup.procs).

Moving a process between cgroups write-locks the global `cgroup_threadgroup_rwsem`. Since
Linux 6.0 that rwsem stays in its fast (per-cpu) mode for forks and exits, so each write
lock first waits for an RCU grace period: about 14 ms per adoption measured here
(docs/performance.md), for callerid and pam_slurm_adopt's slurmstepd alike. The mount
option `favordynmods` (Linux 6.0, cgroup v1 and v2) keeps the rwsem in its slow mode: the
migration is cheap (0.25 ms measured), forks and exits a little dearer. Kernels before 6.0
used that mode by default (since commit 3942a9bd7b58), unless a distribution backported
the change (RHEL 9 did): /sys/kernel/cgroup/features, not the release, says whether the
flag exists. One hierarchy with the flag switches the global rwsem. cgroup2 takes it on a
remount, which applies the whole option set given (so the current options are repeated);
cgroup v1 changes no flags on remount and needs the kernel command line
`cgroup_favordynmods=true` (Linux 6.7, or a backport). Doctor only reads
/proc/self/mountinfo, /sys/kernel/cgroup/features and the kernel release.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["Mount", "cgroup_migration_checks", "kernel_version", "parse_mountinfo"]

Check = tuple[str, str, str]  # (level, what, advice)
FLAG = "favordynmods"
FAVOR_SINCE = (6, 0)  # the mount option, and the default fast mode it switches off
_GENERIC = {"rw", "ro"}  # super-block options that are not cgroup flags


@dataclass(frozen=True)
class Mount:
    point: str
    fstype: str
    options: frozenset[str]  # per-mount and super-block options together
    super_options: tuple[str, ...]  # as the file system shows them, in order


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """The lines of /proc/<pid>/mountinfo (proc(5)); malformed lines are skipped."""
    out: list[Mount] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 6 or len(tail) < 3:
            continue
        sup = tuple(o for o in tail[2].split(",") if o)
        out.append(
            Mount(_unescape(fields[4]), tail[0], frozenset(fields[5].split(",")) | set(sup), sup)
        )
    return out


def kernel_version(release: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _remount(m: Mount) -> str:
    opts = [o for o in m.super_options if o not in _GENERIC and o != FLAG]
    return f"mount -o {','.join(['remount', *opts, FLAG])} {m.point}"


def cgroup_migration_checks(mountinfo: str, release: str, features: str | None) -> Iterator[Check]:
    """``features``: /sys/kernel/cgroup/features (None when unreadable: the release decides)."""
    mounts = [m for m in parse_mountinfo(mountinfo) if m.fstype in ("cgroup", "cgroup2")]
    version = kernel_version(release)
    if not mounts:
        yield "warn", "no cgroup file system is mounted here", "the cgroup backend needs one"
        return
    favored = [m for m in mounts if FLAG in m.options]
    if favored:
        yield (
            "ok",
            f"kernel {release}: {favored[0].fstype} at {favored[0].point} is mounted {FLAG}: "
            f"an adoption waits for no RCU grace period (0.25 ms measured)",
            "",
        )
        return
    supported = FLAG in features.split() if features is not None else None
    if supported is None:
        supported = version is not None and version >= FAVOR_SINCE
    if not supported:
        yield (
            "ok",
            f"kernel {release} has no {FLAG}: it keeps cgroup migrations cheap by itself (no "
            f"RCU grace period per adoption)",
            "",
        )
        return
    what = (
        f"kernel {release}: no cgroup hierarchy is mounted {FLAG}: every adoption (a write "
        f"to cgroup.procs, by callerid or slurmstepd alike) waits for an RCU grace period, "
        f"~14 ms measured against 0.25 ms with {FLAG}"
    )
    boot = "kernel command line cgroup_favordynmods=true (Linux 6.7+, or a backport of it)"
    v2 = [m for m in mounts if m.fstype == "cgroup2"]
    if v2:
        advice = f"now: {_remount(v2[0])} (forks and exits get slightly dearer); at boot: {boot}"
    else:
        advice = f"cgroup v1 takes no new flags on remount: {boot}"
    yield "warn", what, advice
