"""What several calleridctl commands share: errors, exit codes, targets, the mesh identity,
one mesh question, and one line to the local agent's socket."""

from __future__ import annotations

import asyncio
import socket

from callerid.agent.config import Config
from callerid.bus.peers import PeerTable, local_node_name
from callerid.bus.protocol import CallerIdQuery, Endpoint, normalize_ip
from callerid.bus.transport import KeyPair, MeshClient, QueryResult, load_keypair

__all__ = [
    "EXIT_ERROR",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "PING_EXIT",
    "CtlError",
    "agent_line",
    "ask",
    "endpoint",
    "mesh_identity",
    "parse_target",
    "resolve",
]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_UNREACHABLE = 2
EXIT_AUTH_FAILED = 3
EXIT_TIMEOUT = 4
EXIT_UNKNOWN_PEER = 5
EXIT_NOT_FOUND = 6

PING_EXIT = {
    "ok": EXIT_OK,
    "unreachable": EXIT_UNREACHABLE,
    "auth_failed": EXIT_AUTH_FAILED,
    "timeout": EXIT_TIMEOUT,
    "unknown_peer": EXIT_UNKNOWN_PEER,
    "error": EXIT_ERROR,
}


class CtlError(Exception):
    """A failure to report on stderr with exit status 1 (no traceback)."""


def endpoint(text: str) -> Endpoint:
    try:
        return Endpoint.parse(text)
    except ValueError as exc:
        raise CtlError(str(exc)) from exc


def parse_target(text: str, default_port: int) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT``, ``[IPv6]:PORT`` or a bare IPv6 literal -> (host, port)."""
    host, port = text, ""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            msg = f"bad target {text!r}: expected [IPv6]:PORT"
            raise CtlError(msg)
        port = rest[1:]
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    if not host:
        msg = f"bad target {text!r}: no host"
        raise CtlError(msg)
    if not port:
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        msg = f"bad port in {text!r}"
        raise CtlError(msg)
    return host, int(port)


def resolve(host: str) -> str:
    """An IP literal for ``host`` (a literal already, or the first address DNS gives)."""
    try:
        return normalize_ip(host)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as exc:
        msg = f"cannot resolve {host}: {exc}"
        raise CtlError(msg) from exc
    return normalize_ip(str(infos[0][4][0]))


def mesh_identity(cfg: Config) -> tuple[KeyPair, PeerTable]:
    """This node's keypair and the authorized peers, as every mesh-speaking command needs."""
    try:
        return load_keypair(cfg.keys.dir, local_node_name(cfg.node_name)), PeerTable.load(
            cfg.keys.authorized
        )
    except (OSError, ValueError) as exc:
        raise CtlError(str(exc)) from exc


def ask(cfg: Config, host: str, port: int, query: CallerIdQuery) -> QueryResult:
    """One CallerIdQuery to the agent at ``host``, as this node."""
    keypair, peers = mesh_identity(cfg)

    async def run() -> QueryResult:
        async with MeshClient(keypair, peers, cfg.peer, port=port) as client:
            return await client.query(host, query, port)

    return asyncio.run(run())


def agent_line(cfg: Config, line: bytes) -> str:
    """Send one request line to this node's agent (its root-only socket); its answer line.

    OSError when no agent answers within ``pam_timeout_ms``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(cfg.pam_timeout_ms / 1000)
        s.connect(str(cfg.pam_socket))
        s.sendall(line)
        return s.makefile("rb").readline().decode("ascii", "replace").strip()
