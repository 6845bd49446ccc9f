"""Hostile mesh clients, for tests/integration/test_attacks.py: raw TCP, unauthenticated zmq,
and an authorized CURVE key sending malformed messages or floods of queries.

Like `tests.support.attackers`, every attack is bounded in count and time and reports what it
saw; the test asserts. This is test code, so it speaks zmq and msgpack directly (the agent's
rule "transport is the only zmq importer" is about the package).
"""

from __future__ import annotations

import contextlib
import random
import socket
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgpack
import zmq
from zmq.utils.monitor import recv_monitor_message

from callerid.bus.protocol import MAX_MESSAGE_SIZE, PROTOCOL_VERSION
from callerid.bus.transport import KeyPair

__all__ = [
    "AuthorizedPeer",
    "handshake_flood",
    "malformed_messages",
    "tcp_garbage",
]

# ZMTP 3.0 greeting announcing `mechanism`, as a zmq peer sends it before any command
_SIGNATURE = b"\xff" + b"\x00" * 8 + b"\x7f"


def _greeting(mechanism: bytes) -> bytes:
    return _SIGNATURE + b"\x03\x00" + mechanism.ljust(20, b"\x00") + b"\x00" + b"\x00" * 31


def tcp_garbage(
    host: str, port: int, *, conns: int, batch: int, hold: int, seconds: float, seed: int
) -> dict[str, Any]:
    """Raw TCP to the mesh port: ``hold`` connections sending half a ZMTP greeting and then
    nothing, kept open throughout; meanwhile, ``batch`` at a time, connections sending random
    bytes, a CURVE greeting then garbage, or a NULL greeting with a READY command.

    Each of the latter is given up to 1 s to be closed by the agent. Returns the outcomes per
    kind (``closed`` by the agent, or ``open`` when we closed it) and the counts.
    """
    rng = random.Random(seed)
    kinds = {
        "random": lambda: rng.randbytes(rng.randint(1, 64 * 1024)),
        "curve greeting + garbage": lambda: _greeting(b"CURVE") + rng.randbytes(4096),
        "null greeting + READY": lambda: (
            _greeting(b"NULL") + b"\x04\x26\x05READY\x0bSocket-Type\x00\x00\x00\x06DEALER"
        ),
    }
    names = list(kinds)
    outcomes: dict[str, Counter[str]] = {k: Counter() for k in [*names, "half a greeting"]}
    held: list[socket.socket] = []
    done = 0
    deadline = time.monotonic() + seconds
    try:
        for _ in range(hold):
            s = socket.create_connection((host, port), timeout=2.0)
            held.append(s)
            s.sendall(_SIGNATURE[:5])
        while done < conns and time.monotonic() < deadline:
            socks: list[tuple[str, socket.socket]] = []
            try:
                for i in range(min(batch, conns - done)):
                    kind = names[(done + i) % len(names)]
                    s = socket.create_connection((host, port), timeout=2.0)
                    socks.append((kind, s))
                    with contextlib.suppress(OSError):  # the agent may cut us off mid-send
                        s.sendall(kinds[kind]())
                end = time.monotonic() + 1.0
                for kind, s in socks:
                    outcomes[kind][_wait_closed(s, end)] += 1
            finally:
                for _, s in socks:
                    s.close()
            done += len(socks)
        for s in held:
            outcomes["half a greeting"][_wait_closed(s, time.monotonic())] += 1
    finally:
        for s in held:
            s.close()
    return {"connections": done, "held": len(held), "outcomes": _plain(outcomes)}


def _wait_closed(s: socket.socket, end: float) -> str:
    while True:
        s.settimeout(max(0.001, end - time.monotonic()))
        try:
            if not s.recv(65536):
                return "closed"
        except TimeoutError:
            return "open"
        except ConnectionResetError:
            return "closed"


def _plain(counters: dict[str, Counter[str]]) -> dict[str, dict[str, int]]:
    return {k: dict(v) for k, v in counters.items()}


_TERMINAL = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "failed_auth",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "failed_protocol",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "failed_no_detail",
    zmq.EVENT_HANDSHAKE_SUCCEEDED: "SUCCEEDED",
    zmq.EVENT_DISCONNECTED: "disconnected",
}


