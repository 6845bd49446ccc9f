"""The mesh transport over real CURVE sockets on loopback addresses (127.0.0.x and ::1)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import psutil
import pytest
import zmq
import zmq.asyncio

from callerid.bus._client import IDLE_CLOSE_S
from callerid.bus.peers import PeerTable
from callerid.bus.protocol import (
    CallerIdQuery,
    CallerIdReply,
    Endpoint,
    ErrorCode,
    Ping,
    Pong,
    decode,
    encode,
    normalize_ip,
)
from callerid.bus.transport import (
    ClientSettings,
    KeyPair,
    MeshClient,
    MeshServer,
    PeerIdentity,
    QueryResult,
    generate_keypair,
    load_keypair,
)
from tests.support.poll import async_wait_for

A_IP, B_IP = "127.0.0.3", "127.0.0.2"
SLOW = 2.0  # a deadline far above what the fast paths may take


def run(coro: Awaitable[Any]) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, 60)

    return asyncio.run(bounded())


class Keys:
    """Key material of a test mesh: one directory per node, one shared authorized dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.authorized = root / "authorized"
        self.authorized.mkdir()

    def node(self, name: str, *addresses: str, authorize: bool = True) -> KeyPair:
        generate_keypair(self.root / name, name, addresses=addresses)
        if authorize:
            self.authorize(name)
        return load_keypair(self.root / name, name)

    def authorize(self, name: str) -> None:
        shutil.copy(self.root / name / f"{name}.key", self.authorized)

    def revoke(self, name: str) -> None:
        (self.authorized / f"{name}.key").unlink()

    def table(self) -> PeerTable:
        return PeerTable.load(self.authorized, resolve=False)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path)


def query_for(client: MeshClient, uid: int, *, v6: bool = False) -> CallerIdQuery:
    src, dst = ("::1", "::1") if v6 else (A_IP, B_IP)
    return CallerIdQuery(
        id=client.next_id(), proto="tcp", src=Endpoint(src, 40000), dst=Endpoint(dst, 22), uid=uid
    )


class Echo:
    """A handler answering job=str(uid); records who asked; optional delay per query."""

    def __init__(self, node: str, delay: Callable[[CallerIdQuery], Awaitable[None]] | None = None):
        self.node = node
        self.delay = delay
        self.peers: list[PeerIdentity] = []
        self.running = 0
        self.max_running = 0

    async def __call__(self, query: CallerIdQuery, peer: PeerIdentity) -> CallerIdReply:
        self.peers.append(peer)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            if self.delay is not None:
                await self.delay(query)
        finally:
            self.running -= 1
        return CallerIdReply(id=query.id, status="found", node=self.node, job=str(query.uid))


def server(keypair: KeyPair, keys: Keys, handler: Any, *addresses: str, **kw: Any) -> MeshServer:
    return MeshServer(
        keypair, handler, authorized_dir=keys.authorized, addresses=addresses, port=0,
        resolve=False, **kw,
    )  # fmt: skip


def client(keypair: KeyPair, keys: Keys, **kw: Any) -> MeshClient:

    cfg = ClientSettings(
        timeout_ms=kw.pop("timeout_ms", int(SLOW * 1000)),
        connect_timeout_ms=kw.pop("connect_timeout_ms", 300),
        unreachable_ttl_s=kw.pop("unreachable_ttl_s", 30.0),
        pool_size=kw.pop("pool_size", 16),
    )
    return MeshClient(keypair, keys.table(), cfg, **kw)


@contextmanager
def closed_port(ip: str) -> Iterator[int]:
    """A port with nothing listening: bound (so nobody else takes it) but not listening."""
    with socket.socket() as s:
        s.bind((ip, 0))
        yield s.getsockname()[1]


def ok_reply(result: QueryResult) -> CallerIdReply:
    assert result.status == "ok", result
    assert isinstance(result.reply, CallerIdReply)
    return result.reply


# --------------------------------------------------------------------------- queries


