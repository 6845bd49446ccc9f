"""The cgroup backend's pure parts: job patterns, mount-table layouts, /proc/<pid>/cgroup.

The last section runs the backend over a fake tree (a tmp_path described as a cgroup2 mount by
a fake /proc), to pin down owner and start-time rules without real cgroups.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from callerid.agent.backends import DryRun, cgroup, make_backend
from callerid.agent.backends.base import BackendError
from callerid.agent.backends.cgroup import (
    CgroupBackend,
    JobPattern,
    detect_layout,
    parse_mountinfo,
    parse_proc_cgroup,
)
from callerid.agent.config import BackendConfig, CgroupBackendConfig

# --------------------------------------------------------------------------- patterns


def test_default_pattern_compiles_to_glob_and_regex() -> None:
    p = JobPattern.compile("slurm/uid_{uid}/job_{job}")
    assert p.has_uid
    assert p.depth == 3
    assert p.glob() == "slurm/uid_*/job_*"
    assert p.glob(uid=1001) == "slurm/uid_1001/job_*"
    assert p.glob(uid=1001, job="42") == "slurm/uid_1001/job_42"
    assert p.glob(job="42") == "slurm/uid_*/job_42"


@pytest.mark.parametrize(
    ("rel", "expected"),
    [
        ("slurm/uid_1001/job_42", ("42", 1001)),
        ("slurm/uid_0/job_7", ("7", 0)),
        ("slurm/uid_1001/job_1.2-a_B", ("1.2-a_B", 1001)),
        ("slurm/uid_1001/job_", None),
        ("slurm/uid_x/job_42", None),
        ("slurm/uid_/job_42", None),
        ("slurm/uid_1001", None),
        ("slurm/uid_1001/job_42/step_extern", None),
        ("slurm/uid_1001/job_4 2", None),
        ("slurm/uid_1001/job_4+2", None),
        ("other/uid_1001/job_42", None),
        ("x/slurm/uid_1001/job_42", None),
        ("", None),
    ],
)
def test_match_reads_job_and_uid(rel: str, expected: tuple[str, int] | None) -> None:
    assert JobPattern.compile("slurm/uid_{uid}/job_{job}").match(rel) == expected


def test_pattern_without_uid_reports_no_uid() -> None:
    p = JobPattern.compile("jobs/job_{job}")
    assert not p.has_uid
    assert p.match("jobs/job_9") == ("9", None)
    assert p.glob(uid=5) == "jobs/job_*"  # no {uid}: a uid cannot narrow the glob


def test_match_within_finds_the_job_dir_of_a_descendant() -> None:
    p = JobPattern.compile("slurm/uid_{uid}/job_{job}")
    assert p.match_within("/slurm/uid_5/job_42/step_extern/user/task_0") == (
        "slurm/uid_5/job_42",
        "42",
        5,
    )
    assert p.match_within("slurm/uid_5/job_42") == ("slurm/uid_5/job_42", "42", 5)
    assert p.match_within("/slurm/uid_5") is None
    assert p.match_within("/system.slice/sshd.service") is None
    assert p.match_within("/") is None


def test_wildcards_stay_within_one_path_component() -> None:
    p = JobPattern.compile("slurm*/uid_{uid}/job_{job}")
    assert p.glob(uid=3) == "slurm*/uid_3/job_*"
    assert p.match("slurm_vm/uid_3/job_8") == ("8", 3)
    assert p.match("slurm/uid_3/job_8") == ("8", 3)
    assert p.match("slurm_vm/extra/uid_3/job_8") is None
    q = JobPattern.compile("slurm_?/job_{job}")
    assert q.match("slurm_a/job_1") == ("1", None)
    assert q.match("slurm_ab/job_1") is None
    assert q.match("slurm_//job_1") is None


def test_literal_regex_characters_are_literal() -> None:
    p = JobPattern.compile("a.b+c/job_{job}")
    assert p.match("a.b+c/job_1") == ("1", None)
    assert p.match("axbbc/job_1") is None


def test_placeholders_in_one_component() -> None:
    p = JobPattern.compile("u{uid}-j{job}")
    assert p.depth == 1
    assert p.match("u12-j34") == ("34", 12)
    assert p.match("u12-j") is None


@pytest.mark.parametrize(
    ("pattern", "complaint"),
    [
        ("slurm/uid_{uid}/job", "must contain {job}"),
        ("", "must contain {job}"),
        ("/slurm/job_{job}", "relative path"),
        ("slurm//job_{job}", "relative path"),
        ("slurm/job_{job}/", "relative path"),
        ("../job_{job}", "relative path"),
        ("./job_{job}", "relative path"),
        ("slurm/{user}/job_{job}", "unknown placeholder {user}"),
        ("job_{job}/x_{job}", "appears twice"),
        ("job_{job}/{uid", "unbalanced brace"),
        ("job_{job}/uid}", "unbalanced brace"),
        ("job_{job}/{}", "unknown placeholder {}"),
        ("job_[0-9]{job}", "character classes"),
    ],
)
def test_bad_patterns_are_rejected(pattern: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint.replace("{", r"\{").replace("}", r"\}")):
        JobPattern.compile(pattern)


def test_backend_rejects_bad_config_before_touching_the_system(tmp_path: Path) -> None:
    no_proc = tmp_path / "no-proc"  # would fail later if it were read
    with pytest.raises(BackendError, match=r"backend\.cgroup\.jobs: .*\{job\}"):
        CgroupBackend(CgroupBackendConfig(jobs="slurm/uid_{uid}"), proc_root=no_proc)
    with pytest.raises(BackendError, match=r"backend\.cgroup\.extern"):
        CgroupBackend(CgroupBackendConfig(extern="a/b"), proc_root=no_proc)


# --------------------------------------------------------------------------- layouts

HYBRID = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
23 22 0:21 / /sys rw,nosuid - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
34 31 0:31 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
"""

