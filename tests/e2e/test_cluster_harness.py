"""The virtual-cluster harness itself, with a plain PAM stack (no callerid).

One 3-node cluster (IPv4 + IPv6) serves the module; one small 2-node cluster with a stand-in
agent and per-node account lines checks the agent controls, the PAM line and the teardown.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cluster import Cluster, ClusterUser, Node, require_cluster, socket_listening
from tests.support.poll import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.root]


def _ssh_connection(stdout: str) -> list[str]:
    """The SSH_CONNECTION words (client ip, client port, server ip, server port)."""
    line = next(ln for ln in stdout.splitlines() if ln.startswith("SSH_CONNECTION="))
    return line.removeprefix("SSH_CONNECTION=").split()


def test_nodes_are_namespaces_invisible_from_the_host(plain_cluster: Cluster) -> None:
    host_addrs = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for node in plain_cluster:
        assert node.netns in netns
        assert node.ipv4 not in host_addrs
        assert str(node.ipv6) not in host_addrs
        r = node.run(["sh", "-c", "hostname; ip -o addr show dev eth0"])
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[0] == node.name
        assert f"inet {node.ipv4}/24" in r.stdout
        assert f"inet6 {node.ipv6}/64" in r.stdout
        # the node's /etc/hosts names every node, with both addresses
        for family in ("ahostsv4", "ahostsv6"):
            found = node.run(["getent", family, "node2"]).stdout.split()
            assert found[:3] == [
                plain_cluster.node2.address(ipv6=family.endswith("6")),
                "STREAM",
                "node2",
            ]
    assert "node2" not in Path("/etc/hosts").read_text()
    assert socket.gethostname() != "node1"


def test_ssh_by_name_reports_both_ends(plain_cluster: Cluster, plain_user: ClusterUser) -> None:
    n1, n2 = plain_cluster.node1, plain_cluster.node2
    r = n1.ssh(plain_user, n2, "echo SSH_CONNECTION=$SSH_CONNECTION; hostname; id -un")
    assert r.returncode == 0, r.stderr
    client_ip, _port, server_ip, server_port = _ssh_connection(r.stdout)
    assert (client_ip, server_ip, server_port) == (n1.ipv4, n2.ipv4, "22")
    assert r.stdout.splitlines()[1:] == ["node2", plain_user.name]
    wait_for(
        lambda: f"Accepted publickey for {plain_user.name}" in n2.sshd_log_text(),
        what="the login in node2's sshd log",
    )


def test_ssh_over_ipv6(plain_cluster: Cluster, plain_user: ClusterUser) -> None:
    n3, n1 = plain_cluster.node3, plain_cluster.node1
    r = n3.ssh(plain_user, n1, "echo SSH_CONNECTION=$SSH_CONNECTION", ipv6=True)
    assert r.returncode == 0, r.stderr
    client_ip, _port, server_ip, _ = _ssh_connection(r.stdout)
    assert (client_ip, server_ip) == (n3.ipv6, n1.ipv6)


def test_unknown_host_key_is_refused(plain_cluster: Cluster, plain_user: ClusterUser) -> None:
    """StrictHostKeyChecking is really on: an empty known_hosts makes ssh fail."""
    n1 = plain_cluster.node1
    empty = plain_user.ssh_dir / "empty_known_hosts"
    empty.touch()
    r = n1.ssh(plain_user, "node2", "true", extra_opts=["-o", f"UserKnownHostsFile={empty}"])
    assert r.returncode == 255
    assert "Host key verification failed" in r.stderr


def test_ssh_from_a_job_runs_the_client_in_the_job(
    plain_cluster: Cluster, plain_user: ClusterUser
) -> None:
    n1, n2 = plain_cluster.node1, plain_cluster.node2
    job_dir = n1.add_job("7", plain_user)
    assert job_dir.is_dir()
    argv = n1.ssh_argv(plain_user, n2, "echo ready; exec cat")
    proc = n1.run_in_job(
        "7", plain_user, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline() == "ready\n"  # the session is up, the client still runs
    assert Path(f"/proc/{proc.pid}/comm").read_text().strip() == "ssh"
    assert n1.jobs.cgroup_of(proc.pid) == n1.jobs.cgroup_path("7", "step_batch")
    assert os.stat(f"/proc/{proc.pid}/ns/net").st_ino == os.stat(f"/run/netns/{n1.netns}").st_ino
    session_uids = {p.uids().real for p in n2.sshd_sessions()}
    assert plain_user.uid in session_uids
    proc.stdin.close()
    assert proc.wait(30) == 0
    assert proc.stdout.read() == ""
    proc.stdout.close()


def test_ssh_outside_a_job_is_in_no_job(plain_cluster: Cluster, plain_user: ClusterUser) -> None:
    n1 = plain_cluster.node1
    r = n1.run(["cat", "/proc/self/cgroup"], user=plain_user)
    assert r.returncode == 0, r.stderr
    assert n1.jobs.name not in r.stdout


def test_keyboard_interactive_with_sshpass(plain_cluster: Cluster, plain_user: ClusterUser) -> None:
    n2, n3 = plain_cluster.node2, plain_cluster.node3
    r = n2.ssh_password(plain_user, n3, "echo SSH_CONNECTION=$SSH_CONNECTION")
    assert r.returncode == 0, r.stderr
    assert _ssh_connection(r.stdout)[2] == n3.ipv4
    bad = n2.ssh_password(plain_user, n3, "true", password="wrong")
    assert bad.returncode != 0
    assert f"keyboard-interactive/pam for {plain_user.name}" in n3.sshd_log_text()


def test_sshd_runs_under_its_own_pam_service(plain_cluster: Cluster) -> None:
    for node in plain_cluster:
        assert node.sshd is not None and node.sshd.poll() is None
        assert Path(f"/proc/{node.sshd.pid}/exe").resolve() == Path("/usr/sbin/sshd")
        assert os.readlink(node.sshd_bin) == "/usr/sbin/sshd"
        assert node.pam_file.name == node.sshd_bin.name == f"sshd-{node.netns}"
        rules = [ln.split() for ln in node.pam_file.read_text().splitlines() if ln[:1].isalpha()]
        assert [r[:3] for r in rules if r[0] == "session"] == [
            ["session", "required", "pam_unix.so"]
        ]
        assert [r[:3] for r in rules if r[0] == "account"][-1] == [
            "account",
            "required",
            "pam_unix.so",
        ]
        assert node.sshd_log.exists()


# ---------------------------------------------------------------- agent controls and teardown

# A stand-in agent: answers "pong <hostname>" on a unix socket, one line per connection.
FAKE_AGENT = """
import os, socket, sys
path = sys.argv[1]
srv = socket.socket(socket.AF_UNIX)
srv.bind(path); srv.listen(16)
print("agent up on", socket.gethostname(), flush=True)
while True:
    conn, _ = srv.accept()
    try:
        conn.recv(64); conn.sendall(b"pong " + socket.gethostname().encode() + b"\\n")
    except OSError:
        pass  # the asker gave up (e.g. while we were stopped)
    conn.close()
