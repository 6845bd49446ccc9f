"""End to end: real ssh from inside a job, real sshd + pam_callerid.so, real agents, journald.

One 3-node virtual cluster (network namespaces, tests/support/callerid_cluster.py) for the
whole module. Each test uses its own user, so jobs and journal records never mix.
"""

from __future__ import annotations

import time

import pytest

from tests.support.callerid_cluster import CalleridCluster, cgroup_line
from tests.support.cluster import ClusterUser, Node

pytestmark = [pytest.mark.e2e, pytest.mark.root]

CAT_CGROUP = "cat /proc/self/cgroup"


@pytest.fixture
def user(cc: CalleridCluster) -> ClusterUser:
    return cc.cluster.add_user(password="cid-e2e-pw-" + str(len(cc.cluster.users)))


def extern(node: Node, job: str) -> str:
    return node.jobs.cgroup_path(job, "step_extern")


def login(
    cc: CalleridCluster,
    src: Node,
    dst: Node,
    user: ClusterUser,
    *,
    job: str | None = None,
    cmd: str = CAT_CGROUP,
    **kw: object,
) -> tuple[int, str, str, dict[str, object]]:
    """ssh from `src` (inside `job` if given) to `dst`; (rc, stdout, stderr, journal record)."""
    before = len(cc.decisions(dst, user))
    r = src.ssh(user, dst.name, cmd, job=job, **kw)  # type: ignore[arg-type]
    rec = cc.next_decision(dst, user, before)
    return r.returncode, r.stdout, r.stderr, rec


def test_ssh_from_a_job_lands_in_its_extern_step(cc: CalleridCluster, user: ClusterUser) -> None:
    n1, n2 = cc.cluster.node1, cc.cluster.node2
    n1.add_job("42", user)
    n2.add_job("42", user)
    rc, out, err, rec = login(cc, n1, n2, user, job="42")
    assert rc == 0, err
    assert cgroup_line(out) == extern(n2, "42")
    assert rec["CALLERID_DECISION"] == "adopt"
    assert rec["CALLERID_JOB_ID"] == "42"
    assert rec["CALLERID_REASON"] == "single_job"
    assert rec["CALLERID_SRC"].startswith(n1.ipv4 + ":")
    assert rec["CALLERID_DST"] == f"{n2.ipv4}:22"
    assert rec["CALLERID_UID"] == str(user.uid)
    assert rec["SYSLOG_IDENTIFIER"] == "callerid-agent"
    assert int(rec["CALLERID_LATENCY_US"]) > 0


def test_two_jobs_callerid_picks_the_one_the_ssh_came_from(
    cc: CalleridCluster, user: ClusterUser
) -> None:
    n1, n2 = cc.cluster.node1, cc.cluster.node2
    for job in ("50", "51"):
        n1.add_job(job, user)
        n2.add_job(job, user)
    for job in ("50", "51", "50"):  # the older one too: not "newest" by luck
        rc, out, err, rec = login(cc, n1, n2, user, job=job)
        assert rc == 0, err
        assert cgroup_line(out) == extern(n2, job)
        assert (rec["CALLERID_REASON"], rec["CALLERID_JOB_ID"]) == ("callerid", job)
        assert rec["CALLERID_PEER_STATUS"] == "found"


def test_outside_any_job_follows_the_unknown_policy(cc: CalleridCluster, user: ClusterUser) -> None:
    n1, n3 = cc.cluster.node1, cc.cluster.node3
    n3.add_job("60", user)
    n3.add_job("61", user)  # started later: the newest
    try:
        rc, out, _, rec = login(cc, n1, n3, user)
        assert rc == 0
        assert cgroup_line(out) == extern(n3, "61")
        assert (rec["CALLERID_REASON"], rec["CALLERID_PEER_STATUS"]) == (
            "unknown_newest",
            "not_found",
        )

        cc.set_policy(n3, unknown="random")
        seen = set()
        for _ in range(8):
            rc, out, _, rec = login(cc, n1, n3, user)
            assert rc == 0 and rec["CALLERID_REASON"] == "unknown_random"
            assert cgroup_line(out) == extern(n3, rec["CALLERID_JOB_ID"])
            seen.add(rec["CALLERID_JOB_ID"])
        assert seen <= {"60", "61"} and seen

        cc.set_policy(n3, unknown="deny")
        rc, out, err, rec = login(cc, n1, n3, user)
        assert rc == 255 and out == ""
        assert "cannot tell which of your jobs" in err
        assert (rec["CALLERID_DECISION"], rec["CALLERID_REASON"]) == ("deny", "unknown_deny")
    finally:
        cc.set_policy(n3, unknown="newest")


