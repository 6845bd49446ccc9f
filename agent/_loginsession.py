"""The session phase of a login (`login.LoginFlow`): the sessions adopted at account time,
remembered, and put back into their job at open_session if something moved them out."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Executor

from callerid.agent._loginports import Processes, UserSource
from callerid.agent._loginstate import pinned
from callerid.agent._offload import backend_call
from callerid.agent.backends.base import Backend, BackendError, Job
from callerid.agent.memo import Memo
from callerid.agent.netinfo import NetinfoError
from callerid.agent.pamproto import PamReply, PamRequest

__all__ = ["SESSION_MEMORY", "AdoptedSessions"]

log = logging.getLogger("callerid.agent.login")

SESSION_MEMORY = 4096  # adopted monitor pids remembered for open_session re-checks


class AdoptedSessions:
    """The monitor pids adopted at account time, and the session phase's re-check."""

    def __init__(
        self,
        *,
        users: UserSource,
        procs: Processes,
        backend: Backend,
        executor: Executor | None,
        clock: Callable[[], float],
        max_sessions: int = SESSION_MEMORY,
    ) -> None:
        self.users = users
        self.procs = procs
        self.backend = backend
        self.executor = executor
        # monitor pid -> (its start time, the job it was adopted into). True only for that
        # very process: open_session checks the start time (a pid is reused once its process
        # is gone) and the job's owner against the session's user; a later login on the pid
        # decided otherwise forgets it; so do close_session and the bound.
        self.adopted: Memo[int, tuple[float | None, Job]] = Memo(
            max_entries=max_sessions, ttl_s=None, clock=clock
        )

    def remember(self, pid: int, start: float | None, job: Job) -> None:
        self.adopted.put(pid, (start, job))

    def forget(self, *pids: int | None) -> None:
        for pid in pids:
            if pid is not None:
                self.adopted.pop(pid)

    async def open_session(self, req: PamRequest, caller_pid: int) -> PamReply:
        """Session phase: make sure a session adopted at account time is still in its job.

        Something between the account and session phases (a misplaced pam_systemd) may have
        moved the monitor out of the job; it is put back, but only the very process adopted
        at account time (same pid and start time) and only into a job of the session's user.
        """
        hit = self.adopted.get(caller_pid)
        if hit is None:
            return PamReply("allow", "not_adopted")
        start, job = hit
        facts = await self.users.facts(req.user)
        if facts.uid != job.uid or self.procs.start_time(caller_pid) != start:
            self.adopted.pop(caller_pid)
            log.warning(
                "pid %d: session of %s (uid %s) is not the one adopted into job %s (uid %d) "
                "at account time; not touched", caller_pid, req.user, facts.uid, job.id, job.uid,
            )  # fmt: skip
            return PamReply("allow", "not_adopted")
        backend = self.backend
        current = await backend_call(backend, self.executor, backend.job_of_pid, caller_pid)
        if current is not None and current.id == job.id:
            return PamReply("adopt", "still_in_job", job.id)
        try:
            await backend_call(backend, self.executor, self._adopt, caller_pid, start, job)
        except (BackendError, NetinfoError) as exc:
            log.warning("re-adopting pid %d into job %s failed: %s", caller_pid, job.id, exc)
            return PamReply("error", "readopt_failed")
        log.warning(
            "pid %d had left job %s before the session opened; re-adopted", caller_pid, job.id
        )
        return PamReply("adopt", "readopted", job.id)

    def close_session(self, caller_pid: int) -> PamReply:
        self.adopted.pop(caller_pid)
        return PamReply("allow", "closed")

    def _adopt(self, pid: int, start: float | None, job: Job) -> None:
        """Adopt the (pinned) process ``pid`` started at ``start`` into ``job``."""
        with pinned(self.procs, pid, start):
            self.backend.adopt(pid, job)
