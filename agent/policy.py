"""The decision policy: a pure function from facts to a verdict. No I/O, no clock.

One login is decided in stages, because some facts cost I/O (the user's local jobs, a peer
query) and must not be fetched when an earlier rule already decides (root is never delayed):

    decide(facts, cfg, rng) -> Decision | Need

`Need.JOBS` asks the caller to look up the user's local jobs, `Need.CALLERID` to ask the source
agent; the caller fills the fact in and calls `decide` again. Rules, first match wins:

 1. ignore_root and uid 0                   -> allow   (root)
 2. user in exempt_users                    -> allow   (exempt_user)
 3. user in one of exempt_groups            -> allow   (exempt_group)
 4. unknown user                            -> deny    (unknown_user)
 5. no local jobs                           -> no_jobs action: deny | allow   (no_jobs)
                                               (with wait_for_job_ms, only after the source
                                               was asked and its job did not appear)
 6. the source names one of the user's jobs -> adopt it                       (callerid)
 7. one job and single_job_shortcut         -> adopt it                       (single_job)
    (rule 6 applies first only when the source was asked already, which the shortcut spares)
 8. otherwise                               -> unknown action: newest | oldest | random |
                                               deny | allow                   (unknown_<action>)
Adoption that then fails goes through `after_adopt_failure`: adopt_failure = deny | allow.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from callerid.agent.backends.base import Job
from callerid.agent.config import PolicyConfig

__all__ = ["Decision", "Facts", "Need", "after_adopt_failure", "decide"]

Verdict = Literal["adopt", "allow", "deny"]


class Need(enum.Enum):
    """A fact the policy needs before it can decide."""

    JOBS = "jobs"
    CALLERID = "callerid"


@dataclass(frozen=True, slots=True)
class Facts:
    """What is known about one login so far (None = not looked up yet)."""

    user: str
    uid: int | None  # None: no such user
    groups: frozenset[str] = frozenset()  # the user's group names (only if exempt_groups is set)
    jobs: Sequence[Job] | None = None  # the user's jobs on this node
    callerid_asked: bool = False
    callerid_job: str | None = None  # the job id the source agent named, if any
    callerid_status: str = "skipped"  # found | not_found | unreachable | timeout | ...

    def with_jobs(self, jobs: Sequence[Job]) -> Facts:
        """These facts and the user's local jobs (a direct copy: dataclasses.replace is slow)."""
        return Facts(self.user, self.uid, self.groups, jobs)

    def with_more_jobs(self, jobs: Sequence[Job]) -> Facts:
        """These facts with the local jobs listed again (what the source said is kept)."""
        return Facts(
            self.user, self.uid, self.groups, jobs,
            self.callerid_asked, self.callerid_job, self.callerid_status,
        )  # fmt: skip

    def with_callerid(self, job: str | None = None, status: str = "skipped") -> Facts:
        """These facts and what the source agent said (``job`` if it named one)."""
        return Facts(self.user, self.uid, self.groups, self.jobs, True, job, status)


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    reason: str
    job: Job | None = None
    user_message: str = ""  # shown to the user on deny

    def __post_init__(self) -> None:
        if (self.verdict == "adopt") != (self.job is not None):
            msg = "a job is named exactly when the verdict is adopt"
            raise ValueError(msg)


def decide(facts: Facts, cfg: PolicyConfig, node: str, rng: random.Random) -> Decision | Need:
    """Apply the rules above to the facts known so far."""
    if cfg.ignore_root and facts.uid == 0:
        return Decision("allow", "root")
    if facts.user in cfg.exempt_users:
        return Decision("allow", "exempt_user")
    if cfg.exempt_groups and not facts.groups.isdisjoint(cfg.exempt_groups):
        return Decision("allow", "exempt_group")
    if facts.uid is None:
        return Decision("deny", "unknown_user", user_message=_deny_message(cfg, node))
    if facts.jobs is None:
        return Need.JOBS
    jobs = sorted(facts.jobs, key=Job.sort_key)  # oldest first, newest last
    if not jobs:
        if cfg.wait_for_job_ms > 0 and not facts.callerid_asked:
            return Need.CALLERID  # the source may name a job this node is still creating
        if cfg.no_jobs == "allow":
            return Decision("allow", "no_jobs")
        return Decision("deny", "no_jobs", user_message=_deny_message(cfg, node))
    named = _named(jobs, facts)
    if named is not None:  # asked already (the job was awaited): the source's answer counts
        return Decision("adopt", "callerid", job=named)
    if len(jobs) == 1 and cfg.single_job_shortcut:
        return Decision("adopt", "single_job", job=jobs[0])
    if not facts.callerid_asked:
        return Need.CALLERID
    return _unknown(jobs, cfg, node, rng)


def _named(jobs: list[Job], facts: Facts) -> Job | None:
    """The user's job the source named, if it did and the job is here."""
    if not facts.callerid_asked or facts.callerid_job is None:
        return None
    return next((j for j in jobs if j.id == facts.callerid_job), None)


def _unknown(jobs: list[Job], cfg: PolicyConfig, node: str, rng: random.Random) -> Decision:
    reason = f"unknown_{cfg.unknown}"
    match cfg.unknown:
        case "newest":
            return Decision("adopt", reason, job=jobs[-1])
        case "oldest":
            return Decision("adopt", reason, job=jobs[0])
        case "random":
            return Decision("adopt", reason, job=rng.choice(jobs))
        case "allow":
            return Decision("allow", reason)
        case _:
            return Decision(
                "deny",
                reason,
                user_message=f"Access denied by callerid: cannot tell which of your jobs on "
                f"{node} this login comes from",
            )


def after_adopt_failure(decision: Decision, cfg: PolicyConfig, node: str) -> Decision:
    """The verdict when adopting into ``decision.job`` failed."""
    if cfg.adopt_failure == "allow":
        return Decision("allow", "adopt_failed")
    job = decision.job.id if decision.job else "?"
    return Decision(
        "deny",
        "adopt_failed",
        user_message=f"Access denied by callerid: could not place this login into job {job} "
        f"on {node}",
    )


def _deny_message(cfg: PolicyConfig, node: str) -> str:
    return cfg.deny_message.replace("{node}", node)