def test_two_agents_query_each_other_on_loopback_addresses(keys: Keys) -> None:
    kp_a, kp_b = keys.node("nodeA", A_IP), keys.node("nodeB", B_IP)

    async def main() -> None:
        echo_a, echo_b = Echo("nodeA"), Echo("nodeB")
        async with (
            server(kp_a, keys, echo_a, A_IP) as srv_a,
            server(kp_b, keys, echo_b, B_IP) as srv_b,
            client(kp_a, keys, source_address=A_IP, port=srv_b.port) as cli_a,
            client(kp_b, keys, source_address=B_IP, port=srv_a.port) as cli_b,
        ):
            reply = ok_reply(await cli_a.query(B_IP, query_for(cli_a, 1001)))
            assert (reply.node, reply.job) == ("nodeB", "1001")
            conns = psutil.Process().net_connections(kind="tcp")
            assert any(
                c.laddr
                and normalize_ip(c.laddr.ip) == A_IP
                and c.raddr
                and c.raddr.port == srv_b.port
                for c in conns
            ), "the client connection is not bound to its source address"
            reply = ok_reply(await cli_b.query(A_IP, query_for(cli_b, 1002)))
            assert (reply.node, reply.job) == ("nodeA", "1002")
            assert [p.node for p in echo_b.peers] == ["nodeA"]
            assert echo_b.peers[0].public_key == kp_a.public_text
            assert [p.node for p in echo_a.peers] == ["nodeB"]
            pong = await cli_a.ping(B_IP)
            assert pong.status == "ok"
            assert pong.reply == Pong(id=pong.reply.id, node="nodeB")  # type: ignore[union-attr]
            assert srv_b.stats.pings == 1
            assert srv_b.stats.answered == 2

    run(main())


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback (::1) on this host")
def test_query_over_ipv6_and_ipv4_on_one_server(keys: Keys) -> None:
    kp_a, kp_b = keys.node("nodeA"), keys.node("nodeB", "::1", B_IP)

    async def main() -> None:
        async with server(kp_b, keys, Echo("nodeB"), B_IP, "::1") as srv:
            assert len(srv.endpoints) == 2
            ports = {ep.rsplit(":", 1)[1] for ep in srv.endpoints}
            v6_port = int(next(ep for ep in srv.endpoints if "[::1]" in ep).rsplit(":", 1)[1])
            async with client(kp_a, keys) as cli:
                reply = ok_reply(await cli.query("::1", query_for(cli, 7, v6=True), v6_port))
                assert reply.job == "7"
                assert (await cli.ping(B_IP, srv.port)).status == "ok"
                assert (await cli.ping("::ffff:" + B_IP, srv.port)).status == "ok"
            assert len(ports) == 2

    run(main())


def test_thousand_concurrent_queries_are_matched_to_their_requests(keys: Keys) -> None:
    kp_a, kp_b = keys.node("nodeA"), keys.node("nodeB", B_IP)

    async def shuffle(query: CallerIdQuery) -> None:
        await asyncio.sleep((query.uid % 7) / 1000)  # replies come back out of order

    async def main() -> None:
        echo = Echo("nodeB", shuffle)
        async with server(kp_b, keys, echo, B_IP) as srv, client(kp_a, keys) as cli:
            queries = [query_for(cli, 5000 + i) for i in range(1000)]
            results = await asyncio.gather(*(cli.query(B_IP, q, srv.port) for q in queries))
            for q, r in zip(queries, results, strict=True):
                reply = ok_reply(r)
                assert (reply.id, reply.job) == (q.id, str(q.uid))
            assert echo.max_running > 100, "handlers did not run concurrently"
            assert cli.stats.sockets_opened == 1
            assert srv.stats.answered == 1000

    run(main())


