"""End to end with real Slurm: ssh from inside a Slurm job, adopted into its extern step.

A real one-node Slurm (tests/support/slurm.py), real OpenSSH sshds with the real pam_callerid.so,
real callerid agents with ``backend: {type: slurm}`` and a private journald
(tests/support/slurm_site.py), set up once per Slurm release (the ``slurm_release`` fixture: 22.05,
24.11, 26.05) for all the module's tests. Each test uses its own users and jobs. The ssh client
runs in a job's batch step (sbatch); the login lands on this same Slurm node, either at n1
(127.0.0.1: the agent answers the source question itself) or at n2 (127.0.0.2: n2's agent asks n1's
over the CURVE mesh). What Slurm itself says is checked: ``scontrol listpids`` lists the adopted
sshd under the extern step, the remote shell is in the extern step's freezer cgroup, and
``scancel`` ends the session. Also: the single-job shortcut, a user with no job denied with
callerid's message, another user's job never adopted, and the machine-wide LocalSlurm lock.
tests/e2e/test_slurm_cluster_e2e.py does the same between two slurmd nodes in network namespaces.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.support.poll import wait_for
from tests.support.slurm import (
    CGROUP_ROOT,
    LOCK_FILE,
    LOCK_TIMEOUT,
    LocalSlurm,
    SlurmError,
    namespaces_under_test,
    require_slurm,
)
from tests.support.slurm_release import SlurmRelease, release_names
from tests.support.slurm_site import ADDRESSES, REMOTE_CMD, Session, SiteUser, SlurmSite
from tests.support.users import require_useradd

# the first test may wait for another process's LocalSlurm (the machine-wide lock)
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slurm,
    pytest.mark.root,
    pytest.mark.timeout(LOCK_TIMEOUT + 180),
]

PAM_TIMEOUT_US = 2_000_000


@pytest.fixture(scope="module", params=release_names())
def slurm_release(request: pytest.FixtureRequest) -> SlurmRelease:
    """Each Slurm release in turn (its tree unpacked, its packages installed)."""
    return require_slurm(request.param)


@pytest.fixture(scope="module")
def slurm(slurm_release: SlurmRelease) -> Iterator[LocalSlurm]:
    require_useradd()
    if not Path("/usr/sbin/sshd").exists():
        pytest.skip("/usr/sbin/sshd is missing (apt-get install openssh-server)")
    with LocalSlurm(slurm_release, namespaces=namespaces_under_test(slurm_release)) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def site(slurm: LocalSlurm) -> Iterator[SlurmSite]:
    with SlurmSite(slurm) as s:
        yield s


def extern_freezer(slurm: LocalSlurm, user: SiteUser, job: str) -> str:
    return f"{slurm.cgroup_prefix()}/uid_{user.uid}/job_{job}/step_extern"


def gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def assert_in_extern_step(
    site: SlurmSite, node: str, user: SiteUser, job: str, rec: dict[str, str], s: Session
) -> None:
    """What Slurm and the kernel say about a session adopted at ``node``."""
    slurm = site.slurm
    monitor = int(rec["CALLERID_PID"])
    assert psutil.Process(monitor).ppid() == site.sshds[node].pid  # the per-connection monitor
    extern = extern_freezer(slurm, user, job)
    assert s.controller("freezer") == extern, s.cgroup
    assert (CGROUP_ROOT / "freezer" / extern.lstrip("/")).is_dir()
    steps = slurm.step_pids(job)
    assert monitor in steps["extern"], slurm.listpids(job)
    assert s.shell_pid in steps["extern"], slurm.listpids(job)
    assert monitor not in steps.get("batch", [])


def assert_scancel_ends_session(
    slurm: LocalSlurm, site: SlurmSite, user: SiteUser, job: str, rec: dict[str, str]
) -> None:
    """scancel ends the sshd session (the monitor and everything below it) and the client."""
    monitor = psutil.Process(int(rec["CALLERID_PID"]))
    session = [monitor, *monitor.children(recursive=True)]
    clients = site.ssh_clients(user)
    assert len(session) >= 3 and clients  # monitor, user's sshd, shell (sleep)
    slurm.cancel(job)
    wait_for(
        lambda: all(gone(p) for p in [*session, *clients]),
        timeout=15,
        what="the sshd session and the ssh client to exit after scancel",
    )


@pytest.mark.parametrize("node", ["n1", "n2"])
def test_ssh_from_the_second_job_is_adopted_into_it(
    slurm: LocalSlurm, site: SlurmSite, node: str
) -> None:
    """Two jobs: the source is asked (n1 answers itself, n2 asks n1 over the mesh)."""
    alice = site.add_user()
    first = site.submit(alice)
    job = site.submit(alice, site.ssh_script(alice, node))
    session = site.wait_session(alice)
    rec = site.decision(node, alice)
    assert (rec["CALLERID_DECISION"], rec["CALLERID_REASON"]) == ("adopt", "callerid"), rec
    assert rec["CALLERID_JOB_ID"] == job
    assert rec["CALLERID_PEER_STATUS"] == ("local" if node == "n1" else "found")
    assert rec["CALLERID_SRC"].startswith("127.0.0.1:")
    assert rec["CALLERID_DST"] == f"{ADDRESSES[node]}:{site.ssh_ports[node]}"
    assert 0 < int(rec["CALLERID_LATENCY_US"]) < PAM_TIMEOUT_US
    assert_in_extern_step(site, node, alice, job, rec, session)
    assert session.shell_pid not in slurm.step_pids(first).get("extern", [])

    assert_scancel_ends_session(slurm, site, alice, job, rec)
    assert slurm.job_state(first) == "RUNNING"  # the other job is untouched


def test_single_job_is_adopted_without_asking(slurm: LocalSlurm, site: SlurmSite) -> None:
    carol = site.add_user()
    job = site.submit(carol, site.ssh_script(carol, "n2"))
    session = site.wait_session(carol)
    rec = site.decision("n2", carol)
    assert (rec["CALLERID_DECISION"], rec["CALLERID_REASON"]) == ("adopt", "single_job"), rec
    assert (rec["CALLERID_JOB_ID"], rec["CALLERID_PEER_STATUS"]) == (job, "skipped")
    assert_in_extern_step(site, "n2", carol, job, rec, session)
    assert_scancel_ends_session(slurm, site, carol, job, rec)


def test_the_session_sees_the_jobs_private_tmp(slurm: LocalSlurm, site: SlurmSite) -> None:
    """``ssh node cat /tmp/<file the batch script wrote>``: with job_container/tmpfs (24.11) and
    namespace/tmpfs (26.05) the adopted session is in the job's mount namespace (the PAM
    module entered the fds the agent got from the stepd), where the file is; the node's /tmp
    has no such file. With 22.05 (no plugin) job and session share the node's /tmp."""
    grace = site.add_user()
    token = secrets.token_hex(6)
    path = f"/tmp/cid-ns-{token}"
    script = site.ssh_script(
        grace,
        "n1",
        prelude=f"echo {token} > {path}\n",
        command=f"cat {path} || echo NO-FILE; {REMOTE_CMD}",
    )
    try:
        job = site.submit(grace, script)
        session = site.wait_session(grace)
        rec = site.decision("n1", grace)
        assert (rec["CALLERID_DECISION"], rec["CALLERID_JOB_ID"]) == ("adopt", job), rec
        out = (grace.out_dir / "out").read_text()
        assert out.splitlines()[0] == token, out
        batch = slurm.step_pids(job)["batch"][0]
        job_mnt = os.stat(f"/proc/{batch}/ns/mnt").st_ino
        assert os.stat(f"/proc/{session.shell_pid}/ns/mnt").st_ino == job_mnt
        if slurm.namespaces is None:
            assert Path(path).read_text() == f"{token}\n"
            assert job_mnt == os.stat("/proc/self/ns/mnt").st_ino
        else:
            assert not Path(path).exists()  # only in the job's /tmp
            assert job_mnt != os.stat("/proc/self/ns/mnt").st_ino
            monitor = int(rec["CALLERID_PID"])  # the sshd itself entered it
            assert os.stat(f"/proc/{monitor}/ns/mnt").st_ino == job_mnt
        assert_in_extern_step(site, "n1", grace, job, rec, session)
        assert_scancel_ends_session(slurm, site, grace, job, rec)
    finally:
        Path(path).unlink(missing_ok=True)