def handshake_flood(
    ctx: zmq.Context[Any],
    endpoint: str,
    *,
    server_key: bytes | None,
    parallel: int,
    seconds: float,
    max_handshakes: int,
) -> dict[str, Any]:
    """Handshake after handshake with the mesh server, each from a new DEALER: with a fresh
    CURVE key that is not authorized (``server_key`` given), or with no security at all (the
    NULL mechanism, ``server_key=None``). Each socket sends a Ping and a query; ``parallel``
    sockets are in flight at once, each replaced when its handshake ended.

    Returns the handshake outcomes seen by the clients' monitors and any replies received
    (there must be none).
    """
    outcomes: Counter[str] = Counter()
    replies = 0
    started = 0
    slots: dict[zmq.Socket[Any], zmq.Socket[Any]] = {}  # monitor -> dealer
    poller = zmq.Poller()

    def open_one() -> None:
        nonlocal started
        dealer = ctx.socket(zmq.DEALER)
        dealer.linger = 0
        if server_key is not None:
            public, secret = zmq.curve_keypair()
            dealer.curve_publickey = public
            dealer.curve_secretkey = secret
            dealer.curve_serverkey = server_key
        monitor = dealer.get_monitor_socket()
        dealer.connect(endpoint)
        for body in (_ping(1), _query(2, 0)):
            with contextlib.suppress(zmq.Again):
                dealer.send(body, zmq.NOBLOCK)
        slots[monitor] = dealer
        poller.register(monitor, zmq.POLLIN)
        poller.register(dealer, zmq.POLLIN)
        started += 1

    def close_one(monitor: zmq.Socket[Any]) -> None:
        dealer = slots.pop(monitor)
        poller.unregister(monitor)
        poller.unregister(dealer)
        dealer.disable_monitor()
        monitor.close(linger=0)
        dealer.close(linger=0)

    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            while len(slots) < parallel and started < max_handshakes:
                open_one()
            if not slots:
                break
            for sock, _ in poller.poll(timeout=50):
                if sock in slots:
                    event = recv_monitor_message(sock)["event"]
                    if event in _TERMINAL:
                        outcomes[_TERMINAL[event]] += 1
                        close_one(sock)
                else:
                    sock.recv_multipart()
                    replies += 1
    finally:
        for monitor in list(slots):
            close_one(monitor)
    return {"handshakes_started": started, "outcomes": dict(outcomes), "replies": replies}


# --------------------------------------------------------------------------- an authorized peer


def _pack(body: Any) -> bytes:
    data: bytes = msgpack.packb(body, use_bin_type=True)
    return data


def _ping(rid: int) -> bytes:
    return _pack({"t": "ping", "v": PROTOCOL_VERSION, "id": rid})


def _query(rid: int, src_port: int, *, uid: int = 0, src: str = "127.0.0.2") -> bytes:
    return _pack(
        {
            "t": "q",
            "v": PROTOCOL_VERSION,
            "id": rid,
            "proto": "tcp",
            "src": [src, src_port],
            "dst": ["127.0.0.3", 22],
            "uid": uid,
        }
    )


def malformed_messages(seed: int) -> list[tuple[str, list[bytes], int | None]]:
    """(label, frames, id of the reply it must get or None) for one round of bad messages.

    The frames stay under zmq's cut-off (16 KiB, MAXMSGSIZE), so they reach the agent's
    decoder; the one oversized frame, which makes zmq drop the connection, is
    `AuthorizedPeer.oversized`.
    """
    rng = random.Random(seed)
    q = {
        "t": "q",
        "v": PROTOCOL_VERSION,
        "id": 7,
        "proto": "tcp",
        "src": ["127.0.0.2", 40000],
        "dst": ["127.0.0.3", 22],
        "uid": 0,
    }
    bad_fields: list[tuple[str, str, Any]] = [
        ("id as text", "id", "7"),
        ("negative id", "id", -1),
        ("most negative id", "id", -(2**63)),
        ("float id", "id", 1e308),
        ("bool id", "id", True),
        ("uid as text", "uid", "0"),
        ("negative uid", "uid", -1),
        ("uid 2**32", "uid", 2**32),
        ("uid 2**64-1", "uid", 2**64 - 1),
        ("proto sctp", "proto", "sctp"),
        ("proto 1000 chars", "proto", "x" * 1000),
        ("src as map", "src", {"ip": "127.0.0.2"}),
        ("src of one", "src", ["127.0.0.2"]),
        ("src as name", "src", ["localhost", 1]),
        ("src with zone", "src", ["fe80::1%lo", 1]),
        ("src port 70000", "src", ["127.0.0.2", 70000]),
        ("src port -1", "src", ["127.0.0.2", -1]),
        ("src port text", "src", ["127.0.0.2", "22"]),
        ("mixed families", "src", ["::1", 22]),
        ("dst nested", "dst", [["127.0.0.3"], 22]),
        ("version as text", "v", "1"),
        ("version bool", "v", True),
    ]
    out: list[tuple[str, list[bytes], int | None]] = [
        ("two frames", [_ping(1), _ping(1)], None),
        ("three frames", [b"", b"x", b"y"], None),
        ("ten empty frames", [b""] * 10, None),
        ("one empty frame", [b""], None),
        ("1 KiB + 1", [b"\x80" * (MAX_MESSAGE_SIZE + 1)], None),
        ("15 KiB", [rng.randbytes(15 * 1024)], None),
        ("reserved byte", [b"\xc1"], None),
        ("truncated map", [b"\x87\xa1t"], None),
        ("random 100", [rng.randbytes(100)], None),
        ("deep nesting", [b"\x91" * 1000 + b"\xc0"], None),
        ("ext type", [b"\xd4\x01\x00"], None),
        ("bin string", [_pack({"t": b"q", "v": 1, "id": 1})], None),
        ("a list", [_pack([1, 2, 3])], None),
        ("a string", [_pack("q")], None),
        ("nil", [_pack(None)], None),
        ("int keys", [_pack({1: 2})], None),
        ("17 keys", [_pack({str(i): i for i in range(17)})], None),
        ("no version", [_pack({"t": "ping", "id": 1})], None),
        ("unknown kind", [_pack({"t": "zzz", "v": 1, "id": 1})], None),
        ("kind as int", [_pack({"t": 1, "v": 1, "id": 1})], None),
        ("a reply", [_pack({**_reply_body(), "id": 5})], None),
        ("a pong", [_pack({"t": "pong", "v": 1, "id": 5, "node": "b"})], None),
        ("extra field", [_pack({**q, "x": 1})], None),
        ("missing field", [_pack({k: v for k, v in q.items() if k != "uid"})], None),
        ("version 2, no id", [_pack({"t": "q", "v": 2})], None),
        ("version 2", [_pack({"t": "q", "v": 2, "id": 2**64 - 2})], 2**64 - 2),
        ("version -1", [_pack({"t": "ping", "v": -1, "id": 3})], 3),
        ("ping, id 2**64-1", [_ping(2**64 - 1)], 2**64 - 1),
        ("query, id 2**64-3", [_pack({**q, "id": 2**64 - 3})], 2**64 - 3),
    ]
    out += [(label, [_pack({**q, key: value})], None) for label, key, value in bad_fields]
    return out


