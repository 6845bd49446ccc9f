"""Audit mode for a staged rollout, with real agents writing to a real (private) journald.

In `mode: audit` the agent decides and adopts as in enforce mode, but a login enforce mode
would deny is let through: the reply is allow (reason audit) and the journal record carries
the would-be verdict and reason. `calleridctl audit --would-deny --summary` reads them back
from the journal. A SIGHUP back to `mode: enforce` denies again.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.agents import ADDRESSES, LoopbackAgents, client_argv, end_client
from tests.support.cgroups import JobTree, require_cgroups
from tests.support.journald import PrivateJournald
from tests.support.users import ThrowawayUser, throwaway_users

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def users() -> Iterator[list[ThrowawayUser]]:
    require_cgroups("v2")
    with throwaway_users(2) as both:
        yield both  # [with jobs on a and b, without any job on b]


@pytest.fixture(scope="module")
def trees(users: list[ThrowawayUser]) -> Iterator[dict[str, JobTree]]:
    with JobTree("v2") as a, JobTree("v2") as b:
        a.add_job("42", users[0].uid)
        a.add_job("52", users[1].uid)
        b.add_job("42", users[0].uid)
        yield {"a": a, "b": b}


@pytest.fixture(scope="module")
def jd() -> Iterator[PrivateJournald]:
    with PrivateJournald() as journald:
        yield journald


@pytest.fixture(scope="module")
def agents(trees: dict[str, JobTree], jd: PrivateJournald) -> Iterator[LoopbackAgents]:
    with LoopbackAgents(trees, extra={"mode": "audit"}, prefix=jd.prefix) as ag:
        yield ag


def login(
    agents: LoopbackAgents, trees: dict[str, JobTree], user: ThrowawayUser, job: str
) -> dict[str, Any]:
    sshd = agents.sshd("b")
    argv = client_argv("tcp", ADDRESSES["a"], ADDRESSES["b"], sshd.port)
    kw: dict[str, Any] = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE}
    client = trees["a"].spawn_in(job, "step_batch", argv, user=user, **kw)
    try:
        assert client.stdout is not None
        client.stdout.readline()
        return sshd.login(user.name)["fields"]
    finally:
        end_client(client)
        sshd.close()


def ctl(agents: LoopbackAgents, jd: PrivateJournald, *args: str) -> str:
    argv = [sys.executable, "-m", "callerid.agent.ctl", "--config", str(agents.config("b"))]
    out = jd.run([*argv, *args], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return str(out.stdout)


def test_a_denial_is_let_through_and_journaled_with_the_would_be_verdict(
    agents: LoopbackAgents,
    trees: dict[str, JobTree],
    users: list[ThrowawayUser],
    jd: PrivateJournald,
) -> None:
    with_jobs, without = users
    adopted = login(agents, trees, with_jobs, "42")
    assert (adopted["verdict"], adopted["reason"], adopted["job"]) == ("adopt", "single_job", "42")
    let_through = login(agents, trees, without, "52")
    assert (let_through["verdict"], let_through["reason"]) == ("allow", "audit")
    entries = jd.wait_for_entries(1, CALLERID_USER=without.name)
    rec = entries[-1]
    assert (rec["CALLERID_DECISION"], rec["CALLERID_REASON"]) == ("allow", "audit")
    assert (rec["CALLERID_WOULD_DECISION"], rec["CALLERID_WOULD_REASON"]) == ("deny", "no_jobs")
    assert "would be denied (no_jobs); allowed: audit mode" in rec["MESSAGE"]
    listed = ctl(agents, jd, "audit", "--would-deny")
    assert without.name in listed and "would=deny:no_jobs" in listed
    assert with_jobs.name not in listed  # adopted as usual: not a would-be denial
    summary = ctl(agents, jd, "audit", "--summary")
    assert "1 logins enforce mode would deny" in summary
    assert "by reason: no_jobs 1" in summary and f"by user: {without.name} 1" in summary


def test_back_to_enforce_denies_again(
    agents: LoopbackAgents,
    trees: dict[str, JobTree],
    users: list[ThrowawayUser],
    jd: PrivateJournald,
) -> None:
    reloads = len(jd.read(CALLERID_EVENT="reloaded"))
    agents.write_config("b", mode="enforce")
    agents.procs["b"].send_signal(1)
    jd.wait_for_entries(reloads + 1, CALLERID_EVENT="reloaded")
    denied = login(agents, trees, users[1], "52")
    assert (denied["verdict"], denied["reason"]) == ("deny", "no_jobs")
