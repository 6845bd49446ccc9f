"""calleridctl, the admin CLI of callerid: `main` and its command table (see `_main`)."""

from callerid.agent.ctl._common import CtlError, parse_target
from callerid.agent.ctl._main import COMMANDS, Command, build_parser, main

__all__ = ["COMMANDS", "Command", "CtlError", "build_parser", "main", "parse_target"]
