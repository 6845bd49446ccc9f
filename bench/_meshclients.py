"""Many real MeshClients in one process: each a destination's key and source address.

    python -m bench._meshclients SPEC_JSON        (bench/scale.py starts it, from the repo top)

SPEC_JSON: {"keys": dir of the keypairs, "auth": authorized-keys dir, "port": mesh port,
"source": the source's address, "lport": the stand-in sshd's port, "uid": the user,
"items": [[key name, source address of the client, client port], ...]}. Prints "ready" once
every client exists; then, twice (cold, warm), reads an epoch time on stdin, waits for it and
sends one CallerIdQuery per client at once, and prints the JSON list of their results.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import zmq.asyncio

from callerid.bus.peers import PeerTable
from callerid.bus.protocol import CallerIdQuery, Endpoint
from callerid.bus.transport import ClientSettings, MeshClient, load_keypair

WAVES = 2  # cold, warm


async def one(spec: dict[str, Any], client: MeshClient, ip: str, cport: int) -> dict[str, Any]:
    q = CallerIdQuery(
        id=client.next_id(),
        proto="tcp",
        src=Endpoint(spec["source"], cport),
        dst=Endpoint(ip, spec["lport"]),
        uid=spec["uid"],
    )
    r = await client.query(spec["source"], q)
    return {"elapsed": r.elapsed_s * 1000, "status": r.status, "job": getattr(r.reply, "job", None)}


async def main(spec: dict[str, Any]) -> None:
    ctx = zmq.asyncio.Context()
    peers = PeerTable.load(Path(spec["auth"]), resolve=False)
    settings = ClientSettings(timeout_ms=10000)
    keys = Path(spec["keys"])
    clients = [
        (
            MeshClient(
                load_keypair(keys / name, name),
                peers,
                settings,
                port=spec["port"],
                ctx=ctx,
                source_address=ip,
            ),
            ip,
            cport,
        )
        for name, ip, cport in spec["items"]
    ]
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    for _ in range(WAVES):
        at = float(await loop.run_in_executor(None, sys.stdin.readline))
        await asyncio.sleep(max(0.0, at - time.time()))
        res = await asyncio.gather(*(one(spec, c, ip, cport) for c, ip, cport in clients))
        print(json.dumps(res), flush=True)
    for c, _, _ in clients:
        await c.close()
    ctx.term()


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
