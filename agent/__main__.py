"""`callerid-agent --config PATH`: the node agent in the foreground (systemd Type=notify)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from callerid.agent import __version__
from callerid.agent.config import DEFAULT_PATH, ConfigError

EXIT_CONFIG = 78  # EX_CONFIG: systemd shows it as "configuration error" (and, with
# RestartPreventExitStatus=78, does not restart): every problem of the file or what it names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="callerid-agent", description="callerid node agent (runs in the foreground)"
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_PATH, help="default: %(default)s")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument("--version", action="version", version=f"callerid {__version__}")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from callerid.agent import daemon

    try:
        return daemon.run(args.config)
    except (ConfigError, FileNotFoundError) as exc:  # a file the config names is missing
        one_line = " ".join(str(exc).split())
        print(f"callerid-agent: configuration error: {one_line}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
