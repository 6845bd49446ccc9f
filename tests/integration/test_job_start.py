"""The job-start race: a login waits (a bound) for the job the source names to appear here.

Two real agents on loopback with real cgroup v2 job trees. The ssh client runs in job 44 on
"a"; "b" does not have job 44 yet (its prolog is still creating the extern step). b asks a,
a names job 44, and b lists the user's jobs again every 50 ms for up to
`policy.wait_for_job_ms`: the test creates job 44 on b once a has answered (seen in a's debug
log), and the login is adopted into it, its record saying how long it waited. Without the
job, the login falls back to the usual policy after the bound.
"""

from __future__ import annotations

import re
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.agents import ADDRESSES, LoopbackAgents, client_argv, end_client
from tests.support.cgroups import JobTree
from tests.support.poll import wait_for
from tests.support.users import ThrowawayUser

pytestmark = pytest.mark.root

WAIT_MS = 800


@pytest.fixture(scope="module")
def trees(user: ThrowawayUser) -> Iterator[dict[str, JobTree]]:
    with JobTree("v2") as a, JobTree("v2") as b:
        a.add_job("44", user.uid)
        a.add_job("45", user.uid)
        yield {"a": a, "b": b}


@pytest.fixture(scope="module")
def agents(trees: dict[str, JobTree]) -> Iterator[LoopbackAgents]:
    extra = {"pam_timeout_ms": 2000}
    policy = {"wait_for_job_ms": WAIT_MS}
    with LoopbackAgents(trees, policy=policy, extra=extra, log_level="debug") as ag:
        yield ag


def record(log: str, user: str) -> dict[str, str]:
    lines = [ln for ln in log.splitlines() if f"CALLERID_USER={user} " in ln + " "]
    assert lines, log[-2000:]
    return dict(re.findall(r"(CALLERID_[A-Z_]+)=([^\s\]]+)", lines[-1]))


def login_from(
    agents: LoopbackAgents, trees: dict[str, JobTree], user: ThrowawayUser, job: str
) -> tuple[threading.Thread, dict[str, Any], subprocess.Popen[bytes]]:
    sshd = agents.sshd("b")
    argv = client_argv("tcp", ADDRESSES["a"], ADDRESSES["b"], sshd.port)
    kw: dict[str, Any] = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE}
    client = trees["a"].spawn_in(job, "step_batch", argv, user=user, **kw)
    assert client.stdout is not None
    client.stdout.readline()  # connected
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(sshd.login(user.name)))
    thread.start()
    return thread, result, client


def test_a_job_created_while_the_login_waits_is_the_one_adopted(
    agents: LoopbackAgents, trees: dict[str, JobTree], user: ThrowawayUser
) -> None:
    answered = agents.log("a").count(": job 44")
    thread, result, client = login_from(agents, trees, user, "44")
    try:
        wait_for(lambda: agents.log("a").count(": job 44") > answered, what="a names job 44")
        trees["b"].add_job("44", user.uid)  # the prolog on b is done now
        thread.join(timeout=10)
    finally:
        end_client(client)
    assert (result["fields"]["verdict"], result["fields"]["reason"]) == ("adopt", "callerid")
    assert result["fields"]["job"] == "44"
    assert trees["b"].cgroup_of(result["monitor"]) == trees["b"].cgroup_path("44", "step_extern")
    rec = record(agents.log("b"), user.name)
    assert rec["CALLERID_PEER_STATUS"] == "found"
    assert 0 < int(rec["CALLERID_WAITED_MS"]) < WAIT_MS


def test_a_job_that_does_not_come_falls_back_to_the_policy_after_the_bound(
    agents: LoopbackAgents, trees: dict[str, JobTree], user: ThrowawayUser
) -> None:
    """Job 45 never comes to b, which has two other jobs of the user: after the bound the
    policy's unknown action (newest) decides."""
    trees["b"].add_job("46", user.uid)
    trees["b"].add_job("47", user.uid)
    thread, result, client = login_from(agents, trees, user, "45")
    try:
        thread.join(timeout=10)
    finally:
        end_client(client)
    assert (result["fields"]["verdict"], result["fields"]["reason"]) == ("adopt", "unknown_newest")
    rec = record(agents.log("b"), user.name)
    assert rec["CALLERID_PEER_STATUS"] == "found"  # a named job 45, which b does not have
    assert WAIT_MS <= int(rec["CALLERID_WAITED_MS"]) < WAIT_MS + 400
