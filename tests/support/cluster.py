"""A virtual cluster on this one machine, shared by the end-to-end tests and `make demo`.

    with Cluster(3, pam_account_line=lambda node: f"account required {so} socket=...") as c:
        alice = c.add_user()
        c.node1.add_job("42", alice)
        r = c.node1.ssh(alice, "node2", "cat /proc/self/cgroup", job="42")

Each node is a network namespace `<prefix>-nodeI` (prefix `cid` + 4 hex digits) with its own
UTS namespace (`hostname` says `nodeI`). The nodes are joined by a bridge that lives in its own
namespace `<prefix>-br`; their addresses (a private IPv4 /24 and an IPv6 ULA /64) exist only
inside the namespaces: nothing is added to the host's network namespace. All nodes share one
mount namespace, a copy of the host's where only /etc/hosts is replaced by a file naming the
nodes; we enter nodes with `nsenter` rather than `ip netns exec` because the latter remounts
/sys and so hides /sys/fs/cgroup (the jobs). /etc/netns/<ns>/hosts is written too, for people
who do use `ip netns exec`.

Every node runs a real OpenSSH sshd under its own PAM service (`sshd-<prefix>-nodeI`, the
basename of sshd's argv[0]) whose account stack starts with the caller's line, and optionally
the caller's agent. Users are throwaway accounts (tests/support/users.py) with an ssh key that
every node accepts and a known_hosts naming every node. Jobs are cgroups (one JobTree of
tests/support/cgroups.py per node). Everything is torn down in reverse order, even when the
block fails; `leftovers()` lists whatever of ours is still there.

`python -m tests.support.cluster --nodes 3 --hold` brings a cluster up for a human.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from tests.support import users as _users
from tests.support._cluster_node import SSH_PORT, ClusterUser, Node
from tests.support._cluster_sys import (
    delete_netns,
    kill_tree,
    kill_user_processes,
    pam_service_text,
    rmdir_if_empty,
    sh,
    sshd_config_text,
    umount,
    unlink,
    user_exists,
)
from tests.support.cgroups import JobTree, Mode, require_cgroups
from tests.support.poll import wait_for

__all__ = ["Cluster", "ClusterUser", "Node", "require_cluster", "socket_listening"]

log = logging.getLogger(__name__)

PAM_DIR = Path("/etc/pam.d")
NETNS_ETC = Path("/etc/netns")
PRIVSEP_DIR = Path("/run/sshd")  # sshd refuses to start without it; shared, never removed

AgentCmd = Callable[[Node], Sequence[str]]
AgentPrefix = Sequence[str] | Callable[[Node], Sequence[str]]
AgentReady = Callable[[Node], object]
PamLine = str | Callable[[Node], str | None]


def socket_listening(path: Callable[[Node], Path]) -> AgentReady:
    """An `agent_ready` predicate: ready once a unix socket at `path(node)` listens in the
    node (a stale socket file from an earlier agent does not count)."""
    return lambda node: node.unix_listening(path(node))


CLUSTER_TOOLS: tuple[str, ...] = ("ip", "nsenter", "unshare", "setpriv", "ssh", "ssh-keygen")
CLUSTER_TOOLS += ("sshpass", "chpasswd", "useradd", "userdel", "mount", "umount")


def require_cluster(cgroup_mode: Mode = "v2") -> None:
    """Skip the calling test unless a virtual cluster can be built here."""
    if os.geteuid() != 0:
        pytest.skip("the virtual cluster needs root (namespaces, sshd, users, cgroups)")
    missing = [tool for tool in CLUSTER_TOOLS if shutil.which(tool) is None]
    if not Path("/usr/sbin/sshd").exists():
        missing.append("/usr/sbin/sshd (openssh-server)")
    if missing:
        pytest.skip(f"the virtual cluster needs: {', '.join(missing)}")
    require_cgroups(cgroup_mode)


class Cluster:
    """N nodes as network namespaces, each with sshd (own PAM service) and optional agent.

    `pam_account_line`: text (or `node -> text`) put first in the account stack of every
    node's PAM service, e.g. `account required pam_callerid.so socket={node.run_dir}/agent.sock`.
    `agent_cmd(node) -> argv` is called just before each start of a node's agent (it may write
    the node's config into `node.dir`); `before_agents(cluster)` runs once, after every sshd
    is up and before the first agent starts (e.g. to make every node's keys). The agent runs
    `agent_prefix` + nsenter into the node + argv, output appended to `node.agent_log`; with
    `agent_ready(node)` the start waits (`agent_timeout` s) until it is truthy.
    `hosts_ipv6=False` makes node names resolve to IPv4 only (by default glibc prefers our
    ULA IPv6 address for a plain `ssh node2`).
    """

    def __init__(
        self,
        n: int = 3,
        *,
        ipv6: bool = True,
        pam_account_line: PamLine | None = None,
        agent_cmd: AgentCmd | None = None,
        agent_prefix: AgentPrefix = (),
        agent_ready: AgentReady | None = None,
        agent_timeout: float = 15.0,
        before_agents: Callable[[Cluster], None] | None = None,
        name_prefix: str | None = None,
        cgroup_mode: Mode = "v2",
        sshd_log_level: str = "DEBUG1",
        hosts_ipv6: bool = True,
    ) -> None:
        if not 1 <= n <= 250:
            msg = f"n must be 1..250, not {n}"
            raise ValueError(msg)
        self.prefix = name_prefix or f"cid{secrets.token_hex(2)}"
        self.ipv6 = ipv6
        self.pam_account_line = pam_account_line
        self.agent_cmd = agent_cmd
        self.agent_prefix = agent_prefix
        self.agent_ready = agent_ready
        self.agent_timeout = agent_timeout
        self.before_agents = before_agents
        self.cgroup_mode = cgroup_mode
        self.sshd_log_level = sshd_log_level
        self.hosts_ipv6 = ipv6 and hosts_ipv6
        rnd = secrets.randbelow(2**16)
        self.subnet4 = ipaddress.IPv4Network(f"10.{200 + rnd % 51}.{rnd >> 8}.0/24")
        self.subnet6 = ipaddress.IPv6Network(f"fd00:{secrets.token_hex(2)}:{rnd:x}::/64")
        self.bridge_netns = f"{self.prefix}-br"
        self.dir = Path("/nonexistent")
        self.mount_ns = Path("/nonexistent")
        self.hosts_file = Path("/nonexistent")
        self.nodes = [Node(self, i) for i in range(1, n + 1)]
        self.users: list[ClusterUser] = []
        self._stack = contextlib.ExitStack()
        self._procs: list[subprocess.Popen[Any]] = []
        self._cgroup_roots: list[Path] = []

    # -- lookup ---------------------------------------------------------------------------

    def node(self, name: str | int) -> Node:
        """The node called `name` ("node2"), or with that index (2)."""
        for node in self.nodes:
            if name in (node.name, node.index, node.netns):
                return node
        msg = f"no node {name!r} in {self.prefix}"
        raise KeyError(msg)

    def __getattr__(self, name: str) -> Node:
        if name.startswith("node") and name[4:].isdigit():
            return self.node(name)
        raise AttributeError(name)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def track(self, proc: subprocess.Popen[Any]) -> None:
        """End `proc` (and its descendants) at teardown, before anything else is undone."""
        self._procs.append(proc)

    # -- life cycle -----------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        if os.geteuid() != 0:
            msg = "the virtual cluster needs root (namespaces, sshd, users, cgroups)"
            raise PermissionError(msg)
        try:
            self._set_up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop every process we started, then undo every set-up step (idempotent)."""
        self._stop_processes()
        self._stack.close()

    def _set_up(self) -> None:
        stack = self._stack
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-", dir="/tmp"))
        stack.callback(shutil.rmtree, self.dir, ignore_errors=True)
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        self._write_hosts()
        self._make_mount_ns()
        self._make_netns(self.bridge_netns)
        sh(["ip", "-n", self.bridge_netns, "link", "add", "br0", "type", "bridge"])
        sh(["ip", "-n", self.bridge_netns, "link", "set", "br0", "up"])
        for node in self.nodes:
            self._make_node_net(node)
        for node in self.nodes:
            self._make_node_rest(node)
        for node in self.nodes:
            self._wait_sshd(node)
        if self.before_agents is not None:
            self.before_agents(self)
        if self.agent_cmd is not None:
            for node in self.nodes:
                self.start_agent(node)

    def _write_hosts(self) -> None:
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        for node in self.nodes:
            lines.append(f"{node.ipv4}\t{node.name}")
            if self.hosts_ipv6:
                lines.append(f"{node.ipv6}\t{node.name}")
        self.hosts_file = self.dir / "hosts"
        self.hosts_file.write_text("\n".join(lines) + "\n")
        self.hosts_file.chmod(0o644)

    def _make_mount_ns(self) -> None:
        """One mount namespace for all nodes: the host's mounts, with our /etc/hosts."""
        self.mount_ns = self.dir / "mnt.ns"
        self.mount_ns.touch()
        # slave: host umounts (e.g. `ip netns del`) propagate in, so we pin nothing of others'
        sh(
            [
                "unshare",
                f"--mount={self.mount_ns}",
                "--propagation",
                "slave",
                "mount",
                "--bind",
                str(self.hosts_file),
                "/etc/hosts",
            ]
        )
        self._stack.callback(umount, self.mount_ns)

    def _make_netns(self, name: str) -> None:
        sh(["ip", "netns", "add", name])
        self._stack.callback(delete_netns, name)
        sh(["ip", "-n", name, "link", "set", "lo", "up"])

    def _make_node_net(self, node: Node) -> None:
        self._make_netns(node.netns)
        br, ns = self.bridge_netns, node.netns
        port = f"p{node.index}"
        sh(["ip", "-n", br, "link", "add", port, "type", "veth", "peer", "eth0", "netns", ns])
        sh(["ip", "-n", br, "link", "set", port, "master", "br0", "up"])
        sh(["ip", "-n", ns, "addr", "add", f"{node.ipv4}/24", "dev", "eth0"])
        if self.ipv6:
            sh(["ip", "-n", ns, "addr", "add", f"{node.ipv6}/64", "dev", "eth0", "nodad"])
        sh(["ip", "-n", ns, "link", "set", "eth0", "up"])
        if not NETNS_ETC.exists():
            NETNS_ETC.mkdir(mode=0o755, exist_ok=True)
            self._stack.callback(rmdir_if_empty, NETNS_ETC)
        etc = NETNS_ETC / ns
        etc.mkdir(exist_ok=True)
        self._stack.callback(shutil.rmtree, etc, ignore_errors=True)
        shutil.copyfile(self.hosts_file, etc / "hosts")

    def _make_node_rest(self, node: Node) -> None:
        """UTS namespace, run dir, PAM service, host key, sshd and its job tree."""
        node.dir.mkdir(mode=0o700)
        node.uts_ns.touch()
        sh(["unshare", f"--uts={node.uts_ns}", "hostname", node.name])
        self._stack.callback(umount, node.uts_ns)
        node.run_dir.mkdir(mode=0o755, exist_ok=True)
        self._stack.callback(shutil.rmtree, node.run_dir, ignore_errors=True)
        self._make_job_tree(node)
        self._stack.callback(unlink, node.pam_file)
        self.set_pam_account_line(node, self.pam_account_line)
        key = node.dir / "ssh_host_ed25519_key"
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", node.name, "-f", str(key)])
        node.host_key = key.with_suffix(".pub").read_text().split()[:2]
        node.sshd_bin.symlink_to("/usr/sbin/sshd")
        listen = node.addresses()
        pid_file = node.dir / "sshd.pid"
        conf = sshd_config_text(listen, key, pid_file, self.sshd_log_level, SSH_PORT)
        node.sshd_config.write_text(conf)
        self._start_sshd(node)

    def _make_job_tree(self, node: Node) -> None:
        node.jobs = self._stack.enter_context(JobTree(self.cgroup_mode))
        self._cgroup_roots.extend(node.jobs.roots)

    def set_pam_account_line(self, node: Node, line: PamLine | None) -> None:
        """(Re)write the node's PAM service; sshd reads it afresh for every connection."""
        account = line(node) if callable(line) else line
        title = f"PAM service of sshd on {node.name} ({node.netns})"
        node.pam_file.write_text(pam_service_text(title, account))

    def _start_sshd(self, node: Node) -> None:
        argv = [*node.entry(), str(node.sshd_bin), "-D", "-f", str(node.sshd_config)]
        argv += ["-E", str(node.sshd_log)]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
        node.sshd = proc
        self._procs.append(proc)
        self._stack.callback(kill_tree, proc)

    def _wait_sshd(self, node: Node) -> None:
        def listening() -> bool:
            if node.sshd is not None and node.sshd.poll() is not None:
                log_text = node.sshd_log_text()
                msg = f"sshd on {node.name} exited ({node.sshd.returncode}): {log_text}"
                raise RuntimeError(msg)
            return node.sshd_listening()

        wait_for(listening, timeout=10.0, what=f"sshd listening on {node.name}")

    # -- agents ---------------------------------------------------------------------------

    def start_agent(self, node: Node) -> subprocess.Popen[bytes]:
        """Start `agent_cmd(node)` in the node (after `agent_prefix`); wait for `agent_ready`.

        With an `agent_prefix` (e.g. nsenter into a private journald's mount namespace) the
        agent keeps the prefix's mount namespace; otherwise it gets the nodes' one.
        """
        if self.agent_cmd is None:
            msg = "this cluster has no agent_cmd"
            raise RuntimeError(msg)
        if node.agent is not None and node.agent.poll() is None:
            msg = f"the agent of {node.name} is already running"
            raise RuntimeError(msg)
        prefix = self.agent_prefix(node) if callable(self.agent_prefix) else self.agent_prefix
        argv = [*prefix, *node.entry(mount=not prefix), *self.agent_cmd(node)]
        with node.agent_log.open("ab") as out:
            out.write(f"== harness: starting {argv}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )
        node.agent = proc
        self._procs.append(proc)
        self._stack.callback(kill_tree, proc)
        if self.agent_ready is not None:
            self._wait_agent(node, proc)
        return proc

    def _wait_agent(self, node: Node, proc: subprocess.Popen[bytes]) -> None:
        ready = self.agent_ready
        assert ready is not None

        def check() -> object:
            if proc.poll() is not None:
                msg = f"agent on {node.name} exited ({proc.returncode}): {node.agent_log_text()}"
                raise RuntimeError(msg)
            return ready(node)

        wait_for(check, timeout=self.agent_timeout, what=f"agent ready on {node.name}")

    def stop_agent(self, node: Node, *, timeout: float = 10.0) -> int | None:
        """SIGTERM the agent's process group (SIGKILL after `timeout`); return its exit code."""
        proc = node.agent
        if proc is None:
            return None
        kill_tree(proc, timeout=timeout)
        node.agent = None
        return proc.returncode

    def restart_agent(self, node: Node) -> subprocess.Popen[bytes]:
        self.stop_agent(node)
        return self.start_agent(node)

    def hang_agent(self, node: Node) -> None:
        """SIGSTOP the agent: it keeps its sockets open but answers nothing."""
        self._signal_agent(node, signal.SIGSTOP)

    def resume_agent(self, node: Node) -> None:
        self._signal_agent(node, signal.SIGCONT)

    def _signal_agent(self, node: Node, sig: signal.Signals) -> None:
        if node.agent is None or node.agent.poll() is not None:
            msg = f"no running agent on {node.name}"
            raise RuntimeError(msg)
        os.killpg(node.agent.pid, sig)

    # -- users ----------------------------------------------------------------------------

    def add_user(self, *, password: str | None = None, shell: str = "/bin/bash") -> ClusterUser:
        """A throwaway user whose key logs in on every node; removed at teardown."""
        base = _users.create_user(home=True, shell=shell, locked=False)
        self._stack.callback(_users.delete_user, base)
        self._stack.callback(kill_user_processes, base.uid)
        assert base.home is not None
        user = ClusterUser(base.name, base.uid, base.gid, base.home, password)
        self.users.append(user)
        if password is not None:
            sh(["chpasswd"], input=f"{user.name}:{password}\n")
        ssh_dir = user.ssh_dir
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", user.name, "-f", str(user.key)])
        shutil.copyfile(user.key.with_suffix(".pub"), ssh_dir / "authorized_keys")
        known = [
            f"{','.join(node.addresses(names=True))} {' '.join(node.host_key)}"
            for node in self.nodes
        ]
        user.known_hosts.write_text("\n".join(known) + "\n")
        for path in [ssh_dir, *ssh_dir.iterdir()]:
            os.chown(path, user.uid, user.gid)
        return user

    # -- teardown -------------------------------------------------------------------------

    def _stop_processes(self) -> None:
        for proc in reversed(self._procs):
            kill_tree(proc)
        for user in self.users:
            kill_user_processes(user.uid)

    def leftovers(self) -> list[str]:
        """Everything of ours still present (empty after a clean teardown)."""
        found: list[str] = []
        netns = sh(["ip", "netns", "list"]).split()
        found += [f"netns {n}" for n in netns if n.startswith(f"{self.prefix}-")]
        for pattern_dir, pattern in (
            (NETNS_ETC, f"{self.prefix}-*"),
            (PAM_DIR, f"sshd-{self.prefix}-*"),
            (Path("/run"), f"{self.prefix}-*"),
            (Path("/tmp"), f"{self.prefix}-*"),
        ):
            found += [f"path {p}" for p in pattern_dir.glob(pattern)]
        mounts = Path("/proc/self/mountinfo").read_text()
        found += [f"mount {line.split()[4]}" for line in mounts.splitlines() if self.prefix in line]
        found += [f"user {u.name}" for u in self.users if user_exists(u.name)]
        found += [f"home {u.home}" for u in self.users if u.home.exists()]
        found += [f"cgroup {p}" for p in self._cgroup_roots if p.exists()]
        found += [f"process {p.pid}" for p in self._procs if p.poll() is None]
        return found


def main(argv: Sequence[str] | None = None) -> int:
    """Bring a cluster up for a human, print how to use it, tear it down on Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m tests.support.cluster")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--hold", action="store_true", help="wait for Ctrl-C before teardown")
    parser.add_argument("--user", action="store_true", help="create a user (password 'demo')")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    with Cluster(args.nodes) as cluster:
        user = cluster.add_user(password="demo") if args.user else None
        for node in cluster.nodes:
            print(f"{node.name}: {node.ipv4} {node.ipv6}  sshd log {node.sshd_log}")
            print(f"    enter: {' '.join(node.entry())} bash")
        if user is not None:
            who = f"setpriv --reuid={user.uid} --regid={user.gid} --init-groups --reset-env"
            print(f"user {user.name} (password demo):")
            print(f"    {' '.join(cluster.node1.entry())} {who} ssh node2 hostname")
        if args.hold:
            print("up; Ctrl-C tears it down", flush=True)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
    left = cluster.leftovers()
    print("torn down" + (f"; LEFTOVERS: {left}" if left else ""))
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
