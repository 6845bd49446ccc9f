"""Scale: N destination agents all query one source agent at once; latency and memory per agent.

A 1,000-node `mpirun` over ssh: the same instant, every destination node's sshd asks its agent,
and every agent asks the one source node. Here, on one machine:

* the source: one real agent (`python -m callerid.agent`) on 127.S.255.254, cgroup backend;
  the user's client processes in its job 42 hold one TCP connection to every destination
  (`--per-client` connections per process, from the source address);
* N destination agents on 127.S.x.y (x.y = 0.1, 0.2, ...), all on one port, each with its own
  CURVE keypair, PAM socket and config, sharing one cgroup v2 job tree (jobs 42 and 43 of the
  user, so that every login needs the source); the source authorizes all N keys;
* a stand-in sshd listening on 0.0.0.0 (all of 127/8) forks one monitor per connection; the
  monitor asks the agent of the address the connection came in on, as pam_callerid.so would.

The destination agents are the real agent (`callerid.agent.daemon.run`, unchanged), started by
fork from one "zygote" process that imported the code once (as a pre-forking server would)
instead of by 1,000 interpreter starts: the start-up takes seconds instead of minutes, and the
agents share the interpreter's and the modules' memory pages. Per-agent memory is reported as
RSS (shared pages counted in full, what `ps` shows), PSS and USS (pages only this agent has:
what each additional agent costs). One agent started the usual way is measured too.

Everything shares 2 cores here, where a real cluster gives each destination its own machine:
the source agent runs with SCHED_RR (`chrt -r 10`) so that the 2N destination processes do
not starve it, as they would not on a real cluster. Two waves: "cold" (each agent's first
query: TCP connect and CURVE handshake to the source) and "warm" (pooled connection).

Reproduce (root):  .venv/bin/python bench/scale.py --agents 200 [--agents 1000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (
    Row,
    cpu_s,
    hosts_prefix,
    kill_wait,
    median,
    met,
    need_root,
    pct,
    poll,
    raise_nofile,
    reproduce,
    rss_mb,
    write_rows,
)
from bench._scale_scripts import CLIENT, LISTENER, MESHCLIENTS, ZYGOTE
from callerid.bus.transport import generate_keypair
from tests.support.agents import USER_PYTHON
from tests.support.cgroups import JobTree
from tests.support.users import ThrowawayUser, throwaway_user

TARGET_RSS_MB = 60.0
MEM_RESERVE_MB = 4096  # never start agents that would leave less than this available
LIGHT_PROCS = 10  # processes sharing the client-only MeshClients


class Net:
    """The addresses: 127.S.255.254 for the source, 127.S.x.y for destination i."""

    def __init__(self) -> None:
        self.s = 100 + secrets.randbelow(100)
        self.source = f"127.{self.s}.255.254"

    def dest(self, i: int) -> str:
        return f"127.{self.s}.{i // 250}.{i % 250 + 1}"


class Fleet:
    """Keys, configs and processes of the source and the destination agents."""

    def __init__(self, top: Path, n: int, net: Net, port: int) -> None:
        self.top, self.n, self.net, self.port = top, n, net, port
        self.src_auth = top / "auth-src"
        self.dst_auth = top / "auth-dst"
        self.source: subprocess.Popen[bytes] | None = None
        self.zygote: subprocess.Popen[str] | None = None
        self.pids: list[int] = []
        self.prefix: list[str] = []

    def names(self) -> list[str]:
        return [f"d{i:04d}" for i in range(self.n)]

    def make_keys(self) -> None:
        for d in (self.src_auth, self.dst_auth):
            d.mkdir()
        pub, _ = generate_keypair(self.top / "keys" / "src", "src", addresses=[self.net.source])
        shutil.copy(pub, self.src_auth)
        shutil.copy(pub, self.dst_auth)
        for i, name in enumerate(self.names()):
            pub, _ = generate_keypair(self.top / "keys" / name, name, addresses=[self.net.dest(i)])
            shutil.copy(pub, self.src_auth)
        hosts = {"src": self.net.source} | {n: self.net.dest(i) for i, n in enumerate(self.names())}
        self.prefix = hosts_prefix(self.top / "hosts", hosts)

    def config(self, name: str, ip: str, auth: Path, tree: JobTree) -> Path:
        cg = tree.backend_config()
        cfg = {
            "node_name": name,
            "listen": [ip],
            "port": self.port,
            "keys": {"dir": str(self.top / "keys" / name), "authorized": str(auth)},
            "pam_socket": str(self.top / "sock" / f"{name}.sock"),
            "policy": {"single_job_shortcut": True},
            "backend": {"cgroup": {"root": str(cg.root), "jobs": cg.jobs, "extern": cg.extern}},
        }
        path = self.top / "cfg" / f"{name}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump(cfg))
        return path

    def pam_socket(self, name: str) -> Path:
        return self.top / "sock" / f"{name}.sock"

    def start_source(self, tree: JobTree) -> None:
        cfg = self.config("src", self.net.source, self.src_auth, tree)
        with (self.top / "src.log").open("ab") as out:
            argv = [sys.executable, "-m", "callerid.agent", "--config", str(cfg)]
            self.source = subprocess.Popen(
                [*self.prefix, "chrt", "-r", "10", *argv],
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
            )
        wait_listening([self.pam_socket("src")], 30)

    def start_destinations(self, tree: JobTree, count: int) -> None:
        """Fork ``count`` more destination agents (from the zygote), wait until they listen."""
        if self.zygote is None:
            self.zygote = subprocess.Popen(
                [*self.prefix, sys.executable, "-c", ZYGOTE],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert self.zygote.stdout is not None
            assert self.zygote.stdout.readline().strip() == "ready"
        assert self.zygote.stdin is not None and self.zygote.stdout is not None
        first = len(self.pids)
        names = self.names()[first : first + count]
        for i, name in enumerate(names, start=first):
            cfg = self.config(name, self.net.dest(i), self.dst_auth, tree)
            self.zygote.stdin.write(f"{cfg} {self.top / 'log' / name}.log\n")
            self.zygote.stdin.flush()
            self.pids.append(int(self.zygote.stdout.readline()))
        wait_listening([self.pam_socket(n) for n in names], 60 + count / 10)

    def stop(self) -> None:
        """SIGTERM every agent we started (by pid, forked ones only while their parent is
        our zygote), wait until they are gone, then stop the zygote."""
        zpid = self.zygote.pid if self.zygote is not None else -1
        ours = [p for p in self.pids if _ppid(p) == zpid]
        for pid in ours:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        with contextlib.suppress(RuntimeError):
            poll(lambda: not any(_ppid(p) == zpid for p in ours), 60, "agents to exit", 0.1)
        for pid in ours:
            if _ppid(pid) == zpid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        procs: list[subprocess.Popen[Any]] = [self.source] if self.source else []
        if self.zygote is not None:
            procs.append(self.zygote)
        kill_wait(procs)
        if self.zygote is not None:
            for f in (self.zygote.stdin, self.zygote.stdout):
                if f is not None:
                    f.close()


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def wait_listening(paths: list[Path], timeout: float) -> None:
    import socket

    def all_up() -> bool:
        while paths:
            if not paths[-1].exists():
                return False
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(paths[-1]))
                except OSError:
                    return False
            paths.pop()
        return True

    poll(all_up, timeout, f"{len(paths)} agent PAM sockets", 0.05)


def mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_fleet(fleet: Fleet, tree: JobTree, wanted: int) -> int:
    """Start up to ``wanted`` destination agents in batches while memory allows; how many."""
    batch = 50
    per_agent = 0.0
    while len(fleet.pids) < wanted:
        count = min(batch, wanted - len(fleet.pids))
        if mem_available_mb() - count * max(per_agent * 2, 20.0) < MEM_RESERVE_MB:
            print(f"# memory: stopping at {len(fleet.pids)} agents", flush=True)
            break
        before = mem_available_mb()
        fleet.start_destinations(tree, count)
        per_agent = max(per_agent, (before - mem_available_mb()) / count)
    return len(fleet.pids)


def start_clients(
    ts: JobTree, user: ThrowawayUser, net: Net, port: int, *, n: int, per_client: int
) -> tuple[list[subprocess.Popen[bytes]], dict[str, int]]:
    """The user's processes in the source's job 42: destination address -> client port."""
    procs, ports = [], {}
    for first in range(0, n, per_client):
        dsts = ",".join(net.dest(i) for i in range(first, min(n, first + per_client)))
        argv = [USER_PYTHON, "-c", CLIENT, net.source, str(port), dsts]
        proc = ts.spawn_in(
            "42", "step_batch", argv, user=user, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        procs.append(proc)
        assert proc.stdout is not None
        ports.update({ip: cport for cport, ip in json.loads(proc.stdout.readline())})
    return procs, ports


def _end(procs: list[subprocess.Popen[Any]], group: bool = False) -> None:
    for p in procs:
        if group and p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
    kill_wait(procs)
    for p in procs:
        for f in (p.stdin, p.stdout):
            if f is not None:
                f.close()


def logins(
    stack: contextlib.ExitStack, fleet: Fleet, ts: JobTree, user: ThrowawayUser, per_client: int
) -> dict[str, Any]:
    """Two waves (cold, warm) of one PAM request per destination agent, all at once."""
    n = len(fleet.pids)
    out = fleet.top / "out"
    out.mkdir()
    listener = subprocess.Popen(
        [sys.executable, "-c", LISTENER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    stack.callback(_end, [listener], group=True)
    assert listener.stdin is not None and listener.stdout is not None
    lport = json.loads(listener.stdout.readline())["port"]
    names = fleet.names()
    socks = {fleet.net.dest(i): str(fleet.pam_socket(names[i])) for i in range(n)}
    spec = {
        "n": n,
        "waves": 2,
        "user": user.name,
        "rhost": fleet.net.source,
        "socks": socks,
        "out": str(out),
    }
    listener.stdin.write(json.dumps(spec) + "\n")
    listener.stdin.flush()
    clients, ports = start_clients(ts, user, fleet.net, lport, n=n, per_client=per_client)
    stack.callback(_end, clients)
    assert json.loads(listener.stdout.readline())["ready"] == n
    gos = []
    for _ in range(2):
        listener.stdin.write("go\n")
        listener.stdin.flush()
        gos.append(json.loads(listener.stdout.readline()))
    listener.stdin.close()
    listener.wait(60)
    results = [json.loads(p.read_text()) for p in out.glob("*.json")]
    return {"gos": gos, "results": results, "ports": ports, "lport": lport}


def listen_drops() -> int:
    """TcpExt ListenDrops of this network namespace: SYNs dropped by a full accept queue."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for head, values in zip(lines[::2], lines[1::2], strict=False):
        if head.startswith("TcpExt:"):
            return int(dict(zip(head.split(), values.split(), strict=False))["ListenDrops"])
    return 0


