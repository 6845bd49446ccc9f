"""calleridctl commands of the mesh: keygen (this node's keys), ping and whois (another agent)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from pathlib import Path

from callerid.agent.config import Config
from callerid.agent.ctl._common import (
    EXIT_ERROR,
    EXIT_NOT_FOUND,
    EXIT_OK,
    PING_EXIT,
    CtlError,
    ask,
    endpoint,
    mesh_identity,
    parse_target,
    resolve,
)
from callerid.bus.peers import local_node_name
from callerid.bus.protocol import CallerIdQuery, CallerIdReply, Pong
from callerid.bus.transport import MeshClient, QueryResult, generate_keypair

__all__ = ["cmd_keygen", "cmd_ping", "cmd_whois", "keygen_args", "ping_args", "whois_args"]


def keygen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", type=Path, help="key directory (default: keys.dir of the config)")
    p.add_argument("--name", help="node name (default: node_name of the config, or hostname)")
    p.add_argument(
        "--address",
        action="append",
        default=[],
        metavar="IP",
        help="IP at which this node's agent is reached, recorded in the public key (repeatable)",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing keypair")


def cmd_keygen(args: argparse.Namespace, cfg: Config) -> int:
    """Write this node's CURVE keypair; the public half goes to every node's keys.authorized."""
    directory: Path = args.dir or cfg.keys.dir
    try:
        name = args.name or local_node_name(cfg.node_name)
        public, secret = generate_keypair(directory, name, addresses=args.address, force=args.force)
    except FileExistsError as exc:
        msg = f"{exc.filename} already exists; use --force to replace the keypair"
        raise CtlError(msg) from exc
    except (OSError, ValueError) as exc:
        raise CtlError(str(exc)) from exc
    print(f"public key: {public}")
    print(f"secret key: {secret}")
    return EXIT_OK


def ping_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="HOST[:PORT]", help="e.g. node2, 10.0.0.2:6820, [::1]:6820")
    p.add_argument(
        "--timeout-ms", type=int, default=None, help="deadline (default: peer.timeout_ms)"
    )


def cmd_ping(args: argparse.Namespace, cfg: Config) -> int:
    """Round trip a Ping to the agent at HOST; prints its node name and the round-trip time."""
    host, port = parse_target(args.target, cfg.port)
    ip = resolve(host)
    keypair, peers = mesh_identity(cfg)
    settings = cfg.peer
    if args.timeout_ms is not None:
        if args.timeout_ms <= 0:
            msg = "--timeout-ms must be positive"
            raise CtlError(msg)
        settings = dataclasses.replace(settings, timeout_ms=args.timeout_ms)

    async def ping() -> QueryResult:
        async with MeshClient(keypair, peers, settings, port=port) as client:
            return await client.ping(ip, port)

    result = asyncio.run(ping())
    where = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
    if isinstance(result.reply, Pong):
        ms = result.elapsed_s * 1000
        print(f"pong from {result.reply.node} at {where}: {ms:.2f} ms")
    else:
        print(f"calleridctl: ping {where}: {result.status}: {result.detail}", file=sys.stderr)
    return PING_EXIT.get(result.status, EXIT_ERROR)


def whois_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("proto", choices=["tcp", "udp"])
    p.add_argument("src", metavar="SRC:PORT", help="the end that opened the connection")
    p.add_argument("dst", metavar="DST:PORT", help="the end that accepted it (e.g. sshd)")
    p.add_argument("--uid", type=int, required=True, help="the user the job must belong to")
    p.add_argument("--agent", metavar="HOST[:PORT]", help="whom to ask (default: SRC's agent)")


def cmd_whois(args: argparse.Namespace, cfg: Config) -> int:
    """Ask an agent which job owns a connection (told only if it belongs to --uid).

    Exit status: 0 found, 6 not found, 2 unreachable, 3 auth_failed, 4 timeout,
    5 unknown_peer, 1 error."""
    src, dst = endpoint(args.src), endpoint(args.dst)
    host, port = parse_target(args.agent, cfg.port) if args.agent else (src.ip, cfg.port)
    query = CallerIdQuery(id=1, proto=args.proto, src=src, dst=dst, uid=args.uid)
    result = ask(cfg, host, port, query)
    reply = result.reply
    if not isinstance(reply, CallerIdReply):
        print(f"calleridctl: whois: {result.status}: {result.detail}", file=sys.stderr)
        return PING_EXIT.get(result.status, EXIT_ERROR)
    ms = result.elapsed_s * 1000
    if reply.status == "found":
        print(f"job {reply.job} on {reply.node} ({ms:.2f} ms)")
        return EXIT_OK
    print(f"{reply.status} on {reply.node}: {reply.reason} ({ms:.2f} ms)")
    return EXIT_NOT_FOUND if reply.status == "not_found" else EXIT_ERROR
