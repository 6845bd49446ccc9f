"""The cgroup backend on real cgroups (v2 and v1), real users and real processes.

Each test builds its own job tree under a unique test root (tests/support/cgroups.py) with
throwaway users (tests/support/users.py); the fixtures remove all of it and check that the
test root is gone.
"""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from callerid.agent.backends.base import BackendError, Job, JobVanished
from callerid.agent.backends.cgroup import CgroupBackend
from tests.fakes import FakeClock
from tests.support.cgroups import JobTree, Mode, cgroup_mounts, require_cgroups
from tests.support.poll import wait_for
from tests.support.users import ThrowawayUser, require_useradd, secondary_group, throwaway_users

pytestmark = pytest.mark.root

SLEEP = ["sleep", "300"]


def _start_ticks(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])


def _clock_past(ticks: int) -> bool:
    """Has the boot clock (in clock ticks, from /proc/uptime) reached ``ticks``?"""
    return float(Path("/proc/uptime").read_text().split()[0]) * os.sysconf("SC_CLK_TCK") >= ticks


def _process_start(pid: int, backend_btime: float) -> float:
    return backend_btime + _start_ticks(pid) / os.sysconf("SC_CLK_TCK")


def _btime() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise AssertionError("no btime in /proc/stat")


def _uid_of(pid: int) -> int:
    return Path(f"/proc/{pid}").stat().st_uid


@pytest.fixture
def users() -> Iterator[list[ThrowawayUser]]:
    require_useradd()
    with throwaway_users(2) as pair:
        yield pair


def _job_tree(mode: Mode, **kw: str) -> Iterator[JobTree]:
    require_cgroups(mode)
    tree = JobTree(mode, **kw)
    with tree:
        yield tree
    left = [r for r in tree.roots if r.exists()]
    assert not left, f"test cgroups left behind: {left}"


@pytest.fixture(params=["v2", "v1"])
def tree(request: pytest.FixtureRequest) -> Iterator[JobTree]:
    yield from _job_tree(request.param)


@dataclass
class Scenario:
    tree: JobTree
    backend: CgroupBackend
    alice: ThrowawayUser
    bob: ThrowawayUser
    procs: dict[str, subprocess.Popen[bytes]]  # job id -> a process in its batch step


@pytest.fixture
def scene(users: list[ThrowawayUser], tree: JobTree) -> Scenario:
    """Jobs 101 and 102 (alice, 102 started later) and 201 (bob), each running a process."""
    alice, bob = users
    procs = {}
    for job_id, user in (("101", alice), ("102", alice), ("201", bob)):
        tree.add_job(job_id, user.uid)
        procs[job_id] = tree.spawn_in(job_id, "step_batch", SLEEP, user=user)
        ticks = _start_ticks(procs[job_id].pid)  # the next job starts at least one tick later
        wait_for(functools.partial(_clock_past, ticks + 2), what="the clock to tick")
    return Scenario(tree, CgroupBackend(tree.backend_config()), alice, bob, procs)


# --------------------------------------------------------------------------- listing


def test_jobs_of_lists_exactly_the_users_jobs_with_process_start_times(scene: Scenario) -> None:
    jobs = scene.backend.jobs_of(scene.alice.uid)
    assert [j.id for j in jobs] == ["101", "102"]
    assert {j.uid for j in jobs} == {scene.alice.uid}
    assert jobs[0].start_time < jobs[1].start_time  # 102 is the newer one
    assert max(jobs, key=Job.sort_key).id == "102"
    for job in jobs:  # the start time is the job's process start, not a directory time
        assert job.start_time == _process_start(scene.procs[job.id].pid, _btime())
    assert [(j.id, j.uid) for j in scene.backend.jobs_of(scene.bob.uid)] == [("201", scene.bob.uid)]
    assert scene.backend.jobs_of(0) == []


def test_the_uid_in_the_pattern_limits_the_listing_to_that_users_directory(
    scene: Scenario,
) -> None:
    # a process of bob's inside alice's job does not make the job bob's: the path says alice
    scene.tree.spawn_in("101", "step_batch", SLEEP, user=scene.bob)
    assert [j.id for j in scene.backend.jobs_of(scene.bob.uid)] == ["201"]


