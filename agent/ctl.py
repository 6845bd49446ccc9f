"""calleridctl: the admin CLI of callerid (keys, mesh checks, ...).

Each subcommand is two small functions, registered in `COMMANDS`: one adds its arguments
to its sub-parser, the other runs it with the parsed arguments and the loaded `Config` and
returns the exit status. `--config PATH` is global. To add a subcommand, write both
functions and add one `Command` entry to the table.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from callerid.agent import config as config_mod
from callerid.agent._ctl_doctor import cmd_doctor, doctor_args
from callerid.agent._ctl_inspect import (
    InspectError,
    audit_args,
    cmd_audit,
    cmd_explain,
    cmd_status,
    cmd_whois,
    explain_args,
    mesh_identity,
    status_args,
    whois_args,
)
from callerid.agent.config import Config, ConfigError
from callerid.bus.peers import local_node_name
from callerid.bus.protocol import Pong, normalize_ip
from callerid.bus.transport import MeshClient, QueryResult, generate_keypair

__all__ = ["COMMANDS", "Command", "build_parser", "main"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_UNREACHABLE = 2
EXIT_AUTH_FAILED = 3
EXIT_TIMEOUT = 4
EXIT_UNKNOWN_PEER = 5

PING_EXIT = {
    "ok": EXIT_OK,
    "unreachable": EXIT_UNREACHABLE,
    "auth_failed": EXIT_AUTH_FAILED,
    "timeout": EXIT_TIMEOUT,
    "unknown_peer": EXIT_UNKNOWN_PEER,
    "error": EXIT_ERROR,
}

EXIT_CODES_HELP = """\
exit status:
  0  success
  1  error (bad usage, bad config, missing keys, ...)
  2  ping, whois: nothing listens at the peer (no agent there)
  3  ping, whois: the peer refused our key, or its key is not the one we hold
  4  ping, whois: no answer before the deadline
  5  ping, whois: no authorized key for that address (keys.authorized)
  6  whois: the agent answered "not found"
"""


class CtlError(Exception):
    """A failure to report on stderr with exit status 1 (no traceback)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # usage errors exit 1: 2..5 mean ping outcomes
        self.print_usage(sys.stderr)
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


@dataclass(frozen=True)
class Command:
    """One subcommand: its help, its arguments, its action (args, config) -> exit status."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Config], int]
    config_optional: bool = False  # a missing --config file means defaults


# --------------------------------------------------------------------------- keygen


def _keygen_args(p: argparse.ArgumentParser) -> None:
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


# --------------------------------------------------------------------------- ping


def _ping_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="HOST[:PORT]", help="e.g. node2, 10.0.0.2:6820, [::1]:6820")
    p.add_argument(
        "--timeout-ms", type=int, default=None, help="deadline (default: peer.timeout_ms)"
    )


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


def _resolve(host: str) -> str:
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


def cmd_ping(args: argparse.Namespace, cfg: Config) -> int:
    """Round trip a Ping to the agent at HOST; prints its node name and the round-trip time."""
    host, port = parse_target(args.target, cfg.port)
    ip = _resolve(host)
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


# --------------------------------------------------------------------------- table and main

COMMANDS: dict[str, Command] = {
    "keygen": Command(
        help="create this node's CURVE keypair",
        add_arguments=_keygen_args,
        run=cmd_keygen,
        config_optional=True,
    ),
    "ping": Command(
        help="check the mesh link to another agent", add_arguments=_ping_args, run=cmd_ping
    ),
    "status": Command(
        help="the running agent's state and counters", add_arguments=status_args, run=cmd_status
    ),
    "whois": Command(
        help="ask an agent which job owns a connection", add_arguments=whois_args, run=cmd_whois
    ),
    "explain": Command(
        help="dry run: what would happen if USER logged in here now",
        add_arguments=explain_args,
        run=cmd_explain,
    ),
    "doctor": Command(
        help="check this node's set-up and say what to fix",
        add_arguments=doctor_args,
        run=cmd_doctor,
    ),
    "audit": Command(
        help="list decision records from the journal", add_arguments=audit_args, run=cmd_audit
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="calleridctl",
        description="Administer the callerid agent.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=config_mod.DEFAULT_PATH,
        metavar="PATH",
        help=f"agent configuration (default: {config_mod.DEFAULT_PATH})",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=cmd.help,
            description=cmd.run.__doc__,
            epilog=EXIT_CODES_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        cmd.add_arguments(p)
    return parser


def _load_config(path: Path, optional: bool) -> Config:
    if optional and not path.exists():
        return Config()
    return config_mod.load(path)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="calleridctl: %(message)s")
    args = build_parser().parse_args(argv)
    cmd = COMMANDS[args.command]
    try:
        cfg = _load_config(args.config, cmd.config_optional)
        return cmd.run(args, cfg)
    except (CtlError, ConfigError, InspectError) as exc:
        print(f"calleridctl: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