def test_a_slow_lookup_does_not_block_the_others(keys: Keys) -> None:
    kp_a, kp_b = keys.node("nodeA"), keys.node("nodeB", B_IP)
    never = asyncio.Event()

    async def stall_uid_1(query: CallerIdQuery) -> None:
        if query.uid == 1:
            await never.wait()

    async def main() -> None:
        async with (
            server(kp_b, keys, Echo("nodeB", stall_uid_1), B_IP) as srv,
            client(kp_a, keys, timeout_ms=500) as cli,
        ):
            stuck = asyncio.create_task(cli.query(B_IP, query_for(cli, 1), srv.port))
            fast = await cli.query(B_IP, query_for(cli, 2), srv.port)
            assert ok_reply(fast).job == "2"
            assert not stuck.done()
            assert fast.elapsed_s < 0.25
            late = await stuck
            assert late.status == "timeout"
            assert 0.5 <= late.elapsed_s < 0.6

    run(main())


class Silence:
    """A source's handler that, while ``silent`` is set, holds every query until `speak`."""

    def __init__(self) -> None:
        self.silent = asyncio.Event()
        self._wake = asyncio.Event()

    async def maybe_silent(self, query: CallerIdQuery) -> None:
        if self.silent.is_set():
            await self._wake.wait()

    def speak(self) -> None:
        self.silent.clear()
        self._wake.set()


def test_a_silent_peer_gets_one_probe_at_a_time_and_fast_timeouts(keys: Keys) -> None:
    """After a query to a peer timed out with nothing heard since, one probe goes to it and
    every other query is answered "timeout" at once; its next answer ends that."""
    kp_a, kp_b = keys.node("nodeA"), keys.node("nodeB", B_IP)
    peer = Silence()
    peer.silent.set()

    async def main() -> None:
        async with (
            server(kp_b, keys, Echo("nodeB", peer.maybe_silent), B_IP) as srv,
            client(kp_a, keys, timeout_ms=300) as cli,
        ):
            first = await cli.query(B_IP, query_for(cli, 1), srv.port)
            assert first.status == "timeout" and first.elapsed_s >= 0.3
            probe = asyncio.create_task(cli.query(B_IP, query_for(cli, 2), srv.port))
            await async_wait_for(lambda: srv.stats.received == 2, what="the probe received")
            fast = [await cli.query(B_IP, query_for(cli, u), srv.port) for u in (3, 4, 5)]
            assert [r.status for r in fast] == ["timeout"] * 3
            assert max(r.elapsed_s for r in fast) < 0.05
            assert cli.stats.stalled_fast_fails == 3
            peer.speak()  # the peer answers again: the probe's reply ends the stall
            assert ok_reply(await probe).job == "2"
            again = await cli.query(B_IP, query_for(cli, 6), srv.port)
            assert ok_reply(again).job == "6"

    run(main())


def test_a_query_on_an_established_connection_times_out_at_its_deadline(keys: Keys) -> None:
    """Once the connection is up a query waits for its reply under a plain timer (not the
    path of the first query): it still ends at its deadline, as a timeout that stalls the peer,
    and a late reply to it is dropped."""
    kp_a, kp_b = keys.node("nodeA"), keys.node("nodeB", B_IP)
    peer = Silence()

    async def main() -> None:
        async with (
            server(kp_b, keys, Echo("nodeB", peer.maybe_silent), B_IP) as srv,
            client(kp_a, keys, timeout_ms=300) as cli,
        ):
            assert ok_reply(await cli.query(B_IP, query_for(cli, 1), srv.port)).job == "1"
            peer.silent.set()
            late = await cli.query(B_IP, query_for(cli, 2), srv.port)
            assert late.status == "timeout" and 0.3 <= late.elapsed_s < 0.5
            probe = asyncio.create_task(cli.query(B_IP, query_for(cli, 3), srv.port))
            await async_wait_for(lambda: srv.stats.received == 3, what="the probe received")
            fast = await cli.query(B_IP, query_for(cli, 5), srv.port)  # the peer is stalled
            assert fast.status == "timeout" and cli.stats.stalled_fast_fails == 1
            peer.speak()  # the late reply arrives (nobody waits for it), then the probe's
            assert ok_reply(await probe).job == "3"
            again = await cli.query(B_IP, query_for(cli, 4), srv.port)
            assert ok_reply(again).job == "4"

    run(main())


