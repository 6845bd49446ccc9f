"""`calleridctl explain USER`: the agent's own login flow, run as a dry run.

The flow is `login.LoginFlow`, the very object the agent decides with, built from this
node's config with the real pieces (NSS with the user's groups, the configured backend, the
mesh and the source side) but two: the session connection is the one given with --from/--to
(no sshd process here), and the backend's adoption does nothing. It prints the verdict and
reason, and the journal record's message, that the agent would write for that login now.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import time
from collections.abc import Callable, Sequence

from callerid.agent.ask import LocalAddresses, SourceAsker, mesh_asker
from callerid.agent.backends import DryRun, make_backend
from callerid.agent.backends.base import Backend, Job
from callerid.agent.config import Config
from callerid.agent.ctl._common import endpoint, mesh_identity
from callerid.agent.login import LoginFlow, Outcome
from callerid.agent.netinfo import Connection, NetinfoError, Proc, ProcReader, SocketOwners
from callerid.agent.pamproto import PamRequest
from callerid.agent.source import SourceAnswer
from callerid.agent.users import Users
from callerid.bus.peers import local_node_name
from callerid.bus.protocol import Endpoint
from callerid.bus.transport import MeshClient

__all__ = ["GivenSession", "NarratedDryRun", "cmd_explain", "explain_args"]


def explain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("user")
    p.add_argument("--from", dest="src", metavar="IP:PORT", help="the ssh client's end")
    p.add_argument(
        "--to", dest="dst", metavar="IP:PORT", help="this node's sshd end (default: IP:22 of ours)"
    )
    p.add_argument("--proto", choices=["tcp", "udp"], default="tcp")


class GivenSession:
    """A `SessionFinder` that knows one connection, the one given on the command line, held
    by the caller (calleridctl itself: nothing is adopted)."""

    def __init__(self, conn: Connection | None, procs: ProcReader) -> None:
        self.conn = conn
        self.procs = procs

    def session_connection(
        self, pid: int, rhost: str | None = None, lent: Sequence[Connection] | None = None
    ) -> tuple[Proc, Connection]:
        if self.conn is None:
            msg = "no --from given"
            raise NetinfoError(msg)
        return self.procs.proc(pid), self.conn


class NarratedDryRun(DryRun):
    """`backends.DryRun` (nothing adopted) that also says which jobs it listed."""

    def __init__(self, backend: Backend, say: Callable[[str], None]) -> None:
        super().__init__(backend)
        self.say = say

    def jobs_of(self, uid: int) -> list[Job]:
        jobs = super().jobs_of(uid)
        listed = ", ".join(f"{j.id} (started {time.ctime(j.start_time)})" for j in jobs)
        self.say(f"local jobs ({self.name} backend): {listed or 'none'}")
        return jobs


def cmd_explain(args: argparse.Namespace, cfg: Config) -> int:
    """Dry run: what would happen if USER logged in here now. Nothing is adopted."""
    conn = _given_connection(args, cfg)
    said: list[str] = []
    outcome = asyncio.run(_explain(cfg, args.user, conn, said.append))
    rec = outcome.record
    uid = rec.uid if rec.uid is not None else "unknown"
    print(f"node {rec.node}, user {args.user} (uid {uid})")
    for line in said:
        print(line)
    print(f"journal record: {rec.message} [peer status {rec.peer_status or '-'}]")
    job = f" job {outcome.reply.job}" if outcome.reply.job else ""
    print(f"decision: {outcome.reply.verdict}{job} (reason {outcome.reply.reason})")
    if outcome.reply.msg:
        print(f"the user would read: {outcome.reply.msg}")
    return 0


async def _explain(
    cfg: Config, user: str, conn: Connection | None, say: Callable[[str], None]
) -> Outcome:
    """The login flow as `daemon.build` wires it, with `GivenSession` and `NarratedDryRun`."""
    node = local_node_name(cfg.node_name)
    clock = time.monotonic
    backend = NarratedDryRun(make_backend(cfg.backend, clock=clock), say)
    procs = ProcReader()
    owners = SocketOwners(procs)
    keypair, peers = mesh_identity(cfg)
    try:
        async with MeshClient(keypair, peers, cfg.peer, port=cfg.port) as client:
            source = SourceAnswer(
                node=node, owners=owners, backend=backend, executor=None, clock=clock
            )
            asker = SourceAsker(
                ask_peer=mesh_asker(client),
                is_local=LocalAddresses(cfg.listen, clock),
                local=source,
            )

            async def ask_source(conn: Connection, uid: int) -> tuple[str, str | None]:
                status, job = await asker(conn, uid)
                say(f"asked the agent at {conn.remote.ip}: {status}{f' job {job}' if job else ''}")
                return status, job

            flow = LoginFlow(
                cfg.policy,
                node=node,
                users=Users(cfg.policy, executor=None, clock=clock),
                sessions=GivenSession(conn, procs),
                procs=procs,
                backend=backend,
                ask_source=ask_source,
                executor=None,
                clock=clock,
                mode=cfg.mode,
            )
            rhost = conn.remote.ip if conn else ""
            req = PamRequest("account", user, "calleridctl", rhost, "", join=True)  # as the module
            outcome = await flow.account(req, os.getpid())
            if outcome.namespaces is not None:
                say(f"the session would enter the job's namespaces: {','.join(outcome.reply.ns)}")
                outcome.namespaces.close()  # a dry run: nobody enters them
            return outcome
    finally:
        owners.close()
        backend.close()


def _given_connection(args: argparse.Namespace, cfg: Config) -> Connection | None:
    if not args.src:
        return None
    src = endpoint(args.src)
    dst = endpoint(args.dst) if args.dst else Endpoint(_local_ip(src), 22)
    return Connection(args.proto, local=dst, remote=src, inode=0, uid=0, state="ESTABLISHED")


def _local_ip(src: Endpoint) -> str:
    family = socket.AF_INET6 if src.family == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((src.ip, 9))  # no packet is sent: only the route is looked up
        return str(s.getsockname()[0])
