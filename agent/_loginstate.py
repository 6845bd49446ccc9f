"""The state of one login in `login.LoginFlow`: its scratch facts, and what comes out of it.

Re-exported by `login` (`Outcome`, `Started`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from callerid.agent import policy
from callerid.agent._joinns import Fetched
from callerid.agent.backends.base import JobNamespaces
from callerid.agent.journal import DecisionRecord
from callerid.agent.netinfo import Connection
from callerid.agent.pamproto import PamReply, PamRequest

__all__ = ["Login", "Outcome", "Started"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """The reply and record of a login; ``namespaces``: the job's, sent with the reply (their
    kinds are the reply's ``ns``) and closed by whoever sends or drops it (the PAM server)."""

    reply: PamReply
    record: DecisionRecord
    namespaces: JobNamespaces | None = None


@dataclass(frozen=True, slots=True)
class Started:
    """A login `LoginFlow.account_now` took as far as it could: the source is to be asked."""

    login: Login


@dataclass(slots=True)
class Login:
    """Mutable scratch state of one login while its facts are gathered."""

    req: PamRequest
    caller_pid: int
    started: float
    facts: policy.Facts
    target_pid: int | None = None
    target_start: float | None = None  # the target's start time: its identity with the pid
    conn: Connection | None = None
    peer_status: str = "skipped"
    waited_ms: int | None = None  # waited for the job the source named (wait_for_job_ms)
    fetched: Fetched | None = None  # the job's namespaces, asked for after the adoption
    marks: list[tuple[str, float]] = dataclasses.field(default_factory=list)

    def give_up(self) -> None:
        """The login was cancelled (PAM deadline): fds a worker fetched meanwhile are closed."""
        if self.fetched is not None:
            self.fetched.drop()