def test_server_back_pressure_bounds_concurrent_handlers(keys: Keys) -> None:
    kp_a, kp_b = keys.node("nodeA"), keys.node("nodeB", B_IP)
    release = asyncio.Event()

    async def hold(query: CallerIdQuery) -> None:
        await release.wait()

    async def main() -> None:
        echo = Echo("nodeB", hold)
        async with (
            server(kp_b, keys, echo, B_IP, max_concurrency=4) as srv,
            client(kp_a, keys) as cli,
        ):
            queries = [query_for(cli, uid) for uid in range(10)]
            tasks = [asyncio.create_task(cli.query(B_IP, q, srv.port)) for q in queries]
            await async_wait_for(lambda: echo.running == 4, what="4 handlers running")
            assert srv.stats.received == 4  # the others wait, unread, in the socket
            release.set()
            results = await asyncio.gather(*tasks)
            assert [ok_reply(r).job for r in results] == [str(q.uid) for q in queries]
            assert echo.max_running == 4
            assert srv.stats.received == 10

    run(main())


def test_server_bind_failure_is_an_os_error(keys: Keys) -> None:
    kp_b = keys.node("nodeB")

    async def main() -> None:
        srv = server(kp_b, keys, Echo("nodeB"), "192.0.2.1")  # TEST-NET: not on this host
        with pytest.raises(OSError, match=r"cannot listen on tcp://192\.0\.2\.1"):
            await srv.start()

    run(main())


def test_unknown_peer_touches_no_network(keys: Keys) -> None:
    kp_a = keys.node("nodeA")

    async def main() -> None:
        async with client(kp_a, keys) as cli:
            result = await cli.query("127.0.0.9", query_for(cli, 1))
            assert result.status == "unknown_peer"
            assert (await cli.ping("not-an-ip")).status == "error"
            assert cli.stats.sockets_opened == 0

    run(main())


# --------------------------------------------------------------------------- failures


def test_unauthorized_client_key_is_auth_failed_fast(keys: Keys) -> None:
    kp_b = keys.node("nodeB", B_IP)
    kp_x = keys.node("intruder", authorize=False)

    async def main() -> None:
        echo = Echo("nodeB")
        async with server(kp_b, keys, echo, B_IP) as srv, client(kp_x, keys) as cli:
            start = time.perf_counter()
            result = await cli.query(B_IP, query_for(cli, 1), srv.port)
            took = time.perf_counter() - start
            assert result.status == "auth_failed", result
            assert took < 0.25, f"auth failure reported after {took:.3f}s (deadline {SLOW}s)"
            assert echo.peers == []
            assert srv.stats.received == 0
            assert cli.connected_peers == []  # the refused socket is not kept

    run(main())


def test_wrong_server_key_is_auth_failed_fast(keys: Keys) -> None:
    kp_a = keys.node("nodeA")
    kp_b = keys.node("nodeB", authorize=False)
    keys.node("impostor", B_IP)  # the table says B_IP holds this key; the server has B's

    async def main() -> None:
        async with server(kp_b, keys, Echo("nodeB"), B_IP) as srv, client(kp_a, keys) as cli:
            result = await cli.ping(B_IP, srv.port)
            assert result.status == "auth_failed", result
            assert result.elapsed_s < 0.25

    run(main())


def test_closed_port_is_unreachable_within_50ms(keys: Keys) -> None:
    kp_a = keys.node("nodeA")
    keys.node("nodeB", B_IP)

    async def main() -> None:
        with closed_port(B_IP) as port:
            async with client(kp_a, keys) as cli:
                start = time.perf_counter()
                result = await cli.query(B_IP, query_for(cli, 1), port)
                took = time.perf_counter() - start
        assert result.status == "unreachable", result
        assert took < 0.050, f"unreachable reported after {took * 1000:.1f} ms"

    run(main())


