"""The job's namespaces for an adopted login: what `login.LoginFlow` hands the PAM module.

After a login is adopted into its job, the backend is asked for the job's namespaces
(`Backend.namespaces`; on the loop, or for a blocking backend in the same worker-thread call
as the adoption, `fetch_namespaces`), then `namespace_verdict` says what follows. The PAM
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

import logging
from dataclasses import dataclass

from callerid.agent import policy
from callerid.agent.backends.base import Backend, BackendError, Job, JobNamespaces

__all__ = ["Fetched", "fetch_namespaces", "namespace_verdict"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Fetched:
    """What asking the backend for a job's namespaces gave: the fds, or the error."""

    ns: JobNamespaces | None = None
    error: BackendError | None = None

    def drop(self) -> None:
        """Close the fds (the login was given up before they could be sent)."""
        if self.ns is not None:
            self.ns.close()
            self.ns = None


def fetch_namespaces(
    backend: Backend, decision: policy.Decision, join: bool | None
) -> Fetched | None:
    """Ask ``backend`` for the namespaces of the job ``decision`` adopted into (None: nothing
    to ask: not adopted, or the module said ``ns=0``). Runs where the backend's calls run: in
    the same worker-thread call as the adoption for a blocking backend (no hop of its own)."""
    job = decision.job
    if decision.verdict != "adopt" or job is None or join is False:
        return None
    try:
        return Fetched(ns=backend.namespaces(job))
    except BackendError as exc:
        return Fetched(error=exc)


def namespace_verdict(
    decision: policy.Decision, fetched: Fetched | None, join: bool | None, node: str
) -> tuple[policy.Decision, JobNamespaces | None]:
    """The decision after an adoption, with the namespaces to hand over (see the module
    docstring); ``join`` is the request's ``ns`` (`PamRequest.join`)."""
    job = decision.job
    if fetched is None or job is None:
        return decision, None
    if fetched.error is not None:
        log.error("job %s: cannot get its namespaces: %s; denied", job.id, fetched.error)
        return _denied("namespace_failed", job, node), None
    ns = fetched.ns
    if ns is not None and join is None:
        kinds = ",".join(ns.kinds)
        fetched.drop()
        log.warning(
            "job %s has namespaces (%s) the PAM module cannot enter (it did not say ns=1: "
            "an older pam_callerid.so?); denied", job.id, kinds,
        )  # fmt: skip
        return _denied("namespace_unsupported", job, node), None
    return decision, ns


def _denied(reason: str, job: Job, node: str) -> policy.Decision:
    text = f"Access denied by callerid: cannot enter the namespaces of job {job.id} on {node}"
    return policy.Decision("deny", reason, user_message=text)
