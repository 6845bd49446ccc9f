"""Benchmark: 4-tuple -> owning pid, callerid's netinfo beside slurmd's algorithm (needs root).

Builds a busy node on loopback, then times `NetInfo.socket_owner` on random connections:

* targets: a throwaway user's processes (in a cgroup v2 directory, like a job), each holding a
  few client connections; created FIRST, so they are the oldest pids (the worst case for our
  newest-first scan);
* a farm of established TCP sockets (client and server ends, held by root processes);
* sleepers (root), created last.

slurmd's algorithm (src/common/callerid.c), re-implemented in Python so that both run in the
same language: parse /proc/net/tcp then tcp6 line by line for the 4-tuple's inode, then walk
readdir(/proc) in order and stat() every /proc/<pid>/fd/* until one has that inode.

Reproduce:  sudo .venv/bin/python bench/resolution.py [--sleepers 2000] [--sockets 10000]
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
import contextlib
import json
import os
import platform
import pwd
import random
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import Row, need_root, raise_nofile, ratio_text, reproduce, write_rows
from callerid.agent.netinfo import NetInfo
from callerid.bus.protocol import Endpoint

Tuple4 = tuple[str, int, str, int]  # local ip, local port, remote ip, remote port

# Holds n connections to itself (both ends) or, with host/port, n client connections to them.
HOLDER = r"""
import json, socket, struct, sys
n, host, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
keep, conns, lst = [], [], None
if port == 0:  # a farm: connect to our own listener and hold the accepted ends too
    lst = socket.socket()
    lst.bind((host, 0))
    lst.listen(4096)
    port = lst.getsockname()[1]
for _ in range(n):
    c = socket.socket()
    c.connect((host, port))
    keep.append(c)
    conns.append([*c.getsockname(), *c.getpeername()])
    if lst is not None:
        keep.append(lst.accept()[0])
print(json.dumps(conns), flush=True)
sys.stdin.read()
for c in keep:  # reset rather than close: no TIME_WAIT rows left for the next run
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
"""

# Starts N `sleep` processes (all in this shell's process group), says so, waits.
SPAWNER = 'for i in $(seq "$1"); do sleep 3600 & done; echo ready; wait'

# Accepts forever (the server end of the targets' connections).
ACCEPTOR = r"""
import socket, sys
lst = socket.socket(); lst.bind((sys.argv[1], 0)); lst.listen(4096)
print(lst.getsockname()[1], flush=True)
keep = []
while True:
    keep.append(lst.accept()[0])
