"""Private zmq helpers of the transport: socket options, monitor events, CURVE key files.

Part of `callerid.bus.transport` (one of the few modules allowed to import zmq); import the
public names from there.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import zmq

from callerid.bus.peers import check_node_name, parse_certificate
from callerid.bus.protocol import MAX_MESSAGE_SIZE, normalize_ip

log = logging.getLogger("callerid.bus.transport")

DEFAULT_PORT: Final = 6820
HWM: Final = 10_000  # messages queued per connection before zmq pushes back / drops
MAX_WIRE_MESSAGE: Final = 16 * MAX_MESSAGE_SIZE  # zmq cuts a peer sending more than this
RECONNECT_IVL_MS: Final = 100
RECONNECT_IVL_MAX_MS: Final = 5_000
READ_BATCH: Final = 256  # messages handled per loop callback before yielding to other work
HANDSHAKE_IVL_MS: Final = 5_000  # a peer silent during the handshake is disconnected
KEEPALIVE_IDLE_S: Final = 60
KEEPALIVE_INTVL_S: Final = 10
KEEPALIVE_CNT: Final = 3


@dataclass(frozen=True, slots=True)
class KeyPair:
    """This node's CURVE keypair (Z85 bytes); the secret never appears in repr."""

    name: str
    public: bytes
    secret: bytes = field(repr=False)
    addresses: tuple[str, ...] = ()

    @property
    def public_text(self) -> str:
        return self.public.decode("ascii")


def configure_socket(
    sock: zmq.Socket[Any],
    keypair: KeyPair,
    *,
    server: bool = False,
    server_key: bytes | None = None,
    connect_timeout_ms: int | None = None,
) -> None:
    """Every option of a mesh socket, in one place (server ROUTER or client DEALER)."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IPV6, 1)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_WIRE_MESSAGE)
    sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, KEEPALIVE_IDLE_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, KEEPALIVE_INTVL_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, KEEPALIVE_CNT)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keypair.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keypair.secret)
    if server:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        return
    if server_key is None:
        msg = "a client socket needs the server's public key"
        raise ValueError(msg)
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
    sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue a request for a peer not connected
    if connect_timeout_ms is not None:
        sock.setsockopt(zmq.CONNECT_TIMEOUT, connect_timeout_ms)
    jitter = random.randint(0, RECONNECT_IVL_MS)  # noqa: S311 - spreading retries, not crypto
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS + jitter)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def endpoint(ip: str, port: int, *, source: str | None = None) -> str:
    """``tcp://`` endpoint for an IP literal; port 0 means any; ``source`` binds the client end."""
    dest = f"{_host(ip)}:{port if port else '*'}"
    if source is not None and (":" in source) == (":" in ip):
        return f"tcp://{_host(source)}:0;{dest}"
    return f"tcp://{dest}"


# --------------------------------------------------------------------------- loop sockets


# plain ints: an operation on pyzmq's flag enums builds a new enum member each time
_NOBLOCK: Final = int(zmq.NOBLOCK)
_POLLIN: Final = int(zmq.POLLIN)
_POLLOUT: Final = int(zmq.POLLOUT)


