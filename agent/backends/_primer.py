"""The cgroup migration primer: start the kernel's wait before the adoption needs it.

Every adoption is a write to a ``cgroup.procs`` (the agent's, or slurmstepd's for the slurm
backend). Since Linux 6.0 such a write first waits for an RCU grace period, unless the global
``cgroup_threadgroup_rwsem`` is already in its slow mode: a migration happened within about
one grace period, or a hierarchy is mounted ``favordynmods`` (docs/performance.md, section
2): 6-15 ms measured here, most of a login's module time, for callerid and pam_slurm_adopt
alike. Which cgroup is written does not matter: the rwsem is global.

So when a login looks like it will be adopted (its user has jobs here), `Primer.prime` has a
worker thread write the agent's own pid into the agent's own cgroup: no move (it is there
already), but the write takes the rwsem, so it waits for the grace period while the login's
decision goes on. The adoption then waits only for what is left of that same grace period
(its write queues behind the primer's on the cgroup mutex and finds the rwsem in slow mode).
A login's module time loses the time of its decision (1-2 ms), and the worker sleeps while it
waits: no CPU worth counting.

Not primed: with ``favordynmods`` on (nothing to wait for): at start, or set later (a remount
while the agent runs; the worker looks at /proc/self/mountinfo before a priming write, at
most once per `LOOK_S`, and while the flag is on it rests `FDM_QUIET_S` between looks, so
priming resumes within that time of the flag going off); when the last priming began less
than `WINDOW_S` ago (the rwsem is still in slow mode or about to be; in a storm the adoptions
keep it there); for `QUIET_S` after a priming write that took less than `FAST_S` (the rwsem
was in slow mode anyway, as it stays on a busy node: the worker's wake-up would be all the
priming did), twice as long after each such write in a row up to `QUIET_MAX_S`, and `QUIET_S`
again once a write waits (a kernel whose migrations never wait, as this machine's 6.18 after
a second's idle, has the primer write about twice a minute instead of at every second login:
each write costs ~0.3 ms of a CPU, often the one the login's reply then waits for); after a
write failed (logged once, the primer stops); with
``backend.prime_migration: false``. The agent's cgroup is read from /proc/self/cgroup at each
priming, so an agent moved by its service manager is never written back into its old cgroup.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

from callerid.agent.backends._cglayout import Mount, parse_mountinfo, parse_proc_cgroup
from callerid.agent.netinfo import read_proc

__all__ = ["FAST_S", "FDM_QUIET_S", "LOOK_S", "QUIET_MAX_S", "QUIET_S", "WINDOW_S", "Primer"]

log = logging.getLogger(__name__)

WINDOW_S = 0.01  # a priming begun this recently covers the next adoption too
FAST_S = 0.001  # a priming write this quick waited for no grace period: nothing to prime now
QUIET_S = 1.0  # after such a write, priming rests this long (then looks again)
QUIET_MAX_S = 32.0  # ... twice as long after each such write in a row, up to this
LOOK_S = 1.0  # the mount's favordynmods flag is looked at again at most this often
FDM_QUIET_S = 60.0  # while favordynmods is on, priming rests this long between looks
FLAG = "favordynmods"


@dataclass(frozen=True, slots=True)
class _Hierarchy:
    """Where the agent's own cgroup is written: a mount, and which /proc/self/cgroup line."""

    mount: Mount
    controllers: frozenset[str] | None  # None: cgroup v2 (the "0::" line)


