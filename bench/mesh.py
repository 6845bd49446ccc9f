"""Benchmark of the mesh transport (CURVE on loopback): round-trip latency and throughput.

Not a test: prints numbers next to their targets. Reproduce (from the repo top) with

    .venv/bin/python -m bench.mesh [--round-trips 2000] [--clients 4] [--inflight 64] [--seconds 5]

The server runs in its own process (`--serve`); latency is measured by one client doing
sequential queries after a warm-up, throughput by several client processes (`--load`) each
keeping many queries in flight against the same server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._common import TOP, bench_argv
from callerid.bus.peers import PeerTable
from callerid.bus.protocol import CallerIdQuery, CallerIdReply, Endpoint
from callerid.bus.transport import (
    ClientSettings,
    MeshClient,
    MeshServer,
    PeerIdentity,
    generate_keypair,
    load_keypair,
)

SERVER_IP = "127.0.0.2"
TARGET_P50_MS = 0.5
TARGET_QPS = 5000
SETTINGS = ClientSettings(timeout_ms=5000, pool_size=4)


def make_keys(root: Path) -> None:
    auth = root / "authorized"
    auth.mkdir()
    for name, addrs in (("server", [SERVER_IP]), ("client", [])):
        pub, _ = generate_keypair(root / name, name, addresses=addrs)
        shutil.copy(pub, auth)


def make_query(client: MeshClient, uid: int) -> CallerIdQuery:
    return CallerIdQuery(
        id=client.next_id(),
        proto="tcp",
        src=Endpoint("127.0.0.3", 40000 + uid % 20000),
        dst=Endpoint(SERVER_IP, 22),
        uid=uid,
    )


# --------------------------------------------------------------------------- roles


async def serve(root: Path) -> None:
    async def handler(query: CallerIdQuery, peer: PeerIdentity) -> CallerIdReply:
        return CallerIdReply(id=query.id, status="found", node="server", job=str(query.uid))

    kp = load_keypair(root / "server", "server")
    srv = MeshServer(
        kp, handler, authorized_dir=root / "authorized", addresses=[SERVER_IP], port=0,
        resolve=False,
    )  # fmt: skip
    async with srv:
        print(json.dumps({"port": srv.port}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until EOF
        print(json.dumps({"served": srv.stats.answered}), flush=True)


def client_for(root: Path, port: int) -> MeshClient:
    kp = load_keypair(root / "client", "client")
    return MeshClient(kp, PeerTable.load(root / "authorized", resolve=False), SETTINGS, port=port)


async def latency(root: Path, port: int, warmup: int, count: int) -> list[float]:
    async with client_for(root, port) as client:
        for i in range(warmup):
            result = await client.query(SERVER_IP, make_query(client, i))
            assert result.ok, result
        samples = []
        for i in range(count):
            q = make_query(client, i)
            t0 = time.perf_counter()
            result = await client.query(SERVER_IP, q)
            samples.append(time.perf_counter() - t0)
            assert result.ok, result
    return samples


async def load(root: Path, port: int, inflight: int, seconds: float, start_at: float) -> None:
    async with client_for(root, port) as client:
        assert (await client.ping(SERVER_IP)).ok  # connect and warm up before the clock
        await asyncio.sleep(max(0.0, start_at - time.time()))
        stop = time.monotonic() + seconds
        counts = {"ok": 0, "failed": 0}

        async def worker(n: int) -> None:
            uid = n
            while time.monotonic() < stop:
                result = await client.query(SERVER_IP, make_query(client, uid))
                counts["ok" if result.ok else "failed"] += 1
                uid += inflight

        await asyncio.gather(*(worker(n) for n in range(inflight)))
    print(json.dumps(counts), flush=True)


# --------------------------------------------------------------------------- driver


def percentile(samples: list[float], pct: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


def run_bench(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="callerid-bench-", dir="/tmp"))
    me = bench_argv("mesh")
    try:
        make_keys(root)
        server = subprocess.Popen(
            [*me, "--serve", str(root)],
            cwd=TOP,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdout is not None and server.stdin is not None
        port = json.loads(server.stdout.readline())["port"]
        try:
            samples = asyncio.run(latency(root, port, args.warmup, args.round_trips))
            start_at = time.time() + 1.5
            load_argv = [*me, "--load", str(root), "--port", str(port), "--start-at",
                         str(start_at), "--inflight", str(args.inflight), "--seconds",
                         str(args.seconds)]  # fmt: skip
            loaders = [
                subprocess.Popen(load_argv, cwd=TOP, stdout=subprocess.PIPE, text=True)
                for _ in range(args.clients)
            ]
            totals = [json.loads(p.communicate(timeout=args.seconds + 60)[0]) for p in loaders]
        finally:
            server.stdin.close()
            server.wait(timeout=30)
    finally:
        shutil.rmtree(root)
    p50, p99 = percentile(samples, 50) * 1e3, percentile(samples, 99) * 1e3
    ok = sum(t["ok"] for t in totals)
    failed = sum(t["failed"] for t in totals)
    qps = ok / args.seconds
    mean = statistics.fmean(samples) * 1e3
    verdict = {True: "OK", False: "MISSED"}
    print(f"mesh round trip: CURVE, loopback, server in another process, {len(samples)} queries")
    print(f"  p50 {p50:.3f} ms  (target <= {TARGET_P50_MS} ms)  {verdict[p50 <= TARGET_P50_MS]}")
    print(f"  p99 {p99:.3f} ms  mean {mean:.3f} ms")
    print(f"mesh throughput: {args.clients} client processes x {args.inflight} in flight")
    print(f"  {qps:,.0f} queries/s over {args.seconds:g} s  (target >= {TARGET_QPS:,})  "
          f"{verdict[qps >= TARGET_QPS]}  failed: {failed}")  # fmt: skip
    print(f"reproduce: .venv/bin/python -m bench.mesh --round-trips {args.round_trips} "
          f"--clients {args.clients} --inflight {args.inflight} "
          f"--seconds {args.seconds:g}")  # fmt: skip
    return 0 if p50 <= TARGET_P50_MS and qps >= TARGET_QPS and not failed else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--round-trips", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--inflight", type=int, default=64)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--load", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
        return 0
    if args.load:
        asyncio.run(load(args.load, args.port, args.inflight, args.seconds, args.start_at))
        return 0
    return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())
