"""The job-start race: waiting (briefly) for a job the source named but this node does not list.

Launchers ssh to every node of a new job at once, while each node's prolog is still creating
the job's extern step; the source already knows the job. So when the source names a job of
this user that the local listing lacks, the jobs are listed again every `JOB_POLL_S`, for at
most ``bound_ms`` (and at most as many polls as fit in it, whatever the clock says); then the
policy decides with what is there (`login.LoginFlow`, ``policy.wait_for_job_ms``).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable

from callerid.agent import policy
from callerid.agent.backends.base import BackendError, Job

__all__ = ["JOB_POLL_S", "await_named_job", "named_job_missing"]

log = logging.getLogger("callerid.agent.login")

JOB_POLL_S = 0.05  # how often the jobs are listed again while waiting for a named job


def named_job_missing(facts: policy.Facts) -> bool:
    """Whether the source named a job that ``facts`` do not list (what would be waited for)."""
    named = facts.callerid_job
    return named is not None and all(j.id != named for j in facts.jobs or ())


async def await_named_job(
    facts: policy.Facts,
    *,
    user: str,
    bound_ms: int,
    clock: Callable[[], float],
    list_jobs: Callable[[int], Awaitable[list[Job]]],
) -> tuple[policy.Facts, int | None]:
    """``facts`` with the jobs found while waiting, and how long it waited (None: it did
    not: no job named, the named job is listed, or no time left)."""
    named, uid = facts.callerid_job, facts.uid
    if uid is None or bound_ms <= 0 or not named_job_missing(facts):
        return facts, None
    start = clock()
    for _ in range(max(1, math.ceil(bound_ms / 1000 / JOB_POLL_S))):
        await asyncio.sleep(JOB_POLL_S)
        try:
            jobs = await list_jobs(uid)
        except BackendError as exc:
            log.warning("listing the jobs of uid %d while waiting failed: %s", uid, exc)
            break
        facts = facts.with_more_jobs(tuple(jobs))
        if any(j.id == named for j in jobs) or clock() - start >= bound_ms / 1000:
            break
    waited = round((clock() - start) * 1000)
    found = any(j.id == named for j in facts.jobs or ())
    log.info(
        "%s: waited %d ms for job %s named by the source: %s", user, waited, named,
        "it appeared" if found else "not here",
    )  # fmt: skip
    return facts, waited