def test_black_hole_peer_is_bounded_by_the_deadline(keys: Keys) -> None:
    kp_a = keys.node("nodeA")
    keys.node("nodeB", B_IP)

    async def main() -> None:
        with socket.socket() as hole:
            hole.bind((B_IP, 0))
            hole.listen(8)  # the kernel accepts the connection; nothing ever speaks
            port = hole.getsockname()[1]
            async with client(kp_a, keys, timeout_ms=300) as cli:
                start = time.perf_counter()
                result = await cli.query(B_IP, query_for(cli, 1), port)
                took = time.perf_counter() - start
                conn, _ = hole.accept()  # proves the TCP connection was made
                conn.close()
        assert result.status == "timeout", result
        assert 0.3 <= took <= 0.4, f"took {took:.3f}s for a 0.3s deadline"

    run(main())


def test_idle_pooled_connections_are_closed(keys: Keys) -> None:
    """A peer connection unused for IDLE_CLOSE_S is closed, so a source keeps no state for
    nodes that stopped asking it."""
    kp_a, kp_b = keys.node("nodeA"), keys.node("nodeB", B_IP)
    now = [1000.0]

    async def main() -> None:
        async with (
            server(kp_b, keys, Echo("nodeB"), B_IP) as srv,
            client(kp_a, keys, clock=lambda: now[0]) as cli,
        ):
            assert ok_reply(await cli.query(B_IP, query_for(cli, 1), srv.port)).job == "1"
            assert cli.connected_peers == [(B_IP, srv.port)]
            now[0] += IDLE_CLOSE_S - 1
            assert ok_reply(await cli.query(B_IP, query_for(cli, 2), srv.port)).job == "2"
            assert cli.stats.sockets_opened == 1  # still in use: kept
            now[0] += IDLE_CLOSE_S + 1
            assert ok_reply(await cli.query(B_IP, query_for(cli, 3), srv.port)).job == "3"
            assert cli.stats.sockets_opened == 2  # the idle one was closed and a new one made

    run(main())


def test_negative_cache_skips_a_dead_host_until_the_ttl(keys: Keys) -> None:
    kp_a, kp_b = keys.node("nodeA"), keys.node("nodeB", B_IP)
    now = [1000.0]

    async def main() -> None:
        echo = Echo("nodeB")
        async with client(kp_a, keys, unreachable_ttl_s=30.0, clock=lambda: now[0]) as cli:
            with closed_port(B_IP) as port:
                first = await cli.query(B_IP, query_for(cli, 1), port)
            assert first.status == "unreachable"
            assert cli.stats.sockets_opened == 1
            # An agent starts there now; within the TTL the client must not even try.
            srv = MeshServer(kp_b, echo, authorized_dir=keys.authorized, addresses=[B_IP],
                             port=port, resolve=False)  # fmt: skip
            async with srv:
                now[0] += 29.0
                start = time.perf_counter()
                second = await cli.query(B_IP, query_for(cli, 2), port)
                assert second.status == "unreachable"
                assert time.perf_counter() - start < 0.005
                assert cli.stats.sockets_opened == 1
                assert cli.stats.negative_cache_hits == 1
                assert srv.stats.received == 0
                now[0] += 2.0  # past the TTL: tried again, and the agent answers
                assert ok_reply(await cli.query(B_IP, query_for(cli, 3), port)).job == "3"
                assert cli.stats.sockets_opened == 2
            assert [p.node for p in echo.peers] == ["nodeA"]

    run(main())


