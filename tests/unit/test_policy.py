"""policy.decide: table-driven, every rule and every configurable action."""

from __future__ import annotations

import dataclasses
import random

import pytest

from callerid.agent.backends.base import Job
from callerid.agent.config import PolicyConfig
from callerid.agent.policy import Decision, Facts, Need, after_adopt_failure, decide

OLD = Job("7", 1001, 100.0)
MID = Job("9", 1001, 200.0)
NEW = Job("8", 1001, 300.0)
TIE_LOW = Job("10", 1001, 300.0)
TIE_HIGH = Job("11", 1001, 300.0)
RNG = random.Random(4)


def pol(**kw: object) -> PolicyConfig:
    return dataclasses.replace(PolicyConfig(), **kw)  # type: ignore[arg-type]


def facts(**kw: object) -> Facts:
    base: dict[str, object] = {"user": "alice", "uid": 1001}
    base.update(kw)
    return Facts(**base)  # type: ignore[arg-type]


CASES = [
    # (id, facts, policy, expected verdict or Need, reason, job id)
    ("root", facts(user="root", uid=0), pol(), "allow", "root", None),
    ("root-not-ignored", facts(user="root", uid=0), pol(ignore_root=False), Need.JOBS, "", None),
    ("exempt-user", facts(), pol(exempt_users=["alice"]), "allow", "exempt_user", None),
    (
        "exempt-group",
        facts(groups=frozenset({"staff", "hpcadm"})),
        pol(exempt_groups=["hpcadm"]),
        "allow",
        "exempt_group",
        None,
    ),
    (
        "not-exempt-group",
        facts(groups=frozenset({"staff"})),
        pol(exempt_groups=["adm"]),
        Need.JOBS,
        "",
        None,
    ),
    ("unknown-user", facts(uid=None), pol(), "deny", "unknown_user", None),
    ("needs-jobs", facts(), pol(), Need.JOBS, "", None),
    ("no-jobs-ask-first", facts(jobs=()), pol(), Need.CALLERID, "", None),
    ("no-jobs-deny", facts(jobs=(), callerid_asked=True), pol(), "deny", "no_jobs", None),
    ("no-jobs-no-wait", facts(jobs=()), pol(wait_for_job_ms=0), "deny", "no_jobs", None),
    (
        "no-jobs-allow",
        facts(jobs=(), callerid_asked=True, callerid_job="5"),
        pol(no_jobs="allow"),
        "allow",
        "no_jobs",
        None,
    ),
    (
        "awaited-job-beats-the-shortcut",
        facts(jobs=(MID,), callerid_asked=True, callerid_job="9"),
        pol(),
        "adopt",
        "callerid",
        "9",
    ),
    ("single-job", facts(jobs=(MID,)), pol(), "adopt", "single_job", "9"),
    (
        "single-job-no-shortcut",
        facts(jobs=(MID,)),
        pol(single_job_shortcut=False),
        Need.CALLERID,
        "",
        None,
    ),
    ("needs-callerid", facts(jobs=(OLD, NEW)), pol(), Need.CALLERID, "", None),
    (
        "callerid-match",
        facts(jobs=(OLD, NEW), callerid_asked=True, callerid_job="7"),
        pol(),
        "adopt",
        "callerid",
        "7",
    ),
    (
        "callerid-single-no-shortcut",
        facts(jobs=(MID,), callerid_asked=True, callerid_job="9"),
        pol(single_job_shortcut=False, unknown="deny"),
        "adopt",
        "callerid",
        "9",
    ),
    (
        "callerid-not-ours-newest",
        facts(jobs=(OLD, NEW), callerid_asked=True, callerid_job="99"),
        pol(),
        "adopt",
        "unknown_newest",
        "8",
    ),
    (
        "unknown-newest",
        facts(jobs=(NEW, OLD, MID), callerid_asked=True),
        pol(),
        "adopt",
        "unknown_newest",
        "8",
    ),
    (
        "unknown-newest-tie-higher-id",
        facts(jobs=(TIE_HIGH, TIE_LOW, OLD), callerid_asked=True),
        pol(),
        "adopt",
        "unknown_newest",
        "11",
    ),
    (
        "unknown-oldest",
        facts(jobs=(NEW, OLD, MID), callerid_asked=True),
        pol(unknown="oldest"),
        "adopt",
        "unknown_oldest",
        "7",
    ),
    (
        "unknown-deny",
        facts(jobs=(NEW, OLD), callerid_asked=True),
        pol(unknown="deny"),
        "deny",
        "unknown_deny",
        None,
    ),
    (
        "unknown-allow",
        facts(jobs=(NEW, OLD), callerid_asked=True),
        pol(unknown="allow"),
        "allow",
        "unknown_allow",
        None,
    ),
    (
        "single-no-shortcut-unknown-deny",
        facts(jobs=(MID,), callerid_asked=True),
        pol(single_job_shortcut=False, unknown="deny"),
        "deny",
        "unknown_deny",
        None,
    ),
]


@pytest.mark.parametrize(
    ("name", "f", "p", "verdict", "reason", "job"), CASES, ids=[c[0] for c in CASES]
)
def test_decide(
    name: str, f: Facts, p: PolicyConfig, verdict: object, reason: str, job: str | None
) -> None:
    out = decide(f, p, "node2", RNG)
    if isinstance(verdict, Need):
        assert out is verdict
        return
    assert isinstance(out, Decision)
    assert (out.verdict, out.reason) == (verdict, reason)
    assert (out.job.id if out.job else None) == job
    if out.verdict == "deny":
        assert out.user_message.startswith("Access denied by callerid")
    else:
        assert out.user_message == ""


def test_deny_message_names_the_node() -> None:
    out = decide(facts(jobs=(), callerid_asked=True), pol(), "node2", RNG)
    assert isinstance(out, Decision)
    assert out.user_message == "Access denied by callerid: you have no active job on node2"


def test_random_picks_only_the_users_jobs_and_all_of_them() -> None:
    jobs = (OLD, MID, NEW)
    seen = set()
    rng = random.Random(1)
    for _ in range(200):
        out = decide(facts(jobs=jobs, callerid_asked=True), pol(unknown="random"), "n", rng)
        assert (
            isinstance(out, Decision) and out.verdict == "adopt" and out.reason == "unknown_random"
        )
        assert out.job in jobs
        seen.add(out.job.id if out.job else None)
    assert seen == {"7", "8", "9"}


def test_root_is_decided_without_any_fact() -> None:
    # no jobs, no callerid: root never waits for a lookup
    assert decide(Facts(user="root", uid=0), pol(), "n", RNG) == Decision("allow", "root")


@pytest.mark.parametrize(("action", "verdict"), [("deny", "deny"), ("allow", "allow")])
def test_adopt_failure(action: str, verdict: str) -> None:
    before = Decision("adopt", "callerid", job=MID)
    out = after_adopt_failure(before, pol(adopt_failure=action), "node2")
    assert (out.verdict, out.reason) == (verdict, "adopt_failed")
    assert out.job is None
    if verdict == "deny":
        assert "job 9" in out.user_message and "node2" in out.user_message


def test_decision_invariant() -> None:
    with pytest.raises(ValueError, match="exactly when"):
        Decision("adopt", "x")
    with pytest.raises(ValueError, match="exactly when"):
        Decision("allow", "x", job=MID)
