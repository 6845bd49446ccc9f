"""Every reason and every peer status of the journal, reached through the real login flow.

One row per case: the real `PamServer` on a real unix socket, the real `LoginFlow`,
`SourceAsker` and `SourceAnswer`, with fakes only at the edges (NSS, backend, the session's
connection, the mesh, this node's sockets). Each row asserts the PAM reply line and the journal
record. The README's tables of `CALLERID_REASON` and `CALLERID_PEER_STATUS` values are read
back: a documented value that no row reaches fails, and so does a row whose value is not
documented.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from callerid.agent.ask import SourceAsker
from callerid.agent.backends.base import BackendError, Job
from callerid.agent.config import parse
from callerid.agent.login import LoginFlow
from callerid.agent.netinfo import Connection, NetinfoError, Owner
from callerid.agent.pamserver import PamServer
from callerid.agent.source import SourceAnswer
from callerid.bus.protocol import CallerIdReply, Endpoint, ErrorCode, error_reply
from tests.fakes import (
    FakeBackend,
    FakeClock,
    FakeJournal,
    FakeOwners,
    FakePeers,
    FakeProcs,
    FakeSessions,
    FakeUsers,
)
from tests.support.readme import documented

README = Path(__file__).resolve().parents[2] / "README.md"
NODE_IP, SOURCE_IP = "10.0.0.2", "10.0.0.1"
ALICE, BOB = 1000, 1001
J41, J42 = Job("41", ALICE, 100.0), Job("42", ALICE, 200.0)
USERS = {
    "root": (0, frozenset({"root"})),
    "alice": (ALICE, frozenset({"alice", "users"})),
    "bob": (BOB, frozenset({"bob"})),
    "carol": (1002, frozenset({"carol", "staff"})),
}
HOLDER = 4242  # the sshd monitor FakeSessions says holds the connection
OWNER = Owner(pid=777, uid=ALICE, inode=99, comm="ssh")  # the ssh client, when it runs here


def conn(remote_ip: str = SOURCE_IP) -> Connection:
    return Connection("tcp", Endpoint(NODE_IP, 22), Endpoint(remote_ip, 40022), 7, 0, "ESTABLISHED")


def found(job: str) -> tuple[str, CallerIdReply]:
    return "ok", CallerIdReply(id=1, status="found", node="a", job=job)


NOT_FOUND = ("ok", CallerIdReply(id=1, status="not_found", node="a", reason="no such connection"))
SOURCE_ERROR = ("ok", error_reply(1, "a", ErrorCode.BACKEND, "lookup failed"))


@dataclass
class Row:
    name: str
    reply: tuple[str, str, str | None]  # verdict, reason, job
    peer: str | None  # the record's CALLERID_PEER_STATUS
    user: str = "alice"
    policy: dict[str, Any] = field(default_factory=dict)
    jobs: list[Job] = field(default_factory=lambda: [J41, J42])
    conn: Connection | None = field(default_factory=conn)
    answer: tuple[str, CallerIdReply | None] | None = NOT_FOUND  # None: the source never answers
    owner: Owner | None = None
    owner_fail: Exception | None = None
    fail: dict[str, Exception] = field(default_factory=dict)
    adopted: int | None = HOLDER  # the pid adopted when the verdict is adopt
    later: tuple[int, list[Job]] | None = None  # jobs that appear on the n-th listing
    mode: str = "enforce"
    would: tuple[str, str] | None = None  # audit mode: what enforce would have done
    waited: bool = False  # the record says how long it waited for the named job
    ns: dict[str, tuple[str, ...]] = field(default_factory=dict)  # job id -> its namespaces
    join: str | None = None  # the request's ns= (the module enters namespaces: 1, or not: 0)
    sent_ns: str | None = None  # the reply's ns= (as many fds came with it)


ROWS = [
    Row("root", ("allow", "root", None), "skipped", user="root"),
    Row("exempt user", ("allow", "exempt_user", None), "skipped",
        policy={"exempt_users": ["alice"]}),
    Row("exempt group", ("allow", "exempt_group", None), "skipped", user="carol",
        policy={"exempt_groups": ["staff"]}),
    Row("unknown user", ("deny", "unknown_user", None), "skipped", user="mallory"),
    Row("no jobs: deny", ("deny", "no_jobs", None), "not_found", user="bob"),
    Row("no jobs: allow", ("allow", "no_jobs", None), "not_found", user="bob",
        policy={"no_jobs": "allow"}),
    Row("no jobs, no waiting: the source is not asked", ("deny", "no_jobs", None), "skipped",
        user="bob", policy={"wait_for_job_ms": 0}),
    Row("the named job appears while the login waits", ("adopt", "callerid", "43"), "found",
        jobs=[], answer=found("43"), later=(3, [Job("43", ALICE, 300.0)]), waited=True),
    Row("the named job never appears", ("deny", "no_jobs", None), "found", jobs=[],
        answer=found("43"), waited=True),
    Row("audit: a denial let through", ("allow", "audit", None), "not_found", user="bob",
        mode="audit", would=("deny", "no_jobs")),
    Row("audit: an error let through", ("allow", "audit", None), "skipped", mode="audit",
        fail={"jobs_of": BackendError("cannot read the job directory")},
        would=("error", "backend_error")),
    Row("audit: adoption as usual", ("adopt", "single_job", "41"), "skipped", jobs=[J41],
        mode="audit"),
    Row("single job", ("adopt", "single_job", "41"), "skipped", jobs=[J41]),
    Row("callerid", ("adopt", "callerid", "41"), "found", answer=found("41")),
    Row("newest", ("adopt", "unknown_newest", "42"), "not_found"),
    Row("oldest", ("adopt", "unknown_oldest", "41"), "not_found", policy={"unknown": "oldest"}),
    Row("random", ("adopt", "unknown_random", "41"), "not_found", policy={"unknown": "random"}),
    Row("unknown: deny", ("deny", "unknown_deny", None), "not_found",
        policy={"unknown": "deny"}),
    Row("unknown: allow", ("allow", "unknown_allow", None), "not_found",
        policy={"unknown": "allow"}),
    Row("a job not here named", ("adopt", "unknown_newest", "42"), "found",
        answer=found("77"), waited=True),
    Row("source error", ("adopt", "unknown_newest", "42"), "error", answer=SOURCE_ERROR),
    Row("unreachable", ("adopt", "unknown_newest", "42"), "unreachable",
        answer=("unreachable", None)),
    Row("peer timeout", ("adopt", "unknown_newest", "42"), "timeout", answer=("timeout", None)),
    Row("auth failed", ("adopt", "unknown_newest", "42"), "auth_failed",
        answer=("auth_failed", None)),
    Row("unknown peer", ("adopt", "unknown_newest", "42"), "unknown_peer",
        answer=("unknown_peer", None)),
    Row("local", ("adopt", "callerid", "41"), "local", conn=conn(NODE_IP), owner=OWNER),
    Row("local, not found", ("adopt", "unknown_newest", "42"), "local_not_found",
        conn=conn(NODE_IP)),
    Row("local, failed", ("adopt", "unknown_newest", "42"), "local_error", conn=conn(NODE_IP),
        owner_fail=NetinfoError("cannot read /proc/777/stat")),
    Row("no connection", ("adopt", "unknown_newest", "42"), "no_connection", conn=None,
        adopted=os.getpid()),
    Row("adoption fails: deny", ("deny", "adopt_failed", None), "skipped", jobs=[J41],
        fail={"adopt": BackendError("job 41 has no extern step cgroup")}),
    Row("adoption fails: allow", ("allow", "adopt_failed", None), "found",
        answer=found("42"), policy={"adopt_failure": "allow"},
        fail={"adopt": BackendError("process 4242 vanished")}),
    Row("namespaces handed over", ("adopt", "single_job", "41"), "skipped", jobs=[J41],
        ns={"41": ("mnt", "uts")}, join="1", sent_ns="mnt,uts"),
    Row("namespaces: join_container=0 at the module", ("adopt", "single_job", "41"), "skipped",
        jobs=[J41], ns={"41": ("mnt",)}, join="0"),
    Row("namespaces: none to join", ("adopt", "single_job", "41"), "skipped", jobs=[J41],
        join="1"),
    Row("namespaces: an old module", ("deny", "namespace_unsupported", None), "skipped",
        jobs=[J41], ns={"41": ("mnt",)}),
    Row("namespaces cannot be had", ("deny", "namespace_failed", None), "skipped", jobs=[J41],
        join="1", fail={"namespaces": BackendError("job 41: its oldest process is gone")}),
    Row("backend error", ("error", "backend_error", None), "skipped",
        fail={"jobs_of": BackendError("cannot read the job directory")}),
    Row("decision timeout", ("error", "timeout", None), None, answer=None),
    Row("agent error", ("error", "agent_error", None), None,
        fail={"jobs_of": RuntimeError("a bug")}),
]  # fmt: skip


def build(row: Row, journal: FakeJournal) -> tuple[PamServer, FakeBackend]:
    cfg = parse({"node_name": "b", "policy": row.policy, "mode": row.mode})
    clock = FakeClock()
    pid_jobs = {OWNER.pid: J41}
    backend = FakeBackend(row.jobs, pid_jobs=pid_jobs, fail=row.fail, later=row.later, ns=row.ns)
    owners = FakeOwners(row.owner, row.owner_fail)
    source = SourceAnswer(node="b", owners=owners, backend=backend, executor=None, clock=clock)
    peers = FakePeers({} if row.answer is None else {SOURCE_IP: row.answer})
    asker = SourceAsker(ask_peer=peers, is_local=lambda ip: ip == NODE_IP, local=source)
    flow = LoginFlow(
        cfg.policy,
        node="b",
        users=FakeUsers(USERS),
        sessions=FakeSessions(row.conn, holder=HOLDER),
        procs=FakeProcs(),
        backend=backend,
        ask_source=asker,
        executor=None,
        clock=clock,
        rng=random.Random(1),  # the random row's choice: job 41
        mode=cfg.mode,
    )
    timeout = 0.2 if row.answer is None else 5.0
    server = PamServer(flow, journal, timeout_s=timeout, clock=clock, allowed_uid=os.getuid())
    return server, backend


def login(path: Path, user: str, join: str | None = None) -> tuple[str, list[int]]:
    """One account exchange as the module makes it: the reply line and the fds it carried."""
    ns = f" ns={join}" if join is not None else ""
    line = f"CALLERID/1 op=account user={user} service=sshd rhost={SOURCE_IP}{ns}\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(line.encode())
        data, fds = b"", []
        while not data.endswith(b"\n"):
            part, got, _flags, _addr = socket.recv_fds(sock, 4096, 8, socket.MSG_CMSG_CLOEXEC)
            if not part:
                break
            data, fds = data + part, fds + got
    return data.decode().strip(), fds


def reply_fields(line: str) -> dict[str, str]:
    head, *fields = line.split(" ")
    assert head == "CALLERID/1", line
    return dict(f.split("=", 1) for f in fields)


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_row(row: Row, tmp_path: Path) -> None:
    journal = FakeJournal()
    server, backend = build(row, journal)

    async def run() -> tuple[str, list[int]]:
        await server.start(tmp_path / "agent.sock")
        try:
            return await asyncio.to_thread(login, tmp_path / "agent.sock", row.user, row.join)
        finally:
            await server.stop()

    line, fds = asyncio.run(run())
    got = reply_fields(line)
    for fd in fds:
        os.close(fd)
    assert got.get("ns") == row.sent_ns
    assert len(fds) == (len(row.sent_ns.split(",")) if row.sent_ns else 0)
    assert all(ns.fds == () for ns in backend.handed)  # the agent's copies are all closed
    asked = [c for c in backend.calls if c[0] == "namespaces"]
    assert bool(asked) == (verdict_of(row) == "adopt" and row.join != "0")
    verdict, reason, job = row.reply
    assert (got["verdict"], got["reason"], got.get("job")) == (verdict, reason, job)
    assert len(journal.records) == 1
    rec = journal.records[0]
    assert (rec.decision, rec.reason, rec.job, rec.peer_status) == (verdict, reason, job, row.peer)
    assert (rec.would_decision, rec.would_reason) == (row.would or (None, None))
    assert (rec.waited_ms is not None) == row.waited
    assert rec.user == row.user and rec.node == "b" and rec.service == "sshd"
    by_server = reason in ("timeout", "agent_error")  # answered by the PAM server itself
    assert rec.uid == (USERS[row.user][0] if row.user in USERS and not by_server else None)
    adopted = [c for c in backend.calls if c[0] == "adopt"]
    if verdict == "adopt":
        assert backend.adopted == [(row.adopted, job)]
        assert rec.pid == row.adopted
    elif "adopt_failed" in (reason, rec.would_reason) or reason.startswith("namespace_"):
        assert len(adopted) == 1  # tried once, then the policy's adopt_failure
    else:
        assert adopted == []
    if rec.peer_status not in (None, "skipped", "no_connection"):
        assert row.conn is not None
        assert (rec.src, rec.dst) == (str(row.conn.remote), str(row.conn.local))


def verdict_of(row: Row) -> str:
    """The verdict before the namespaces step (a namespace_* deny was an adoption first)."""
    return "adopt" if row.reply[1].startswith("namespace_") else row.reply[0]


def test_every_documented_reason_has_a_row_and_no_row_an_undocumented_one() -> None:
    reasons = documented("CALLERID_REASON")
    assert len(reasons) >= 16
    assert {r.reply[1] for r in ROWS} == reasons


def test_every_documented_peer_status_has_a_row_and_no_row_an_undocumented_one() -> None:
    statuses = documented("CALLERID_PEER_STATUS")
    assert len(statuses) >= 12
    assert {r.peer for r in ROWS if r.peer is not None} == statuses