def test_lost_connection_fails_waiting_queries_at_once(keys: Keys) -> None:
    kp_a, kp_b = keys.node("nodeA"), keys.node("nodeB", B_IP)
    never = asyncio.Event()

    async def stall(query: CallerIdQuery) -> None:
        await never.wait()

    async def main() -> None:
        srv = server(kp_b, keys, Echo("nodeB", stall), B_IP)
        await srv.start()
        serving = asyncio.create_task(srv.serve())
        async with client(kp_a, keys, timeout_ms=5000) as cli:
            pending = asyncio.create_task(cli.query(B_IP, query_for(cli, 1), srv.port))
            await async_wait_for(lambda: srv.stats.received == 1, what="query received")
            await srv.close(grace=0)
            await serving
            result = await pending
            assert result.status == "unreachable", result
            assert result.elapsed_s < 1.0
            assert cli.connected_peers == []

    run(main())


def test_pool_eviction_closes_sockets(keys: Keys) -> None:
    ips = [f"127.0.0.{i}" for i in range(10, 30)]
    kp_a, kp_b = keys.node("nodeA"), keys.node("nodeB", *ips)

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    async def main() -> None:
        async with server(kp_b, keys, Echo("nodeB"), *ips) as srv:
            ports = [int(ep.rsplit(":", 1)[1]) for ep in srv.endpoints]
            assert len(ports) == 20
            async with client(kp_a, keys, pool_size=4) as cli:
                await cli.ping(ips[0], ports[0])  # let zmq start its threads
                baseline = fds()
                for _round in range(3):
                    for ip, port in zip(ips, ports, strict=True):
                        assert (await cli.ping(ip, port)).status == "ok"
                        assert len(cli.connected_peers) <= 4
                    # 4 pooled sockets cost ~3 fds each (+ the server's ends); 20 would be ~80
                    await async_wait_for(lambda: fds() <= baseline + 30, what="fds released")
                assert cli.stats.sockets_opened == 60
                assert cli.stats.sockets_closed >= 56
                assert cli.connected_peers == list(zip(ips[-4:], ports[-4:], strict=True))

    run(main())


# --------------------------------------------------------------------------- server hygiene


class RawPeer:
    """A CURVE DEALER speaking raw frames to a server, to send what MeshClient never would."""

    def __init__(self, ctx: zmq.asyncio.Context, keypair: KeyPair, server_kp: KeyPair, port: int):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.curve_publickey = keypair.public
        self.sock.curve_secretkey = keypair.secret
        self.sock.curve_serverkey = server_kp.public
        self.sock.connect(f"tcp://{B_IP}:{port}")

    async def send(self, *frames: bytes) -> None:
        await self.sock.send_multipart(list(frames))

    async def recv(self) -> Any:
        frames = await asyncio.wait_for(self.sock.recv_multipart(), 5)
        assert len(frames) == 1
        return decode(frames[0])


def test_garbage_is_counted_and_dropped_and_the_server_keeps_serving(keys: Keys) -> None:
    kp_a, kp_b = keys.node("nodeA"), keys.node("nodeB", B_IP)

    async def main() -> None:
        ctx = zmq.asyncio.Context()
        try:
            async with server(kp_b, keys, Echo("nodeB"), B_IP) as srv:
                raw = RawPeer(ctx, kp_a, kp_b, srv.port)
                await raw.send(b"\xc1")
                await raw.send(b"")
                await raw.send(encode(Ping(id=1)), encode(Ping(id=2)))  # two frames
                await raw.send(msgpack.packb({"t": "ping", "v": 1, "id": "x"}))
                await raw.send(encode(Pong(id=3, node="nodeA")))  # a reply is not a request
                await raw.send(b"\x00" * 5000)
                await raw.send(encode(Ping(id=4)))
                assert await raw.recv() == Pong(id=4, node="nodeB")  # nothing answered before
                assert srv.stats.malformed == 6
                assert srv.stats.answered == 1
                raw.sock.close()
        finally:
            ctx.term()

    run(main())


