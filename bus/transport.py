"""The mesh transport: CURVE-authenticated ZeroMQ over asyncio (the only zmq importer).

- `MeshServer`: one ROUTER bound on every configured address (IPv4 and IPv6), CURVE server
  with this node's keypair, a ZAP allow-list fed from the `PeerTable` (reloadable with
  `reload_keys()`). Each query runs in its own task (bounded), so a slow lookup blocks no
  other; Ping is answered inline. Garbage is counted and dropped, never answered.
- `MeshClient` (in `bus/_client.py`, re-exported here): one DEALER per peer from an LRU
  pool, replies matched by request id, a deadline per query, fast failure through a socket
  monitor and a negative cache of hosts with no agent.
- Keys: `generate_keypair()` / `load_keypair()` in zmq's certificate format.

The context, ZAP and the socket monitors use zmq.asyncio; the data sockets (ROUTER and
DEALERs) are plain zmq sockets driven by the event loop through their ZMQ_FD (`LoopSocket`),
which halves the per-message overhead of zmq.asyncio futures (bench/mesh.py). All of it
runs on the one event loop: no threads of our own.

Private helpers of this module that also import zmq: `bus/_client.py` (the client and its
pool) and `bus/_sockets.py` (socket options, `LoopSocket`, monitor events, keys). Four
do not: `bus/_client_types.py` (the client's settings, results and counters),
`bus/_deadhosts.py` (its negative cache), `bus/_zap.py` (the ZAP verdict on a client key and
the server's counters) and `bus/loglimit.py` (the bound on log lines about refused handshakes).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from callerid.bus._client import MeshClient
from callerid.bus._client_types import ClientSettings, ClientStats, QueryResult, QueryStatus
from callerid.bus._sockets import (
    DEFAULT_PORT,
    KeyPair,
    LoopSocket,
    configure_socket,
    endpoint,
    generate_keypair,
    load_keypair,
)
from callerid.bus._zap import KeyProvider, ServerStats
from callerid.bus.loglimit import LogBudget, QuietLog
from callerid.bus.peers import PeerTable
from callerid.bus.protocol import (
    CallerIdQuery,
    CallerIdReply,
    ErrorCode,
    LocalProtocolError,
    Ping,
    Pong,
    ProtocolError,
    UnsupportedVersion,
    decode_frames,
    encode,
    error_reply,
)

__all__ = [
    "DEFAULT_PORT",
    "ClientSettings",
    "ClientStats",
    "Handler",
    "KeyPair",
    "MeshClient",
    "MeshServer",
    "PeerIdentity",
    "QueryResult",
    "QueryStatus",
    "ServerStats",
    "generate_keypair",
    "load_keypair",
]

log = logging.getLogger(__name__)

MAX_CONCURRENCY: Final = 1024
INTERNAL_REASON: Final = "internal error"
ZAP_DOMAIN: Final = "callerid"
_IPV6_UNAVAILABLE: Final = frozenset({errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL})


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Who sent a query: the CURVE key proven in the handshake, and its node when known."""

    public_key: str
    node: str | None


Handler = Callable[[CallerIdQuery, PeerIdentity], Awaitable[CallerIdReply]]


