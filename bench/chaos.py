"""Faults during a 1,000-login storm (`make chaos`): what each login got, and how fast.

The storm is bench/storm.py's (two loopback agents, client processes in jobs 42/43 on "a", a
stand-in sshd on "b" forking one monitor per connection), with the monitors of
tests/support/faultstorm.py, which ask through pam_callerid.so's own client code and its
deadline (2,500 ms). Faults, one storm each:

* dest-kill: b SIGKILLed after 300 decisions; then restarted over its stale socket and a
  second storm of 100 logins;
* source-kill, source-stop: a SIGKILLed / SIGSTOPped after 300 decisions;
* sighup: b gets SIGHUP every 100 ms for the whole storm (2 logins per monitor);
* journal-hung: b runs with a private journald (tests/support/journald.py), SIGSTOPped
  during a storm; the records b could not hand over are counted (`calleridctl status`).

Reported per fault: logins answered / made, lost replies, worst and p99 round trip at the
monitor, the outcomes (verdict:reason, or fail:<client status> when the agent could not be
asked and the module applies on_error=deny), and lost journal records.
Reproduce (root, from the repo top): .venv/bin/python -m bench.chaos [--connections 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from bench._common import need_root, raise_nofile, reproduce
from tests.support.agents import LoopbackAgents, unix_listening
from tests.support.cgroups import JobTree
from tests.support.faultstorm import FaultStorm, StormResult
from tests.support.journald import PrivateJournald
from tests.support.poll import wait_for
from tests.support.users import throwaway_user

PAM_TIMEOUT_MS = 2000
Fault = Callable[[LoopbackAgents, FaultStorm], dict[str, Any]]


@contextmanager
def started(trees: dict[str, JobTree], prefix: list[str] | None = None) -> Iterator[LoopbackAgents]:
    with LoopbackAgents(trees, extra={"pam_timeout_ms": PAM_TIMEOUT_MS}, prefix=prefix) as agents:
        yield agents


def kill_b(agents: LoopbackAgents, storm: FaultStorm) -> dict[str, Any]:
    storm.wait_decided(min(300, storm.expected // 3))
    agents.stop("b", signal.SIGKILL)
    return {"decided_before_kill": storm.decided()}


def signal_a(sig: signal.Signals) -> Fault:
    def fault(agents: LoopbackAgents, storm: FaultStorm) -> dict[str, Any]:
        storm.wait_decided(min(300, storm.expected // 3))
        os.kill(agents.procs["a"].pid, sig)
        return {}

    return fault


def hup_b(agents: LoopbackAgents, storm: FaultStorm) -> dict[str, Any]:
    proc, hups = agents.procs["b"], 0
    while proc.poll() is None and storm.decided() < storm.expected:
        proc.send_signal(signal.SIGHUP)
        hups += 1
        time.sleep(0.1)  # the fault's rhythm
    return {"sighups": hups}


def run_storm(
    agents: LoopbackAgents, ta: JobTree, user: Any, n: int, requests: int, *, fault: Fault | None
) -> tuple[StormResult, dict[str, Any]]:
    with FaultStorm(agents, ta, user, connections=n, requests=requests) as storm:
        storm.go()
        extra = fault(agents, storm) if fault is not None else {}
        return storm.finish(), extra


def figures(name: str, res: StormResult, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "fault": name,
        "answered": res.answered,
        "logins": res.expected,
        "lost_replies": res.expected - res.answered,
        "success": sum(x.success for x in res.logins),
        "worst_ms": round(res.worst_ms, 1),
        "p99_ms": round(res.p99_ms(), 1),
        "outcomes": res.outcomes(),
        **extra,
    }


def ctl_status(agents: LoopbackAgents) -> dict[str, Any]:
    argv = [sys.executable, "-m", "callerid.agent.ctl", "--config", str(agents.config("b"))]
    r = subprocess.run([*argv, "status", "--json"], capture_output=True, text=True, check=True)
    return dict(json.loads(r.stdout))


def journal_hung(trees: dict[str, JobTree], ta: JobTree, user: Any, n: int) -> dict[str, Any]:
    with PrivateJournald() as jd, started(trees, jd.prefix) as agents:
        pid = jd.pid

        def stop_journald(agents: LoopbackAgents, storm: FaultStorm) -> dict[str, Any]:
            os.kill(pid, signal.SIGSTOP)
            return {}

        try:
            res, _ = run_storm(agents, ta, user, n, 1, fault=stop_journald)
            lost = ctl_status(agents)["journal_lost"]
        finally:
            os.kill(pid, signal.SIGCONT)
        run_storm(agents, ta, user, 10, 1, fault=None)  # records again: the recovery line
        log = agents.log("b")
        return figures(
            "journal-hung",
            res,
            {
                "journal_lost": lost,
                "loss_log_lines": log.count("would block): dropping"),
                "recovery_log_lines": log.count("takes records again"),
            },
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=1000, help="logins in each storm")
    ap.add_argument("--json", type=argparse.FileType("w"))
    args = ap.parse_args()
    need_root()
    raise_nofile(1 << 16)
    n, out = args.connections, []
    with throwaway_user() as user, JobTree("v2") as ta, JobTree("v2") as tb:
        for job in ("42", "43"):
            ta.add_job(job, user.uid)
            tb.add_job(job, user.uid)
            tb.spawn_in(job, "step_extern", ["sleep", "infinity"], user=user)
        trees = {"a": ta, "b": tb}
        with started(trees) as agents:
            res, extra = run_storm(agents, ta, user, n, 1, fault=kill_b)
            out.append(figures("dest-kill", res, extra))
            stale = agents.socket("b").is_socket()
            t0 = time.monotonic()
            agents.start("b")
            wait_for(lambda: unix_listening(agents.socket("b")), timeout=15, what="b again")
            res, _ = run_storm(agents, ta, user, min(n, 100), 1, fault=None)
            up_s = time.monotonic() - t0
            out.append(figures("dest-restarted", res, {"stale_socket": stale, "up_s": up_s}))
        for name, sig in (("source-kill", signal.SIGKILL), ("source-stop", signal.SIGSTOP)):
            with started(trees) as agents:
                try:
                    res, extra = run_storm(agents, ta, user, n, 1, fault=signal_a(sig))
                finally:
                    os.kill(agents.procs["a"].pid, signal.SIGCONT)
                out.append(figures(name, res, extra))
        with started(trees) as agents:
            res, extra = run_storm(agents, ta, user, n, 2, fault=hup_b)
            out.append(figures("sighup", res, extra))
        out.append(journal_hung(trees, ta, user, n))
    for row in out:
        print(json.dumps(row))
    print(f"reproduce: {reproduce('chaos', ['--connections', str(n)])}")
    if args.json is not None:
        json.dump(out, args.json, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
