"""A login storm to break things in: bench/storm.py's set-up, with the module's own client.

    with FaultStorm(agents, tree_a, user, connections=200, requests=3) as storm:
        storm.go()
        storm.wait_decided(60)                 # b has decided 60 of them: mid-storm
        agents.stop("b", signal.SIGKILL)       # the fault, at a known monotonic time
        result = storm.finish()                # every login's [start, ms, outcome]

The pieces are bench/storm.py's (its client processes in jobs 42/43 on "a", the stand-in sshd
bench/_standin_sshd.py forking one monitor per connection on "b"); the monitor is
tests/support/fault_monitor.c, which asks through pam/client.c's `cid_exchange` with the
module's deadline, so a login ends exactly as pam_callerid.so would see it: an answer
(`adopt:callerid:42`) or `fail:<status>:` (agent missing, hung or answering garbage; the
module then applies on_error, default deny). Used by tests/integration/test_faults.py and
bench/chaos.py.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._common import TOP, bench_argv, end_procs, pct
from bench.storm import start_clients
from tests.support.agents import ADDRESSES, LoopbackAgents
from tests.support.cgroups import JobTree
from tests.support.harness import Harness
from tests.support.poll import wait_for

__all__ = ["SUCCESS", "FaultStorm", "Login", "StormResult", "build_monitor"]

MODULE_TIMEOUT_MS = 2500  # pam_callerid.so's default timeout=
SUCCESS = ("adopt", "allow")  # verdicts the module turns into PAM_SUCCESS


def build_monitor(out_dir: Path) -> Path:
    """Compile fault_monitor.c with the PAM module's client code into ``out_dir``."""
    pam = TOP / "pam"
    exe = out_dir / "fault-monitor"
    src = Path(__file__).with_name("fault_monitor.c")
    argv = ["gcc", "-O2", "-Wall", "-Werror", f"-I{pam}", "-o", str(exe), str(src)]
    subprocess.run([*argv, str(pam / "client.c"), str(pam / "codec.c")], check=True)
    return exe


@dataclass(frozen=True, slots=True)
class Login:
    start: float  # monotonic seconds
    ms: float
    outcome: str  # verdict:reason:job | fail:<status>:
    job: str  # the job of the client process behind it

    @property
    def end(self) -> float:
        return self.start + self.ms / 1000

    @property
    def verdict(self) -> str:
        return self.outcome.split(":", 1)[0]

    @property
    def success(self) -> bool:
        return self.verdict in SUCCESS


@dataclass
class StormResult:
    logins: list[Login]
    expected: int
    go: float  # monotonic
    faults: dict[str, float] = field(default_factory=dict)  # what -> monotonic time

    @property
    def answered(self) -> int:
        return len(self.logins)

    @property
    def worst_ms(self) -> float:
        return max((x.ms for x in self.logins), default=0.0)

    def p99_ms(self) -> float:
        return pct([x.ms for x in self.logins], 99)

    def outcomes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for x in self.logins:
            key = ":".join(x.outcome.split(":")[:2])
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items()))


class FaultStorm(Harness):
    """``connections`` monitors on "b", each making ``requests`` logins one after another."""

    def __init__(
        self,
        agents: LoopbackAgents,
        tree_a: JobTree,
        user: Any,
        *,
        connections: int,
        requests: int = 1,
        timeout_ms: int = MODULE_TIMEOUT_MS,
        per_client: int = 10,
    ) -> None:
        self.agents = agents
        self.tree_a = tree_a
        self.user = user
        self.connections = connections
        self.requests = requests
        self.timeout_ms = timeout_ms
        self.per_client = per_client
        self.dir = Path(tempfile.mkdtemp(prefix="cidfault-", dir="/tmp"))
        self.sshd: subprocess.Popen[str] | None = None
        self.clients: list[subprocess.Popen[bytes]] = []
        self.jobs: dict[str, str] = {}
        self.go_at = 0.0
        self._log_at = 0

    def _start(self) -> None:
        monitor = build_monitor(self.dir)
        out = self.dir / "out"
        out.mkdir()
        argv = ["storm", ADDRESSES["b"], str(self.agents.socket("b")), str(out), str(monitor)]
        env = {**os.environ, "CALLERID_FAULT_TIMEOUT_MS": str(self.timeout_ms)}
        self.sshd = subprocess.Popen(
            bench_argv("_standin_sshd", *argv),
            cwd=TOP,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env=env,
        )
        port = json.loads(self._line(30))["port"]
        ns = argparse.Namespace(clients=max(1, self.connections // self.per_client))
        ns.per_client = self.per_client
        self.clients, self.jobs = start_clients(self.tree_a, self.user, port, ns)
        spec = {
            "user": self.user.name,
            "rhost": ADDRESSES["a"],
            "connections": len(self.jobs),
            "inflight": 1,
            "requests": self.requests,
            "jobs": self.jobs,
        }
        self._write(json.dumps(spec))
        ready = json.loads(self._line(60))
        assert ready["ready"] == len(self.jobs), ready

    def _write(self, line: str) -> None:
        assert self.sshd is not None and self.sshd.stdin is not None
        self.sshd.stdin.write(line + "\n")
        self.sshd.stdin.flush()

    def _line(self, timeout: float) -> str:
        assert self.sshd is not None and self.sshd.stdout is not None
        ready, _, _ = select.select([self.sshd.stdout], [], [], timeout)
        if not ready:
            msg = f"the stand-in sshd said nothing in {timeout:.0f} s"
            raise AssertionError(msg)
        line = self.sshd.stdout.readline()
        assert line, "the stand-in sshd died"
        return line

    @property
    def expected(self) -> int:
        return len(self.jobs) * self.requests

    def go(self) -> float:
        """Start every monitor's logins; the monotonic time of the start."""
        self._log_at = len(self.agents.log("b"))
        self.go_at = time.monotonic()
        self._write("go")
        return self.go_at

    def decided(self) -> int:
        """Decisions agent "b" has written (its records go to its log without journald)."""
        return self.agents.log("b")[self._log_at :].count("CALLERID_DECISION=")

    def wait_decided(self, n: int, timeout: float = 30.0) -> None:
        wait_for(lambda: self.decided() >= n, timeout=timeout, what=f"{n} decisions on b")

    def finish(self, timeout: float = 120.0) -> StormResult:
        """Wait until every monitor has exited; every login's outcome."""
        done = json.loads(self._line(timeout))
        assert done["done"] == len(self.jobs), done
        logins = []
        for path in (self.dir / "out").glob("*.json"):
            data = json.loads(path.read_text())
            logins += [Login(s, ms, outcome, data["job"]) for s, ms, outcome in data["res"]]
        return StormResult(sorted(logins, key=lambda x: x.start), self.expected, self.go_at)

    def close(self) -> None:
        end_procs([self.sshd] if self.sshd is not None else [], group=True)
        end_procs(self.clients)
        self.sshd, self.clients = None, []
        shutil.rmtree(self.dir, ignore_errors=True)
