"""The cgroup backend's cgroup.procs writes through descriptors kept open (`_procsfd`), on
real cgroup v2 directories: kept, bounded, timed out, and right when the cgroup behind one is
removed (and made again under the same path)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from callerid.agent.backends._procsfd import ProcsWriter
from callerid.agent.backends.base import Job, JobVanished
from tests.fakes import FakeClock
from tests.support.cgroups import scratch_cgroup2
from tests.support.poll import wait_for

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (cgroups)"),
]

JOB = Job("42", 1000, 0.0)


@pytest.fixture
def top() -> Iterator[Path]:
    with scratch_cgroup2("cid-pw") as path:
        yield path


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    child = subprocess.Popen(["sleep", "60"])
    yield child
    child.kill()
    child.wait()


def _two(top: Path) -> tuple[Path, Path]:
    a, b = top / "a", top / "b"
    a.mkdir()
    b.mkdir()
    return a, b


def _in(cgroup: Path, pid: int) -> bool:
    return str(pid) in (cgroup / "cgroup.procs").read_text().split()


def test_a_cgroup_is_written_through_one_kept_descriptor(
    top: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    a, b = _two(top)
    writer = ProcsWriter(ttl_s=10.0, max_open=1, clock=FakeClock())
    writer.write(str(a), sleeper.pid, JOB)
    assert _in(a, sleeper.pid) and len(writer) == 1
    writer.write(str(b), sleeper.pid, JOB)  # the bound: a's descriptor goes
    assert _in(b, sleeper.pid) and len(writer) == 1
    writer.write(str(b), sleeper.pid, JOB)
    writer.close()
    assert len(writer) == 0


def test_a_removed_cgroup_is_opened_again_by_its_path(
    top: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    """The job ended (its cgroup removed) and a new one took the same path: the write goes to
    the new cgroup; with nothing at the path any more, the job has vanished."""
    job = top / "job_42"
    job.mkdir()
    writer = ProcsWriter(ttl_s=10.0, max_open=8, clock=FakeClock())
    writer.write(str(job), sleeper.pid, JOB)
    (top / "cgroup.procs").write_text(str(sleeper.pid))  # out again, so that it can go
    wait_for(lambda: not _in(job, sleeper.pid), what="the cgroup empty")
    job.rmdir()
    job.mkdir()  # a new job under the same id
    writer.write(str(job), sleeper.pid, JOB)
    assert _in(job, sleeper.pid)
    (top / "cgroup.procs").write_text(str(sleeper.pid))
    wait_for(lambda: not _in(job, sleeper.pid), what="the cgroup empty")
    job.rmdir()
    with pytest.raises(JobVanished):
        writer.write(str(job), sleeper.pid, JOB)
    assert len(writer) == 0


def test_kept_descriptors_are_closed_after_their_time(
    top: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    a, b = _two(top)
    clock = FakeClock()
    writer = ProcsWriter(ttl_s=10.0, max_open=8, clock=clock)
    writer.write(str(a), sleeper.pid, JOB)
    clock.advance(10.0)
    writer.write(str(b), sleeper.pid, JOB)  # a's time is up: closed on the way
    assert len(writer) == 1 and _in(b, sleeper.pid)
    off = ProcsWriter(ttl_s=0.0, max_open=8, clock=clock)  # kept no time at all
    off.write(str(a), sleeper.pid, JOB)
    assert len(off) == 0 and _in(a, sleeper.pid)