class LoopSocket:
    """A plain zmq socket driven by the running asyncio loop through its ZMQ_FD.

    The hot path of both server and client: a loop reader callback drains the socket and
    hands each message to ``on_message`` (no future and no task hop per message, which
    zmq.asyncio costs; see bench/mesh.py). ZMQ_FD is edge-triggered: it only signals again
    once the socket is drained, and a send may consume a signal, so reads drain until
    EAGAIN (or re-schedule themselves after a batch) and a send re-checks ZMQ_EVENTS: once
    for all the sends of one loop turn, in a callback after them (the loop does not sleep
    while a callback is ready, so no signal is missed; a storm's queries, sent by many logins
    in one turn, cost one check instead of a getsockopt and its two system calls each).
    """

    def __init__(
        self, sock: zmq.Socket[Any], on_message: Callable[[list[Any]], None], *, copy: bool
    ) -> None:
        self.sock = sock
        self._on_message = on_message
        self._copy = copy
        self._loop = asyncio.get_running_loop()
        self._fd = sock.FD
        self._writers: list[asyncio.Future[None]] = []
        self._reading = False
        self._recheck_due = False
        self.closed = False
        self.resume()

    def pause(self) -> None:
        """Stop reading (back-pressure): messages wait in zmq's queue, then in TCP."""
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def resume(self) -> None:
        if not self._reading and not self.closed:
            self._loop.add_reader(self._fd, self._on_events)
            self._reading = True
            self._loop.call_soon(self._on_events)  # the edge may already have passed

    def send(self, frames: Sequence[bytes]) -> None:
        """Send now or raise zmq.Again (no pipe yet under IMMEDIATE, or HWM reached)."""
        self.sock.send_multipart(frames, _NOBLOCK)
        if not self._recheck_due:
            self._recheck_due = True
            self._loop.call_soon(self._recheck)

    async def send_wait(self, frames: Sequence[bytes]) -> None:
        """Send, waiting for the socket to become writable; ZMQError once closed."""
        while True:
            try:
                return self.send(frames)
            except zmq.Again:
                waiter = self._loop.create_future()
                self._writers.append(waiter)
                await waiter

    def close(self) -> None:
        self.pause()
        self.closed = True
        self._wake_writers()
        self.sock.close(linger=0)

    def _events(self) -> int:
        events: int = self.sock.getsockopt(zmq.EVENTS)  # type: ignore[assignment]
        return events

    def _recheck(self) -> None:
        self._recheck_due = False
        if self._reading and self._events() & _POLLIN:
            self._on_events()

    def _wake_writers(self) -> None:
        writers, self._writers = self._writers, []
        for waiter in writers:
            if not waiter.done():
                waiter.set_result(None)

    def _on_events(self) -> None:
        if not self._reading:
            return
        for _ in range(READ_BATCH):
            try:
                frames = self.sock.recv_multipart(_NOBLOCK, copy=self._copy)
            except zmq.Again:
                break
            self._on_message(frames)
            if not self._reading:  # paused or closed by the handler
                return
        else:
            self._loop.call_soon(self._on_events)  # not drained: continue after other work
        if self._writers and self._events() & _POLLOUT:
            self._wake_writers()


# --------------------------------------------------------------------------- monitor events

