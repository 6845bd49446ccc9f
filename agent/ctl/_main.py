"""calleridctl: the admin CLI of callerid (keys, mesh checks, ...).

Each subcommand is two small functions in the module of its kind (`_mesh`: keygen, ping,
whois; `_explain`; `_status`: status, audit; `_doctor`), registered in `COMMANDS`: one adds
its arguments to its sub-parser, the other runs it with the parsed arguments and the loaded
`Config` and returns the exit status. `--config PATH` is global. To add a subcommand, write
both functions and add one `Command` entry to the table. No command imports the daemon.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from callerid.agent import config as config_mod
from callerid.agent.config import Config, ConfigError
from callerid.agent.ctl._common import EXIT_ERROR, CtlError
from callerid.agent.ctl._doctor import cmd_doctor, doctor_args
from callerid.agent.ctl._explain import cmd_explain, explain_args
from callerid.agent.ctl._mesh import (
    cmd_keygen,
    cmd_ping,
    cmd_whois,
    keygen_args,
    ping_args,
    whois_args,
)
from callerid.agent.ctl._status import audit_args, cmd_audit, cmd_status, status_args

__all__ = ["COMMANDS", "Command", "build_parser", "main"]

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


# --------------------------------------------------------------------------- table and main

COMMANDS: dict[str, Command] = {
    "keygen": Command(
        help="create this node's CURVE keypair",
        add_arguments=keygen_args,
        run=cmd_keygen,
        config_optional=True,
    ),
    "ping": Command(
        help="check the mesh link to another agent", add_arguments=ping_args, run=cmd_ping
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
    except (CtlError, ConfigError) as exc:
        print(f"calleridctl: {exc}", file=sys.stderr)
        return EXIT_ERROR
