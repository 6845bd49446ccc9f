"""`calleridctl explain` agrees with the agent's journaled decision, for every policy rule.

Two real agents on loopback (node "a" with the ssh client's jobs, node "b" with sshd), real
users and groups, real cgroup job trees. For each rule: b gets the rule's policy (SIGHUP), a
stand-in sshd on b takes a login whose monitor asks b's agent, and b journals the decision;
then, with the ssh client's connection still open, `calleridctl explain` on b is asked about
the same login (--from the client's end --to sshd's end) and must print the same verdict,
reason and job. Explain is the agent's own login flow with adoption switched off, so this
holds by construction; the test makes sure it stays so.
"""

from __future__ import annotations

import grp
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.support.agents import ADDRESSES, LoopbackAgents, client_argv, end_client
from tests.support.cgroups import JobTree, require_cgroups
from tests.support.poll import wait_for
from tests.support.users import ThrowawayUser, throwaway_users

pytestmark = pytest.mark.root


@dataclass(frozen=True)
class People:
    user: ThrowawayUser  # jobs 42 and 43 on a and on b
    solo: ThrowawayUser  # one job on b (50)
    idle: ThrowawayUser  # no job anywhere


@pytest.fixture(scope="module")
def people() -> Iterator[People]:
    require_cgroups("v2")
    with throwaway_users(3) as (user, solo, idle):
        yield People(user, solo, idle)


@pytest.fixture(scope="module")
def trees(people: People) -> Iterator[dict[str, JobTree]]:
    with JobTree("v2") as a, JobTree("v2") as b:
        for job in ("42", "43"):
            a.add_job(job, people.user.uid)
            b.add_job(job, people.user.uid)
        b.add_job("50", people.solo.uid)
        for job in ("42", "43", "50"):  # as slurmstepd does, a process holds each job from its
            b.spawn_in(job, "step_extern", ["sleep", "infinity"])  # start (fixing its age)
        yield {"a": a, "b": b}


@pytest.fixture(scope="module")
def agents(trees: dict[str, JobTree]) -> Iterator[LoopbackAgents]:
    with LoopbackAgents(trees) as ag:
        yield ag


@dataclass(frozen=True)
class Case:
    reason: str
    login_as: str  # "user", "solo", "idle", or a literal name
    from_job: str | None = "43"  # the ssh client's job on a (None: outside any job)
    policy: dict[str, Any] = field(default_factory=dict)


CASES = [
    Case("root", "root"),
    Case("exempt_user", "user", policy={"exempt_users": ["@user"]}),
    Case("exempt_group", "user", policy={"exempt_groups": ["@group"]}),
    Case("unknown_user", "no-such-user-callerid"),
    Case("no_jobs", "idle"),
    Case("single_job", "solo"),
    Case("callerid", "user"),
    *(
        Case(f"unknown_{action}", "user", from_job=None, policy={"unknown": action})
        for action in ("newest", "oldest", "random", "deny", "allow")
    ),
]


def journaled(log: str, user: str) -> dict[str, str]:
    """The CALLERID_* fields of the last decision record for ``user`` in an agent's log."""
    lines = [ln for ln in log.splitlines() if f"CALLERID_USER={user} " in ln + " "]
    assert lines, f"no record for {user} in:\n{log}"
    return dict(re.findall(r"(CALLERID_[A-Z_]+)=(\S+)", lines[-1]))


def explain(agents: LoopbackAgents, user: str, src: str, dst: str) -> dict[str, str | None]:
    argv = [sys.executable, "-m", "callerid.agent.ctl", "--config", str(agents.config("b"))]
    out = subprocess.run(
        [*argv, "explain", user, "--from", src, "--to", dst],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    last = re.search(r"^decision: (\w+)(?: job (\S+))? \(reason (\w+)\)$", out.stdout, re.M)
    assert last, out.stdout
    return {"decision": last[1], "job": last[2], "reason": last[3], "out": out.stdout}


@pytest.mark.parametrize("case", CASES, ids=[c.reason for c in CASES])
def test_explain_agrees_with_the_journaled_decision(
    case: Case, agents: LoopbackAgents, trees: dict[str, JobTree], people: People
) -> None:
    user = people.user
    names = {"user": user.name, "solo": people.solo.name, "idle": people.idle.name}
    login_as = names.get(case.login_as, case.login_as)
    group = grp.getgrgid(user.gid).gr_name
    subst = {"@user": user.name, "@group": group}
    policy = {k: [subst.get(v, v) for v in vs] if isinstance(vs, list) else vs
              for k, vs in case.policy.items()}  # fmt: skip
    reloads = agents.log("b").count("peer keys reloaded")
    agents.write_config("b", policy=policy)
    agents.procs["b"].send_signal(1)
    wait_for(lambda: agents.log("b").count("peer keys reloaded") > reloads, what="reload")

    sshd = agents.sshd("b")
    argv = client_argv("tcp", ADDRESSES["a"], ADDRESSES["b"], sshd.port)
    kw: dict[str, Any] = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE}
    if case.from_job is None:
        client = trees["a"].spawn(argv, user=user, **kw)
    else:
        client = trees["a"].spawn_in(case.from_job, "step_batch", argv, user=user, **kw)
    try:
        assert client.stdout is not None and client.stdin is not None
        src = f"{ADDRESSES['a']}:{int(client.stdout.readline())}"
        dst = f"{ADDRESSES['b']}:{sshd.port}"
        login = sshd.login(login_as)
        record = journaled(agents.log("b"), login_as)
        dry = explain(agents, login_as, src, dst)
    finally:
        end_client(client)
        sshd.close()
    assert record["CALLERID_REASON"] == case.reason, record
    assert login["fields"]["reason"] == case.reason
    assert (dry["decision"], dry["reason"]) == (
        record["CALLERID_DECISION"],
        record["CALLERID_REASON"],
    ), dry["out"]
    if case.reason != "unknown_random":  # a random choice may differ between two runs
        assert dry["job"] == record.get("CALLERID_JOB_ID"), dry["out"]
    peer = re.search(r"\[peer status (\S+)\]", str(dry["out"]))
    assert peer and peer[1] == record.get("CALLERID_PEER_STATUS", "-"), dry["out"]
