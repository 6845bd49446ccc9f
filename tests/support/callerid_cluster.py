"""The virtual cluster running callerid for real: agents, keys, PAM module, private journald.

Shared by the end-to-end tests and `make demo`:

    with CalleridCluster(3) as cc:
        alice = cc.cluster.add_user()
        cc.cluster.node1.add_job("42", alice); cc.cluster.node2.add_job("42", alice)
        r = cc.cluster.node1.ssh(alice, "node2", "cat /proc/self/cgroup", job="42")
        rec = cc.last_decision("node2", alice)

Each node gets a CURVE keypair (`calleridctl keygen`, with the node's addresses in the
certificate), a shared authorized-keys directory, an `agent.yaml` (listen on the node's own
addresses, PAM socket under the node's run dir, the node's cgroup job tree), a real
`callerid-agent` started inside the node, and `pam_callerid.so` first in the node's sshd
account stack. The agents write their decision records to one private systemd-journald that
lives in a copy of the cluster's mount namespace (the host journal is never touched).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from tests.support.cluster import Cluster, ClusterUser, Node, socket_listening
from tests.support.journald import PrivateJournald
from tests.support.poll import wait_for

TOP = Path(__file__).resolve().parents[2]
PAM_SO = TOP / "pam" / "pam_callerid.so"
PAM_CLIENT = TOP / "pam" / "callerid-pam-client"
CATALOG = TOP / "packaging" / "callerid.catalog"


class CalleridCluster:
    def __init__(
        self,
        n: int = 3,
        *,
        policy: dict[str, Any] | None = None,
        peer: dict[str, Any] | None = None,
        pam_options: str = "timeout=2500",
        cgroup_mode: str = "v2",
    ) -> None:
        self.policy = dict(policy or {})
        self.node_policy: dict[str, dict[str, Any]] = {}
        self.peer = dict(peer or {})
        self.pam_options = pam_options
        self.journald: PrivateJournald | None = None
        self._stack = contextlib.ExitStack()
        self.cluster = Cluster(
            n,
            pam_account_line=self._pam_line,
            agent_cmd=self._agent_cmd,
            agent_prefix=lambda node: self.jd.prefix,
            agent_ready=socket_listening(self.pam_socket),
            before_agents=self._before_agents,
            cgroup_mode=cgroup_mode,  # type: ignore[arg-type]
            hosts_ipv6=False,
        )

    # -- set-up ---------------------------------------------------------------------------

    @property
    def jd(self) -> PrivateJournald:
        assert self.journald is not None, "the private journald is not running"
        return self.journald

    def __enter__(self) -> CalleridCluster:
        if not PAM_SO.exists():
            subprocess.run(["make", "-s", "-C", str(TOP / "pam")], check=True)
        try:
            self._stack.enter_context(self.cluster)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stack.close()

    @property
    def keys_dir(self) -> Path:
        return self.cluster.dir / "keys"

    @staticmethod
    def pam_socket(node: Node) -> Path:
        return node.run_dir / "agent.sock"

    def _pam_line(self, node: Node) -> str:
        return f"account required {PAM_SO} socket={self.pam_socket(node)} {self.pam_options}"

    def _before_agents(self, cluster: Cluster) -> None:
        # journald starts from a copy of the cluster's mount namespace (keeps its /etc/hosts)
        jd = PrivateJournald(parent_mount_ns=cluster.mount_ns)
        self.journald = self._stack.enter_context(jd)
        if CATALOG.exists():
            jd.install_catalog(CATALOG)
        authorized = self.keys_dir / "authorized"
        authorized.mkdir(parents=True, exist_ok=True)
        for node in cluster:
            addresses = [a for ip in (node.ipv4, node.ipv6) if ip for a in ("--address", ip)]
            ctl("keygen", "--dir", str(self.keys_dir / node.name), "--name", node.name, *addresses)
            pub = self.keys_dir / node.name / f"{node.name}.key"
            (authorized / pub.name).write_bytes(pub.read_bytes())

    def config_path(self, node: Node) -> Path:
        return node.dir / "agent.yaml"

    def write_config(self, node: Node) -> Path:
        cg = node.cgroup_config()
        policy = {**self.policy, **self.node_policy.get(node.name, {})}
        cfg: dict[str, Any] = {
            "node_name": node.name,
            "listen": [ip for ip in (node.ipv4, node.ipv6) if ip],
            "keys": {
                "dir": str(self.keys_dir / node.name),
                "authorized": str(self.keys_dir / "authorized"),
            },
            "pam_socket": str(self.pam_socket(node)),
            "peer": {"unreachable_ttl_s": 0.0, **self.peer},
            "policy": policy,
            "backend": {
                "type": "cgroup",
                "cgroup": {"root": str(cg.root), "jobs": cg.jobs, "extern": cg.extern},
            },
        }
        path = self.config_path(node)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    def _agent_cmd(self, node: Node) -> list[str]:
        path = self.write_config(node)
        return [sys.executable, "-m", "callerid.agent", "--config", str(path)]

    # -- operations ------------------------------------------------------------------------

    def set_policy(self, node: Node | str, **policy: Any) -> None:
        """Change one node's policy keys and reload its agent (SIGHUP), waiting for the reload."""
        node = self.cluster.node(node) if isinstance(node, str) else node
        self.node_policy.setdefault(node.name, {}).update(policy)
        self.write_config(node)
        before = len(self.jd.read(CALLERID_EVENT="reloaded", CALLERID_NODE=node.name))
        assert node.agent is not None
        os.kill(node.agent.pid, signal.SIGHUP)
        self.jd.wait_for_entries(
            before + 1, timeout=10, CALLERID_EVENT="reloaded", CALLERID_NODE=node.name
        )

    def decisions(self, node: Node | str, user: ClusterUser | str) -> list[dict[str, Any]]:
        name = node if isinstance(node, str) else node.name
        who = user if isinstance(user, str) else user.name
        return self.jd.read(CALLERID_NODE=name, CALLERID_USER=who)

    def next_decision(
        self, node: Node | str, user: ClusterUser | str, before: int
    ) -> dict[str, Any]:
        """Wait for decision record number ``before + 1`` of ``user`` on ``node``; return it."""
        name = node if isinstance(node, str) else node.name
        who = user if isinstance(user, str) else user.name
        entries = self.jd.wait_for_entries(
            before + 1, timeout=10, CALLERID_NODE=name, CALLERID_USER=who
        )
        return entries[before]

    def pam_request(
        self, node: Node, user: str, *, op: str = "account"
    ) -> subprocess.CompletedProcess[str]:
        """Ask a node's agent directly with the module's own client (as sshd would)."""
        argv = [str(PAM_CLIENT), "-s", str(self.pam_socket(node)), "-o", op, "-S", "sshd", user]
        return node.run(argv, timeout=10)


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "callerid.agent.ctl", *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    )


def cgroup_line(text: str) -> str:
    """The cgroup v2 path in a /proc/<pid>/cgroup text (the `0::` line)."""
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return ""


def wait_gone(pid: int, timeout: float = 10.0) -> None:
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), timeout=timeout, what=f"pid {pid} gone")