"""


def _agent_sock(node: Node) -> Path:
    return node.run_dir / "agent.sock"


def _fake_agent(node: Node) -> list[str]:
    _agent_sock(node).unlink(missing_ok=True)  # left by the previous agent (restart)
    return [sys.executable, "-c", FAKE_AGENT, str(_agent_sock(node))]


def _ask(node: Node, timeout: float = 5.0) -> str:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(_agent_sock(node)))
        s.sendall(b"ping\n")
        return s.recv(64).decode()


def _pam_line(node: Node) -> str:
    return "account requisite pam_deny.so" if node.index == 2 else "account required pam_permit.so"


def _mark_nodes(cluster: Cluster) -> None:
    for node in cluster:
        (node.dir / "before").touch()


def test_agents_pam_line_and_teardown_after_a_failure() -> None:
    require_cluster()
    cluster = Cluster(
        2,
        ipv6=False,
        pam_account_line=_pam_line,
        agent_cmd=_fake_agent,
        agent_ready=socket_listening(_agent_sock),
        before_agents=_mark_nodes,
    )
    with pytest.raises(RuntimeError, match="test failure"), cluster:
        n1, n2 = cluster.node1, cluster.node2
        assert (n2.dir / "before").exists()
        assert _ask(n1) == "pong node1\n"
        assert "agent up on node2" in n2.agent_log_text()
        assert n1.agent is not None
        agent_net = os.stat(f"/proc/{n1.agent.pid}/ns/net").st_ino
        assert agent_net == os.stat(f"/run/netns/{n1.netns}").st_ino

        cluster.hang_agent(n1)
        with pytest.raises(TimeoutError):
            _ask(n1, timeout=0.3)  # a stopped agent accepts (backlog) but never answers
        cluster.resume_agent(n1)
        assert _ask(n1) == "pong node1\n"
        old_pid = n1.agent.pid
        cluster.restart_agent(n1)
        assert n1.agent.pid != old_pid
        assert _ask(n1) == "pong node1\n"
        cluster.stop_agent(n2)
        assert n2.agent is None
        assert _agent_sock(n2).exists()  # stale socket file: not ready, not listening
        assert not n2.unix_listening(_agent_sock(n2))

        user = cluster.add_user()
        denied = n1.ssh(user, n2, "true")  # node2's account line is pam_deny
        assert denied.returncode == 255
        assert "by PAM account configuration" in n2.sshd_log_text()
        allowed = n2.ssh(user, n1, "hostname")
        assert (allowed.returncode, allowed.stdout) == (0, "node1\n"), allowed.stderr
        cluster.set_pam_account_line(n2, None)  # sshd reads its PAM service per connection
        assert n1.ssh(user, n2, "true").returncode == 0

        n1.add_job("5", user)
        job_proc = n1.run_in_job("5", user, ["cat"], stdin=subprocess.PIPE)
        session = n2.popen(n2.ssh_argv(user, n1, "exec cat"), user=user, stdin=subprocess.PIPE)
        wait_for(n1.sshd_sessions, what="an open ssh session on node1")
        raise RuntimeError("test failure")
    assert job_proc.poll() is not None
    assert session.poll() is not None
    assert cluster.leftovers() == []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert cluster.prefix not in netns
    assert not Path(f"/etc/pam.d/sshd-{cluster.prefix}-node1").exists()
    assert not user.home.exists()


def test_a_failed_set_up_is_undone() -> None:
    require_cluster()
    cluster = Cluster(2, agent_cmd=lambda node: ["false"], agent_ready=lambda node: False)
    with pytest.raises(RuntimeError, match="agent on node1 exited"), cluster:
        pytest.fail("the cluster should not have come up")
    assert cluster.node1.sshd is not None  # it got as far as sshd
    assert cluster.leftovers() == []