def test_job_of_pid_finds_the_job_of_a_process_in_one_of_its_steps(scene: Scenario) -> None:
    proc = scene.procs["102"]
    job = scene.backend.job_of_pid(proc.pid)
    assert job is not None
    assert (job.id, job.uid) == ("102", scene.alice.uid)
    assert job == scene.backend.jobs_of(scene.alice.uid)[1]
    outsider = scene.tree.spawn(SLEEP, user=scene.alice)
    assert scene.backend.job_of_pid(outsider.pid) is None
    assert scene.backend.job_of_pid(os.getpid()) is None


def test_job_of_pid_of_a_dead_process_is_none(scene: Scenario) -> None:
    proc = scene.procs["201"]
    proc.kill()
    proc.wait()
    assert scene.backend.job_of_pid(proc.pid) is None


# --------------------------------------------------------------------------- adoption


def test_adopt_moves_a_process_into_the_extern_step(scene: Scenario) -> None:
    outsider = scene.tree.spawn(SLEEP, user=scene.alice)
    job = scene.backend.jobs_of(scene.alice.uid)[1]
    scene.backend.adopt(outsider.pid, job)
    assert scene.tree.cgroup_of(outsider.pid) == scene.tree.cgroup_path("102", "step_extern")
    assert scene.backend.job_of_pid(outsider.pid) == job
    assert outsider.poll() is None


def test_adopt_into_a_removed_job_raises_job_vanished(scene: Scenario) -> None:
    scene.tree.add_job("103", scene.alice.uid)
    (job,) = [j for j in scene.backend.jobs_of(scene.alice.uid) if j.id == "103"]
    scene.tree.remove_job("103")
    outsider = scene.tree.spawn(SLEEP)
    before = scene.tree.cgroup_of(outsider.pid)
    with pytest.raises(JobVanished, match=r"job 103 no longer exists \(.*job_103\)"):
        scene.backend.adopt(outsider.pid, job)
    assert scene.tree.cgroup_of(outsider.pid) == before
    assert not any(
        (r / "slurm" / f"uid_{scene.alice.uid}" / "job_103").exists() for r in scene.tree.roots
    )


