"""The scale benchmark's agents: addresses, keys, configs, the source agent and the zygote.

`Fleet` starts the source agent (`python -m callerid.agent`, under SCHED_RR) and forks the
destination agents from one zygote process (bench/_zygote.py), in batches while memory allows
(`start_fleet`); `Fleet.stop` ends exactly the processes it started.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from bench._common import TOP, bench_argv, hosts_prefix, kill_wait, poll
from callerid.bus.transport import generate_keypair
from tests.support.agents import unix_listening
from tests.support.cgroups import JobTree

MEM_RESERVE_MB = 4096  # never start agents that would leave less than this available


class Net:
    """The addresses: 127.S.255.254 for the source, 127.S.x.y for destination i."""

    def __init__(self) -> None:
        self.s = 100 + secrets.randbelow(100)
        self.source = f"127.{self.s}.255.254"

    def dest(self, i: int) -> str:
        return f"127.{self.s}.{i // 250}.{i % 250 + 1}"


class Fleet:
    """Keys, configs and processes of the source and the destination agents."""

    def __init__(self, top: Path, n: int, net: Net, port: int) -> None:
        self.top, self.n, self.net, self.port = top, n, net, port
        self.src_auth = top / "auth-src"
        self.dst_auth = top / "auth-dst"
        self.source: subprocess.Popen[bytes] | None = None
        self.zygote: subprocess.Popen[str] | None = None
        self.pids: list[int] = []
        self.prefix: list[str] = []

    def names(self) -> list[str]:
        return [f"d{i:04d}" for i in range(self.n)]

    def make_keys(self) -> None:
        for d in (self.src_auth, self.dst_auth):
            d.mkdir()
        pub, _ = generate_keypair(self.top / "keys" / "src", "src", addresses=[self.net.source])
        shutil.copy(pub, self.src_auth)
        shutil.copy(pub, self.dst_auth)
        for i, name in enumerate(self.names()):
            pub, _ = generate_keypair(self.top / "keys" / name, name, addresses=[self.net.dest(i)])
            shutil.copy(pub, self.src_auth)
        hosts = {"src": self.net.source} | {n: self.net.dest(i) for i, n in enumerate(self.names())}
        self.prefix = hosts_prefix(self.top / "hosts", hosts)

    def config(self, name: str, ip: str, auth: Path, tree: JobTree) -> Path:
        cg = tree.backend_config()
        cfg = {
            "node_name": name,
            "listen": [ip],
            "port": self.port,
            "keys": {"dir": str(self.top / "keys" / name), "authorized": str(auth)},
            "pam_socket": str(self.top / "sock" / f"{name}.sock"),
            "policy": {"single_job_shortcut": True},
            "backend": {"cgroup": {"root": str(cg.root), "jobs": cg.jobs, "extern": cg.extern}},
        }
        path = self.top / "cfg" / f"{name}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump(cfg))
        return path

    def pam_socket(self, name: str) -> Path:
        return self.top / "sock" / f"{name}.sock"

    def start_source(self, tree: JobTree) -> None:
        cfg = self.config("src", self.net.source, self.src_auth, tree)
        with (self.top / "src.log").open("ab") as out:
            argv = [sys.executable, "-m", "callerid.agent", "--config", str(cfg)]
            self.source = subprocess.Popen(
                [*self.prefix, "chrt", "-r", "10", *argv],
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
            )
        wait_listening([self.pam_socket("src")], 30)

    def start_destinations(self, tree: JobTree, count: int) -> None:
        """Fork ``count`` more destination agents (from the zygote), wait until they listen."""
        if self.zygote is None:
            self.zygote = subprocess.Popen(
                [*self.prefix, *bench_argv("_zygote")],
                cwd=TOP,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert self.zygote.stdout is not None
            assert self.zygote.stdout.readline().strip() == "ready"
        assert self.zygote.stdin is not None and self.zygote.stdout is not None
        first = len(self.pids)
        names = self.names()[first : first + count]
        for i, name in enumerate(names, start=first):
            cfg = self.config(name, self.net.dest(i), self.dst_auth, tree)
            self.zygote.stdin.write(f"{cfg} {self.top / 'log' / name}.log\n")
            self.zygote.stdin.flush()
            self.pids.append(int(self.zygote.stdout.readline()))
        wait_listening([self.pam_socket(n) for n in names], 60 + count / 10)

    def forked(self, pids: list[int] | None = None) -> list[int]:
        """Those of ``pids`` (default: all destination agents) still children of our zygote."""
        zpid = self.zygote.pid if self.zygote is not None else -1
        return [p for p in (self.pids if pids is None else pids) if _ppid(p) == zpid]

    def stop(self) -> None:
        """SIGTERM every agent we started (by pid, forked ones only while their parent is
        our zygote), wait until they are gone, then stop the zygote."""
        ours = self.forked()
        for pid in ours:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        with contextlib.suppress(RuntimeError):
            poll(lambda: not self.forked(ours), 60, "agents to exit", 0.1)
        for pid in self.forked(ours):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        procs: list[subprocess.Popen[Any]] = [self.source] if self.source else []
        if self.zygote is not None:
            procs.append(self.zygote)
        kill_wait(procs)
        if self.zygote is not None:
            for f in (self.zygote.stdin, self.zygote.stdout):
                if f is not None:
                    f.close()


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def wait_listening(paths: list[Path], timeout: float) -> None:
    left = list(paths)

    def all_up() -> bool:
        while left and unix_listening(left[-1]):
            left.pop()
        return not left

    poll(all_up, timeout, f"{len(paths)} agent PAM sockets", 0.05)


def mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_fleet(fleet: Fleet, tree: JobTree, wanted: int) -> int:
    """Start up to ``wanted`` destination agents in batches while memory allows; how many."""
    batch = 50
    per_agent = 0.0
    while len(fleet.pids) < wanted:
        count = min(batch, wanted - len(fleet.pids))
        if mem_available_mb() - count * max(per_agent * 2, 20.0) < MEM_RESERVE_MB:
            print(f"# memory: stopping at {len(fleet.pids)} agents", flush=True)
            break
        before = mem_available_mb()
        fleet.start_destinations(tree, count)
        per_agent = max(per_agent, (before - mem_available_mb()) / count)
    return len(fleet.pids)
