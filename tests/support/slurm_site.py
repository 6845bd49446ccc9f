"""Real logins into a real Slurm node: sshd + pam_callerid.so + callerid agents (slurm backend).

    with LocalSlurm() as slurm, SlurmSite(slurm) as site:
        alice = site.add_user()
        job = site.submit(alice, site.ssh_script(alice, "n1"))   # its batch step runs ssh
        session = site.wait_session(alice)        # the remote shell's pid and /proc/self/cgroup
        rec = site.decision("n1", alice)           # the agent's journal record

The site has two "nodes" on loopback addresses of this one Slurm node (LocalSlurm runs one
slurmd): ``n1`` on 127.0.0.1 and ``n2`` on 127.0.0.2. Each has a real OpenSSH sshd on its own
address and port, under its own PAM service (the basename of sshd's argv[0], a symlink) whose
account stack starts with ``pam_callerid.so socket=<that node's agent socket>`` (no
pam_systemd), and a real ``callerid-agent`` listening on that address only, with its own CURVE
keypair, ``backend: {type: slurm}`` pointing at LocalSlurm's spool dir and NodeName. Both
agents see the same Slurm jobs (there is one slurmd); they differ in where the login arrives.
An ssh from a job (source 127.0.0.1) to ``n1`` is answered by n1's agent locally (the source
is its own address); one to ``n2`` makes n2's agent ask n1's over the mesh.

The agents write their decision records to a private systemd-journald (tests/support/
journald.py); `decision()` reads them back. Users are throwaway accounts with a home, an ssh
key accepted by both sshds and a known_hosts for their (shared) host key under the alias
`HOST_ALIAS`. Teardown ends every process the site started (sshd, agents, the users'
processes), removes the PAM service files, the users and the temp dir.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

from callerid.bus.transport import generate_keypair
from tests.support._cluster_sys import (
    kill_tree,
    kill_user_processes,
    pam_service_text,
    sh,
    sshd_config_text,
    unix_listening,
)
from tests.support.harness import Harness
from tests.support.journald import PrivateJournald
from tests.support.poll import wait_for
from tests.support.slurm import LocalSlurm
from tests.support.users import ThrowawayUser, create_user, delete_user

__all__ = [
    "ADDRESSES",
    "HOST_ALIAS",
    "PAM_SO",
    "READY",
    "REMOTE_CMD",
    "Session",
    "SiteUser",
    "SlurmSite",
]

TOP = Path(__file__).resolve().parents[2]
PAM_SO = TOP / "pam" / "pam_callerid.so"
ADDRESSES = {"n1": "127.0.0.1", "n2": "127.0.0.2"}
HOST_ALIAS = "callerid-slurm-site"
PRIVSEP_DIR = Path("/run/sshd")
READY = "CALLERID-SESSION-READY"
REMOTE_CMD = f'echo "shell $$"; cat /proc/self/cgroup; echo {READY}; exec sleep 300'
_LISTEN = "0A"


@dataclass(frozen=True)
class SiteUser:
    """A throwaway user with an ssh key both sshds accept, and a dir for its session output."""

    user: ThrowawayUser
    home: Path
    out_dir: Path

    @property
    def name(self) -> str:
        return self.user.name

    @property
    def uid(self) -> int:
        return self.user.uid

    @property
    def key(self) -> Path:
        return self.home / ".ssh" / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.home / ".ssh" / "known_hosts"


@dataclass(frozen=True)
class Session:
    """What the remote shell reported: its pid and its /proc/self/cgroup lines."""

    shell_pid: int
    cgroup: str

    def controller(self, name: str) -> str:
        """The cgroup path of v1 controller ``name`` (e.g. "freezer"), or ""."""
        for line in self.cgroup.splitlines():
            _, controllers, path = line.split(":", 2)
            if name in controllers.split(","):
                return path
        return ""


class SlurmSite(Harness):
    def __init__(self, slurm: LocalSlurm, *, policy: dict[str, Any] | None = None) -> None:
        self.slurm = slurm
        self.policy = dict(policy or {})
        self.tag = secrets.token_hex(2)
        self.dir = Path("/nonexistent")
        self.port = 0  # the agents' mesh port (same on both addresses)
        self.ssh_ports: dict[str, int] = {}
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.sshds: dict[str, subprocess.Popen[bytes]] = {}
        self.users: list[SiteUser] = []
        self._jd: PrivateJournald | None = None
        self._stack = contextlib.ExitStack()

    # -- life cycle -------------------------------------------------------------------------

    def close(self) -> None:
        self._stack.close()

    def _start(self) -> None:
        if not PAM_SO.exists():
            subprocess.run(["make", "-s", "-C", str(TOP / "pam")], check=True)
        # jobs with a private /tmp (LocalSlurm(namespaces=...)) write their output outside it
        where = "/tmp" if self.slurm.namespaces is None else "/var/tmp"
        self.dir = Path(tempfile.mkdtemp(prefix=f"cidsl{self.tag}-", dir=where))
        self._stack.callback(shutil.rmtree, self.dir, ignore_errors=True)
        self.dir.chmod(0o755)  # users write their session output below it
        self._jd = self._stack.enter_context(PrivateJournald())
        self._make_keys()
        self._start_agents()
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        host_key = self.dir / "ssh_host_ed25519_key"
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", HOST_ALIAS, "-f", str(host_key)])
        for node in ADDRESSES:
            self._start_sshd(node, host_key)

    @property
    def jd(self) -> PrivateJournald:
        assert self._jd is not None, "the site is not up"
        return self._jd

    # -- agents -----------------------------------------------------------------------------

    def agent_name(self, node: str) -> str:
        return f"cidsl-{node}"

    def pam_socket(self, node: str) -> Path:
        return self.dir / f"{node}.sock"

    def agent_log(self, node: str) -> str:
        path = self.dir / f"{node}-agent.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _make_keys(self) -> None:
        authorized = self.dir / "authorized"
        authorized.mkdir()
        for node, ip in ADDRESSES.items():
            name = self.agent_name(node)
            pub, _ = generate_keypair(self.dir / "keys" / node, name, addresses=[ip])
            shutil.copy(pub, authorized / pub.name)

    def _agent_config(self, node: str) -> Path:
        cfg: dict[str, Any] = {
            "node_name": self.agent_name(node),
            "listen": [ADDRESSES[node]],
            "port": self.port,
            "keys": {
                "dir": str(self.dir / "keys" / node),
                "authorized": str(self.dir / "authorized"),
            },
            "pam_socket": str(self.pam_socket(node)),
            "pam_timeout_ms": 2000,
            "peer": {"timeout_ms": 500, "unreachable_ttl_s": 0},
            "policy": self.policy,
            "backend": {
                "type": "slurm",
                "slurm": {
                    "spool_dir": str(self.slurm.spool_dir),
                    "node_name": self.slurm.node,
                    "timeout_ms": 1000,
                },
            },
        }
        path = self.dir / f"{node}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    def _start_agents(self) -> None:
        for _ in range(20):
            self.port = 20000 + secrets.randbelow(40000)
            if all(self._start_agent(node) for node in ADDRESSES):
                return
            for node in list(self.agents):
                kill_tree(self.agents.pop(node))
        msg = "no free mesh port for the agents after 20 tries"
        raise RuntimeError(msg)

    def _start_agent(self, node: str) -> bool:
        """Start the node's agent; False when its mesh port was taken (try another)."""
        argv = [*self.jd.prefix, sys.executable, "-m", "callerid.agent"]
        argv += ["--config", str(self._agent_config(node)), "--log-level", "debug"]
        with (self.dir / f"{node}-agent.log").open("ab") as out:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )
        self._stack.callback(kill_tree, proc)
        self.agents[node] = proc
        sock = self.pam_socket(node)
        wait_for(
            lambda: proc.poll() is not None or unix_listening(os.getpid(), sock),
            timeout=20,
            what=f"agent {node} listening on {sock}",
        )
        if proc.poll() is None:
            return True
        if "Address already in use" in self.agent_log(node):
            return False
        msg = f"agent {node} exited ({proc.returncode}): {self.agent_log(node)[-3000:]}"
        raise RuntimeError(msg)

    # -- sshd -------------------------------------------------------------------------------

    def pam_service(self, node: str) -> str:
        return f"sshd-cidsl{self.tag}-{node}"

    def sshd_log(self, node: str) -> str:
        path = self.dir / f"{node}-sshd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _start_sshd(self, node: str, host_key: Path) -> None:
        service = self.pam_service(node)
        pam_file = Path("/etc/pam.d") / service
        self._stack.callback(pam_file.unlink, missing_ok=True)
        line = f"account required {PAM_SO} socket={self.pam_socket(node)} timeout=2500"
        pam_file.write_text(pam_service_text(f"callerid slurm site {node}", line))
        binary = self.dir / service  # argv[0]'s basename is sshd's PAM service name
        binary.symlink_to("/usr/sbin/sshd")
        for _ in range(20):
            port = 20000 + secrets.randbelow(40000)
            conf = self.dir / f"{node}-sshd_config"
            pid_file = self.dir / f"{node}-sshd.pid"
            conf.write_text(sshd_config_text([ADDRESSES[node]], host_key, pid_file, "DEBUG1", port))
            argv = [str(binary), "-D", "-f", str(conf), "-E", str(self.dir / f"{node}-sshd.log")]
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
            self._stack.callback(kill_tree, proc)
            if _wait_listening(proc, port, f"sshd {node}"):
                self.sshds[node], self.ssh_ports[node] = proc, port
                return
        msg = f"sshd {node} did not start: {self.sshd_log(node)[-2000:]}"
        raise RuntimeError(msg)

    def sshd_sessions(self, node: str) -> list[psutil.Process]:
        """Every process below the node's sshd listener (its per-connection sessions)."""
        try:
            return list(psutil.Process(self.sshds[node].pid).children(recursive=True))
        except psutil.NoSuchProcess:
            return []

    # -- users ------------------------------------------------------------------------------

    def add_user(self) -> SiteUser:
        """A throwaway user (home, ssh key, known_hosts); removed at teardown."""
        base = create_user(home=True, locked=False)
        self._stack.callback(delete_user, base)
        self._stack.callback(kill_user_processes, base.uid)
        assert base.home is not None
        user = SiteUser(base, base.home, self.dir / base.name)
        user.out_dir.mkdir(mode=0o700)
        ssh_dir = base.home / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", base.name, "-f", str(user.key)])
        shutil.copyfile(user.key.with_suffix(".pub"), ssh_dir / "authorized_keys")
        host_pub = (self.dir / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        user.known_hosts.write_text(f"{HOST_ALIAS} {' '.join(host_pub)}\n")
        for path in [user.out_dir, ssh_dir, *ssh_dir.iterdir()]:
            os.chown(path, base.uid, base.gid)
        self.users.append(user)
        return user

    def give_key(self, owner: SiteUser, to: SiteUser) -> Path:
        """Copy ``owner``'s private key into ``to``'s ~/.ssh (to log in as ``owner``)."""
        path = to.home / ".ssh" / f"key_of_{owner.name}"
        shutil.copyfile(owner.key, path)
        path.chmod(0o600)
        os.chown(path, to.user.uid, to.user.gid)
        return path

    # -- jobs -------------------------------------------------------------------------------

    def submit(self, user: SiteUser, script: str | None = None, *, wait: bool = True) -> str:
        """sbatch ``script`` (default: a job that sleeps) as ``user``; cancelled at teardown
        (before the user is removed). With ``wait``, returns once the job runs."""
        if script is None:
            job = self.slurm.submit(user.name, wrap="sleep 300")
        else:
            job = self.slurm.submit(user.name, script)
        self._stack.callback(self._cancel_quietly, job)
        if wait:
            self.slurm.wait_running(job)
        return job

    def _cancel_quietly(self, job: str) -> None:
        if self.slurm.job_state(job):
            self.slurm.cancel(job)

    # -- logins -----------------------------------------------------------------------------

    def ssh_argv(
        self,
        user: SiteUser,
        node: str,
        *,
        login: SiteUser | None = None,
        key: Path | None = None,
        command: str = REMOTE_CMD,
    ) -> list[str]:
        """The ssh client command (run as ``user``) logging in as ``login`` (default: the
        same user) at ``node`` and running ``command`` there (`REMOTE_CMD`: `wait_session`
        waits for its output)."""
        opts = {
            "BatchMode": "yes",
            "StrictHostKeyChecking": "yes",
            "HostKeyAlias": HOST_ALIAS,
            "UserKnownHostsFile": str(user.known_hosts),
            "GlobalKnownHostsFile": "/dev/null",
            "UpdateHostKeys": "no",
            "ConnectTimeout": "10",
            "IdentitiesOnly": "yes",
            "IdentityFile": str(key or user.key),
        }
        argv = ["ssh", "-4", "-p", str(self.ssh_ports[node]), "-l", (login or user).name]
        for k, v in opts.items():
            argv += ["-o", f"{k}={v}"]
        return [*argv, ADDRESSES[node], command]

    def ssh_script(self, user: SiteUser, node: str, *, prelude: str = "", **kw: Any) -> str:
        """An sbatch script whose batch step runs ``prelude`` (shell lines), then the ssh
        client, output in ``user.out_dir``."""
        cmd = shlex.join(self.ssh_argv(user, node, **kw))
        out, err = user.out_dir / "out", user.out_dir / "err"
        return f'#!/bin/sh\n{prelude}{cmd} >{out} 2>{err}\necho "ssh rc $?" >>{err}\n'

    def ssh_outside_jobs(self, user: SiteUser, node: str) -> subprocess.CompletedProcess[str]:
        """Run the ssh client as ``user`` outside any job (it waits for the remote command)."""
        switch = ["setpriv", f"--reuid={user.uid}", f"--regid={user.user.gid}", "--init-groups"]
        switch += ["--reset-env", "--", "env", "-C", str(user.home)]
        return subprocess.run(
            [*switch, *self.ssh_argv(user, node)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
        )

    def wait_session(self, user: SiteUser, timeout: float = 20.0) -> Session:
        """Wait until the remote shell of ``user``'s batch-step ssh has reported itself."""
        out, err = user.out_dir / "out", user.out_dir / "err"

        def ready() -> str:
            text = out.read_text() if out.exists() else ""
            if READY in text:
                return text
            done = err.read_text() if err.exists() else ""
            if "ssh rc" in done:
                msg = f"the ssh in the job ended: {done}\n{self.diagnostics()}"
                raise AssertionError(msg)
            return ""

        text = wait_for(ready, timeout=timeout, interval=0.05, what=f"{user.name}'s session")
        m = re.search(r"^shell (\d+)$", text, re.MULTILINE)
        assert m is not None, text
        cgroup = text[m.end() : text.index(READY)].strip()
        return Session(int(m.group(1)), cgroup)

    def ssh_clients(self, user: SiteUser) -> list[psutil.Process]:
        """The user's running ssh client processes."""
        return [
            proc
            for proc in psutil.process_iter(["uids", "name"])
            if proc.info["uids"]
            and proc.info["uids"].real == user.uid
            and proc.info["name"] == "ssh"
        ]

    # -- records ----------------------------------------------------------------------------

    def decisions(self, node: str, user: SiteUser) -> list[dict[str, Any]]:
        return self.jd.read(CALLERID_NODE=self.agent_name(node), CALLERID_USER=user.name)

    def decision(self, node: str, user: SiteUser, n: int = 1) -> dict[str, Any]:
        """Decision record number ``n`` (1-based) of ``user`` by ``node``'s agent."""
        entries = self.jd.wait_for_entries(
            n, timeout=10, CALLERID_NODE=self.agent_name(node), CALLERID_USER=user.name
        )
        return entries[n - 1]

    def diagnostics(self) -> str:
        parts = []
        for node in ADDRESSES:
            parts.append(f"--- agent {node}\n{self.agent_log(node)[-2500:]}")
            parts.append(f"--- sshd {node}\n{self.sshd_log(node)[-1500:]}")
        return "\n".join(parts)


def _wait_listening(proc: subprocess.Popen[bytes], port: int, what: str) -> bool:
    """Wait until ``proc`` listens on TCP ``port`` (True) or exits (False)."""

    def settled() -> bool:
        return proc.poll() is not None or _tcp_listening(proc.pid, port)

    wait_for(settled, timeout=10, what=f"{what} listening on port {port}")
    return proc.poll() is None


def _tcp_listening(pid: int, port: int) -> bool:
    try:
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return any(f.split()[1].endswith(f":{port:04X}") and f.split()[3] == _LISTEN for f in lines)