MONITOR_EVENTS: Final = (
    zmq.EVENT_CONNECTED
    | zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_CLOSED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
)
_TIMEOUT_ERRNOS: Final = frozenset({errno.EAGAIN, errno.ETIMEDOUT})
_HANDSHAKE_FAILED: Final = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a monitor event means for a peer connection."""

    state: str  # "connected" | "up" | "unreachable" | "stalled" | "auth_failed" | "lost"
    detail: str = ""


def parse_event(frames: list[bytes]) -> tuple[int, int]:
    """(event, value) of a monitor message; ValueError if it is not one."""
    if len(frames) != 2 or len(frames[0]) != 6:
        msg = "not a zmq monitor message"
        raise ValueError(msg)
    event, value = struct.unpack("=hi", frames[0])
    return int(event), int(value)


def classify_event(
    event: int, value: int, *, established: bool, connected: bool = False
) -> Verdict | None:
    """Map a monitor event to a verdict; None for events that change nothing.

    Before the TCP connection is made, a closed or retried connection means nothing listens
    there (a refused connect shows up within ~1 ms on loopback): "unreachable", worth caching.
    Once it is made (``connected``) but before the CURVE handshake succeeds, a handshake that
    times out or a connection closed without a word means the peer accepted but did not
    answer in time (an overloaded or stopped agent): "stalled", reported as a timeout and not
    cached. A failed handshake means that the peer refused our key, or is not the node whose
    key we hold: "auth_failed".
    """
    if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
        return Verdict("up")
    if event == zmq.EVENT_CONNECTED:
        return Verdict("connected")
    if established:
        if event == zmq.EVENT_DISCONNECTED:
            return Verdict("lost", "connection to the peer lost")
        return None
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return Verdict("auth_failed", f"the peer refused our key (ZAP status {value})")
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and value in _TIMEOUT_ERRNOS:
        return Verdict("stalled", "the peer accepted but did not complete the handshake in time")
    if event in _HANDSHAKE_FAILED:
        return Verdict(
            "auth_failed",
            f"CURVE handshake failed (event {event:#x}, value {value:#x}): the peer's key "
            "is not the one we hold, or it is not a callerid agent",
        )
    if connected and event in (zmq.EVENT_CLOSED, zmq.EVENT_DISCONNECTED):
        return Verdict("stalled", "the peer accepted, then closed before the handshake")
    if event in (zmq.EVENT_CLOSED, zmq.EVENT_CONNECT_RETRIED):
        return Verdict("unreachable", "connection refused or connect timed out")
    if event == zmq.EVENT_DISCONNECTED:
        return Verdict("unreachable", "connection closed before the handshake")
    return None


# --------------------------------------------------------------------------- keys

_PUBLIC_BANNER: Final = (
    "#   ZeroMQ CURVE Public Certificate (written by calleridctl keygen)\n"
    "#   Copy it to keys.authorized on every node of the cluster.\n"
)
_PRIVATE_BANNER: Final = (
    "#   ZeroMQ CURVE **Secret** Certificate (written by calleridctl keygen)\n"
    "#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.\n"
)


def _cert_text(banner: str, meta: dict[str, str], public: bytes, secret: bytes | None) -> str:
    lines = [banner, "metadata"]
    lines += [f'    {k} = "{v}"' for k, v in meta.items()]
    lines += ["curve", f'    public-key = "{public.decode("ascii")}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode("ascii")}"')
    return "\n".join(lines) + "\n"


def _write_file(path: Path, text: str, mode: int, *, force: bool) -> None:
    """Write via a temporary file: replaced atomically, or linked only if absent."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # not subject to the umask
        os.write(fd, text.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        if force:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails with EEXIST: never clobbers a key written meanwhile
    finally:
        if tmp.exists():
            tmp.unlink()


def generate_keypair(
    directory: Path, name: str, *, addresses: Iterable[str] = (), force: bool = False
) -> tuple[Path, Path]:
    """Write ``<name>.key`` (public, 0644) and ``<name>.key_secret`` (0600) into ``directory``.

    The metadata carries ``name`` and, if given, ``addresses`` (IP literals at which this
    node's agent is reached). Creates ``directory`` with mode 0700 if missing. Raises
    FileExistsError rather than overwrite an existing key unless ``force``; ValueError for a
    bad name or address.
    """
    check_node_name(name)
    meta = {"name": name}
    ips = [normalize_ip(a) for a in addresses]
    if ips:
        meta["addresses"] = " ".join(dict.fromkeys(ips))
    directory = Path(directory)
    public_path = directory / f"{name}.key"
    secret_path = directory / f"{name}.key_secret"
    for path in (public_path, secret_path):
        if not force and (path.exists() or path.is_symlink()):
            msg = f"refusing to overwrite the existing key file {path}"
            raise FileExistsError(errno.EEXIST, msg, str(path))
    if not directory.is_dir():
        directory.mkdir(mode=0o700, parents=True)
        directory.chmod(0o700)
    public, secret = zmq.curve_keypair()
    _write_file(secret_path, _cert_text(_PRIVATE_BANNER, meta, public, secret), 0o600, force=force)
    _write_file(public_path, _cert_text(_PUBLIC_BANNER, meta, public, None), 0o644, force=force)
    log.info("wrote CURVE keypair %s and %s", public_path, secret_path)
    return public_path, secret_path


def load_keypair(directory: Path, name: str) -> KeyPair:
    """Read ``<name>.key_secret`` from ``directory``; ValueError if it holds no secret key."""
    check_node_name(name)
    path = Path(directory) / f"{name}.key_secret"
    cert = parse_certificate(path.read_text(encoding="ascii"))
    if cert.secret_key is None:
        msg = f"{path}: no secret-key in this certificate"
        raise ValueError(msg)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("secret key %s is readable by others (mode %o): chmod 600 it", path, mode)
    return KeyPair(
        name=name,
        public=cert.public_key.encode("ascii"),
        secret=cert.secret_key.encode("ascii"),
        addresses=cert.addresses,
    )
