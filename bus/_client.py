"""Private part of `callerid.bus.transport`: the mesh client and its pool of peer sockets.

One DEALER per peer (ip, port) from a bounded LRU pool. Each DEALER has a reader (a loop
callback, see `LoopSocket`) that matches replies to waiting futures by request id (so many
queries share a socket) and a monitor task that turns socket events into a verdict: up,
unreachable (nothing listens: reported within a few ms, not at the deadline, and
remembered in a negative cache), auth_failed (the CURVE handshake was refused) or lost.

A peer that accepted the connection but let a query time out (stopped, hung, overloaded) is
"stalled" until anything arrives from it again: meanwhile one query at a time goes to it (the
probe that notices its return) and any other gets `timeout` at once, instead of each waiting
its full deadline; under a login storm this keeps every login decided within
``timeout_ms`` of a source that stopped answering. Import from `transport`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Final

import zmq
import zmq.asyncio

from callerid.bus._client_types import (
    ClientSettings,
    ClientStats,
    PeerSettings,
    QueryResult,
    QueryStatus,
    reach,
)
from callerid.bus._deadhosts import DeadHosts
from callerid.bus._sockets import (
    DEFAULT_PORT,
    MONITOR_EVENTS,
    KeyPair,
    LoopSocket,
    classify_event,
    configure_socket,
    endpoint,
    parse_event,
)
from callerid.bus.peers import PeerTable
from callerid.bus.protocol import (
    MAX_REQUEST_ID,
    CallerIdQuery,
    CallerIdReply,
    Message,
    Ping,
    Pong,
    ProtocolError,
    UnsupportedVersion,
    decode_frames,
    encode,
    normalize_ip,
)

log = logging.getLogger("callerid.bus.transport")

IDLE_CLOSE_S: Final = 300.0  # a pooled peer connection unused this long is closed
_DEFAULT_SETTINGS: Final = ClientSettings()
_STATUS_OF: Final[dict[str, QueryStatus]] = {
    "unreachable": "unreachable",
    "stalled": "timeout",
    "auth_failed": "auth_failed",
    "lost": "unreachable",
}


@dataclass(frozen=True, slots=True)
class _Failure:
    status: QueryStatus
    detail: str


_EXPIRED: Final = _Failure("timeout", "")  # a query's own deadline passed (`_expire`)


def _expire(fut: asyncio.Future[Message | _Failure]) -> None:
    if not fut.done():
        fut.set_result(_EXPIRED)


@dataclass(eq=False)
class _PeerConn:
    key: tuple[str, int]
    server_key: str
    sock: zmq.Socket[bytes]
    mon: zmq.asyncio.Socket
    ready: asyncio.Future[_Failure | None]
    pending: dict[int, asyncio.Future[Message | _Failure]] = field(default_factory=dict)
    io: LoopSocket | None = None
    monitor: asyncio.Task[None] | None = None
    closed: bool = False
    last_used: float = 0.0
    stalled: bool = False  # a query timed out and nothing has been heard since

    def settle(self, failure: _Failure) -> None:
        """Fail everything waiting on this connection (no exception objects involved)."""
        if not self.ready.done():
            self.ready.set_result(failure)
        for fut in self.pending.values():
            if not fut.done():
                fut.set_result(failure)
        self.pending.clear()


class MeshClient:
    """Query other agents; see the module docstring. All methods run on one event loop."""

    def __init__(
        self,
        keypair: KeyPair,
        peers: PeerTable,
        cfg: PeerSettings = _DEFAULT_SETTINGS,
        *,
        port: int = DEFAULT_PORT,
        ctx: zmq.asyncio.Context | None = None,
        clock: Callable[[], float] = time.monotonic,
        source_address: str | None = None,
    ) -> None:
        self.stats = ClientStats()
        self._keypair = keypair
        self._peers = peers
        self._cfg = cfg
        self._port = port
        self._own_ctx = ctx is None
        self._ctx = ctx if ctx is not None else zmq.asyncio.Context()
        self._clock = clock
        self._source = normalize_ip(source_address) if source_address else None
        self._ids = itertools.count(1)
        self._pool: OrderedDict[tuple[str, int], _PeerConn] = OrderedDict()
        self._dead = DeadHosts(cfg.unreachable_ttl_s, clock)
        self._closed = False

    # ------------------------------------------------------------------ public API

    def next_id(self) -> int:
        """A fresh request id for a CallerIdQuery."""
        return next(self._ids) % (MAX_REQUEST_ID + 1)

    @property
    def connected_peers(self) -> list[tuple[str, int]]:
        """(ip, port) of the pooled sockets, least recently used first."""
        return list(self._pool)

    @property
    def peers(self) -> PeerTable:
        return self._peers

    @peers.setter
    def peers(self, peers: PeerTable) -> None:
        self.set_peers(peers)

    def set_peers(self, peers: PeerTable) -> None:
        """Use a new peer table (after a reload); sockets whose peer key changed are closed."""
        self._peers = peers
        for conn in list(self._pool.values()):
            peer = peers.by_address(conn.key[0])
            if peer is None or peer.public_key != conn.server_key:
                self._drop(conn, _Failure("error", "the peer's key changed"))

    def query(
        self,
        host: str,
        query: CallerIdQuery,
        port: int | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Coroutine[None, None, QueryResult]:
        """Ask the agent at ``host`` (an IP literal) which job owns a connection (a coroutine
        to await; no frame of its own between the caller and the exchange)."""
        return self._exchange(host, port, query, CallerIdReply, timeout_s)

    async def ping(
        self, host: str, port: int | None = None, *, timeout_s: float | None = None
    ) -> QueryResult:
        """Round trip a Ping; on success ``reply`` is the peer's Pong (with its node name)."""
        return await self._exchange(host, port, Ping(id=self.next_id()), Pong, timeout_s)

    async def close(self) -> None:
        """Close every socket (waiting queries fail with status "error")."""
        self._closed = True
        monitors = [c.monitor for c in self._pool.values() if c.monitor is not None]
        for conn in list(self._pool.values()):
            self._drop(conn, _Failure("error", "client closed"))
        await asyncio.gather(*monitors, return_exceptions=True)
        if self._own_ctx and not self._ctx.closed:
            self._ctx.term()

    async def __aenter__(self) -> MeshClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ one exchange

    async def _exchange(
        self,
        host: str,
        port: int | None,
        msg: CallerIdQuery | Ping,
        expect: type[CallerIdReply] | type[Pong],
        timeout_s: float | None,
    ) -> QueryResult:
        loop = asyncio.get_running_loop()
        start = loop.time()

        def done(
            status: QueryStatus, detail: str = "", reply: Message | None = None
        ) -> QueryResult:
            answer = reply if isinstance(reply, CallerIdReply | Pong) else None
            return QueryResult(status, answer, loop.time() - start, detail)

        if self._closed:
            return done("error", "client closed")
        try:
            ip, where = reach(host)
        except ValueError as exc:
            return done("error", str(exc))
        key = (where, self._port if port is None else port)
        if key in self._dead:
            self.stats.negative_cache_hits += 1
            return done("unreachable", "no agent there (cached)")
        peer = self._peers.by_address(ip)
        if peer is None:
            return done("unknown_peer", f"no authorized key for {ip}")
        conn = self._connection(key, peer.public_key)
        if conn.stalled and conn.pending:  # one probe at a time to a silent peer
            self.stats.stalled_fast_fails += 1
            return done("timeout", "the peer has not answered since its last query timed out")
        if msg.id in conn.pending:
            return done("error", f"request id {msg.id} is already in flight")
        fut: asyncio.Future[Message | _Failure] = loop.create_future()
        conn.pending[msg.id] = fut
        timeout = timeout_s if timeout_s is not None else self._cfg.timeout_ms / 1000
        try:
            outcome = await self._reply(conn, msg, fut, start + timeout)
        finally:
            conn.pending.pop(msg.id, None)
        if outcome is _EXPIRED:
            conn.stalled = True
            return done("timeout", f"no answer within {timeout * 1000:.0f} ms")
        if isinstance(outcome, _Failure):
            return done(outcome.status, outcome.detail)
        if not isinstance(outcome, expect):
            return done("error", f"unexpected {type(outcome).__name__} in reply")
        return done("ok", reply=outcome)

    async def _reply(
        self,
        conn: _PeerConn,
        msg: CallerIdQuery | Ping,
        fut: asyncio.Future[Message | _Failure],
        deadline: float,
    ) -> Message | _Failure:
        """Send ``msg`` and wait for its reply until ``deadline`` (loop time; then
        `_EXPIRED`). When the connection is up and takes the message at once (the usual
        case) only the reply is waited for, under a plain timer; else `_roundtrip`."""
        loop = fut.get_loop()  # the running one (asyncio.get_running_loop costs a getpid)
        if conn.io is not None and conn.ready.done() and conn.ready.result() is None:
            with contextlib.suppress(zmq.ZMQError):  # Again, or closed: `_roundtrip` tells
                conn.io.send([encode(msg)])
                expiry = loop.call_at(deadline, _expire, fut)
                try:
                    return await fut
                finally:
                    expiry.cancel()
        try:
            async with asyncio.timeout_at(deadline):
                return await self._roundtrip(conn, msg, fut)
        except TimeoutError:
            return _EXPIRED

    async def _roundtrip(
        self, conn: _PeerConn, msg: CallerIdQuery | Ping, fut: asyncio.Future[Message | _Failure]
    ) -> Message | _Failure:
        if not conn.ready.done():
            await asyncio.wait((conn.ready,))  # shared: must not be cancelled by our timeout
        failure = conn.ready.result()
        if failure is not None:
            return failure
        assert conn.io is not None
        try:  # under IMMEDIATE the pipe may attach a moment after the handshake: wait for it
            await conn.io.send_wait([encode(msg)])
        except zmq.ZMQError as exc:  # closed meanwhile: report why, if we know
            return fut.result() if fut.done() else _Failure("error", f"send failed: {exc}")
        return await fut

    # ------------------------------------------------------------------ pool

    def _connection(self, key: tuple[str, int], server_key: str) -> _PeerConn:
        now = self._clock()
        self._expire_idle(now)
        conn = self._pool.get(key)
        if conn is not None:
            if conn.server_key == server_key:
                self._pool.move_to_end(key)
                conn.last_used = now
                return conn
            self._drop(conn, _Failure("error", "the peer's key changed"))
        while len(self._pool) >= self._cfg.pool_size:
            idle = [c for c in self._pool.values() if not c.pending]
            victim = idle[0] if idle else next(iter(self._pool.values()))
            self._drop(victim, _Failure("error", "connection evicted from the pool"))
        conn = self._open(key, server_key)
        conn.last_used = now
        self._pool[key] = conn
        return conn

    def _expire_idle(self, now: float) -> None:
        """Close connections unused for IDLE_CLOSE_S: a source then holds state only for the
        peers that asked it recently, not for every node that ever did (LRU order: the
        least recently used come first)."""
        idle = []
        for conn in self._pool.values():  # a copy only when some are to go
            if now - conn.last_used < IDLE_CLOSE_S:
                break
            if not conn.pending:
                idle.append(conn)
        for conn in idle:
            self._drop(conn, _Failure("error", "idle connection closed"))

    def _open(self, key: tuple[str, int], server_key: str) -> _PeerConn:
        sock: zmq.Socket[bytes] = zmq.Socket(self._ctx, zmq.DEALER)  # driven by LoopSocket
        try:
            configure_socket(
                sock,
                self._keypair,
                server_key=server_key.encode("ascii"),
                connect_timeout_ms=self._cfg.connect_timeout_ms,
            )
            mon = sock.get_monitor_socket(MONITOR_EVENTS)  # a PAIR of our asyncio context
            if not isinstance(mon, zmq.asyncio.Socket):
                msg = "MeshClient needs a zmq.asyncio.Context"
                raise TypeError(msg)
            source = None if "%" in key[0] else self._source  # link-local: the link decides
            sock.connect(endpoint(key[0], key[1], source=source))
        except BaseException:
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
            sock.close(linger=0)
            raise
        conn = _PeerConn(key, server_key, sock, mon, asyncio.get_running_loop().create_future())
        conn.io = LoopSocket(sock, functools.partial(self._deliver, conn), copy=True)
        conn.monitor = asyncio.create_task(self._watch(conn), name=f"mesh-monitor-{key[0]}")
        self.stats.sockets_opened += 1
        return conn

    def _drop(self, conn: _PeerConn, failure: _Failure) -> None:
        """Remove from the pool, fail its waiters, stop its tasks, close socket and monitor."""
        if conn.closed:
            return
        conn.closed = True
        if self._pool.get(conn.key) is conn:
            del self._pool[conn.key]
        conn.settle(failure)
        if conn.monitor is not None and conn.monitor is not asyncio.current_task():
            conn.monitor.cancel()
        with contextlib.suppress(zmq.ZMQError):
            conn.sock.disable_monitor()
        conn.mon.close(linger=0)
        if conn.io is not None:
            conn.io.close()
        conn.sock.close(linger=0)
        self.stats.sockets_closed += 1

    # ------------------------------------------------------------------ per-socket tasks

    async def _watch(self, conn: _PeerConn) -> None:
        established = connected = False
        while not conn.closed:
            try:
                event, value = parse_event(await conn.mon.recv_multipart())
            except ValueError:
                continue
            verdict = classify_event(event, value, established=established, connected=connected)
            if verdict is None:
                continue
            if verdict.state == "connected":
                connected = True
                continue
            if verdict.state == "up":
                established = True
                if not conn.ready.done():
                    conn.ready.set_result(None)
                continue
            log.debug("peer %s:%d: %s (%s)", *conn.key, verdict.state, verdict.detail)
            if verdict.state == "unreachable":  # nothing listens: skip the host for a while
                self._dead.add(conn.key)
            self._drop(conn, _Failure(_STATUS_OF[verdict.state], verdict.detail))
            return

    def _deliver(self, conn: _PeerConn, frames: list[bytes]) -> None:
        """A reply, from the loop's reader callback: wake the query waiting for its id."""
        try:
            msg = decode_frames(frames)
        except UnsupportedVersion as exc:
            fut = conn.pending.get(exc.request_id) if exc.request_id is not None else None
            if fut is not None and not fut.done():
                fut.set_result(_Failure("error", str(exc)))
            return
        except ProtocolError as exc:
            self.stats.malformed += 1
            log.debug("malformed reply from %s:%d: %s", *conn.key, exc)
            return
        conn.stalled = False  # it answers again
        fut = conn.pending.get(msg.id)
        if fut is not None and not fut.done():
            fut.set_result(msg)
