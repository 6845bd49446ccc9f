"""End to end on a two-node Slurm cluster in network namespaces: ssh between the nodes of a job.

One slurmd per node (tests/support/slurm_cluster.py), each in its node's network and UTS
namespaces, set up once per Slurm release (the ``slurm_release`` fixture: 22.05, 24.11, 26.05);
real sshd + pam_callerid.so, real agents with the slurm backend, one private journald. A two-node
job's batch step on node1 runs ssh to node2: node2's agent asks node1's over the CURVE mesh which
job the connection comes from, and adopts the sshd session through node2's slurmstepd into that
job's extern step on node2, as pam_slurm_adopt does.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import psutil
import pytest

from tests.support.cluster import require_cluster
from tests.support.poll import wait_for
from tests.support.slurm import CGROUP_ROOT, LOCK_TIMEOUT, require_slurm
from tests.support.slurm_cluster import SlurmCalleridCluster
from tests.support.slurm_release import SlurmRelease, release_names

# the set-up may wait for another process's LocalSlurm (the machine-wide lock)
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slurm,
    pytest.mark.root,
    pytest.mark.timeout(LOCK_TIMEOUT + 180),
]


@pytest.fixture(scope="module", params=release_names())
def slurm_release(request: pytest.FixtureRequest) -> SlurmRelease:
    """Each Slurm release in turn (its tree unpacked, its packages installed)."""
    return require_slurm(request.param)


@pytest.fixture(scope="module")
def sc(slurm_release: SlurmRelease) -> Iterator[SlurmCalleridCluster]:
    require_cluster()
    with SlurmCalleridCluster(2, release=slurm_release) as c:
        yield c
    left = c.cc.cluster.leftovers()
    assert not left, f"the cluster left things behind: {left}"


def gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def adopted_by(sc: SlurmCalleridCluster, node: str, job: str, pid: int) -> bool:
    """Whether ``node``'s slurmstepd of ``job``'s extern step logged adopting ``pid``."""
    line = rf"_handle_add_extern_pid_internal: for \S*\b{job}\.extern\S*, pid {pid}$"
    return re.search(line, sc.slurm.slurmd_log(node), re.MULTILINE) is not None


def test_ssh_to_another_node_of_the_job_lands_in_its_extern_step_there(
    sc: SlurmCalleridCluster,
) -> None:
    """The session is adopted by node2's stepd (its log says so, node1's does not) into the
    job's extern step. With Debian's 22.05 node2's cgroups are its own (``/slurm_node2``),
    so ``scontrol listpids`` on node1 does not list the session; the 24.11 and 26.05 trees
    put both nodes' steps of the job in one ``/slurm/...`` cgroup (one kernel), so there it
    does (`LocalSlurm.cgroup_prefix`)."""
    alice = sc.add_user()
    n1, n2 = sc.node("node1"), sc.node("node2")
    first = sc.submit(alice, nodes="node1,node2")
    job = sc.submit(alice, sc.ssh_script(alice, "node1", "node2"), nodes="node1,node2")
    session = sc.wait_session(alice)
    rec = sc.cc.next_decision(n2, alice, 0)
    assert (rec["CALLERID_DECISION"], rec["CALLERID_REASON"]) == ("adopt", "callerid"), rec
    assert (rec["CALLERID_JOB_ID"], rec["CALLERID_PEER_STATUS"]) == (job, "found")
    assert rec["CALLERID_SRC"].startswith(f"{n1.ipv4}:")
    assert rec["CALLERID_DST"] == f"{n2.ipv4}:22"
    monitor = int(rec["CALLERID_PID"])
    assert n2.sshd is not None and psutil.Process(monitor).ppid() == n2.sshd.pid

    wait_for(lambda: adopted_by(sc, "node2", job, monitor), timeout=5, what="node2's stepd log")
    assert not adopted_by(sc, "node1", job, monitor)
    extern = f"{sc.slurm.cgroup_prefix('node2')}/uid_{alice.uid}/job_{job}/step_extern"
    assert session.controller("freezer") == extern, session.cgroup
    assert (CGROUP_ROOT / "freezer" / extern.lstrip("/")).is_dir()
    on_node2 = sc.slurm.step_pids(job, "node2")
    assert monitor in on_node2["extern"], sc.slurm.listpids(job, "node2")
    assert session.shell_pid in on_node2["extern"]
    assert "batch" not in on_node2  # the batch step runs on node1
    if sc.slurm.release.multiple_slurmd:
        assert monitor not in sc.slurm.step_pids(job, "node1").get("extern", [])
    assert monitor not in sc.slurm.step_pids(first, "node2").get("extern", [])

    sessions = [psutil.Process(monitor), *psutil.Process(monitor).children(recursive=True)]
    clients = sc.ssh_clients(alice)
    assert len(sessions) >= 3 and clients  # monitor, user's sshd, shell (sleep)
    sc.slurm.cancel(job)
    wait_for(
        lambda: all(gone(p) for p in [*sessions, *clients]),
        timeout=15,
        what="the sshd session on node2 and the ssh client on node1 to exit after scancel",
    )
    assert sc.slurm.job_state(first) == "RUNNING"


def test_a_job_not_on_the_target_node_does_not_let_in(sc: SlurmCalleridCluster) -> None:
    """Like pam_slurm_adopt: a job on node1 only gives no access to node2."""
    bob = sc.add_user()
    sc.submit(bob, sc.ssh_script(bob, "node1", "node2"), nodes="node1")
    rec = sc.cc.next_decision("node2", bob, 0)
    assert (rec["CALLERID_DECISION"], rec["CALLERID_REASON"]) == ("deny", "no_jobs")
    err = sc.out / bob.name / "err"
    text = wait_for(
        lambda: err.read_text() if err.exists() and "ssh rc" in err.read_text() else "",
        timeout=10,
        what="the ssh client in bob's job to give up",
    )
    assert "Access denied by callerid: you have no active job on node2" in text
    assert "ssh rc 255" in text
