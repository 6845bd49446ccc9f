"""What a peer can learn, link-local addresses, and the bound on refused-handshake log lines:
the pure parts (source answers, socket matching, zones, the log budget) without a network."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from pathlib import Path

import pytest

from callerid.agent.ask import SourceAsker
from callerid.agent.backends.base import Job
from callerid.agent.netinfo import Connection, Owner, ProcReader, SocketOwners, _sockfd
from callerid.agent.netinfo import _codec as sd
from callerid.agent.netinfo._session import _from_facts, _rhost_ip
from callerid.agent.source import NOT_FOUND, SourceAnswer
from callerid.bus._client_types import reach
from callerid.bus._sockets import endpoint
from callerid.bus._zap import KeyProvider, ServerStats
from callerid.bus.loglimit import LogBudget
from callerid.bus.peers import Peer, PeerTable
from callerid.bus.protocol import CallerIdQuery, CallerIdReply, Endpoint, split_zone
from tests.fakes import FakeBackend, FakeClock, FakeOwners, FakePeers

KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
SRC, DST = Endpoint("10.0.0.5", 40022), Endpoint("10.0.0.7", 22)
OWNER = Owner(pid=100, uid=1001, inode=5, comm="ssh")


# --------------------------------------------------------------------------- source answers


def _answer(owner: Owner | None, job: Job | None, uid: int = 1001) -> CallerIdReply:
    backend = FakeBackend(pid_jobs={100: job} if job else {})
    source = SourceAnswer(
        node="a", owners=FakeOwners(owner), backend=backend, executor=None, clock=FakeClock()
    )
    query = CallerIdQuery(id=7, proto="tcp", src=SRC, dst=DST, uid=uid)
    return asyncio.run(source.answer(query, peer="b"))


@pytest.mark.parametrize(
    ("owner", "job"),
    [
        (None, None),  # no socket (or another uid's: socket_owner says None then)
        (OWNER, None),  # the asked uid's socket, in no job
        (OWNER, Job(id="42", uid=2002, start_time=0.0)),  # in another uid's job
    ],
    ids=["no-socket", "not-in-a-job", "other-uids-job"],
)
def test_every_not_found_case_is_the_same_answer(owner: Owner | None, job: Job | None) -> None:
    reply = _answer(owner, job)
    assert (reply.status, reply.code, reply.job, reply.reason) == ("not_found", 0, None, NOT_FOUND)


def test_the_owners_job_is_found() -> None:
    reply = _answer(OWNER, Job(id="42", uid=1001, start_time=0.0))
    assert (reply.status, reply.job) == ("found", "42")


# --------------------------------------------------------------------------- socket matching


def _diag(state: int, local: tuple[str, int], remote: tuple[str, int]) -> sd.DiagSocket:
    return sd.DiagSocket(socket.AF_INET, state, local, remote, 1001, 77, None)


LISTEN, ESTABLISHED, CLOSE_WAIT, UNCONN = 10, 1, 8, 7


@pytest.mark.parametrize(
    ("proto", "got", "src", "dst", "want"),
    [
        ("tcp", _diag(ESTABLISHED, ("10.0.0.5", 40022), ("10.0.0.7", 22)), SRC, DST, "exact"),
        # a listener's remote end is 0.0.0.0:0: asking for it must not find the listener
        ("tcp", _diag(LISTEN, ("10.0.0.5", 22), ("0.0.0.0", 0)),
         Endpoint("10.0.0.5", 22), Endpoint("0.0.0.0", 0), "no"),
        ("tcp", _diag(LISTEN, ("0.0.0.0", 22), ("0.0.0.0", 0)),
         Endpoint("0.0.0.0", 22), Endpoint("0.0.0.0", 0), "no"),
        ("tcp", _diag(CLOSE_WAIT, ("10.0.0.5", 40022), ("10.0.0.7", 22)), SRC, DST, "no"),
        ("udp", _diag(ESTABLISHED, ("10.0.0.5", 40022), ("10.0.0.7", 22)), SRC, DST, "exact"),
        ("udp", _diag(UNCONN, ("10.0.0.5", 40022), ("0.0.0.0", 0)), SRC, DST, "unconnected"),
        # the unconnected-sender fallback only for a real remote end
        ("udp", _diag(UNCONN, ("10.0.0.5", 40022), ("0.0.0.0", 0)),
         SRC, Endpoint("0.0.0.0", 0), "no"),
        ("udp", _diag(UNCONN, ("10.0.0.5", 40022), ("0.0.0.0", 0)),
         SRC, Endpoint("10.0.0.7", 0), "no"),
        ("udp", _diag(UNCONN, ("0.0.0.0", 40022), ("0.0.0.0", 0)),
         SRC, Endpoint("0.0.0.0", 22), "no"),
    ],
    ids=["tcp-established", "tcp-listener", "tcp-wildcard-listener", "tcp-close-wait",
         "udp-connected", "udp-unconnected-sender", "udp-unspecified-dst", "udp-port-0",
         "udp-unspecified-dst-ip"],
)  # fmt: skip
def test_only_established_connections_match(
    proto: sd.Proto, got: sd.DiagSocket, src: Endpoint, dst: Endpoint, want: str
) -> None:
    assert sd.match_tuple(proto, got, src, dst) == want


def test_socket_owner_never_looks_up_an_unspecified_end() -> None:
    class NoLookups(SocketOwners):
        def _find_socket(self, *args: object) -> sd.DiagSocket | None:
            raise AssertionError("looked up")

    owners = NoLookups(ProcReader())
    assert owners.socket_owner("tcp", Endpoint("10.0.0.5", 22), Endpoint("0.0.0.0", 0)) is None
    assert owners.socket_owner("udp", SRC, Endpoint("10.0.0.7", 0)) is None


# --------------------------------------------------------------------------- link-local


def test_lookup_request_carries_the_interface_of_a_link_local_socket() -> None:
    req = sd.lookup_request(1, socket.AF_INET6, "tcp", ("fe80::a", 4000), ("fe80::b", 22),
                            ifindex=3)  # fmt: skip
    ifindex = struct.unpack_from("=I", req, 16 + 8 + 36)[0]  # nlmsghdr, req head, sockid
    assert ifindex == 3
    assert struct.unpack_from("=I", sd.lookup_request(1, 10, "tcp", SRC_6, DST_6), 60)[0] == 0


SRC_6, DST_6 = ("fd00::1", 4000), ("fd00::2", 22)

IF_INET6 = """\
fe80000000000000000000000000000a 02 40 20 80     eth0
fd000000000000000000000000000001 03 40 00 80     eth1
fe80000000000000000000000000000a 04 40 20 80     eth2
00000000000000000000000000000001 01 80 10 80       lo
"""


def test_link_scopes_lists_every_interface_with_the_address(tmp_path: Path) -> None:
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "if_inet6").write_text(IF_INET6)
    procs = ProcReader(tmp_path)
    assert procs.link_scopes("fe80::a") == [2, 4]
    assert procs.link_scopes("fe80::b") == []


def test_a_zoned_socket_address_becomes_an_endpoint_and_a_scope() -> None:
    assert _sockfd._addr(("fe80::b%eth0", 22, 0, 2)) == ("fe80::b", 22, 2)
    assert _sockfd._addr(("10.0.0.7", 22)) == ("10.0.0.7", 22, 0)
    facts = _sockfd.SockFacts(
        "tcp", ("fe80::b%eth0", 22), ("fe80::a%eth0", 40022), 9, 0, "ESTABLISHED", 2
    )
    conn = _from_facts(facts)
    assert (conn.local, conn.remote, conn.scope) == (
        Endpoint("fe80::b", 22),
        Endpoint("fe80::a", 40022),
        2,
    )
    assert conn.remote_host == "fe80::a%2"
    assert _rhost_ip("fe80::a%eth0") == "fe80::a"


def test_the_source_of_a_link_local_connection_is_asked_with_its_scope() -> None:
    conn = Connection("tcp", Endpoint("fe80::b", 22), Endpoint("fe80::a", 40022), 9, 0, "E", 2)
    reply = CallerIdReply(id=1, status="found", node="a", job="42")
    peers = FakePeers({"fe80::a%2": ("ok", reply)})
    source = SourceAnswer(
        node="b", owners=FakeOwners(None), backend=FakeBackend(), executor=None, clock=FakeClock()
    )
    asker = SourceAsker(ask_peer=peers, is_local=lambda ip: False, local=source)
    assert asyncio.run(asker(conn, 1001)) == ("found", "42")
    host, query = peers.asked[0]
    assert host == "fe80::a%2"
    assert (query.src, query.dst) == (Endpoint("fe80::a", 40022), Endpoint("fe80::b", 22))


def test_zones_are_split_from_addresses() -> None:
    assert split_zone("fe80::1%eth0") == ("fe80::1", "eth0")
    assert split_zone("10.0.0.1") == ("10.0.0.1", None)
    for bad in ("fe80::1%", "fe80::1%a b", "fe80::1%" + "x" * 16):
        with pytest.raises(ValueError, match="zone"):
            split_zone(bad)


def test_the_mesh_client_reaches_a_link_local_peer_over_its_interface() -> None:
    assert reach("fe80::1%eth0") == ("fe80::1", "fe80::1%eth0")
    assert reach("fe80::1%3") == ("fe80::1", "fe80::1%3")
    assert reach("10.0.0.1") == ("10.0.0.1", "10.0.0.1")
    assert reach("fd00::1%eth0") == ("fd00::1", "fd00::1")  # a zone means nothing there
    with pytest.raises(ValueError, match="interface"):
        reach("fe80::1")
    assert endpoint("fe80::1%3", 6820) == "tcp://[fe80::1%3]:6820"
    table = PeerTable([Peer("a", KEY, ("fe80::1",))])
    peer = table.by_address("fe80::1%eth0")
    assert peer is not None
    assert peer.node == "a"
    assert table.addresses() == {"fe80::1": "a"}


# --------------------------------------------------------------------------- refused handshakes


def test_the_log_budget_lets_a_burst_through_then_summarises() -> None:
    clock = FakeClock()
    budget = LogBudget(clock, burst=3, window_s=60.0)
    verdicts = [budget.event() for _ in range(10)]
    assert [v.log for v in verdicts] == [True] * 3 + [False] * 7
    assert budget.summary() == (0, 0.0)  # the window lasts
    clock.advance(60)
    assert budget.summary() == (7, 1000.0)
    assert budget.summary() == (0, 0.0)
    budget.event()
    clock.advance(30)
    for _ in range(4):
        budget.event()
    clock.advance(31)
    first = budget.event()  # a new window: the summary comes with the first line
    assert (first.log, first.held, first.since) == (True, 2, 1090.0)
    assert budget.suppressed == 9


def test_many_refused_keys_make_a_bounded_number_of_log_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    stats = ServerStats()
    provider = KeyProvider(PeerTable([Peer("a", KEY)]), stats, LogBudget(clock, burst=5))

    async def storm() -> None:
        for i in range(1000):
            assert provider.callback("callerid", f"{i:040d}".encode()) is False
            clock.advance(0.01)  # 1000 in 10 s
        assert provider.callback("callerid", KEY.encode()) is True
        clock.advance(60)
        provider.callback("callerid", b"x" * 40)
        provider.close()

    with caplog.at_level(logging.INFO, logger="callerid.bus.transport"):
        asyncio.run(storm())
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5 + 2  # a burst, one summary, the next window's first
    assert "995 more refused CURVE handshakes" in lines[5]
    assert (stats.refused_handshakes, stats.refusals_not_logged) == (1001, 995)
