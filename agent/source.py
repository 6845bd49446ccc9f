"""The source side: which job owns this connection? Told only to the job's owner.

A destination agent asks (`CallerIdQuery` over the mesh, or this node itself when the ssh
client runs here): the connection's 4-tuple and the uid that logs in. `SourceAnswer.answer`
finds the process holding the socket (`OwnerFinder`: sock_diag, then only that uid's
processes), then its job (the backend), and names the job only when it belongs to that uid.
Any other case reads "no such connection", the same words, so that a peer never learns that
another user's job holds a connection.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Literal, Protocol

from callerid.agent._offload import backend_call
from callerid.agent.backends.base import Backend, BackendError, Job
from callerid.agent.netinfo import NetinfoError, Owner
from callerid.bus.protocol import CallerIdQuery, CallerIdReply, Endpoint, ErrorCode, error_reply

__all__ = ["OwnerFinder", "SourceAnswer"]

log = logging.getLogger(__name__)


class OwnerFinder(Protocol):
    """The process holding the socket local=src, remote=dst on this node (netinfo)."""

    def socket_owner(
        self, proto: Literal["tcp", "udp"], src: Endpoint, dst: Endpoint, *, uid: int | None = None
    ) -> Owner | None: ...


class SourceAnswer:
    """Answers CallerIdQuery for this node (see the module docstring)."""

    def __init__(
        self,
        *,
        node: str,
        owners: OwnerFinder,
        backend: Backend,
        executor: Executor | None,
        clock: Callable[[], float],
    ) -> None:
        self.node = node
        self.owners = owners
        self.backend = backend
        self.executor = executor
        self.clock = clock

    async def answer(self, query: CallerIdQuery, peer: str) -> CallerIdReply:
        """Which job owns src -> dst on this node? Told only if it belongs to query.uid."""
        t0 = self.clock()
        try:
            owner, job = await backend_call(self.backend, self.executor, self._owner_and_job, query)
        except (BackendError, NetinfoError) as exc:
            log.warning("query %d from %s: lookup failed: %s", query.id, peer, exc)
            return error_reply(query.id, self.node, ErrorCode.BACKEND, "lookup failed")
        if owner is None:
            reason = "no such connection"
        elif job is None:
            reason = "connection not in a job"
        elif job.uid != query.uid:
            log.info(
                "query %d from %s: %s -> %s is in job %s of uid %d, not uid %d: not told",
                query.id, peer, query.src, query.dst, job.id, job.uid, query.uid,
            )  # fmt: skip
            reason = "no such connection"  # the same words: never reveal another user's job
        else:
            log.debug("query %d from %s: job %s (%.2f ms)", query.id, peer, job.id, self._ms(t0))
            return CallerIdReply(id=query.id, status="found", node=self.node, job=job.id)
        log.debug("query %d from %s: %s (%.2f ms)", query.id, peer, reason, self._ms(t0))
        return CallerIdReply(id=query.id, status="not_found", node=self.node, reason=reason)

    def _owner_and_job(self, query: CallerIdQuery) -> tuple[Owner | None, Job | None]:
        """The socket's owner process and its job (in one worker-thread hop if blocking)."""
        owner = self.owners.socket_owner(query.proto, query.src, query.dst, uid=query.uid)
        return owner, (self.backend.job_of_pid(owner.pid) if owner else None)

    def _ms(self, since: float) -> float:
        return (self.clock() - since) * 1e3