def light_clients(fleet: Fleet, user: ThrowawayUser, got: dict[str, Any]) -> dict[str, Any]:
    """Every destination's key, from its own address, in ``LIGHT_PROCS`` client processes
    (the real MeshClient, no agent around it): one query each at once, cold then warm."""
    n = len(fleet.pids)
    names = fleet.names()
    procs = []
    try:
        for k in range(LIGHT_PROCS):
            items = [
                [names[i], fleet.net.dest(i), got["ports"][fleet.net.dest(i)]]
                for i in range(k, n, LIGHT_PROCS)
            ]
            spec = {
                "keys": str(fleet.top / "keys"),
                "auth": str(fleet.dst_auth),
                "uid": user.uid,
                "port": fleet.port,
                "source": fleet.net.source,
                "lport": got["lport"],
                "items": items,
            }
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", MESHCLIENTS, json.dumps(spec)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        out: dict[str, Any] = {}
        for label in ("cold", "warm"):
            drops = listen_drops()
            cpu0 = cpu_s(fleet.source.pid) if fleet.source else 0.0
            at = time.time() + 1.0
            for p in procs:
                assert p.stdin is not None
                p.stdin.write(f"{at}\n")
                p.stdin.flush()
            res = [r for p in procs for r in json.loads(p.stdout.readline())]  # type: ignore[union-attr]
            elapsed = [r["elapsed"] for r in res]
            out[label] = {
                "p50": median(elapsed),
                "p99": pct(elapsed, 99),
                "max": max(elapsed),
                "found": sum(1 for r in res if r["job"] == "42"),
                "status": dict(Counter(r["status"] for r in res)),
                "listen_drops": listen_drops() - drops,
                "source_cpu_ms": (cpu_s(fleet.source.pid) - cpu0) * 1000 / len(res)
                if fleet.source
                else 0.0,
            }
        return out
    finally:
        _end(procs)