def test_unknown_version_gets_a_bad_version_error_reply(keys: Keys) -> None:
    kp_a, kp_b = keys.node("nodeA"), keys.node("nodeB", B_IP)

    async def main() -> None:
        ctx = zmq.asyncio.Context()
        try:
            async with server(kp_b, keys, Echo("nodeB"), B_IP) as srv:
                raw = RawPeer(ctx, kp_a, kp_b, srv.port)
                await raw.send(msgpack.packb({"t": "q2", "v": 2, "flags": [1]}))  # no id
                await raw.send(msgpack.packb({"t": "q2", "v": 2, "id": 77, "new": True}))
                reply = await raw.recv()
                assert isinstance(reply, CallerIdReply)
                assert (reply.id, reply.status, reply.code) == (77, "error", ErrorCode.BAD_VERSION)
                assert reply.node == "nodeB"
                assert srv.stats.bad_version == 2
                assert srv.stats.malformed == 0
                raw.sock.close()
        finally:
            ctx.term()

    run(main())


def test_handler_failure_is_an_internal_error_without_details(keys: Keys) -> None:
    kp_a, kp_b = keys.node("nodeA"), keys.node("nodeB", B_IP)

    async def handler(query: CallerIdQuery, peer: PeerIdentity) -> CallerIdReply:
        if query.uid == 1:
            msg = "secret detail: /etc/shadow is unreadable"
            raise RuntimeError(msg)
        if query.uid == 2:
            return CallerIdReply(id=query.id + 1, status="not_found", node="nodeB")
        return CallerIdReply(id=query.id, status="not_found", node="nodeB")

    async def main() -> None:
        async with server(kp_b, keys, handler, B_IP) as srv, client(kp_a, keys) as cli:
            for uid in (1, 2):
                reply = ok_reply(await cli.query(B_IP, query_for(cli, uid), srv.port))
                assert (reply.status, reply.code) == ("error", ErrorCode.INTERNAL)
                assert reply.reason == "internal error"
            assert srv.stats.internal_errors == 2
            reply = ok_reply(await cli.query(B_IP, query_for(cli, 3), srv.port))
            assert reply.status == "not_found"

    run(main())


def test_reload_keys_authorizes_and_revokes_without_restart(keys: Keys) -> None:
    kp_b = keys.node("nodeB", B_IP)
    kp_c = keys.node("nodeC", authorize=False)

    async def main() -> None:
        async with server(kp_b, keys, Echo("nodeB"), B_IP) as srv:
            async with client(kp_c, keys, timeout_ms=500) as cli:
                assert (await cli.ping(B_IP, srv.port)).status == "auth_failed"
                keys.authorize("nodeC")
                srv.reload_keys()
                assert (await cli.ping(B_IP, srv.port)).status == "ok"
                keys.revoke("nodeC")
                srv.reload_keys()
                # The open, already authenticated connection is no longer served ...
                assert (await cli.ping(B_IP, srv.port)).status == "timeout"
                assert srv.stats.unauthorized == 1
            # ... and a new connection is refused at the handshake.
            async with client(kp_c, keys) as fresh:
                assert (await fresh.ping(B_IP, srv.port)).status == "auth_failed"
            assert [p.node for p in srv.peers] == ["nodeB"]

    run(main())


def test_client_close_fails_waiting_queries(keys: Keys) -> None:
    kp_a, kp_b = keys.node("nodeA"), keys.node("nodeB", B_IP)
    never = asyncio.Event()

    async def stall(query: CallerIdQuery) -> None:
        await never.wait()

    async def main() -> None:
        async with server(kp_b, keys, Echo("nodeB", stall), B_IP) as srv:
            cli = client(kp_a, keys)
            pending = asyncio.create_task(cli.query(B_IP, query_for(cli, 1), srv.port))
            await async_wait_for(lambda: srv.stats.received == 1, what="query received")
            await cli.close()
            result = await pending
            assert (result.status, result.detail) == ("error", "client closed")
            assert (await cli.ping(B_IP, srv.port)).status == "error"

    run(main())


# --------------------------------------------------------------------------- refused handshakes