def test_no_job_on_the_target_is_denied_with_a_message(
    cc: CalleridCluster, user: ClusterUser
) -> None:
    n1, n2 = cc.cluster.node1, cc.cluster.node2
    n1.add_job("70", user)
    rc, out, err, rec = login(cc, n1, n2, user, job="70")
    assert rc == 255 and out == ""
    assert "Access denied by callerid: you have no active job on node2" in err
    assert (rec["CALLERID_DECISION"], rec["CALLERID_REASON"]) == ("deny", "no_jobs")
    assert rec["PRIORITY"] == "5"


def test_root_is_allowed_without_any_peer_query(cc: CalleridCluster) -> None:
    n2 = cc.cluster.node2
    before = len(cc.decisions(n2, "root"))
    t0 = time.monotonic()
    r = cc.pam_request(n2, "root")
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    rec = cc.next_decision(n2, "root", before)
    assert (rec["CALLERID_DECISION"], rec["CALLERID_REASON"]) == ("allow", "root")
    assert rec["CALLERID_PEER_STATUS"] == "skipped"
    assert "CALLERID_SRC" not in rec  # not even the connection was looked up
    assert int(rec["CALLERID_LATENCY_US"]) < 50_000
    assert elapsed < 1.0


@pytest.mark.parametrize("failure", ["stopped", "hung"])
def test_source_agent_down_decides_within_the_query_timeout(
    cc: CalleridCluster, user: ClusterUser, failure: str
) -> None:
    n1, n2 = cc.cluster.node1, cc.cluster.node2
    for job in ("80", "81"):
        n1.add_job(job, user)
        n2.add_job(job, user)
    if failure == "stopped":
        cc.cluster.stop_agent(n1)
    else:
        cc.cluster.hang_agent(n1)
    try:
        rc, out, err, rec = login(cc, n1, n2, user, job="80")
    finally:
        if failure == "stopped":
            cc.cluster.start_agent(n1)
        else:
            cc.cluster.resume_agent(n1)
    assert rc == 0, err
    assert rec["CALLERID_REASON"] == "unknown_newest"  # could not ask: the newest job
    assert cgroup_line(out) == extern(n2, "81")
    expected = {"stopped": "unreachable", "hung": "timeout"}[failure]
    assert rec["CALLERID_PEER_STATUS"] == expected
    latency_ms = int(rec["CALLERID_LATENCY_US"]) / 1000
    assert latency_ms < 500 + 250  # bounded by peer.timeout_ms, far below PAM's
    if failure == "stopped":
        assert latency_ms < 100  # refused at once, not at the deadline


def test_keyboard_interactive_session_stays_in_the_job(
    cc: CalleridCluster, user: ClusterUser
) -> None:
    n1, n2 = cc.cluster.node1, cc.cluster.node2
    for job in ("90", "91"):
        n1.add_job(job, user)
        n2.add_job(job, user)
    before = len(cc.decisions(n2, user))
    r = n1.ssh_password(user, "node2", CAT_CGROUP, job="90")
    assert r.returncode == 0, r.stderr
    rec = cc.next_decision(n2, user, before)
    assert cgroup_line(r.stdout) == extern(n2, "90"), (rec, n2.agent_log_text()[-3000:])
    assert (rec["CALLERID_REASON"], rec["CALLERID_JOB_ID"]) == ("callerid", "90")


def test_multi_hop_stays_in_the_job(cc: CalleridCluster, user: ClusterUser) -> None:
    n1, n2, n3 = cc.cluster.node1, cc.cluster.node2, cc.cluster.node3
    for node in (n1, n2, n3):
        node.add_job("100", user)
        node.add_job("101", user)
    hop = (
        "ssh -4 -o BatchMode=yes -o StrictHostKeyChecking=yes -o IdentitiesOnly=yes "
        f"-i {user.key} node3 {CAT_CGROUP}"
    )
    before3 = len(cc.decisions(n3, user))
    rc, out, err, rec2 = login(cc, n1, n2, user, job="100", cmd=hop)
    assert rc == 0, err
    assert cgroup_line(out) == extern(n3, "100")
    assert (rec2["CALLERID_REASON"], rec2["CALLERID_JOB_ID"]) == ("callerid", "100")
    rec3 = cc.next_decision(n3, user, before3)
    assert (rec3["CALLERID_REASON"], rec3["CALLERID_JOB_ID"]) == ("callerid", "100")
    assert rec3["CALLERID_SRC"].startswith(n2.ipv4 + ":")


def test_ipv6_between_namespaces(cc: CalleridCluster, user: ClusterUser) -> None:
    n1, n2 = cc.cluster.node1, cc.cluster.node2
    for job in ("110", "111"):
        n1.add_job(job, user)
        n2.add_job(job, user)
    rc, out, err, rec = login(cc, n1, n2, user, job="110", ipv6=True)
    assert rc == 0, err
    assert cgroup_line(out) == extern(n2, "110")
    assert (rec["CALLERID_REASON"], rec["CALLERID_JOB_ID"]) == ("callerid", "110")
    assert rec["CALLERID_SRC"].startswith(f"[{n1.ipv6}]:")
    assert rec["CALLERID_DST"] == f"[{n2.ipv6}]:22"
