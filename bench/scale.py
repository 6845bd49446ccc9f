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
fork from one "zygote" process (bench/_zygote.py) that imported the code once (as a
pre-forking server would) instead of by 1,000 interpreter starts: the start-up takes seconds
instead of minutes, and the agents share the interpreter's and the modules' memory pages.
Per-agent memory is reported as RSS (shared pages counted in full, what `ps` shows), PSS and
USS (pages only this agent has: what each additional agent costs). One agent started the usual
way is measured too.

Everything shares 2 cores here, where a real cluster gives each destination its own machine:
the source agent runs with SCHED_RR (`chrt -r 10`) so that the 2N destination processes do
not starve it, as they would not on a real cluster. Two waves: "cold" (each agent's first
query: TCP connect and CURVE handshake to the source) and "warm" (pooled connection).

Parts: bench/_scale_fleet.py (the agents), bench/_standin_sshd.py (the sshd), bench/_conns.py
(the user's clients), bench/_meshclients.py (client-only peers), bench/_scale_report.py.

Reproduce (root, from the repo top):  .venv/bin/python -m bench.scale --agents 200 [--agents 1000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench._common import (
    TOP,
    bench_argv,
    cpu_s,
    end_procs,
    median,
    need_root,
    pct,
    raise_nofile,
    rss_mb,
    write_rows,
)
from bench._scale_fleet import Fleet, Net, start_fleet
from bench._scale_report import report, rows, summarize
from tests.support.agents import USER_PYTHON
from tests.support.cgroups import JobTree
from tests.support.users import ThrowawayUser, throwaway_user

LIGHT_PROCS = 10  # processes sharing the client-only MeshClients


def start_clients(
    ts: JobTree, user: ThrowawayUser, net: Net, port: int, *, n: int, per_client: int
) -> tuple[list[subprocess.Popen[bytes]], dict[str, int]]:
    """The user's processes in the source's job 42: destination address -> client port."""
    procs, ports = [], {}
    for first in range(0, n, per_client):
        dsts = [net.dest(i) for i in range(first, min(n, first + per_client))]
        opts = ["--bind", net.source, str(port), *dsts]
        proc = ts.spawn_in(
            "42",
            "step_batch",
            bench_argv("_conns", "connect", *opts, python=USER_PYTHON),
            user=user,
            cwd=str(TOP),  # spawn_in passes its options as JSON
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        procs.append(proc)
        assert proc.stdout is not None
        ports.update({ip: cport for _, cport, ip, _ in json.loads(proc.stdout.readline())})
    return procs, ports


def logins(
    stack: contextlib.ExitStack, fleet: Fleet, ts: JobTree, user: ThrowawayUser, per_client: int
) -> dict[str, Any]:
    """Two waves (cold, warm) of one PAM request per destination agent, all at once."""
    n = len(fleet.pids)
    out = fleet.top / "out"
    out.mkdir()
    listener = subprocess.Popen(
        bench_argv("_standin_sshd", "waves"),
        cwd=TOP,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    stack.callback(end_procs, [listener], group=True)
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
    stack.callback(end_procs, clients)
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
                    bench_argv("_meshclients", json.dumps(spec)),
                    cwd=TOP,
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
        end_procs(procs)


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