PURE_V2 = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw,nsdelegate
"""

COMOUNTED = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
33 31 0:30 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
"""


def test_hybrid_root_is_all_v1_hierarchies_freezer_first() -> None:
    layout = detect_layout("/sys/fs/cgroup", parse_mountinfo(HYBRID))
    assert layout.mode == "v1-all"
    labels = [h.label for h in layout.hierarchies]
    assert labels == ["freezer", "pids", "memory", "cpu", "name=systemd"]  # no 'unified'
    assert all(h.version == 1 and h.prefix == "/" for h in layout.hierarchies)
    assert layout.hierarchies[0].base == Path("/sys/fs/cgroup/freezer")


def test_unified_mount_and_a_dir_in_it_are_v2() -> None:
    mounts = parse_mountinfo(HYBRID)
    layout = detect_layout("/sys/fs/cgroup/unified", mounts)
    assert layout.mode == "v2"
    assert layout.hierarchies[0].prefix == "/"
    inner = detect_layout("/sys/fs/cgroup/unified/test/x", mounts)
    (h,) = inner.hierarchies
    assert (inner.mode, h.base, h.prefix) == (
        "v2",
        Path("/sys/fs/cgroup/unified/test/x"),
        "/test/x",
    )
    pure = detect_layout("/sys/fs/cgroup", parse_mountinfo(PURE_V2))
    assert pure.mode == "v2"


def test_v1_hierarchy_or_dir_in_it_is_that_single_hierarchy() -> None:
    mounts = parse_mountinfo(HYBRID)
    layout = detect_layout("/sys/fs/cgroup/freezer/slurm_vm", mounts)
    (h,) = layout.hierarchies
    assert (layout.mode, h.label, h.prefix) == ("v1", "freezer", "/slurm_vm")
    (s,) = detect_layout("/sys/fs/cgroup/systemd", mounts).hierarchies
    assert s.controllers == {"name=systemd"}  # 'rw', 'xattr' are options, not controllers


def test_comounted_controllers_are_one_hierarchy() -> None:
    layout = detect_layout("/sys/fs/cgroup", parse_mountinfo(COMOUNTED))
    assert [h.label for h in layout.hierarchies] == ["cpu,cpuacct", "devices"]
    entries = parse_proc_cgroup("3:devices:/a\n2:cpu,cpuacct:/slurm/uid_1/job_2\n0::/\n")
    assert layout.hierarchies[0].path_of(entries) == "/slurm/uid_1/job_2"
    assert layout.hierarchies[1].path_of(entries) == "/a"


def test_a_path_with_no_cgroup_is_an_error() -> None:
    with pytest.raises(BackendError, match="neither in a cgroup hierarchy"):
        detect_layout("/var/lib", parse_mountinfo(HYBRID))


