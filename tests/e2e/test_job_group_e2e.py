"""End to end: the job's group reaches an ssh session adopted into the job.

A 3-node virtual cluster (tests/support/callerid_cluster.py: real sshd, ssh, pam_callerid.so
and agents on the cgroup backend). The job on the target node was started in a secondary group
of its user (as `sbatch --gid` or `newgrp; sbatch` start it); a login from inside the job gets
SLURM_JOB_GID and CALLERID_JOB_GID, set by the module in the account phase and passed on by
sshd (pam_getenvlist after the session is opened), while the shell itself still runs with the
user's primary group: OpenSSH sets it after PAM. packaging/profile.d/callerid-job-group.sh
switches an interactive login shell to the job's group; it is checked here with a real shell
and sg, outside sshd (installing it into the cluster's /etc/profile.d would touch the host).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.callerid_cluster import CalleridCluster
from tests.support.cluster import ClusterUser
from tests.support.poll import wait_for
from tests.support.users import secondary_group

pytestmark = [pytest.mark.e2e, pytest.mark.root]

SNIPPET = Path(__file__).resolve().parents[2] / "packaging" / "profile.d" / "callerid-job-group.sh"


@pytest.fixture
def user(cc: CalleridCluster) -> ClusterUser:
    return cc.cluster.add_user()


@pytest.fixture
def job_group(user: ClusterUser) -> Iterator[int]:
    """A throwaway group with ``user`` as a secondary member; its gid."""
    with secondary_group(user.name) as gid:
        yield gid


def _egid(pid: int) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x[:4] == "Gid:")
    return int(line.split()[2])


def test_the_jobs_group_reaches_the_session_environment(
    cc: CalleridCluster, user: ClusterUser, job_group: int
) -> None:
    n1, n2 = cc.cluster.node1, cc.cluster.node2
    n1.add_job("70", user)
    n2.add_job("70", user)
    # the job's first process on node2 runs with the secondary group, as the job was started
    switch = ["setpriv", f"--reuid={user.uid}", f"--regid={job_group}", "--init-groups"]
    first = n2.jobs.spawn_in("70", "step_batch", [*n2.entry(), *switch, "sleep", "600"])
    cc.cluster.track(first)
    wait_for(lambda: _egid(first.pid) == job_group, what="the job's process to take its group")

    cmd = 'echo "job=$SLURM_JOB_ID gids=$SLURM_JOB_GID,$CALLERID_JOB_GID shell=$(id -g)"'
    r = n1.ssh(user, n2.name, cmd, job="70")
    assert r.returncode == 0, r.stderr
    rec = cc.next_decision(n2, user, 0)
    assert (rec["CALLERID_DECISION"], rec["CALLERID_JOB_ID"]) == ("adopt", "70")
    # the environment names the job's group; sshd started the shell in the primary one
    assert r.stdout.split() == ["job=70", f"gids={job_group},{job_group}", f"shell={user.gid}"]

    # a job started in the primary group tells that group
    n1.add_job("71", user)
    n2.add_job("71", user)
    n2.run_in_job("71", user, ["sleep", "600"])
    r = n1.ssh(user, n2.name, 'echo "$CALLERID_JOB_ID $SLURM_JOB_GID"', job="71")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["71", str(user.gid)]


def _shell(user: ClusterUser, gid: int | str | None, flags: str, script: str) -> str:
    """Source the snippet in a bash run as ``user`` (primary group), then run ``script`` in
    whatever shell is left; stdout."""
    env = ["env", f"HOME={user.home}", "SHELL=/bin/bash", "PS1=", "TERM=dumb"]
    if gid is not None:
        env.append(f"CALLERID_JOB_GID={gid}")
    switch = ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups"]
    argv = [*switch, *env, "bash", "--norc", "--noprofile", flags, f". {SNIPPET}"]
    r = subprocess.run(argv, input=script, capture_output=True, text=True, timeout=30)
    return r.stdout


def test_the_profile_snippet_switches_interactive_shells_only(
    cc: CalleridCluster, user: ClusterUser, job_group: int
) -> None:
    probe = 'echo "gid=$(id -g) switched=${CALLERID_JOB_GROUP_SWITCHED-no}"\nexit\n'
    # interactive: replaced by a login shell in the job's group, which reads the rest of stdin
    assert f"gid={job_group} switched=1" in _shell(user, job_group, "-ic", probe)
    # not interactive (ssh node cmd, ssh node < script): left alone, stdin untouched
    assert _shell(user, job_group, "-c", probe) == ""  # the -c script ran; nobody read stdin
    # no variable, the current group already, a group the user is not in, not a number:
    # the shell goes on (here: its -c script ends) and nothing reads stdin
    for gid in (None, str(user.gid), "0", "12x", "-1"):
        assert _shell(user, gid, "-ic", probe) == "", gid