class MeshServer:
    """Serve CallerIdQuery and Ping on a CURVE ROUTER; see the module docstring."""

    def __init__(
        self,
        keypair: KeyPair,
        handler: Handler,
        *,
        peers: PeerTable | None = None,
        authorized_dir: Path | None = None,
        addresses: Sequence[str] = ("0.0.0.0", "::"),
        port: int = DEFAULT_PORT,
        node: str | None = None,
        resolve: bool = True,
        ctx: zmq.asyncio.Context | None = None,
        max_concurrency: int = MAX_CONCURRENCY,
        clock: Callable[[], float] = time.monotonic,
        refusal_log_budget: tuple[int, float] = (5, 60.0),
    ) -> None:
        """``peers`` is the allow-list and name table; without it, ``start()`` loads it from
        ``authorized_dir`` (as does ``reload_keys()`` without argument). At most
        ``refusal_log_budget`` = (lines, per seconds) refused handshakes are logged one by one
        (on ``clock``); the rest are counted and summarised."""
        if peers is None and authorized_dir is None:
            msg = "MeshServer needs peers or authorized_dir"
            raise ValueError(msg)
        self.node = node or keypair.name
        self.stats = ServerStats()
        self.endpoints: list[str] = []
        self._keypair = keypair
        self._authorized_dir = authorized_dir
        self._handler = handler
        self._listen = list(addresses)
        self._port = port
        self._resolve = resolve
        self._peers = peers if peers is not None else PeerTable()
        burst, window_s = refusal_log_budget
        budget = LogBudget(clock, burst=burst, window_s=window_s)
        self._provider = KeyProvider(self._peers, self.stats, budget)
        self._bad_version_log = QuietLog(
            log, logging.INFO, "requests of an unsupported version", LogBudget(clock)
        )
        self._load_peers = peers is None
        self._own_ctx = ctx is None
        self._ctx = ctx if ctx is not None else zmq.asyncio.Context()
        self._max_concurrency = max_concurrency
        self._auth: AsyncioAuthenticator | None = None
        self._sock: zmq.Socket[bytes] | None = None
        self._io: LoopSocket | None = None
        self._stopped = asyncio.Event()
        self._serving: asyncio.Task[None] | None = None
        self._background: asyncio.Task[None] | None = None
        self._stopping = False
        self._inflight: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ lifecycle

    @property
    def peers(self) -> PeerTable:
        return self._peers

    @property
    def port(self) -> int:
        """The TCP port of the first bound endpoint (useful with port 0)."""
        return int(self.endpoints[0].rsplit(":", 1)[1])

    async def start(self) -> None:
        """Load keys (unless given), start ZAP and bind every address; then run `serve()`."""
        try:
            if self._load_peers:
                self.reload_keys()
            self._auth = AsyncioAuthenticator(self._ctx)  # pyzmq 24 (Debian 12) takes no log=
            self._auth.log = logging.getLogger(f"{__name__}.zap")
            self._auth.start()
            self._auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=self._provider)
            sock: zmq.Socket[bytes] = zmq.Socket(self._ctx, zmq.ROUTER)  # driven by LoopSocket
            self._sock = sock
            configure_socket(sock, self._keypair, server=True)
            sock.setsockopt_string(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
            self._bind_all(sock)
        except BaseException:
            await self.close()
            raise
        log.info("mesh server %s listening on %s", self.node, " ".join(self.endpoints))

    async def serve(self) -> None:
        """Answer requests until `close()` (returns) or cancellation (raises)."""
        if self._sock is None:
            msg = "MeshServer.serve() before start()"
            raise RuntimeError(msg)
        self._serving = asyncio.current_task()
        self._io = LoopSocket(self._sock, self._on_message, copy=False)
        try:
            await self._stopped.wait()
        except asyncio.CancelledError:
            if not self._stopping:
                raise
        finally:
            self._io.pause()
            self._serving = None

    def _bind_all(self, sock: zmq.Socket[bytes]) -> None:
        # "::" first: on Linux it is dual-stack and then also covers "0.0.0.0" on the same port.
        order = sorted(self._listen, key=lambda a: a != "::")
        for addr in order:
            where = endpoint(addr, self._port)
            try:
                sock.bind(where)
            except zmq.ZMQError as exc:
                if self._covered_by_dual_stack(addr, exc):
                    log.debug("%s:%d is covered by the dual-stack [::] socket", addr, self._port)
                    continue
                if addr == "::" and exc.errno in _IPV6_UNAVAILABLE:
                    log.warning("cannot listen on %s: %s (no IPv6?)", where, exc)
                    continue
                msg = f"cannot listen on {where}: {exc.strerror}"
                raise OSError(exc.errno, msg) from exc
            self.endpoints.append(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        if not self.endpoints:
            msg = f"no listen address could be bound: {self._listen}"
            raise OSError(msg)

    def _covered_by_dual_stack(self, addr: str, exc: zmq.ZMQError) -> bool:
        return (
            addr == "0.0.0.0"
            and exc.errno == errno.EADDRINUSE
            and self._port != 0
            and any(ep.startswith("tcp://[::]:") for ep in self.endpoints)
        )

    def reload_keys(self, peers: PeerTable | None = None) -> None:
        """Use a new peer table (default: re-read the authorized directory) for ZAP and names.

        New connections are checked against the new keys at once; requests arriving on an
        already authenticated connection whose key was removed are dropped from then on.
        On error (unreadable directory) the previous table stays in force.
        """
        if peers is None:
            if self._authorized_dir is None:
                msg = "reload_keys() needs a table: this server has no authorized_dir"
                raise ValueError(msg)
            peers = PeerTable.load(self._authorized_dir, resolve=self._resolve)
        self._peers = peers
        self._provider.peers = peers
        log.info("mesh server %s: %d authorized keys", self.node, len(peers))

    async def close(self, grace: float = 1.0) -> None:
        """Stop receiving, let in-flight handlers finish for up to ``grace`` s, close."""
        self._stopping = True
        self._stopped.set()
        serving = self._serving
        if serving is not None and serving is not asyncio.current_task():
            await asyncio.wait((serving,))
        if self._inflight:
            _done, pending = await asyncio.wait(set(self._inflight), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if self._auth is not None:
            self._auth.stop()  # before ctx.term(), which otherwise hangs on the ZAP socket
            self._auth = None
        self._provider.close()
        self._bad_version_log.close()
        if self._io is not None:
            self._io.close()
            self._io = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._own_ctx and not self._ctx.closed:
            self._ctx.term()

    async def __aenter__(self) -> MeshServer:
        """Start, and serve in a background task until the block ends."""
        await self.start()
        self._background = asyncio.create_task(self.serve(), name=f"mesh-server-{self.node}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
        if self._background is not None:
            await self._background
            self._background = None

    # ------------------------------------------------------------------ serving

    def _on_message(self, frames: list[Any]) -> None:
        """One request, from the loop's reader callback: Ping inline, a query in a task."""
        self.stats.received += 1
        if len(frames) < 2:  # a ROUTER always prepends the routing id
            self.stats.malformed += 1
            return
        peer = self._identify(frames[-1])
        if peer is None:
            self.stats.unauthorized += 1
            return
        route: bytes = frames[0].bytes
        msg = self._decode(route, [f.bytes for f in frames[1:]], peer)
        if isinstance(msg, Ping):
            self.stats.pings += 1
            self._send(route, Pong(id=msg.id, node=self.node))
        elif isinstance(msg, CallerIdQuery):
            task = asyncio.create_task(self._answer(route, msg, peer))
            self._inflight.add(task)
            task.add_done_callback(self._task_done)
            if len(self._inflight) >= self._max_concurrency and self._io is not None:
                self._io.pause()  # back-pressure: stop reading while saturated

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        serving = self._serving is not None and not self._stopping
        if serving and self._io is not None and len(self._inflight) < self._max_concurrency:
            self._io.resume()

    def _identify(self, frame: zmq.Frame) -> PeerIdentity | None:
        try:
            user_id = str(frame.get("User-Id"))
        except zmq.ZMQError:  # no ZAP verdict attached: never serve such a request
            return None
        peer = self._peers.by_key(user_id)
        if peer is None:  # authenticated under a key that has since been removed
            log.debug("dropping a request from de-authorized key %s", user_id)
            return None
        return PeerIdentity(public_key=user_id, node=peer.node)

    def _decode(self, route: bytes, frames: list[bytes], peer: PeerIdentity) -> object:
        try:
            msg = decode_frames(frames)
        except UnsupportedVersion as exc:
            self.stats.bad_version += 1
            self._bad_version_log("version %d request from %s: %s", exc.version, peer.node, exc)
            if exc.request_id is not None:
                reply = error_reply(exc.request_id, self.node, ErrorCode.BAD_VERSION, str(exc))
                self._send(route, reply)
            return None
        except ProtocolError as exc:
            self.stats.malformed += 1
            log.debug("malformed request from %s: %s", peer.node, exc)
            return None
        if not isinstance(msg, Ping | CallerIdQuery):
            self.stats.malformed += 1
            log.debug("unexpected %s from %s", type(msg).__name__, peer.node)
            return None
        return msg

    async def _answer(self, route: bytes, query: CallerIdQuery, peer: PeerIdentity) -> None:
        try:
            reply = await self._handler(query, peer)
            if not isinstance(reply, CallerIdReply) or reply.id != query.id:
                msg = f"handler returned {reply!r} for request {query.id}"
                raise LocalProtocolError(msg)
        except Exception:
            self.stats.internal_errors += 1
            log.exception("query %d from %s: handler failed", query.id, peer.node)
            reply = error_reply(query.id, self.node, ErrorCode.INTERNAL, INTERNAL_REASON)
        self._send(route, reply)

    def _send(self, route: bytes, reply: CallerIdReply | Pong) -> None:
        io = self._io
        if io is None or io.closed:
            return
        try:
            data = encode(reply)
        except LocalProtocolError:
            self.stats.internal_errors += 1
            log.exception("cannot encode reply %r", reply)
            data = encode(error_reply(reply.id, self.node, ErrorCode.INTERNAL, INTERNAL_REASON))
        try:
            io.send([route, data])  # a ROUTER never blocks: it drops for a vanished peer
        except zmq.ZMQError as exc:
            log.debug("reply %d not sent: %s", reply.id, exc)
            return
        self.stats.answered += 1
