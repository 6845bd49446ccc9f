"""Benchmark: 4-tuple -> owning pid, callerid's netinfo beside slurmd's algorithm (needs root).

Builds a busy node on loopback, then times `SocketOwners.socket_owner` on random connections:

* targets: a throwaway user's processes (in a cgroup v2 directory, like a job), each holding a
  few client connections; created FIRST, so they are the oldest pids (the worst case for our
  newest-first scan);
* a farm of established TCP sockets (client and server ends, held by root processes);
* sleepers (root), created last.

The node is built by bench/_resolution_node.py. slurmd's algorithm (src/common/callerid.c) is
re-implemented in Python in bench/_slurm_lookup.py, so that both run in the same language.

Reproduce (from the repo top):
    sudo .venv/bin/python -m bench.resolution [--sleepers 2000] [--sockets 10000]
        [--scenarios default,uid,fallback,fresh,fresh-cold,farm] [--json PATH]

`make bench` (bench/run.py) runs it at three node sizes: 1k sockets / 500 processes,
10k / 2k and 50k / 10k, scenarios "fresh-cold" (the table's row: a fresh process's socket,
nothing remembered from earlier searches, as for a single login), "fresh-default" and
"default" (repeated queries, partly answered from what earlier searches remembered), and puts
the p50/p99 of both columns into its table (``--json``). The sleepers are started by one
shell (one process group), so 10k of them cost neither 10k pipes nor 10k Popen objects here.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from bench._common import Row, need_root, raise_nofile, ratio_text, reproduce, write_rows
from bench._resolution_node import Node, Tuple4, build
from bench._slurm_lookup import slurm_owner
from callerid.agent.netinfo import ProcReader, SocketOwners
from callerid.bus.protocol import Endpoint

# --------------------------------------------------------------------------- timing


def timed(
    fn: Callable[[Endpoint, Endpoint], int | None], picks: Iterable[tuple[int, Tuple4]]
) -> tuple[float, float, int]:
    """p50 and p99 in ms, and how many answers were not the expected pid."""
    times: list[float] = []
    wrong = 0
    for pid, (lip, lport, rip, rport) in picks:
        src, dst = Endpoint(lip, lport), Endpoint(rip, rport)
        t0 = time.perf_counter()
        got = fn(src, dst)
        times.append((time.perf_counter() - t0) * 1e3)
        wrong += got != pid
    times.sort()
    p50 = times[len(times) // 2]
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
    return p50, p99, wrong


def ours(ni: SocketOwners, *, cold: bool = False) -> Callable[[Endpoint, Endpoint], int | None]:
    """``cold``: every lookup as the first one for its socket (nothing remembered of earlier
    searches), as for the one query of a single ssh login."""

    def run(src: Endpoint, dst: Endpoint) -> int | None:
        if cold:
            ni._holders.clear()  # the memo of sockets seen while searching
        owner = ni.socket_owner("tcp", src, dst)
        return None if owner is None else owner.pid

    return run


SCENARIOS = {
    "default": "job targets, default (sock_diag + cgroup)",
    "uid": "job targets, uid scan (cgroups off)",
    "fallback": "job targets, /proc/net fallback + uid scan",
    "fresh": "fresh target process, uid scan",
    "fresh-default": "fresh target process, default",
    "fresh-cold": "fresh target process, first query for its socket",
    "farm": "farm sockets (root, 2000 fds/holder)",
}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sleepers", type=int, default=2000)
    ap.add_argument("--sockets", type=int, default=10000, help="farm sockets (both ends)")
    ap.add_argument("--farms", type=int, default=5, help="processes holding the farm")
    ap.add_argument("--targets", type=int, default=20, help="throwaway-uid processes")
    ap.add_argument("--per-target", type=int, default=10, help="connections per target")
    ap.add_argument("--lookups", type=int, default=200)
    ap.add_argument("--slurm-lookups", type=int, default=50)
    ap.add_argument(
        "--scenarios",
        default="default,uid,fallback,fresh,farm",
        help=f"comma-separated, from: {', '.join(SCENARIOS)}",
    )
    ap.add_argument("--json", type=Path, help="write the summary rows here (bench/run.py)")
    args = ap.parse_args()
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        ap.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    return args


def summary_row(
    args: argparse.Namespace, nproc: int, ntcp: int, results: dict[str, dict[str, float]]
) -> Row:
    """The first scenario's figures; the others' go into the notes."""
    key = args.scenarios[0]
    res = results[key]
    others = [
        f"{SCENARIOS[k]}: ours p50 {r['o50']:.3f} / ref p50 {r['s50']:.1f} ms"
        for k, r in results.items()
        if k != key
    ]
    argv = [
        *("--sockets", args.sockets, "--sleepers", args.sleepers, "--lookups", args.lookups),
        *("--slurm-lookups", args.slurm_lookups, "--scenarios", ",".join(args.scenarios)),
    ]
    return Row(
        row="3",
        what=f"source-side lookup ({SCENARIOS[key]}), {args.sockets / 1000:g}k sockets, "
        f"{args.sleepers} more processes",
        n=f"{args.lookups} / {args.slurm_lookups}",
        ours=f"p50 {res['o50']:.3f} / p99 {res['o99']:.3f} ms",
        reference=f"p50 {res['s50']:.1f} / p99 {res['s99']:.1f} ms",
        ratio=ratio_text(res["o50"], res["s50"]),
        target="-",
        met="NO (wrong answers)" if res["wrong"] else "-",
        reproduce=reproduce("resolution", [str(a) for a in argv]),
        notes=[f"{nproc} processes, {ntcp} rows in /proc/net/tcp", *others],
    )


def main() -> None:
    args = parse_args()
    need_root()
    raise_nofile(1 << 16)
    node = Node()
    try:
        t0 = time.monotonic()
        targets, farm, fresh = build(node, args)
        nproc = sum(1 for n in os.listdir("/proc") if n.isdigit())
        ntcp = len(Path("/proc/net/tcp").read_text().splitlines()) - 1
        print(
            f"# {platform.node()} Linux {platform.release()}, {os.cpu_count()} cpus, "
            f"Python {platform.python_version()}; setup {time.monotonic() - t0:.1f}s"
        )
        print(
            f"# {nproc} processes, {ntcp} rows in /proc/net/tcp; targets: {len(targets)} "
            f"connections of uid {node.user} in {len(targets) // args.per_target} processes"
            f" ({'in cgroup ' + str(node.cgroup) if node.cgroup else 'no cgroup2'})"
        )
        rng = random.Random(42)
        procs = ProcReader()
        default, no_cg = SocketOwners(procs), SocketOwners(procs, use_cgroups=False)
        no_nl = SocketOwners(procs, use_netlink=False, use_cgroups=False)
        rows = {
            "default": (ours(default), targets),
            "uid": (ours(no_cg), targets),
            "fallback": (ours(no_nl), targets),
            "fresh": (ours(no_cg), fresh),
            "fresh-default": (ours(default), fresh),
            "fresh-cold": (ours(default, cold=True), fresh),
            "farm": (ours(default), farm),
        }
        print(
            f"# {args.lookups} random lookups per row, slurm column: the first {args.slurm_lookups}"
        )
        print(f"{'scenario':46} {'ours p50/p99 ms':>18} {'slurm p50/p99 ms':>18} {'p50 ratio':>9}")
        results: dict[str, dict[str, float]] = {}
        for key in args.scenarios:
            fn, pool = rows[key]
            picks = [rng.choice(pool) for _ in range(args.lookups)]
            fn(Endpoint(*picks[0][1][:2]), Endpoint(*picks[0][1][2:]))  # warm-up
            o50, o99, owrong = timed(fn, picks)
            s50, s99, swrong = timed(slurm_owner, picks[: args.slurm_lookups])
            results[key] = {
                "o50": o50,
                "o99": o99,
                "s50": s50,
                "s99": s99,
                "wrong": owrong + swrong,
            }
            bad = f"  WRONG ours={owrong} slurm={swrong}" if owrong or swrong else ""
            name = SCENARIOS[key]
            print(f"{name:46} {o50:8.3f} /{o99:8.3f} {s50:8.2f} /{s99:8.2f} {s50 / o50:8.1f}x{bad}")
        row = summary_row(args, nproc, ntcp, results)
        print(f"# reproduce: sudo {row.reproduce}")
        details = {"scenarios": results, "processes": nproc, "tcp_rows": ntcp}
        write_rows(args.json, [row], details)
    finally:
        node.close()


if __name__ == "__main__":
    main()
