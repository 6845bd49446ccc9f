"""The job's namespaces for an adopted login: what `login.LoginFlow` hands the PAM module.

After a login is adopted into its job, the backend is asked for the job's namespaces
(`Backend.namespaces`; on the loop, or in a worker thread for a blocking backend). The PAM
server sends their fds with the reply and the module enters them before it returns success
(docs/architecture.md, "Joining the job's namespaces"). Failure is closed, never open:

- the module said ``ns=0`` (its ``join_container=0``): the backend is not asked, the login is
  adopted as before and nothing is joined (the admin chose so at the module);
- the backend has none (None): adopted, nothing to join;
- the backend cannot get them (BackendError): verdict deny, reason ``namespace_failed``;
- the job has some but the module said nothing (a module without namespace support would
  drop the fds and let the session in outside them): deny, reason ``namespace_unsupported``.

The login stays adopted into the job's cgroup in the deny cases; the session never starts.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor

from callerid.agent import policy
from callerid.agent.backends.base import Backend, BackendError, Job, JobNamespaces

__all__ = ["job_namespaces", "namespace_step"]

log = logging.getLogger(__name__)


async def job_namespaces(
    backend: Backend, executor: Executor | None, job: Job
) -> JobNamespaces | None:
    """``backend.namespaces(job)`` where the backend's calls run; fds obtained by a worker
    thread after the caller was cancelled (the PAM deadline) are closed, never leaked."""
    if not backend.blocking:
        return backend.namespaces(job)
    fut = asyncio.get_running_loop().run_in_executor(executor, backend.namespaces, job)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        fut.add_done_callback(_close_result)
        raise


def _close_result(fut: asyncio.Future[JobNamespaces | None]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        ns = fut.result()
        if ns is not None:
            ns.close()


async def namespace_step(
    backend: Backend,
    executor: Executor | None,
    decision: policy.Decision,
    join: bool | None,
    node: str,
) -> tuple[policy.Decision, JobNamespaces | None]:
    """The decision after an adoption, with the namespaces to hand over (see the module
    docstring); ``join`` is the request's ``ns`` (`PamRequest.join`)."""
    job = decision.job
    if decision.verdict != "adopt" or job is None or join is False:
        return decision, None
    try:
        ns = await job_namespaces(backend, executor, job)
    except BackendError as exc:
        log.error("job %s: cannot get its namespaces: %s; denied", job.id, exc)
        return _denied("namespace_failed", job, node), None
    if ns is not None and join is None:
        kinds = ",".join(ns.kinds)
        ns.close()
        log.warning(
            "job %s has namespaces (%s) the PAM module cannot enter (it did not say ns=1: "
            "an older pam_callerid.so?); denied", job.id, kinds,
        )  # fmt: skip
        return _denied("namespace_unsupported", job, node), None
    return decision, ns


def _denied(reason: str, job: Job, node: str) -> policy.Decision:
    text = f"Access denied by callerid: cannot enter the namespaces of job {job.id} on {node}"
    return policy.Decision("deny", reason, user_message=text)