"""


class Node:
    """Every process, user and cgroup the benchmark creates; `close()` removes them all."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.groups: list[subprocess.Popen[str]] = []
        self.user: str | None = None
        self.cgroup: Path | None = None

    def spawn(self, argv: list[str], stdout: bool = True) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
            text=True,
        )
        self.procs.append(p)
        return p

    def spawn_sleepers(self, count: int) -> None:
        """``count`` sleepers in one new process group (killed as a group in close())."""
        p = subprocess.Popen(
            ["bash", "-c", SPAWNER, "spawner", str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.groups.append(p)
        assert p.stdout is not None
        if p.stdout.readline().strip() != "ready":
            msg = "the sleeper spawner failed"
            raise RuntimeError(msg)

    def close(self) -> None:
        for g in self.groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(g.pid, signal.SIGKILL)
            g.wait()
            for f in (g.stdin, g.stdout):
                if f is not None:
                    f.close()
        for p in self.procs:  # holders reset their connections at EOF on stdin
            if p.stdin is not None:
                with contextlib.suppress(OSError):
                    p.stdin.close()
        deadline = time.monotonic() + 10
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                is_acceptor = isinstance(p.args, list) and ACCEPTOR in p.args
                p.wait(0 if is_acceptor else max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
            for f in (p.stdin, p.stdout):
                if f is not None:
                    f.close()
        deadline = time.monotonic() + 10
        while self.cgroup is not None and self.cgroup.exists():
            try:
                self.cgroup.rmdir()
            except OSError:  # EBUSY until the killed members are gone
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        if self.user is not None:
            subprocess.run(["userdel", self.user], check=False)


def cgroup2_mount() -> Path | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if " - cgroup2 " in line:
            return Path(line.split()[4])
    return None


def build(node: Node, args: argparse.Namespace) -> tuple[list[tuple[int, Tuple4]], ...]:
    node.user = f"cidbench{secrets.token_hex(3)}"
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", node.user],
        check=True,
    )
    pw = pwd.getpwnam(node.user)
    mount = cgroup2_mount()
    if mount is not None:
        node.cgroup = mount / f"cid-bench-{secrets.token_hex(3)}"
        node.cgroup.mkdir()
    acceptor = node.spawn([sys.executable, "-c", ACCEPTOR, "127.0.0.2"])
    assert acceptor.stdout is not None
    aport = int(acceptor.stdout.readline())

    def target_procs(count: int) -> list[tuple[int, Tuple4]]:
        drop = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups"]
        join = f"echo $$ > {node.cgroup}/cgroup.procs && " if node.cgroup else ""
        out = []
        for _ in range(count):
            holder = [sys.executable, "-c", HOLDER, str(args.per_target), "127.0.0.2", str(aport)]
            p = node.spawn(["sh", "-c", f'{join}exec "$@"', "sh", *drop, *holder])
            assert p.stdout is not None
            out += [(p.pid, tuple(c)) for c in json.loads(p.stdout.readline())]
        return out

    targets = target_procs(args.targets)
    farm: list[tuple[int, Tuple4]] = []
    per_farm = args.sockets // 2 // args.farms
    for i in range(args.farms):
        p = node.spawn([sys.executable, "-c", HOLDER, str(per_farm), f"127.0.1.{i + 1}", "0"])
        assert p.stdout is not None
        farm += [(p.pid, tuple(c)) for c in json.loads(p.stdout.readline())]
    if args.sleepers:
        node.spawn_sleepers(args.sleepers)
    fresh = target_procs(1)  # like an ssh client that just started
    return targets, farm, fresh


# --------------------------------------------------------------------------- slurmd's algorithm


def _hexaddr(text: str) -> bytes:
    raw = bytes.fromhex(text)
    return b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))


def slurm_inode(local: Endpoint, remote: Endpoint) -> int | None:
    """callerid_find_inode_by_conn: /proc/net/tcp, then tcp6, every line parsed and compared."""
    import ipaddress

    for name, size in (("tcp", 4), ("tcp6", 16)):
        want_l = ipaddress.ip_address(local.ip).packed
        want_r = ipaddress.ip_address(remote.ip).packed
        if len(want_l) != size:
            continue
        with open(f"/proc/net/{name}") as f:
            next(f)
            for line in f:
                fields = line.split()
                la, lp = fields[1].split(":")
                ra, rp = fields[2].split(":")
                if (
                    int(lp, 16) == local.port
                    and int(rp, 16) == remote.port
                    and _hexaddr(la) == want_l
                    and _hexaddr(ra) == want_r
                ):
                    return int(fields[9])
    return None


def slurm_pid(inode: int) -> int | None:
    """find_pid_by_inode: readdir(/proc) order, stat() every fd, first match wins."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fddir = f"/proc/{entry.name}/fd"
        try:
            fds = os.listdir(fddir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.stat(f"{fddir}/{fd}").st_ino == inode:
                    return int(entry.name)
            except OSError:
                continue
    return None


def slurm_owner(local: Endpoint, remote: Endpoint) -> int | None:
    inode = slurm_inode(local, remote)
    return None if inode is None else slurm_pid(inode)


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


def ours(ni: NetInfo, *, cold: bool = False) -> Callable[[Endpoint, Endpoint], int | None]:
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
        reproduce=reproduce("resolution.py", [str(a) for a in argv]),
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
        default, no_cg = NetInfo(), NetInfo(use_cgroups=False)
        no_nl = NetInfo(use_netlink=False, use_cgroups=False)
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
        print(f"# reproduce: sudo {sys.executable} {' '.join(sys.argv)}")
        write_rows(
            args.json,
            [summary_row(args, nproc, ntcp, results)],
            {"scenarios": results, "processes": nproc, "tcp_rows": ntcp},
        )
    finally:
        node.close()


if __name__ == "__main__":
    main()