def summarize(fleet: Fleet, got: dict[str, Any]) -> dict[str, Any]:
    res: dict[str, Any] = {"agents": len(fleet.pids)}
    for w, label in enumerate(("cold", "warm")):
        go = got["gos"][w]["go"]
        done = [(r[w]["at"] - go) * 1000 for r in got["results"]]
        replies = [r[w]["reply"] for r in got["results"]]
        good = sum(
            1
            for x in replies
            if (x.get("verdict"), x.get("reason"), x.get("job")) == ("adopt", "callerid", "42")
        )
        res[label] = {
            "answered": len(done),
            "callerid": good,
            "p50": median(done),
            "p99": pct(done, 99),
            "max": max(done, default=float("nan")),
            "reasons": dict(Counter(x.get("reason", "?") for x in replies)),
        }
    lat: list[list[float]] = [[], []]
    status: list[Counter[str]] = [Counter(), Counter()]
    for name in fleet.names()[: len(fleet.pids)]:
        text = (fleet.top / "log" / f"{name}.log").read_text()
        for w, m in enumerate(re.findall(r"CALLERID_LATENCY_US=(\d+)", text)[:2]):
            lat[w].append(int(m) / 1000)
        for w, m in enumerate(re.findall(r"CALLERID_PEER_STATUS=(\w+)", text)[:2]):
            status[w][m] += 1
    for w, label in enumerate(("cold", "warm")):
        res[label].update(
            agent_p50=median(lat[w]), agent_p99=pct(lat[w], 99), peer_status=dict(status[w])
        )
    mem = [rss_mb(p) for p in fleet.pids if _ppid(p) == (fleet.zygote.pid if fleet.zygote else 0)]
    res["mem"] = {
        "rss_median": median([m[0] for m in mem]),
        "rss_max": max((m[0] for m in mem), default=0.0),
        "pss_median": median([m[1] for m in mem]),
        "uss_median": median([m[2] for m in mem]),
        "pss_total_mb": sum(m[1] for m in mem),
    }
    assert fleet.source is not None
    res["source_mem"] = rss_mb(fleet.source.pid)
    return res


