"""The source side: which job owns this connection? Told only to the job's owner.

A destination agent asks (`CallerIdQuery` over the mesh, or this node itself when the ssh
client runs here): the connection's 4-tuple and the uid that logs in. `SourceAnswer.answer`
finds the process holding the socket (`OwnerFinder`: sock_diag, then only that uid's
processes), then its job (the backend), and names the job only when it belongs to that uid.

Every other case is one answer, ``not_found`` with the reason `NOT_FOUND` ("no such
connection"): no socket, a socket that is not an established connection (a listener, or a
query naming an unspecified address or port 0), a socket of another uid, a process in no job,
a job of another uid. A peer asking about every uid in turn thus learns nothing of who else
holds a connection; docs/architecture.md "What a peer can learn" says what it can.
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

__all__ = ["NOT_FOUND", "OwnerFinder", "SourceAnswer"]

log = logging.getLogger(__name__)

NOT_FOUND = "no such connection"  # the one reason of every not_found answer


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
        if owner is not None and job is not None and job.uid == query.uid:
            log.debug("query %d from %s: job %s (%.2f ms)", query.id, peer, job.id, self._ms(t0))
            return CallerIdReply(id=query.id, status="found", node=self.node, job=job.id)
        # One answer for every other case (see the module docstring); the log says which.
        if owner is None:
            why = "no socket of that uid"
        elif job is None:
            why = f"pid {owner.pid} in no job"
        else:
            why = f"job {job.id} of uid {job.uid}"
        log.debug(
            "query %d from %s: %s -> %s uid %d: %s, not found (%.2f ms)",
            query.id, peer, query.src, query.dst, query.uid, why, self._ms(t0),
        )  # fmt: skip
        return CallerIdReply(id=query.id, status="not_found", node=self.node, reason=NOT_FOUND)

    def _owner_and_job(self, query: CallerIdQuery) -> tuple[Owner | None, Job | None]:
        """The socket's owner process and its job (in one worker-thread hop if blocking)."""
        owner = self.owners.socket_owner(query.proto, query.src, query.dst, uid=query.uid)
        return owner, (self.backend.job_of_pid(owner.pid) if owner else None)

    def _ms(self, since: float) -> float:
        return (self.clock() - since) * 1e3