def test_mountinfo_octal_escapes_are_decoded() -> None:
    (m,) = parse_mountinfo(r"50 31 0:40 / /mnt/my\040cg rw - cgroup2 cgroup2 rw" + "\n")
    assert m.mountpoint == "/mnt/my cg"
    assert m.fstype == "cgroup2"


def test_proc_cgroup_paths_per_hierarchy() -> None:
    text = "6:freezer:/slurm/uid_5/job_9/step_extern\n4:memory:/x\n0::/init.scope\n"
    entries = parse_proc_cgroup(text)
    hybrid = parse_mountinfo(HYBRID)
    v1 = detect_layout("/sys/fs/cgroup/freezer", hybrid).hierarchies[0]
    v2 = detect_layout("/sys/fs/cgroup/unified", hybrid).hierarchies[0]
    assert v1.path_of(entries) == "/slurm/uid_5/job_9/step_extern"
    assert v2.path_of(entries) == "/init.scope"
    inner = detect_layout("/sys/fs/cgroup/freezer/slurm", hybrid).hierarchies[0]
    assert inner.relative("/slurm/uid_5/job_9") == "uid_5/job_9"
    assert inner.relative("/slurmx/uid_5") is None
    assert inner.relative("/slurm") is None
    assert inner.cgroup_path("/sys/fs/cgroup/freezer/slurm/uid_5") == "/slurm/uid_5"


# --------------------------------------------------------------------------- a fake tree


def _fake_system(tmp_path: Path) -> tuple[Path, Path]:
    """A fake /proc whose mountinfo calls tmp_path/cg a cgroup2 mount; (proc, cg)."""
    proc, cg = tmp_path / "proc", tmp_path / "cg"
    (proc / "self").mkdir(parents=True)
    cg.mkdir()
    (proc / "self" / "mountinfo").write_text(f"41 31 0:38 / {cg} rw - cgroup2 cgroup2 rw\n")
    (proc / "stat").write_text("cpu  1 2 3\nbtime 1000\nprocesses 5\n")
    return proc, cg


def _fake_process(
    proc: Path, pid: int, uid: int, start_ticks: int, cgroup: str, gid: int | None = None
) -> None:
    """A /proc/<pid>; with ``gid`` a status file whose effective gid it is (real differs)."""
    d = proc / str(pid)
    d.mkdir()
    fields = ["S"] + ["0"] * 18 + [str(start_ticks)] + ["0"] * 10
    (d / "stat").write_text(f"{pid} (odd) name) " + " ".join(fields) + "\n")
    (d / "cgroup").write_text(f"0::{cgroup}\n")
    if gid is not None:
        ids = f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}\nGid:\t{uid}\t{gid}\t{gid}\t{gid}\n"
        (d / "status").write_text(f"Name:\todd\nUmask:\t0022\nState:\tS\n{ids}Groups:\t\n")
    os.chown(d, uid, uid)


def _fake_job(cg: Path, rel: str, pids_by_step: dict[str, list[int]]) -> Path:
    job = cg / rel
    job.mkdir(parents=True)
    (job / "cgroup.procs").write_text("")
    for step, pids in pids_by_step.items():
        (job / step).mkdir()
        (job / step / "cgroup.procs").write_text("".join(f"{p}\n" for p in pids))
    return job


@pytest.mark.skipif(os.geteuid() != 0, reason="chown of the fake /proc entries needs root")
def test_owner_and_start_time_come_from_the_processes(tmp_path: Path) -> None:
    proc, cg = _fake_system(tmp_path)
    hz = os.sysconf("SC_CLK_TCK")
    _fake_process(proc, 10, 0, 5 * hz, "/jobs/job_1/step_extern")  # root: not the owner
    _fake_process(proc, 11, 2001, 7 * hz, "/jobs/job_1/step_batch")
    _fake_process(proc, 12, 2001, 9 * hz, "/jobs/job_1/step_0")
    _fake_process(proc, 20, 2002, 3 * hz, "/jobs/job_2/step_batch")
    _fake_job(cg, "jobs/job_1", {"step_extern": [10], "step_batch": [11], "step_0": [12, 99]})
    _fake_job(cg, "jobs/job_2", {"step_batch": [20]})
    empty = _fake_job(cg, "jobs/job_3", {"step_extern": []})  # no process: no known owner
    backend = CgroupBackend(CgroupBackendConfig(root=cg, jobs="jobs/job_{job}"), proc_root=proc)

    (job1,) = backend.jobs_of(2001)
    assert (job1.id, job1.uid) == ("1", 2001)
    assert job1.start_time == 1000 + 5  # earliest process, root's included; pid 99 is gone
    assert [j.id for j in backend.jobs_of(2002)] == ["2"]
    assert backend.jobs_of(0) == []
    assert backend.job_of_pid(12) == job1
    assert backend.job_of_pid(99) is None
    assert empty.is_dir()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown of the fake /proc entries needs root")
