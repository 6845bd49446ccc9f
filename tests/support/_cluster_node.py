"""One node of the virtual cluster (tests/support/cluster.py): names, entry, jobs, ssh.

A node is entered with `nsenter` into the cluster's mount namespace (host mounts with our
/etc/hosts), the node's UTS namespace (hostname `nodeI`) and its network namespace. Commands
run as a user go through `setpriv` after `nsenter`, so the namespace switch happens as root.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from tests.support._cluster_sys import kill_tree, unix_listening

if TYPE_CHECKING:
    from callerid.agent.config import CgroupBackendConfig
    from tests.support.cgroups import JobTree
    from tests.support.cluster import Cluster

__all__ = ["SSH_PORT", "ClusterUser", "Node"]

SSH_PORT = 22
SSH_TIMEOUT = 30.0
_LISTEN = "0A"


@dataclass(frozen=True)
class ClusterUser:
    """A throwaway user with an ssh key accepted on every node and a known_hosts for all."""

    name: str
    uid: int
    gid: int
    home: Path
    password: str | None

    @property
    def ssh_dir(self) -> Path:
        return self.home / ".ssh"

    @property
    def key(self) -> Path:
        return self.ssh_dir / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.ssh_dir / "known_hosts"


class Node:
    """A node: `name` (node1), `netns`, `ipv4`/`ipv6`, its sshd, agent and job tree."""

    def __init__(self, cluster: Cluster, index: int) -> None:
        self.cluster = cluster
        self.index = index
        self.name = f"node{index}"
        self.netns = f"{cluster.prefix}-{self.name}"
        self.ipv4 = str(cluster.subnet4[index])
        self.ipv6 = str(cluster.subnet6[index]) if cluster.ipv6 else None
        self.pam_service = f"sshd-{self.netns}"
        self.pam_file = Path("/etc/pam.d") / self.pam_service
        self.run_dir = Path("/run") / self.netns  # for the agent's socket, e.g. agent.sock
        self.host_key: list[str] = []  # ["ssh-ed25519", "AAAA..."]
        self.sshd: subprocess.Popen[bytes] | None = None
        self.agent: subprocess.Popen[bytes] | None = None
        self._jobs: JobTree | None = None

    def __repr__(self) -> str:
        return f"<Node {self.name} {self.netns} {self.ipv4} {self.ipv6}>"

    # -- paths (inside the cluster's temp dir, which exists only once the cluster is up) ----

    @property
    def dir(self) -> Path:
        return self.cluster.dir / self.name

    @property
    def uts_ns(self) -> Path:
        return self.dir / "uts.ns"

    @property
    def sshd_bin(self) -> Path:
        return self.dir / self.pam_service  # argv[0] basename = PAM service name

    @property
    def sshd_config(self) -> Path:
        return self.dir / "sshd_config"

    @property
    def sshd_log(self) -> Path:
        return self.dir / "sshd.log"

    @property
    def agent_log(self) -> Path:
        return self.dir / "agent.log"

    def agent_log_text(self) -> str:
        return self.agent_log.read_text(errors="replace") if self.agent_log.exists() else ""

    def sshd_log_text(self) -> str:
        return self.sshd_log.read_text(errors="replace") if self.sshd_log.exists() else ""

    @property
    def jobs(self) -> JobTree:
        """This node's job tree (its own cgroup test root)."""
        if self._jobs is None:
            msg = f"{self.name} has no job tree yet (is the cluster up?)"
            raise RuntimeError(msg)
        return self._jobs

    @jobs.setter
    def jobs(self, tree: JobTree) -> None:
        self._jobs = tree

    # -- addresses ------------------------------------------------------------------------

    def address(self, *, ipv6: bool = False) -> str:
        if not ipv6:
            return self.ipv4
        if self.ipv6 is None:
            msg = "this cluster was built with ipv6=False"
            raise RuntimeError(msg)
        return self.ipv6

    def addresses(self, *, names: bool = False) -> list[str]:
        """IPv4 then IPv6 address; with `names`, the node's name first (for known_hosts)."""
        found = [self.name] if names else []
        return found + [a for a in (self.ipv4, self.ipv6) if a is not None]

    # -- running things inside the node ---------------------------------------------------

    def entry(self, *, mount: bool = True) -> list[str]:
        """argv prefix that runs a command (as root) inside this node."""
        argv = ["nsenter"]
        if mount:
            argv.append(f"--mount={self.cluster.mount_ns}")
        sshd = getattr(self, "sshd", None)
        if sshd is not None and sshd.poll() is None:
            # /proc paths name the namespaces in any mount namespace (a private journald's
            # copy does not see the bind mounts made after it was created)
            ns = f"/proc/{sshd.pid}/ns"
            return [*argv, f"--uts={ns}/uts", f"--net={ns}/net", "--"]
        return [*argv, f"--uts={self.uts_ns}", f"--net=/run/netns/{self.netns}", "--"]

    def user_argv(self, user: ClusterUser | None, argv: Sequence[str]) -> list[str]:
        """`entry()` + a switch to `user` (login-like environment, cwd = home) + argv."""
        if user is None:
            return [*self.entry(), *argv]
        switch = ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups"]
        switch += ["--reset-env", "--", "env", "-C", str(user.home)]
        return [*self.entry(), *switch, *argv]

    def run(
        self,
        argv: Sequence[str],
        *,
        user: ClusterUser | None = None,
        timeout: float = SSH_TIMEOUT,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv in the node (outside any job), as root or `user`; capture text output."""
        return subprocess.run(
            self.user_argv(user, argv),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def popen(
        self, argv: Sequence[str], *, user: ClusterUser | None = None, **popen: Any
    ) -> subprocess.Popen[Any]:
        """Start argv in the node outside any job; the cluster ends it (and its children)."""
        popen.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.user_argv(user, argv), start_new_session=True, **popen)
        self.cluster.track(proc)
        return proc

    # -- jobs -----------------------------------------------------------------------------

    def add_job(
        self, job_id: str, user: ClusterUser, *, steps: Sequence[str] = ("step_batch",)
    ) -> Path:
        """Create job `job_id` of `user` (with its extern step and `steps`); its cgroup dir."""
        return self.jobs.add_job(str(job_id), user.uid, extern=True, steps=steps)

    def cgroup_config(self) -> CgroupBackendConfig:
        """The cgroup backend config that sees exactly this node's jobs."""
        return self.jobs.backend_config()

    def run_in_job(
        self,
        job_id: str,
        user: ClusterUser,
        argv: Sequence[str],
        *,
        step: str = "step_batch",
        **popen: Any,
    ) -> subprocess.Popen[Any]:
        """Start argv as `user` in this node, inside the job step's cgroup before any exec.

        Popen keywords (stdout=PIPE, text=True ...) are passed on; the job tree (and the
        cluster) end the process at teardown.
        """
        proc = self.jobs.spawn_in(str(job_id), step, self.user_argv(user, argv), None, **popen)
        self.cluster.track(proc)
        return proc

    # -- ssh ------------------------------------------------------------------------------

    def ssh_argv(
        self,
        user: ClusterUser,
        target: Node | str,
        remote_cmd: str,
        *,
        ipv6: bool = False,
        extra_opts: Sequence[str] = (),
        batch: bool = True,
    ) -> list[str]:
        """The ssh client command line (to run as `user` in this node); `extra_opts` come
        first, so they override the defaults (e.g. ["-o", "ConnectTimeout=2"])."""
        if isinstance(target, str):
            target = self.cluster.node(target)
        host = target.address(ipv6=True) if ipv6 else target.name
        opts = {
            "BatchMode": "yes" if batch else "no",
            "StrictHostKeyChecking": "yes",
            "UserKnownHostsFile": str(user.home / ".ssh" / "known_hosts"),
            "GlobalKnownHostsFile": "/dev/null",
            "UpdateHostKeys": "no",
            "ConnectTimeout": "10",
            "IdentitiesOnly": "yes",
            "IdentityFile": str(user.home / ".ssh" / "id_ed25519"),
        }
        # ssh keeps the first value of an option: the caller's extra_opts win over ours
        argv = ["ssh", "-6" if ipv6 else "-4", *extra_opts]
        for key, value in opts.items():
            argv += ["-o", f"{key}={value}"]
        return [*argv, "-p", str(SSH_PORT), "--", host, remote_cmd]

    def ssh(
        self,
        user: ClusterUser,
        target: Node | str,
        remote_cmd: str,
        *,
        job: str | None = None,
        step: str = "step_batch",
        ipv6: bool = False,
        extra_opts: Sequence[str] = (),
        timeout: float = SSH_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """Run the real ssh client as `user` from this node to `target` (by name, or by its
        IPv6 address with `ipv6`), inside job `job`'s `step` cgroup when given."""
        argv = self.ssh_argv(user, target, remote_cmd, ipv6=ipv6, extra_opts=extra_opts)
        return self._client(user, argv, job=job, step=step, timeout=timeout)

    def ssh_password(
        self,
        user: ClusterUser,
        target: Node | str,
        remote_cmd: str,
        *,
        password: str | None = None,
        job: str | None = None,
        step: str = "step_batch",
        ipv6: bool = False,
        extra_opts: Sequence[str] = (),
        timeout: float = SSH_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """Like `ssh`, but keyboard-interactive with the user's password, through sshpass."""
        secret = password if password is not None else user.password
        if secret is None:
            msg = f"user {user.name} has no password"
            raise ValueError(msg)
        kbd = ["-o", "PreferredAuthentications=keyboard-interactive"]
        kbd += ["-o", "PubkeyAuthentication=no", "-o", "NumberOfPasswordPrompts=1"]
        ssh = self.ssh_argv(
            user, target, remote_cmd, ipv6=ipv6, extra_opts=[*kbd, *extra_opts], batch=False
        )
        argv = ["sshpass", "-p", secret, *ssh]
        return self._client(user, argv, job=job, step=step, timeout=timeout)

    def _client(
        self, user: ClusterUser, argv: list[str], *, job: str | None, step: str, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        if job is None:
            return self.run(argv, user=user, timeout=timeout)
        proc = self.run_in_job(
            job, user, argv, step=step, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc, timeout=5.0)
            raise
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    # -- sshd -----------------------------------------------------------------------------

    def sshd_listening(self) -> bool:
        """Whether our sshd listens on every address of the node (read in its netns)."""
        if self.sshd is None:
            return False
        want = 2 if self.ipv6 is not None else 1
        found = 0
        for table in ("tcp", "tcp6"):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                for line in Path(f"/proc/{self.sshd.pid}/net/{table}").read_text().splitlines()[1:]:
                    fields = line.split()
                    if fields[1].endswith(f":{SSH_PORT:04X}") and fields[3] == _LISTEN:
                        found += 1
        return found >= want

    def unix_listening(self, path: Path) -> bool:
        """Whether something in this node's network namespace listens on unix socket `path`."""
        return self.sshd is not None and unix_listening(self.sshd.pid, path)

    def sshd_sessions(self) -> list[psutil.Process]:
        """The per-connection processes below our sshd listener (and their descendants)."""
        if self.sshd is None or self.sshd.poll() is not None:
            return []
        try:
            return list(psutil.Process(self.sshd.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            return []