def test_no_job_is_denied_with_the_callerid_message(slurm: LocalSlurm, site: SlurmSite) -> None:
    dave = site.add_user()
    r = site.ssh_outside_jobs(dave, "n1")
    assert r.returncode == 255 and r.stdout == ""
    assert f"Access denied by callerid: you have no active job on {site.agent_name('n1')}" in (
        r.stderr
    )
    rec = site.decision("n1", dave)
    assert (rec["CALLERID_DECISION"], rec["CALLERID_REASON"]) == ("deny", "no_jobs")
    wait_for(lambda: not site.sshd_sessions("n1"), timeout=5, what="the denied session gone")


def test_another_users_job_is_never_adopted(slurm: LocalSlurm, site: SlurmSite) -> None:
    """bob, in his job, logs in as alice (he has her key): alice's login must not land in
    bob's job; n1 finds the connection's owner is not alice and says nothing."""
    alice, bob = site.add_user(), site.add_user()
    older = site.submit(alice)
    newest = site.submit(alice)
    key = site.give_key(alice, bob)
    bobs = site.submit(bob, site.ssh_script(bob, "n2", login=alice, key=key))
    session = site.wait_session(bob)
    rec = site.decision("n2", alice)
    assert (rec["CALLERID_DECISION"], rec["CALLERID_REASON"]) == ("adopt", "unknown_newest")
    assert rec["CALLERID_PEER_STATUS"] == "not_found"
    assert rec["CALLERID_JOB_ID"] == newest != bobs
    assert session.controller("freezer") == extern_freezer(slurm, alice, newest)
    assert int(rec["CALLERID_PID"]) not in slurm.step_pids(bobs).get("extern", [])
    assert int(rec["CALLERID_PID"]) not in slurm.step_pids(older).get("extern", [])
    assert not site.decisions("n2", bob)  # the login was alice's, never bob's


def test_a_second_local_slurm_waits_for_the_lock_and_touches_nothing(
    slurm: LocalSlurm, site: SlurmSite
) -> None:
    """The running cluster holds the machine-wide lock; another LocalSlurm (here a second
    open file description, as another process would have) waits, gives up, changes nothing."""
    conf = slurm.conf.read_bytes()
    assert LOCK_FILE.read_text().strip() == str(os.getpid())
    t0 = time.monotonic()
    with (
        pytest.raises(SlurmError, match=str(LOCK_FILE)),
        LocalSlurm(slurm.release, lock_timeout=0.5),
    ):
        pass
    assert time.monotonic() - t0 >= 0.5
    assert slurm.conf.read_bytes() == conf
    assert slurm.spool_dir.is_dir()
    assert LOCK_FILE.read_text().strip() == str(os.getpid())
    ellen = site.add_user()  # the running cluster still works
    job = site.submit(ellen)
    assert slurm.extern_socket(job).exists()
