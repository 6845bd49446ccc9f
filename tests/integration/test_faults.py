"""Faults during a login storm: agents killed and stopped, reloads, a hung journal, a job ending
between decision and adoption, a wall-clock jump. docs/reliability.md ("Faults") has the
figures; bench/chaos.py (`make chaos`) runs the same faults with 1,000 logins.

Every login is made by tests/support/fault_monitor.c through pam_callerid.so's own client
code (one deadline over connect + send + receive), held by a monitor that holds a real TCP
connection from a client process in job 42 or 43 on "a" (tests/support/faultstorm.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from callerid.agent.backends.cgroup import CgroupBackend
from callerid.agent.config import parse
from callerid.agent.login import LoginFlow
from callerid.agent.netinfo import Connection, Proc, ProcReader
from callerid.agent.pamproto import PamRequest
from callerid.bus.protocol import Endpoint
from tests.fakes import FakeClock, FakeUsers
from tests.support.agents import LoopbackAgents, unix_listening
from tests.support.cgroups import JobTree, require_cgroups
from tests.support.faultstorm import MODULE_TIMEOUT_MS, FaultStorm, StormResult
from tests.support.journald import PrivateJournald
from tests.support.poll import wait_for
from tests.support.users import throwaway_user

pytestmark = pytest.mark.root

CONNECTIONS = 200  # the tests' storm; `make chaos` makes 1,000
PAM_TIMEOUT_MS = 2000  # the agent's bound (bench/storm.py's)
PEER_TIMEOUT_MS = 500
MARGIN_MS = 300  # scheduling on this small shared machine
LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


@pytest.fixture(scope="module")
def nodes() -> Iterator[tuple[Any, JobTree, JobTree]]:
    """A throwaway user with jobs 42 and 43 on "a" and "b" (b's extern steps hold a process)."""
    require_cgroups("v2")
    with throwaway_user() as user, JobTree("v2") as ta, JobTree("v2") as tb:
        for job in ("42", "43"):
            ta.add_job(job, user.uid)
            tb.add_job(job, user.uid)
            tb.spawn_in(job, "step_extern", ["sleep", "infinity"], user=user)
        yield user, ta, tb


def start_agents(nodes: tuple[Any, JobTree, JobTree], **kw: Any) -> LoopbackAgents:
    _, ta, tb = nodes
    extra = {"pam_timeout_ms": PAM_TIMEOUT_MS, **kw.pop("extra", {})}
    return LoopbackAgents({"a": ta, "b": tb}, extra=extra, **kw).__enter__()


@pytest.fixture
def agents(nodes: tuple[Any, JobTree, JobTree]) -> Iterator[LoopbackAgents]:
    agents = start_agents(nodes)
    try:
        yield agents
    finally:
        agents.close()


def assert_all_answered(res: StormResult, bound_ms: float) -> None:
    assert res.answered == res.expected, "every login got an end"
    slow = [x for x in res.logins if x.ms > bound_ms]
    assert not slow, f"{len(slow)} logins over {bound_ms} ms, e.g. {slow[:3]}"


def assert_right_job(res: StormResult) -> None:
    wrong = [x for x in res.logins if x.success and x.outcome != f"adopt:callerid:{x.job}"]
    assert not wrong, wrong[:5]


# --------------------------------------------------------------------------- agents killed


def test_destination_killed_mid_storm_fails_closed_and_restarts_at_once(
    nodes: tuple[Any, JobTree, JobTree], agents: LoopbackAgents
) -> None:
    user, ta, _ = nodes
    with FaultStorm(agents, ta, user, connections=CONNECTIONS, requests=3) as storm:
        storm.go()
        storm.wait_decided(storm.expected // 4)
        agents.stop("b", signal.SIGKILL)
        adopted = storm.decided()  # every record b wrote before it died (all adopt)
        res = storm.finish()
    assert_all_answered(res, MODULE_TIMEOUT_MS + MARGIN_MS)
    ok = [x for x in res.logins if x.success]
    # fail-closed: a login succeeds only with a decision b made (and journaled) before the
    # kill; every other one ends in an error the module turns into on_error=deny
    assert 0 < len(ok) <= adopted < res.expected, res.outcomes()
    assert {x.verdict for x in res.logins if not x.success} == {"fail"}, res.outcomes()
    assert_right_job(res)
    assert agents.socket("b").is_socket(), "the killed agent's socket is left behind"
    agents.start("b")  # bind_unix replaces the stale socket
    wait_for(lambda: unix_listening(agents.socket("b")), timeout=15, what="b serving again")
    with FaultStorm(agents, ta, user, connections=20) as again:
        again.go()
        res2 = again.finish()
    assert res2.outcomes() == {"adopt:callerid": 20}
    assert_right_job(res2)


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_source_killed_or_stopped_mid_storm_every_login_decided(
    nodes: tuple[Any, JobTree, JobTree], agents: LoopbackAgents, fault: str
) -> None:
    user, ta, _ = nodes
    pid = agents.procs["a"].pid
    try:
        with FaultStorm(agents, ta, user, connections=CONNECTIONS) as storm:
            storm.go()
            storm.wait_decided(storm.expected // 4)
            os.kill(pid, getattr(signal, fault))
            res = storm.finish()
    finally:
        if fault == "SIGSTOP":
            os.kill(pid, signal.SIGCONT)
    assert_all_answered(res, PAM_TIMEOUT_MS + MARGIN_MS)
    verdicts = {x.verdict for x in res.logins}
    assert verdicts == {"adopt"}, res.outcomes()  # decided: callerid, or unknown=newest
    log = agents.log("b")
    assert "CALLERID_REASON=timeout" not in log  # no login ran into the PAM deadline
    peer = "unreachable" if fault == "SIGKILL" else "timeout"
    assert f"CALLERID_PEER_STATUS={peer}" in log or fault == "SIGKILL", log[-3000:]


def test_sighup_every_100ms_loses_no_reply(
    nodes: tuple[Any, JobTree, JobTree], agents: LoopbackAgents
) -> None:
    user, ta, _ = nodes
    proc = agents.procs["b"]
    with FaultStorm(agents, ta, user, connections=CONNECTIONS, requests=5) as storm:
        storm.go()
        hups = 0
        while proc.poll() is None and storm.decided() < storm.expected:
            proc.send_signal(signal.SIGHUP)
            hups += 1
            wait_for(lambda h=hups: agents.log("b").count("configuration and") >= h, timeout=5)
            time.sleep(0.1)  # the fault's rhythm, not a synchronisation
        res = storm.finish()
    assert hups >= 2
    assert_all_answered(res, PAM_TIMEOUT_MS + MARGIN_MS)
    assert res.outcomes() == {"adopt:callerid": res.expected}  # one answer each, all right
    assert_right_job(res)


# --------------------------------------------------------------------------- the journal


def test_hung_journald_logins_on_time_lost_records_counted_once(
    nodes: tuple[Any, JobTree, JobTree],
) -> None:
    with PrivateJournald() as jd:
        agents = start_agents(nodes, prefix=jd.prefix)
        try:
            hung_journal(agents, jd)
        finally:
            agents.close()


def hung_journal(agents: LoopbackAgents, jd: PrivateJournald) -> None:
    sock = agents.socket("b")
    assert ask_root(sock) == "allow"
    jd.wait_for_entries(1, CALLERID_NODE="b", CALLERID_REASON="root")
    os.kill(jd.pid, signal.SIGSTOP)
    try:
        worst = max(timed_root_logins(sock, 300))  # far more than journald's queue holds
        lost = status(agents)["journal_lost"]
        assert lost > 0
    finally:
        os.kill(jd.pid, signal.SIGCONT)
    assert worst < PAM_TIMEOUT_MS / 1000, worst
    wait_for(lambda: ask_root(sock) == "allow" and "takes records again" in agents.log("b"))
    log = agents.log("b")
    assert log.count("(its socket would block): dropping") == 1, log[-2000:]
    assert log.count("takes records again") == 1
    assert status(agents)["journal_lost"] == lost
    assert f"{lost} records lost" in ctl_status_text(agents)


def ask_root(sock: Path) -> str:
    import socket as s

    with s.socket(s.AF_UNIX) as c:
        c.settimeout(5)
        c.connect(str(sock))
        c.sendall(b"CALLERID/1 op=account user=root service=sshd rhost=10.9.9.9 tty=ssh\n")
        reply = c.makefile("rb").readline().decode()
    return dict(f.split("=", 1) for f in reply.split()[1:])["verdict"]


def timed_root_logins(sock: Path, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.monotonic()
        assert ask_root(sock) == "allow"
        out.append(time.monotonic() - t0)
    return out


def status(agents: LoopbackAgents) -> dict[str, Any]:
    r = ctl(agents, "status", "--json")
    return dict(json.loads(r))


def ctl_status_text(agents: LoopbackAgents) -> str:
    return ctl(agents, "status")


def ctl(agents: LoopbackAgents, *args: str) -> str:
    argv = [sys.executable, "-m", "callerid.agent.ctl", "--config", str(agents.config("b"))]
    r = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout


# --------------------------------------------------------------------------- adoption


class VanishingSessions:
    """The session finder of a login whose job ends right after its jobs were listed: it
    removes the job's extern step (killing what held it) before answering."""

    def __init__(self, tree: JobTree, job: str, pid: int) -> None:
        self.tree, self.job, self.pid = tree, job, pid

    def session_connection(
        self, pid: int, rhost: str | None = None, lent: Sequence[Connection] | None = None
    ) -> tuple[Proc, Connection]:
        extern = self.tree.job_dirs(self.job)[0] / "step_extern" / "cgroup.procs"
        for holder in extern.read_text().split():
            os.kill(int(holder), signal.SIGKILL)
        wait_for(lambda: not extern.read_text().strip(), what="the extern step empty")
        self.tree.remove_step(self.job, "step_extern")
        local, remote = Endpoint("10.0.0.2", 22), Endpoint("10.0.0.1", 40022)
        conn = Connection("tcp", local, remote, 7, 0, "ESTABLISHED")
        return Proc(self.pid, 1, "sshd", 0.0), conn


def test_job_ending_between_decision_and_adoption_is_a_clean_adopt_failed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    require_cgroups("v2")
    with throwaway_user() as user, JobTree("v2") as tree:
        tree.add_job("42", user.uid)
        tree.spawn_in("42", "step_extern", ["sleep", "infinity"], user=user)
        backend = CgroupBackend(tree.backend_config())
        victim = subprocess.Popen(["sleep", "60"])
        try:
            flow = LoginFlow(
                parse({"node_name": "b"}).policy,
                node="b",
                users=FakeUsers({user.name: (user.uid, frozenset())}),
                sessions=VanishingSessions(tree, "42", victim.pid),
                procs=ProcReader(Path("/proc")),
                backend=backend,
                ask_source=never_asked,
                executor=None,
                clock=FakeClock(),
                rng=random.Random(1),
            )
            req = PamRequest("account", user.name, "sshd", "10.0.0.1", "ssh")
            out = asyncio.run(flow.account(req, victim.pid))
        finally:
            victim.kill()
            victim.wait()
    assert (out.reply.verdict, out.reply.reason) == ("deny", "adopt_failed")
    assert (out.record.decision, out.record.reason, out.record.job) == (
        "deny",
        "adopt_failed",
        None,
    )
    assert not [r for r in caplog.records if r.exc_info], "no traceback"


async def never_asked(conn: Connection, uid: int) -> tuple[str, str | None]:
    raise AssertionError("one job: the source is not asked")


# --------------------------------------------------------------------------- the clock


def test_wall_clock_jumps_do_not_fire_deadlines(nodes: tuple[Any, JobTree, JobTree]) -> None:
    """libfaketime moves the agents' wall clock (not CLOCK_MONOTONIC, as `date -s` would not):
    a day ahead, then back, during a storm whose source is stopped (every peer query runs
    into its deadline). Decisions still take peer.timeout_ms, not zero and not a day."""
    if not LIBFAKETIME.exists():
        pytest.skip(f"{LIBFAKETIME} is missing (apt-get install faketime; in the Makefile)")
    user, ta, _ = nodes
    faketime = Path(tempfile.mkdtemp(prefix="cidft-", dir="/tmp")) / "faketime"
    faketime.write_text("+0\n")
    env = {
        "LD_PRELOAD": str(LIBFAKETIME),
        "FAKETIME_TIMESTAMP_FILE": str(faketime),
        "FAKETIME_NO_CACHE": "1",
        "DONT_FAKE_MONOTONIC": "1",
    }
    probe = [sys.executable, "-c", "import time; print(time.time())"]
    faketime.write_text("+1d\n")
    out = subprocess.run(
        probe, env={**os.environ, **env}, capture_output=True, text=True, check=True
    ).stdout
    assert float(out) - time.time() > 86000, "libfaketime moves the wall clock"
    faketime.write_text("+0\n")
    agents = start_agents(nodes, env=env)
    try:
        pid = agents.procs["a"].pid
        with FaultStorm(agents, ta, user, connections=100, requests=2) as storm:
            storm.go()
            storm.wait_decided(50)
            os.kill(pid, signal.SIGSTOP)
            try:
                for shift in ("+1d", "-1d", "+365d", "+0"):
                    faketime.write_text(shift + "\n")
                    time.sleep(0.2)  # the jumps' rhythm, not a synchronisation
                res = storm.finish()
            finally:
                os.kill(pid, signal.SIGCONT)
        log_b = agents.log("b")
        status = subprocess.run(
            [sys.executable, "-m", "callerid.agent.ctl", "--config", str(agents.config("b")),
             "status", "--json"],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout  # fmt: skip
    finally:
        agents.close()
        shutil.rmtree(faketime.parent, ignore_errors=True)
    assert_all_answered(res, PAM_TIMEOUT_MS + MARGIN_MS)
    assert {x.verdict for x in res.logins} == {"adopt"}, res.outcomes()
    assert "CALLERID_PEER_STATUS=timeout" in log_b  # the peer deadlines did run
    assert "CALLERID_REASON=timeout" not in log_b  # and no PAM deadline fired
    # A silent peer gets one probe at a time (bus/_client.py): the other queries are answered
    # "timeout" at once and counted. Every quick peer timeout must be one of those: a deadline
    # that fired early would be a quick timeout the client did not count.
    fast_answers = json.loads(status)["asked"]["stalled_fast_fails"]
    quick = [
        int(m[1])
        for m in re.finditer(r"CALLERID_PEER_STATUS=timeout CALLERID_LATENCY_US=(\d+)", log_b)
        if int(m[1]) < PEER_TIMEOUT_MS * 900
    ]
    assert len(quick) <= fast_answers, "no peer deadline fired early"
    waited = re.findall(r"CALLERID_PEER_STATUS=timeout CALLERID_LATENCY_US=(\d+)", log_b)
    assert any(int(us) >= PEER_TIMEOUT_MS * 1000 for us in waited)  # the probes waited it out