def test_refused_handshakes_are_counted_and_their_log_lines_bounded(
    keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    kp_b = keys.node("nodeB", B_IP)
    kp_x = keys.node("intruder", authorize=False)
    tries = 30

    async def main() -> None:
        srv = server(kp_b, keys, Echo("nodeB"), B_IP, refusal_log_budget=(3, 60.0))
        async with srv, client(kp_x, keys) as cli:
            for _ in range(tries):
                assert (await cli.ping(B_IP, srv.port)).status == "auth_failed"
            stats = srv.stats
            assert stats.refused_handshakes >= tries  # zmq may retry one before it is dropped
            assert stats.refusals_not_logged == stats.refused_handshakes - 3
            assert stats.received == 0

    with caplog.at_level(logging.INFO, logger="callerid.bus.transport"):
        run(main())
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 3, [r.getMessage() for r in refused]


# --------------------------------------------------------------------------- link-local

# One mesh node inside a network namespace: a server (answers job=str(uid), prints its port,
# serves until stdin closes), or a client (pings and queries each host given, prints statuses).
MESH_NODE = r"""
import asyncio, json, sys
from pathlib import Path
from callerid.agent.ask import mesh_asker
from callerid.bus.peers import PeerTable
from callerid.bus.protocol import CallerIdQuery, CallerIdReply, Endpoint
from callerid.bus.transport import MeshClient, MeshServer, load_keypair
cfg = json.loads(sys.argv[1])
kp = load_keypair(Path(cfg["dir"]), cfg["name"])
table = PeerTable.load(Path(cfg["authorized"]), resolve=False)

async def echo(q, peer):
    return CallerIdReply(id=q.id, status="found", node=cfg["name"], job=str(q.uid))

async def serve():
    async with MeshServer(kp, echo, peers=table, addresses=["::"], port=0, resolve=False) as s:
        print(json.dumps({"port": s.port}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

async def ask():
    out = {}
    async with MeshClient(kp, table, port=cfg["port"]) as cli:
        for host in cfg["hosts"]:
            ping = await cli.ping(host)
            q = CallerIdQuery(0, "tcp", Endpoint("fe80::a", 40000), Endpoint("fe80::b", 22), 1001)
            status, reply = await mesh_asker(cli)(host, q)
            out[host] = [ping.status, ping.reply.node if ping.reply else None,
                         status, reply.job if reply else None]
    print(json.dumps(out), flush=True)

asyncio.run(serve() if cfg["role"] == "server" else ask())
"""


def test_query_and_ping_over_a_link_local_address(keys: Keys) -> None:
    """Two agents' mesh ends in two namespaces joined only by fe80:: addresses: the client
    reaches the server at fe80::b with its interface (by name or index); without one it
    says so at once."""
    import json
    import subprocess
    import sys

    from tests.support.linklocal import LinkLocalPair

    keys.node("nodeA", "fe80::a")
    keys.node("nodeB", "fe80::b")
    base = {"authorized": str(keys.authorized)}
    with LinkLocalPair() as pair:
        srv = subprocess.Popen(
            [*pair.b.prefix(), sys.executable, "-c", MESH_NODE,
             json.dumps({**base, "role": "server", "dir": str(keys.root / "nodeB"),
                         "name": "nodeB"})],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert srv.stdout is not None
            port = json.loads(srv.stdout.readline())["port"]
            hosts = [pair.b.scoped, f"fe80::b%{pair.a.ifindex}", "fe80::b"]
            cfg = {**base, "role": "client", "dir": str(keys.root / "nodeA"), "name": "nodeA",
                   "port": port, "hosts": hosts}  # fmt: skip
            out = subprocess.run(
                [*pair.a.prefix(), sys.executable, "-c", MESH_NODE, json.dumps(cfg)],
                check=True, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
        finally:
            srv.kill()
            srv.communicate(timeout=10)  # and close its pipes
    got = json.loads(out.stdout)
    assert got[hosts[0]] == ["ok", "nodeB", "ok", "1001"]
    assert got[hosts[1]] == ["ok", "nodeB", "ok", "1001"]
    assert got["fe80::b"] == ["error", None, "error", None]  # which link? not guessed
