"""The cgroup migration primer (`backends._primer`): what it writes, when, and when it stops.

Real cgroupfs for the write itself (the test process primes its own cgroup: it must stay
where it is); a mountinfo text and a scratch /proc for the cases this machine does not have.
Whether the kernel's wait really moves earlier is measured in `make bench` (module time),
not here: timing is not a test.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any, TypeVar

import pytest

from callerid.agent.backends._primer import (
    FAST_S,
    FDM_QUIET_S,
    LOOK_S,
    QUIET_MAX_S,
    QUIET_S,
    WINDOW_S,
    Primer,
)
from tests.fakes import FakeClock

T = TypeVar("T")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="writes cgroup.procs: needs root")


class SlowClock(FakeClock):
    """A clock on which every reading after the first advances by ``step``: each priming
    write then looks as slow as a grace period."""

    def __init__(self, step: float) -> None:
        super().__init__()
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


class Inline(Executor):
    """Runs each submitted call at once, so a test sees its effect without waiting."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        fut: Future[T] = Future()
        fut.set_result(fn(*args, **kwargs))
        return fut


def _cgroup() -> str:
    return Path("/proc/self/cgroup").read_text()


def test_priming_writes_the_agents_own_cgroup_and_moves_nothing() -> None:
    primer = Primer.detect(Inline(), FakeClock())
    if primer is None:
        pytest.skip("this machine's cgroups need no priming (favordynmods, or none mounted)")
    before = _cgroup()
    primer.prime()
    assert primer.enabled, "the priming write failed"
    assert primer.primed == 1
    assert _cgroup() == before


def test_one_priming_per_window_while_writes_wait() -> None:
    clock = SlowClock(FAST_S * 1.5)  # every write seems to wait (a little) for a grace period
    primer = Primer.detect(Inline(), clock)
    if primer is None:
        pytest.skip("this machine's cgroups need no priming (favordynmods, or none mounted)")
    primer.prime()
    clock.advance(WINDOW_S / 4)
    primer.prime()  # the first one's wait covers this login too
    assert primer.primed == 1
    clock.advance(WINDOW_S)
    primer.prime()
    assert primer.primed == 2


def test_a_quick_write_rests_the_primer() -> None:
    """A write that did not wait says the rwsem is in slow mode already: no priming for a
    while (each would only wake a worker), then one look again."""
    clock = FakeClock()  # every write takes no time on it
    primer = Primer.detect(Inline(), clock)
    if primer is None:
        pytest.skip("this machine's cgroups need no priming (favordynmods, or none mounted)")
    primer.prime()
    clock.advance(WINDOW_S * 2)
    primer.prime()
    assert primer.primed == 1
    clock.advance(QUIET_S)
    primer.prime()
    assert primer.primed == 2


def test_quick_writes_in_a_row_rest_the_primer_longer_until_one_waits() -> None:
    """A kernel whose migrations never wait: each quick write doubles the rest (up to
    QUIET_MAX_S); one write that waits brings back the short rest."""
    clock = SlowClock(0.0)  # writes take no time until the step is set
    primer = Primer.detect(Inline(), clock)
    if primer is None:
        pytest.skip("this machine's cgroups need no priming (favordynmods, or none mounted)")
    rests = []
    for _ in range(8):
        primer.prime()
        began, primed = clock.now, primer.primed
        while primer.primed == primed:  # the rest this write earned, to 0.1 s
            clock.advance(0.1)
            primer.prime()
        rests.append(round(clock.now - began))
    assert rests == [1, 2, 4, 8, 16, 32, 32, 32]
    assert QUIET_MAX_S == 32
    clock.step = FAST_S * 1.5  # this write waits: priming is worth it again
    clock.advance(QUIET_MAX_S)
    primer.prime()
    clock.step = 0.0
    primed = primer.primed
    clock.advance(WINDOW_S * 2)
    primer.prime()  # after a write that waited, no rest: this one primes too
    clock.advance(QUIET_S)
    primer.prime()
    assert primer.primed == primed + 2


def _scratch_proc(tmp_path: Path, mountinfo: str, cgroup: str) -> Path:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "mountinfo").write_text(mountinfo)
    (proc / "self" / "cgroup").write_text(cgroup)
    return proc


def test_favordynmods_means_nothing_to_prime(tmp_path: Path) -> None:
    mountinfo = (
        "35 24 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate,favordynmods\n"
    )
    proc = _scratch_proc(tmp_path, mountinfo, "0::/system.slice/x.service\n")
    assert Primer.detect(Inline(), FakeClock(), proc) is None


def test_favordynmods_set_later_rests_the_primer_until_it_is_cleared(tmp_path: Path) -> None:
    mount = tmp_path / "cg"
    (mount / "agent").mkdir(parents=True)
    procs = mount / "agent" / "cgroup.procs"
    procs.write_text("")  # a plain file in a scratch tree: the write lands there
    plain = f"35 24 0:30 / {mount} rw - cgroup2 cgroup2 rw,nsdelegate\n"
    proc = _scratch_proc(tmp_path, plain, "0::/agent\n")
    clock = FakeClock()
    primer = Primer.detect(Inline(), clock, proc)
    assert primer is not None
    clock.advance(LOOK_S)
    primer.prime()
    assert primer.primed == 1 and procs.read_text() == str(os.getpid())
    # the mount is made favordynmods while the agent runs (a remount)
    (proc / "self" / "mountinfo").write_text(plain.replace("nsdelegate", "nsdelegate,favordynmods"))
    clock.advance(QUIET_S + LOOK_S)
    primer.prime()
    assert primer.favordynmods and primer.primed == 1, "primed with favordynmods on"
    clock.advance(FDM_QUIET_S / 2)
    primer.prime()  # resting: the mounts are not even looked at
    assert primer.primed == 1
    (proc / "self" / "mountinfo").write_text(plain)  # cleared again
    clock.advance(FDM_QUIET_S)
    primer.prime()
    assert not primer.favordynmods and primer.primed == 2


def test_a_failed_write_stops_the_primer(tmp_path: Path) -> None:
    mount = tmp_path / "cg"
    (mount / "agent" / "cgroup.procs").mkdir(parents=True)  # a directory: the write fails
    mountinfo = f"35 24 0:30 / {mount} rw - cgroup2 cgroup2 rw,nsdelegate\n"
    proc = _scratch_proc(tmp_path, mountinfo, "0::/agent\n")
    clock = FakeClock()
    primer = Primer.detect(Inline(), clock, proc)
    assert primer is not None
    primer.prime()
    assert not primer.enabled and primer.primed == 0
    clock.advance(QUIET_S + 1)
    primer.prime()  # stopped: not tried again
    assert primer.primed == 0


def test_a_v1_only_machine_primes_in_a_v1_hierarchy(tmp_path: Path) -> None:
    mount = tmp_path / "freezer"
    (mount / "agent").mkdir(parents=True)
    (mount / "agent" / "cgroup.procs").write_text("")  # stands in for cgroupfs
    mountinfo = f"36 24 0:31 / {mount} rw - cgroup cgroup rw,freezer\n"
    proc = _scratch_proc(tmp_path, mountinfo, "9:name=systemd:/\n5:freezer:/agent\n")
    primer = Primer.detect(Inline(), FakeClock(), proc)
    assert primer is not None
    primer.prime()
    assert primer.primed == 1
    assert (mount / "agent" / "cgroup.procs").read_text() == str(os.getpid())