def run(args: argparse.Namespace, wanted: int) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        top = Path(tempfile.mkdtemp(prefix="cidscale-", dir="/tmp"))
        if not os.environ.get("CIDBENCH_KEEP"):
            stack.callback(shutil.rmtree, top, ignore_errors=True)
        for sub in ("sock", "log"):
            (top / sub).mkdir()
        user = stack.enter_context(throwaway_user())
        ts = stack.enter_context(JobTree("v2"))
        td = stack.enter_context(JobTree("v2"))
        for job in ("42", "43"):
            ts.add_job(job, user.uid)
            td.add_job(job, user.uid)
        fleet = Fleet(top, wanted, Net(), 20000 + secrets.randbelow(30000))
        t0 = time.monotonic()
        fleet.make_keys()
        stack.callback(fleet.stop)
        fleet.start_source(ts)
        started = start_fleet(fleet, td, wanted)
        startup = time.monotonic() - t0
        print(f"# {started} destination agents up in {startup:.1f} s", flush=True)
        got = logins(stack, fleet, ts, user, args.per_client)
        res = summarize(fleet, got)
        res["light"] = light_clients(fleet, user, got)
        res["source_mem_light"] = rss_mb(fleet.source.pid) if fleet.source else (0, 0, 0)
        res.update(wanted=wanted, startup_s=startup)
        return res