def _end(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()


def test_extern_steps_are_remembered_and_a_vanished_job_is_forgotten(scene: Scenario) -> None:
    """A remembered extern step is written to without a look; once its write fails (or its
    time is up) the job is looked for again, and found without one."""
    clock = FakeClock()
    backend = CgroupBackend(scene.tree.backend_config(), clock=clock, extern_ttl_s=10.0)
    scene.tree.add_job("105", scene.alice.uid)
    (job,) = [j for j in backend.jobs_of(scene.alice.uid) if j.id == "105"]
    first, second, third = (scene.tree.spawn(SLEEP, user=scene.alice) for _ in range(3))
    backend.adopt(first.pid, job)
    assert scene.tree.cgroup_of(first.pid) == scene.tree.cgroup_path("105", "step_extern")
    _end(first)
    scene.tree.remove_step("105", "step_extern")  # the job stays, its extern step goes
    with pytest.raises(JobVanished, match=r"job 105 no longer exists \(.*step_extern\)"):
        backend.adopt(second.pid, job)  # remembered: straight to the (gone) extern step
    with pytest.raises(BackendError, match="job 105 has no extern step cgroup") as info:
        backend.adopt(second.pid, job)  # forgotten: looked for again
    assert not isinstance(info.value, JobVanished)

    for job_dir in scene.tree.job_dirs("105"):
        (job_dir / "step_extern").mkdir()
    backend.adopt(second.pid, job)  # looked for, found and remembered again
    _end(second)
    scene.tree.remove_step("105", "step_extern")
    clock.advance(10.0)  # the memory expires: looked for again, at once
    with pytest.raises(BackendError, match="job 105 has no extern step cgroup"):
        backend.adopt(third.pid, job)


def test_adopt_into_a_job_without_extern_step_fails_and_creates_nothing(scene: Scenario) -> None:
    job_dir = scene.tree.add_job("104", scene.alice.uid, extern=False)
    before = sorted(p.name for p in job_dir.iterdir() if p.is_dir())
    (job,) = [j for j in scene.backend.jobs_of(scene.alice.uid) if j.id == "104"]
    outsider = scene.tree.spawn(SLEEP, user=scene.alice)
    with pytest.raises(BackendError, match="job 104 has no extern step cgroup") as info:
        scene.backend.adopt(outsider.pid, job)
    assert not isinstance(info.value, JobVanished)
    assert sorted(p.name for p in job_dir.iterdir() if p.is_dir()) == before
    assert not (job_dir / "step_extern").exists()
    assert scene.backend.job_of_pid(outsider.pid) is None


def test_adopt_of_a_dead_process_fails(scene: Scenario) -> None:
    job = scene.backend.jobs_of(scene.alice.uid)[0]
    gone = scene.tree.spawn(["true"])
    gone.wait()
    with pytest.raises(BackendError, match=f"process {gone.pid} vanished"):
        scene.backend.adopt(gone.pid, job)


def test_adopt_reports_the_kernels_refusal(scene: Scenario) -> None:
    kthreadd = Path("/proc/2")
    if (kthreadd / "comm").read_text().strip() != "kthreadd":
        pytest.skip("pid 2 is not kthreadd here (pid namespace)")
    before = (kthreadd / "cgroup").read_text()
    job = scene.backend.jobs_of(scene.alice.uid)[0]
    with pytest.raises(BackendError, match=r"cannot move process 2 into .*: Invalid argument"):
        scene.backend.adopt(2, job)  # the kernel never moves kthreadd
    assert (kthreadd / "cgroup").read_text() == before


def test_adopt_refuses_a_job_id_or_pid_that_is_not_one(scene: Scenario) -> None:
    outsider = scene.tree.spawn(SLEEP)
    with pytest.raises(BackendError, match="invalid job id"):
        scene.backend.adopt(outsider.pid, Job("../101", scene.alice.uid, 0.0))
    assert scene.backend.job_of_pid(outsider.pid) is None
    job = scene.backend.jobs_of(scene.alice.uid)[0]
    for pid in (0, -1):
        with pytest.raises(BackendError, match=f"invalid pid {pid}"):
            scene.backend.adopt(pid, job)
    assert scene.backend.job_of_pid(os.getpid()) is None  # "0" did not move this process


# --------------------------------------------------------------------------- no {uid}


@pytest.fixture(params=["v2", "v1"])
def flat_tree(request: pytest.FixtureRequest) -> Iterator[JobTree]:
    yield from _job_tree(request.param, pattern="jobs/job_{job}")


def test_without_uid_in_the_pattern_the_owner_comes_from_the_processes(
    users: list[ThrowawayUser], flat_tree: JobTree
) -> None:
    alice, bob = users
    for job_id in ("301", "302", "303", "304"):
        flat_tree.add_job(job_id, 0)
    flat_tree.spawn_in("301", "step_batch", SLEEP, user=alice)
    flat_tree.spawn_in("301", "step_extern", SLEEP)  # root's processes do not count
    flat_tree.spawn_in("301", "step_extern", SLEEP)
    in_302 = flat_tree.spawn_in("302", "step_batch", SLEEP, user=bob)
    flat_tree.spawn_in("304", "step_extern", SLEEP)  # only root: owner unknown; 303: empty
    backend = CgroupBackend(flat_tree.backend_config())

    assert [(j.id, j.uid) for j in backend.jobs_of(alice.uid)] == [("301", alice.uid)]
    assert [(j.id, j.uid) for j in backend.jobs_of(bob.uid)] == [("302", bob.uid)]
    assert backend.jobs_of(0) == []
    job = backend.job_of_pid(in_302.pid)
    assert job is not None
    assert (job.id, job.uid) == ("302", bob.uid)
    outsider = flat_tree.spawn(SLEEP, user=bob)
    backend.adopt(outsider.pid, job)
    assert flat_tree.cgroup_of(outsider.pid) == flat_tree.cgroup_path("302", "step_extern")
    assert _uid_of(outsider.pid) == bob.uid


def _egid(pid: int) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x[:4] == "Gid:")
    return int(line.split()[2])