@pytest.mark.parametrize("pattern", ["jobs/job_{job}", "slurm/uid_{uid}/job_{job}"])
def test_the_jobs_group_is_the_effective_gid_of_the_owners_oldest_process(
    tmp_path: Path, pattern: str
) -> None:
    proc, cg = _fake_system(tmp_path)
    hz = os.sysconf("SC_CLK_TCK")
    where = pattern.format(uid=2001, job=1)
    _fake_process(proc, 10, 0, 2 * hz, f"/{where}/step_extern", gid=0)  # root: not the owner
    _fake_process(proc, 11, 2001, 3 * hz, f"/{where}/step_batch")  # exited: no status file
    _fake_process(proc, 12, 2001, 4 * hz, f"/{where}/step_batch", gid=3005)  # sbatch --gid
    for pid in (13, 14, 15):  # adopted sessions later, with the primary group: outnumber it
        _fake_process(proc, pid, 2001, (5 + pid) * hz, f"/{where}/step_extern", gid=2001)
    _fake_job(cg, where, {"step_extern": [10, 13, 14, 15], "step_batch": [11, 12]})
    _fake_job(cg, pattern.format(uid=2001, job=2), {"step_extern": [10]})  # root only
    backend = CgroupBackend(CgroupBackendConfig(root=cg, jobs=pattern), proc_root=proc)

    jobs = {j.id: j for j in backend.jobs_of(2001)}
    assert jobs["1"].gid == 3005
    assert backend.job_of_pid(15) == jobs["1"]
    assert jobs.get("2") is None or jobs["2"].gid is None  # no process of its owner: unknown


def test_a_job_without_processes_starts_at_its_directory_ctime(tmp_path: Path) -> None:
    proc, cg = _fake_system(tmp_path)
    job = _fake_job(cg, "slurm/uid_3001/job_5", {"step_extern": []})
    backend = CgroupBackend(CgroupBackendConfig(root=cg), proc_root=proc)
    (found,) = backend.jobs_of(3001)
    assert (found.id, found.uid, found.start_time) == ("5", 3001, job.stat().st_ctime)
    assert backend.jobs_of(3002) == []


def test_the_factory_builds_the_configured_backend_and_a_dry_run_never_adopts(
    tmp_path: Path,
) -> None:
    proc, cg = _fake_system(tmp_path)
    job_dir = _fake_job(cg, "slurm/uid_3001/job_5", {"step_extern": []})
    cfg = BackendConfig(type="cgroup", cgroup=CgroupBackendConfig(root=cg))
    backend = make_backend(cfg, proc_root=proc)
    assert isinstance(backend, CgroupBackend)
    dry = DryRun(backend)
    assert (dry.name, dry.blocking) == ("cgroup", False)
    (job,) = dry.jobs_of(3001)
    assert job == backend.jobs_of(3001)[0]
    assert dry.job_of_pid(os.getpid()) is None  # not in the fake /proc
    dry.adopt(os.getpid(), job)
    assert (job_dir / "step_extern" / "cgroup.procs").read_text() == ""  # nothing written
    dry.close()


@pytest.mark.parametrize(
    "text",
    [
        "0::/slurm/uid_5/job_7/step_extern\n",
        "13:freezer:/slurm/uid_5/job_7\n1:name=systemd:/x\n0::/slurm/uid_5/job_7/step_0\n",
        "0::/\n",
        "5:pids:/a\n",
        "",
        "0::/no/newline",
        "10:memory:/0::/trap\n0::/real\n",
    ],
)
def test_v2_entry_agrees_with_the_full_parse(text: str) -> None:
    full = [e for e in cgroup.parse_proc_cgroup(text) if e[0] == "0" and not e[1]]
    assert cgroup._v2_entry(text) == full