class Primer:
    """`prime()`: begin the grace period an adoption is about to wait for (module docstring)."""

    def __init__(
        self,
        hierarchy: _Hierarchy,
        executor: Executor,
        clock: Callable[[], float],
        proc_root: Path = Path("/proc"),
    ) -> None:
        self._hierarchy = hierarchy
        self._executor = executor
        self._clock = clock
        self._proc = str(proc_root)
        self._last = -float("inf")
        self._quiet_until = -float("inf")
        self._rest = QUIET_S  # the next rest after a quick write
        self._looked_at = clock()  # `detect` has just looked
        self.favordynmods = False  # the flag, as last looked at (`_look`)
        self.enabled = True
        self.primed = 0  # writes made (for tests and `calleridctl status`)

    @classmethod
    def detect(
        cls, executor: Executor, clock: Callable[[], float], proc_root: Path = Path("/proc")
    ) -> Primer | None:
        """A primer for this machine, or None when there is nothing to prime: no cgroup file
        system, or one mounted ``favordynmods`` (the rwsem is always in its slow mode)."""
        mounts = _cgroup_mounts(read_proc(f"{proc_root}/self/mountinfo") or "")
        if _favors(mounts):
            log.info("cgroup migrations are cheap here (%s): no priming", FLAG)
            return None
        v2 = next((m for m in mounts if m.fstype == "cgroup2"), None)
        if v2 is not None:
            return cls(_Hierarchy(v2, None), executor, clock, proc_root)
        for m in mounts:
            ctrls = frozenset(o for o in m.super_options if o not in ("rw", "ro"))
            if ctrls:
                return cls(_Hierarchy(m, ctrls), executor, clock, proc_root)
        return None

    def prime(self) -> None:
        """Begin a priming write in a worker thread, unless one began within `WINDOW_S`."""
        now = self._clock()
        if not self.enabled or now - self._last < WINDOW_S or now < self._quiet_until:
            return
        self._last = now
        self._executor.submit(self._write)

    def _own_procs(self) -> str | None:
        """The agent's own cgroup.procs in the hierarchy, read now; None if not found."""
        text = read_proc(f"{self._proc}/self/cgroup")
        if text is None:
            return None
        h = self._hierarchy
        for hid, ctrls, path in parse_proc_cgroup(text):
            if h.controllers is None:
                mine = hid == "0" and not ctrls
            else:  # a v1 line names its controllers (or name=...) as the mount's options do
                mine = bool(ctrls) and ctrls <= h.controllers
            if mine:
                root = h.mount.root.rstrip("/")
                if root and not (path == root or path.startswith(root + "/")):
                    return None  # the agent's cgroup is outside this mount's view
                return f"{h.mount.mountpoint}{path[len(root) :].rstrip('/')}/cgroup.procs"
        return None

    def _look(self) -> bool | None:
        """Whether a cgroup hierarchy is mounted favordynmods now; None when the mounts were
        looked at less than `LOOK_S` ago."""
        now = self._clock()
        if now - self._looked_at < LOOK_S:
            return None
        self._looked_at = now
        return _favors(_cgroup_mounts(read_proc(f"{self._proc}/self/mountinfo") or ""))

    def _write(self) -> None:
        fdm = self._look()
        if fdm is not None and fdm != self.favordynmods:
            self.favordynmods = fdm
            log.info("cgroup %s %s", FLAG, "set: no priming" if fdm else "cleared: priming again")
        if self.favordynmods:
            self._quiet_until = self._clock() + FDM_QUIET_S
            return
        path = self._own_procs()
        try:
            if path is None:
                msg = "the agent's own cgroup is not in the mounted hierarchy"
                raise OSError(msg)
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            began = self._clock()
            try:
                os.write(fd, str(os.getpid()).encode())
            finally:
                os.close(fd)
            done = self._clock()
        except OSError as exc:
            self.enabled = False
            log.warning("cgroup migration priming stops: %s (%s)", exc, path)
            return
        self.primed += 1
        if done - began < FAST_S:
            self._quiet_until = done + self._rest
            self._rest = min(self._rest * 2, QUIET_MAX_S)
        else:
            self._rest = QUIET_S


def _cgroup_mounts(mountinfo: str) -> list[Mount]:
    return [m for m in parse_mountinfo(mountinfo) if m.fstype in ("cgroup", "cgroup2")]


def _favors(mounts: list[Mount]) -> bool:
    """Whether one of the cgroup ``mounts`` is mounted favordynmods: the rwsem every
    migration takes is global, so one such mount keeps it in its slow mode for all."""
    return any(FLAG in m.super_options for m in mounts)