def report(res: dict[str, Any]) -> None:
    n, m, sm, lm = res["agents"], res["mem"], res["source_mem"], res["source_mem_light"]
    print(
        f"scale: {n} destination agents (of {res['wanted']} wanted) query one source at once"
        f" (started in {res['startup_s']:.0f} s)"
    )
    for label in ("cold", "warm"):
        w = res[label]
        print(
            f"  {label} logins: {w['callerid']}/{w['answered']} callerid; answered after p50 "
            f"{w['p50']:.0f} / p99 {w['p99']:.0f} / max {w['max']:.0f} ms from the start; "
            f"in agent p50 {w['agent_p50']:.1f} / p99 {w['agent_p99']:.1f} ms; peer status "
            f"{w['peer_status']}; replies {w['reasons']}"
        )
    for label in ("cold", "warm"):
        w = res["light"][label]
        print(
            f"  {label} queries from {n} client-only MeshClients: round trip p50 {w['p50']:.1f}"
            f" / p99 {w['p99']:.1f} / max {w['max']:.1f} ms; found {w['found']}; {w['status']}; "
            f"SYNs dropped by full accept queues meanwhile: {w['listen_drops']}; source CPU "
            f"{w['source_cpu_ms']:.2f} ms per query"
        )
    print(
        f"  memory per destination agent: RSS {m['rss_median']:.1f} MB (max {m['rss_max']:.1f}),"
        f" PSS {m['pss_median']:.1f}, USS {m['uss_median']:.1f}; all agents' PSS "
        f"{m['pss_total_mb'] / 1024:.2f} GB"
    )
    print(
        f"  source agent RSS/PSS/USS: {sm[0]:.1f}/{sm[1]:.1f}/{sm[2]:.1f} MB with {n} peer "
        f"agents; {lm[0]:.1f}/{lm[1]:.1f}/{lm[2]:.1f} MB with {n} more client-only peers"
    )


def rows(results: list[dict[str, Any]]) -> list[Row]:
    out = []
    for res in results:
        n, w, m, light = res["agents"], res["warm"], res["mem"], res["light"]["warm"]
        fit = "" if n == res["wanted"] else f" (only {n} of {res['wanted']} fit in memory)"
        src_rss = res["source_mem"][0]  # with the N peer agents connected
        both_rss = res["source_mem_light"][0]  # with N more client-only peers as well
        ours = (
            f"source answers {n} at once: p99 {light['p99']:.0f} ms; logins all done p99 "
            f"{w['p99']:.0f} ms, {w['callerid']}/{n} callerid; RSS/agent "
            f"{m['rss_median']:.0f} MB (USS {m['uss_median']:.0f}), source {src_rss:.0f} MB "
            f"with {n} peers connected ({both_rss:.0f} MB with {2 * n})"
        )
        out.append(
            Row(
                row="6",
                what=f"scale: {n} agents query one source at once{fit}",
                n=f"{n} x 2 waves",
                ours=ours,
                reference="-",
                ratio="-",
                target=f"RSS <= {TARGET_RSS_MB:.0f} MB",
                met=f"agents {met(m['rss_max'] <= TARGET_RSS_MB)}, "
                f"source {met(src_rss <= TARGET_RSS_MB)}",
                reproduce=reproduce("scale.py", ["--agents", str(res["wanted"])]),
                notes=[
                    f"cold logins p99 {res['cold']['p99']:.0f} ms, "
                    f"peer {res['cold']['peer_status']}",
                    f"warm logins peer {w['peer_status']}, in-agent p99 {w['agent_p99']:.0f} ms",
                    f"client-only cold p99 {res['light']['cold']['p99']:.0f} ms",
                ],
            )
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, action="append", help="repeatable; default 200, 1000")
    ap.add_argument("--per-client", type=int, default=10, help="connections per client process")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    need_root()
    raise_nofile(1 << 16)
    results = []
    for n in args.agents or [200, 1000]:
        res = run(args, n)
        report(res)
        results.append(res)
    write_rows(args.json, rows(results), {"runs": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