def _reply_body() -> dict[str, Any]:
    return {
        "t": "r",
        "v": PROTOCOL_VERSION,
        "status": "not_found",
        "code": 0,
        "job": None,
        "node": "b",
        "reason": "",
    }


class AuthorizedPeer:
    """A DEALER holding an authorized node's keypair, connected to another node's mesh port."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        keypair: KeyPair,
        server_key: bytes,
        endpoint: str,
        *,
        rcvhwm: int = 100_000,
    ) -> None:
        self.sock: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.sndhwm = 100_000
        self.sock.rcvhwm = rcvhwm
        self.sock.curve_publickey = keypair.public
        self.sock.curve_secretkey = keypair.secret
        self.sock.curve_serverkey = server_key
        self.sock.reconnect_ivl = 20
        self.sock.connect(endpoint)
        self.replies: list[dict[str, Any]] = []

    def send(self, frames: list[bytes], timeout: float = 5.0) -> bool:
        """Queue one message (waiting for room up to ``timeout``); False when it never fit."""
        end = time.monotonic() + timeout
        while True:
            try:
                self.sock.send_multipart(frames, zmq.NOBLOCK)
                return True
            except zmq.Again:
                if time.monotonic() >= end:
                    return False
                self.drain(0.001)

    def drain(self, wait: float) -> int:
        """Read every reply that arrives within ``wait`` s of the last one; how many."""
        n = 0
        while self.sock.poll(int(wait * 1000), zmq.POLLIN):
            for frame in self.sock.recv_multipart():
                self.replies.append(msgpack.unpackb(frame, raw=False))
                n += 1
        return n

    def ping(self, rid: int, timeout: float) -> bool:
        """Ping until a Pong comes back (other replies are kept); a Ping queued on a connection
        that the server then dropped is lost, so it is sent again every 0.5 s, with ids
        ``rid``, ``rid + 1``, ..."""
        end = time.monotonic() + timeout
        sent: set[int] = set()
        while time.monotonic() < end:
            rid_now = rid + len(sent)
            self.send([_ping(rid_now)])
            sent.add(rid_now)
            resend = min(end, time.monotonic() + 0.5)
            while time.monotonic() < resend:
                self.drain(0.01)
                if any(r.get("t") == "pong" and r.get("id") in sent for r in self.replies):
                    return True
        return False

    def oversized(self) -> None:
        """One frame over zmq's MAXMSGSIZE: the agent's zmq drops the connection (we reconnect)."""
        self.send([b"\x00" * (64 * 1024)])

    def query(self, rid: int, src_port: int, uid: int) -> bool:
        return self.send([_query(rid, src_port, uid=uid)])

    def close(self) -> None:
        self.sock.close(linger=0)


@contextmanager
def zmq_context() -> Iterator[zmq.Context[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        yield ctx
    finally:
        ctx.term()
