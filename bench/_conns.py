"""Processes that hold TCP connections for the benchmarks (the users' clients, socket farms).

Standard library only: bench/scale.py and bench/storm.py run it as the job's user with the
system python3 (`tests.support.agents.USER_PYTHON`), from the repo top.

    python -m bench._conns connect [--bind IP] [--count N] PORT HOST [HOST ...]
        N connections (default 1) to every HOST:PORT, from IP when given
    python -m bench._conns farm HOST N
        N connections to a listener of its own on HOST, holding the accepted ends too
    python -m bench._conns accept HOST
        print the port of a listener on HOST, then accept (and hold) connections forever

`connect` and `farm` print one JSON line, the list of [local ip, local port, remote ip,
remote port] of their connections, then hold them until EOF on stdin; then they reset them
(no TIME_WAIT rows left for the next run) and exit.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys


def connect(port: int, hosts: list[str], *, count: int = 1, bind: str | None = None) -> None:
    keep = []
    for host in hosts:
        for _ in range(count):
            s = socket.socket()
            if bind is not None:
                s.bind((bind, 0))
            s.connect((host, port))
            keep.append(s)
    hold(keep, keep)


def farm(host: str, count: int) -> None:
    lst = socket.socket()
    lst.bind((host, 0))
    lst.listen(4096)
    port = lst.getsockname()[1]
    clients, keep = [], [lst]
    for _ in range(count):
        c = socket.socket()
        c.connect((host, port))
        clients.append(c)
        keep += [c, lst.accept()[0]]
    hold(clients, keep)


def hold(shown: list[socket.socket], keep: list[socket.socket]) -> None:
    """Print the 4-tuples of ``shown``; at EOF on stdin, reset every socket of ``keep``."""
    print(json.dumps([[*s.getsockname(), *s.getpeername()] for s in shown]), flush=True)
    sys.stdin.read()
    for s in keep:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()


def accept(host: str) -> None:
    lst = socket.socket()
    lst.bind((host, 0))
    lst.listen(4096)
    print(lst.getsockname()[1], flush=True)
    keep = []
    while True:
        keep.append(lst.accept()[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("connect")
    c.add_argument("--bind")
    c.add_argument("--count", type=int, default=1)
    c.add_argument("port", type=int)
    c.add_argument("hosts", nargs="+")
    f = sub.add_parser("farm")
    f.add_argument("host")
    f.add_argument("count", type=int)
    a = sub.add_parser("accept")
    a.add_argument("host")
    args = ap.parse_args()
    if args.mode == "connect":
        connect(args.port, args.hosts, count=args.count, bind=args.bind)
    elif args.mode == "farm":
        farm(args.host, args.count)
    else:
        accept(args.host)


if __name__ == "__main__":
    main()