def test_the_jobs_group_is_the_group_its_first_process_runs_with(
    users: list[ThrowawayUser], tree: JobTree
) -> None:
    """A job started in a secondary group (as `sbatch --gid` or `newgrp; sbatch` would) keeps
    that group, even when more processes of the user's primary group join it later (adopted
    ssh sessions); a job started in the primary group has that one."""
    alice, _bob = users
    with secondary_group(alice.name) as gid:
        tree.add_job("401", alice.uid)
        tree.add_job("402", alice.uid)
        switch = ["setpriv", f"--reuid={alice.uid}", f"--regid={gid}", "--init-groups"]
        first = tree.spawn_in("401", "step_batch", [*switch, *SLEEP])
        wait_for(lambda: _egid(first.pid) == gid, what="setpriv to switch to the group")
        ticks = _start_ticks(first.pid)
        wait_for(functools.partial(_clock_past, ticks + 2), what="the clock to tick")
        for _ in range(3):
            tree.spawn_in("401", "step_extern", SLEEP, user=alice)
        tree.spawn_in("402", "step_batch", SLEEP, user=alice)
        backend = CgroupBackend(tree.backend_config())
        found = {j.id: j.gid for j in backend.jobs_of(alice.uid)}
        assert found == {"401": gid, "402": alice.gid}
        job = backend.job_of_pid(first.pid)
        assert job is not None
        assert (job.id, job.gid) == ("401", gid)


# --------------------------------------------------------------------------- v1, all hierarchies


@pytest.fixture
def v1_all() -> Iterator[JobTree]:
    yield from _job_tree("v1-all")


def test_v1_all_adopts_into_every_hierarchy_holding_the_extern_step(
    users: list[ThrowawayUser], v1_all: JobTree
) -> None:
    alice, _bob = users
    v1_all.add_job("102", alice.uid)
    v1_all.spawn_in("102", "step_batch", SLEEP, user=alice)
    backend = CgroupBackend(v1_all.backend_config())
    assert backend.layout.mode == "v1-all"
    assert backend.layout.hierarchies[0].label == "freezer"
    (job,) = backend.jobs_of(alice.uid)
    assert job.id == "102"

    outsider = v1_all.spawn(SLEEP, user=alice)
    backend.adopt(outsider.pid, job)
    mounts = cgroup_mounts()
    extern = v1_all.cgroup_path("102", "step_extern")
    assert v1_all.cgroup_of(outsider.pid, mounts["freezer"]) == extern
    assert v1_all.cgroup_of(outsider.pid, mounts["pids"]) == extern
    assert backend.job_of_pid(outsider.pid) == job
    if "memory" in mounts:  # the tree has no memory cgroup: adoption created none
        assert not (mounts["memory"] / v1_all.name).exists()
        assert v1_all.cgroup_of(outsider.pid, mounts["memory"]) != extern


def test_v1_all_skips_hierarchies_where_the_job_has_no_extern_step(
    users: list[ThrowawayUser], v1_all: JobTree
) -> None:
    alice, _bob = users
    freezer_dir, pids_dir = v1_all.add_job("7", alice.uid), v1_all.job_dirs("7")[1]
    (pids_dir / "step_extern").rmdir()
    backend = CgroupBackend(v1_all.backend_config())
    (job,) = backend.jobs_of(alice.uid)
    outsider = v1_all.spawn(SLEEP)
    pids_before = v1_all.cgroup_of(outsider.pid, cgroup_mounts()["pids"])
    backend.adopt(outsider.pid, job)
    assert v1_all.cgroup_of(outsider.pid) == v1_all.cgroup_path("7", "step_extern")
    assert v1_all.cgroup_of(outsider.pid, cgroup_mounts()["pids"]) == pids_before
    assert not (pids_dir / "step_extern").exists()
    assert freezer_dir.is_relative_to(cgroup_mounts()["freezer"])


# --------------------------------------------------------------------------- the JobTree helper


@pytest.mark.parametrize("mode", ["v2", "v1"])
def test_job_tree_teardown_kills_its_own_and_evacuates_foreign_processes(mode: Mode) -> None:
    require_cgroups(mode)
    foreign = subprocess.Popen(SLEEP)  # started by the test, not by the tree
    try:
        with JobTree(mode) as tree:
            tree.add_job("1", 0)
            own = tree.spawn_in("1", "step_batch", SLEEP)
            backend = CgroupBackend(tree.backend_config())
            (job,) = backend.jobs_of(0)  # uid 0 from the path (uid_0)
            backend.adopt(foreign.pid, job)
            assert tree.cgroup_of(foreign.pid) == tree.cgroup_path("1", "step_extern")
            with pytest.raises(RuntimeError, match="No such file"):
                tree.spawn_in("1", "step_missing", SLEEP)
        assert own.returncode is not None  # killed and reaped
        assert foreign.poll() is None  # left alive, moved out of the tree
        assert not any(r.exists() for r in tree.roots)
        assert tree.cgroup_of(foreign.pid) == tree.cgroup_of(os.getpid())
    finally:
        foreign.kill()
        foreign.wait()
