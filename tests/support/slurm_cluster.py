"""A multi-node Slurm cluster in network namespaces, with callerid agents on the slurm backend.

    with SlurmCalleridCluster(2, release="26.05") as sc:   # default: Debian's 22.05
        alice = sc.add_user()
        job = sc.submit(alice, sc.ssh_script(alice, "node1", "node2"), nodes="node1,node2")
        session = sc.wait_session(alice)          # the remote shell's pid and cgroup lines
        rec = sc.cc.next_decision("node2", alice, 0)
        sc.slurm.step_pids(job, "node2")["extern"]

The nodes are those of the virtual cluster (tests/support/callerid_cluster.py and cluster.py):
one network + UTS namespace each (hostname ``nodeI``), joined by a bridge, each with a real
sshd whose account stack starts with pam_callerid.so, a real callerid agent and one private
journald. On top, `LocalSlurm` (tests/support/slurm.py) runs one Slurm release (``release=``:
"22.05", "24.11", "26.05"; ready it first with `require_slurm`): slurmctld in node1 and one slurmd
per node, each inside its node (``NodeName=nodeI NodeAddr=<its address>``, spool
``<top>/spool/nodeI``), with a private munged. Every agent is started (after Slurm is up) with
``backend: {type: slurm, slurm: {spool_dir: <its node's spool>, node_name: nodeI}}``.

A job's batch step runs on its first node (inside that node's namespaces, as its slurmd is),
so an ssh client in it really comes from that node's address: the destination's agent asks the
source node's agent over the CURVE mesh, and adopts through the destination's slurmstepd.
Teardown: Slurm first (jobs cancelled, daemons stopped, /etc/slurm restored, cgroups removed),
then the virtual cluster (agents, sshd, users, namespaces), then the output dir.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil
import yaml

from tests.support.callerid_cluster import CalleridCluster
from tests.support.cluster import ClusterUser, Node
from tests.support.poll import wait_for
from tests.support.slurm import LocalSlurm, SlurmNode
from tests.support.slurm_release import SlurmRelease
from tests.support.slurm_site import READY, REMOTE_CMD, Session

__all__ = ["SlurmCalleridCluster"]


class _SlurmAgents(CalleridCluster):
    """CalleridCluster whose agents use the slurm backend once `slurm` is set."""

    slurm: LocalSlurm | None = None

    def write_config(self, node: Node) -> Path:
        path = super().write_config(node)
        if self.slurm is None:
            return path
        cfg: dict[str, Any] = yaml.safe_load(path.read_text())
        cfg["backend"] = {
            "type": "slurm",
            "slurm": {
                "spool_dir": str(self.slurm.spool_of(node.name)),
                "node_name": node.name,
                "timeout_ms": 1000,
            },
        }
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path


class SlurmCalleridCluster:
    def __init__(
        self,
        n: int = 2,
        *,
        release: str | SlurmRelease = "22.05",
        policy: dict[str, Any] | None = None,
    ) -> None:
        self.release = release
        self.cc = _SlurmAgents(n, policy=policy, peer={"timeout_ms": 500})
        self._slurm: LocalSlurm | None = None
        self.out = Path("/nonexistent")
        self._stack = contextlib.ExitStack()

    @property
    def slurm(self) -> LocalSlurm:
        assert self._slurm is not None, "Slurm is not up"
        return self._slurm

    def node(self, name: str) -> Node:
        return self.cc.cluster.node(name)

    def __enter__(self) -> SlurmCalleridCluster:
        try:
            self._set_up()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stack.close()

    def _set_up(self) -> None:
        self.out = Path(tempfile.mkdtemp(prefix="cidslc-", dir="/tmp"))
        self._stack.callback(shutil.rmtree, self.out, ignore_errors=True)
        self.out.chmod(0o755)
        cluster = self.cc.cluster
        agent_cmd, cluster.agent_cmd = cluster.agent_cmd, None  # agents start once Slurm is up
        self._stack.enter_context(self.cc)
        cluster.agent_cmd = agent_cmd
        nodes = [SlurmNode(n.name, n.ipv4, tuple(n.entry())) for n in cluster]
        self._slurm = self._stack.enter_context(LocalSlurm(self.release, nodes=nodes))
        self.cc.slurm = self._slurm
        for node in cluster:
            cluster.start_agent(node)

    # -- users and jobs ---------------------------------------------------------------------

    def add_user(self) -> ClusterUser:
        """A cluster user (key and known_hosts for every node) with an output dir."""
        user = self.cc.cluster.add_user()
        out = self.out / user.name
        out.mkdir(mode=0o700)
        shutil.chown(out, user.uid, user.gid)
        return user

    def submit(self, user: ClusterUser, script: str | None = None, *, nodes: str) -> str:
        """sbatch (``-w nodes``, one task per node) as ``user``; waits until it runs. The job
        is cancelled at teardown at the latest."""
        count = len(nodes.split(","))
        args = ["-N", str(count), "-w", nodes]
        if script is None:
            job = self.slurm.submit(user.name, wrap="sleep 300", args=args)
        else:
            job = self.slurm.submit(user.name, script, args=args)
        self._stack.callback(self._cancel_quietly, job)
        self.slurm.wait_running(job)
        return job

    def _cancel_quietly(self, job: str) -> None:
        if self._slurm is not None and self._slurm.job_state(job):
            self._slurm.cancel(job)

    def ssh_script(self, user: ClusterUser, src: str, dst: str) -> str:
        """An sbatch script whose batch step (on ``src``) runs ssh to ``dst``."""
        argv = self.node(src).ssh_argv(user, dst, REMOTE_CMD)
        out, err = self.out / user.name / "out", self.out / user.name / "err"
        return f'#!/bin/sh\n{shlex.join(argv)} >{out} 2>{err}\necho "ssh rc $?" >>{err}\n'

    def wait_session(self, user: ClusterUser, timeout: float = 20.0) -> Session:
        """Wait until the remote shell of ``user``'s batch-step ssh has reported itself."""
        out, err = self.out / user.name / "out", self.out / user.name / "err"

        def ready() -> str:
            text = out.read_text() if out.exists() else ""
            if READY in text:
                return text
            done = err.read_text() if err.exists() else ""
            if "ssh rc" in done:
                logs = "\n".join(
                    f"--- {n.name}\n{n.agent_log_text()[-2000:]}" for n in self.cc.cluster
                )
                msg = f"the ssh in the job ended: {done}\n{logs}"
                raise AssertionError(msg)
            return ""

        text = wait_for(ready, timeout=timeout, interval=0.05, what=f"{user.name}'s session")
        m = re.search(r"^shell (\d+)$", text, re.MULTILINE)
        assert m is not None, text
        return Session(int(m.group(1)), text[m.end() : text.index(READY)].strip())

    def ssh_clients(self, user: ClusterUser) -> list[psutil.Process]:
        """The user's running ssh client processes (on any node: one kernel)."""
        return [
            p
            for p in psutil.process_iter(["uids", "name"])
            if p.info["name"] == "ssh" and p.info["uids"] and p.info["uids"].real == user.uid
        ]
