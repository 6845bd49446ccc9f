"""The resolution benchmark's busy node: a job's processes, a socket farm, many sleepers.

`build` creates, in this order (the targets are the oldest pids, the worst case for the
agent's newest-first scan): a throwaway user's processes in a cgroup v2 directory (like a
job), each holding a few client connections; a farm of established TCP sockets (both ends,
held by root processes); the sleepers (one shell, one process group); and last one "fresh"
target process, like an ssh client that just started. The socket holders are
bench/_conns.py. `Node.close()` removes all of it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import secrets
import signal
import subprocess
import time
from pathlib import Path

from bench._common import TOP, bench_argv

Tuple4 = tuple[str, int, str, int]  # local ip, local port, remote ip, remote port

# Starts N `sleep` processes (all in this shell's process group), says so, waits.
SPAWNER = 'for i in $(seq "$1"); do sleep 3600 & done; echo ready; wait'


class Node:
    """Every process, user and cgroup the benchmark creates; `close()` removes them all."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.groups: list[subprocess.Popen[str]] = []
        self.user: str | None = None
        self.cgroup: Path | None = None

    def spawn(self, argv: list[str], stdout: bool = True) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            argv,
            cwd=TOP,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
            text=True,
        )
        self.procs.append(p)
        return p

    def spawn_sleepers(self, count: int) -> None:
        """``count`` sleepers in one new process group (killed as a group in close())."""
        p = subprocess.Popen(
            ["bash", "-c", SPAWNER, "spawner", str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.groups.append(p)
        assert p.stdout is not None
        if p.stdout.readline().strip() != "ready":
            msg = "the sleeper spawner failed"
            raise RuntimeError(msg)

    def close(self) -> None:
        for g in self.groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(g.pid, signal.SIGKILL)
            g.wait()
            for f in (g.stdin, g.stdout):
                if f is not None:
                    f.close()
        for p in self.procs:  # holders reset their connections at EOF on stdin
            if p.stdin is not None:
                with contextlib.suppress(OSError):
                    p.stdin.close()
        deadline = time.monotonic() + 10
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                is_acceptor = isinstance(p.args, list) and "accept" in p.args
                p.wait(0 if is_acceptor else max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
            for f in (p.stdin, p.stdout):
                if f is not None:
                    f.close()
        deadline = time.monotonic() + 10
        while self.cgroup is not None and self.cgroup.exists():
            try:
                self.cgroup.rmdir()
            except OSError:  # EBUSY until the killed members are gone
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        if self.user is not None:
            subprocess.run(["userdel", self.user], check=False)


def cgroup2_mount() -> Path | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if " - cgroup2 " in line:
            return Path(line.split()[4])
    return None


def build(node: Node, args: argparse.Namespace) -> tuple[list[tuple[int, Tuple4]], ...]:
    node.user = f"cidbench{secrets.token_hex(3)}"
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", node.user],
        check=True,
    )
    pw = pwd.getpwnam(node.user)
    mount = cgroup2_mount()
    if mount is not None:
        node.cgroup = mount / f"cid-bench-{secrets.token_hex(3)}"
        node.cgroup.mkdir()
    acceptor = node.spawn(bench_argv("_conns", "accept", "127.0.0.2"))
    assert acceptor.stdout is not None
    aport = int(acceptor.stdout.readline())

    def target_procs(count: int) -> list[tuple[int, Tuple4]]:
        drop = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups"]
        join = f"echo $$ > {node.cgroup}/cgroup.procs && " if node.cgroup else ""
        out = []
        for _ in range(count):
            n = str(args.per_target)
            holder = bench_argv("_conns", "connect", "--count", n, str(aport), "127.0.0.2")
            p = node.spawn(["sh", "-c", f'{join}exec "$@"', "sh", *drop, *holder])
            assert p.stdout is not None
            out += [(p.pid, tuple(c)) for c in json.loads(p.stdout.readline())]
        return out

    targets = target_procs(args.targets)
    farm: list[tuple[int, Tuple4]] = []
    per_farm = args.sockets // 2 // args.farms
    for i in range(args.farms):
        p = node.spawn(bench_argv("_conns", "farm", f"127.0.1.{i + 1}", str(per_farm)))
        assert p.stdout is not None
        farm += [(p.pid, tuple(c)) for c in json.loads(p.stdout.readline())]
    if args.sleepers:
        node.spawn_sleepers(args.sleepers)
    fresh = target_procs(1)  # like an ssh client that just started
    return targets, farm, fresh
