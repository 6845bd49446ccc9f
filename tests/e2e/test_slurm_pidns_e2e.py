"""End to end with 26.05's namespace/linux: an adopted ssh session is in the job's PID namespace.

A real one-node Slurm 26.05 with ``NamespaceType=namespace/linux`` (`LocalSlurm(namespaces=
"linux")`: `namespace.yaml` with the job's private `/tmp` and ``clone_ns_flags: "CLONE_NEWPID"``),
real OpenSSH sshds with pam_callerid.so and real callerid agents (tests/support/slurm_site.py).
The batch script writes a marker into its private `/tmp`, then runs ``ssh n1 'grep NSpid
/proc/self/status; ...; cat /tmp/<marker>'`` with its output in the site's dir (under
`/var/tmp`, which the job sees; its `/tmp` is hidden by the plugin's). The session must read
the marker (the job's mount namespace) and be in the job's PID namespace. Seen from inside,
through the job's own `/proc` (namespace/linux mounts a procfs of the job's PID namespace in
the job's mount namespace, so the session sees that one): one NSpid, a small one, pid 1 the
stepd's holder (``slurmstepd: [<job>:namespace]``), the batch script listed. Seen from the
node (its `/proc`): the session's shell has two NSpid values, the node's pid and the one the
shell printed as ``$$``, and the sshd monitor entered the job's mount namespace and, for its
children, the job's PID namespace (setns(CLONE_NEWPID) leaves the caller's own pid as it was).

A module of its own, as tests/integration/test_slurm_namespaces.py: under namespace/linux
Slurm and the remote shell report pids as the job's PID namespace numbers them, so
`SlurmSite.wait_session`'s pid (the shell's ``$$``) is not a node pid; the node's view of the
session is taken from the sshd monitor's process tree (its pid is in the decision record).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.support.poll import wait_for
from tests.support.slurm import CGROUP_ROOT, LOCK_TIMEOUT, LocalSlurm, require_slurm
from tests.support.slurm_release import release_names
from tests.support.slurm_site import READY, SiteUser, SlurmSite
from tests.support.users import require_useradd

# the first test may wait for another process's LocalSlurm (the machine-wide lock)
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slurm,
    pytest.mark.root,
    pytest.mark.timeout(LOCK_TIMEOUT + 180),
]

RELEASES = [r for r in release_names() if r == "26.05"]


@pytest.fixture(scope="module", params=RELEASES)
def slurm(request: pytest.FixtureRequest) -> Iterator[LocalSlurm]:
    release = require_slurm(request.param)
    require_useradd()
    if not Path("/usr/sbin/sshd").exists():
        pytest.skip("/usr/sbin/sshd is missing (apt-get install openssh-server)")
    with LocalSlurm(release, namespaces="linux") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def site(slurm: LocalSlurm) -> Iterator[SlurmSite]:
    with SlurmSite(slurm) as s:
        yield s


def ns_ino(pid: int | str, kind: str) -> int:
    return os.stat(f"/proc/{pid}/ns/{kind}").st_ino


def nspids(status: str) -> list[int]:
    """The NSpid values of a /proc/<pid>/status text (outermost namespace first)."""
    m = re.search(r"^NSpid:\s*(.*)$", status, re.MULTILINE)
    assert m is not None, status
    return [int(x) for x in m.group(1).split()]


def batch_pids(slurm: LocalSlurm, user: SiteUser, job: str) -> list[int]:
    """The node's pids of the job's batch step processes (its freezer cgroup): `scontrol
    listpids` gives the job's namespace pids under namespace/linux."""
    step = f"{slurm.cgroup_prefix()}/uid_{user.uid}/job_{job}/step_batch".lstrip("/")
    try:
        text = (CGROUP_ROOT / "freezer" / step / "cgroup.procs").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def named(proc: psutil.Process, name: str) -> bool:
    try:
        return proc.name() == name
    except psutil.NoSuchProcess:
        return False


def gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_the_session_is_in_the_jobs_pid_and_mount_namespaces(
    slurm: LocalSlurm, site: SlurmSite
) -> None:
    heidi = site.add_user()
    token = secrets.token_hex(6)
    marker = f"/tmp/cid-pidns-{token}"
    remote = (
        "grep NSpid /proc/self/status; "
        'echo "pidns $(readlink /proc/self/ns/pid)"; '
        "echo \"init $(tr '\\0' ' ' </proc/1/cmdline)\"; "
        "echo \"pids $(ls /proc | grep -E '^[0-9]+$' | tr '\\n' ' ')\"; "
        f"cat {marker} || echo NO-FILE; "
        f'echo "shell $$"; echo {READY}; exec sleep 300'
    )
    script = site.ssh_script(heidi, "n1", prelude=f"echo {token} > {marker}\n", command=remote)
    out_file, err_file = heidi.out_dir / "out", heidi.out_dir / "err"

    def ssh_output() -> str:
        """What the ssh in the job printed once the remote side is ready ("" until then)."""
        text = out_file.read_text() if out_file.exists() else ""
        if READY in text:
            return text
        err = err_file.read_text() if err_file.exists() else ""
        if "ssh rc" in err:
            msg = f"the ssh in the job ended: {err}\n{text}\n{site.diagnostics()}"
            raise AssertionError(msg)
        return ""

    job = site.submit(heidi, script)
    session: list[psutil.Process] = []
    try:
        out = wait_for(ssh_output, timeout=20, interval=0.05, what="the ssh session's output")
        rec = site.decision("n1", heidi)
        assert (rec["CALLERID_DECISION"], rec["CALLERID_JOB_ID"]) == ("adopt", job), rec
        monitor = psutil.Process(int(rec["CALLERID_PID"]))  # a node pid (the agent's view)
        session = [monitor, *monitor.children(recursive=True)]

        # the batch script, as the node numbers it: the process that sees the marker
        batch = wait_for(
            lambda: [
                p for p in batch_pids(slurm, heidi, job) if Path(f"/proc/{p}/root{marker}").exists()
            ],
            timeout=10,
            what="the batch script (the process that sees its marker)",
        )[0]
        job_pidns, job_mnt = ns_ino(batch, "pid"), ns_ino(batch, "mnt")
        assert job_pidns != ns_ino("self", "pid")
        assert job_mnt != ns_ino("self", "mnt")
        assert not Path(marker).exists()  # only in the job's /tmp

        # what the session printed. Its /proc is the job's: namespace/linux mounts a procfs
        # of the job's PID namespace in the job's mount namespace, so a process there sees
        # one NSpid (the job's number), pid 1 is the stepd's namespace holder and the job's
        # processes are all it lists; the marker is in its /tmp.
        lines = out.splitlines()
        assert f"pidns pid:[{job_pidns}]" in lines, (out, job_pidns)
        nspid_lines = [line for line in lines if line.startswith("NSpid:")]
        assert len(nspid_lines) == 1, out
        (grep_in_job,) = nspids(nspid_lines[0])  # one value: numbered in the job's namespace
        assert grep_in_job < 1000, out  # small: the namespace holds the job's processes only
        init = next(line for line in lines if line.startswith("init "))
        assert init.split()[1:] == ["slurmstepd:", f"[{job}:namespace]"], out
        listed = {int(p) for p in next(x for x in lines if x.startswith("pids ")).split()[1:]}
        batch_in_job = nspids(Path(f"/proc/{batch}/status").read_text())[-1]
        assert {1, batch_in_job} <= listed, (out, batch_in_job)
        assert len(listed) < len(psutil.pids()), out  # not the node's process list
        assert token in lines, out
        assert "NO-FILE" not in lines, out
        m = re.search(r"^shell (\d+)$", out, re.MULTILINE)
        assert m is not None, out
        shell_in_job = int(m.group(1))
        assert shell_in_job in listed, out

        # the same, seen from the node: the session's shell below the monitor (once it has
        # exec'd `sleep`: READY is printed just before)
        shell = wait_for(
            lambda: [p for p in monitor.children(recursive=True) if named(p, "sleep")],
            timeout=5,
            what="the session's shell to exec sleep",
        )[0]
        session = [monitor, *monitor.children(recursive=True)]
        node_pid, in_job = nspids(Path(f"/proc/{shell.pid}/status").read_text())
        assert (node_pid, in_job) == (shell.pid, shell_in_job)  # nested: two pids
        assert ns_ino(shell.pid, "pid") == job_pidns
        assert ns_ino(shell.pid, "mnt") == job_mnt
        # the sshd monitor setns()ed itself: its mount namespace and its children's PID namespace
        # (setns(CLONE_NEWPID) leaves the caller's own pid where it was)
        assert ns_ino(monitor.pid, "mnt") == job_mnt
        assert ns_ino(monitor.pid, "pid_for_children") == job_pidns
        assert ns_ino(monitor.pid, "pid") == ns_ino("self", "pid")
        assert monitor.ppid() == site.sshds["n1"].pid

        # scancel ends the session and the client; the job leaves the queue
        clients = site.ssh_clients(heidi)
        assert clients
        slurm.cancel(job)
        wait_for(
            lambda: all(gone(p) for p in [*session, *clients]),
            timeout=15,
            what="the sshd session and the ssh client to exit after scancel",
        )
        wait_for(lambda: not slurm.job_state(job), timeout=15, what=f"job {job} to leave the queue")
    finally:
        with contextlib.suppress(Exception):
            if slurm.job_state(job):
                slurm.cancel(job)
        with contextlib.suppress(AssertionError):
            wait_for(lambda: all(gone(p) for p in session), timeout=15, what="the session gone")
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not slurm.job_state(job), timeout=15, what=f"job {job} gone")
