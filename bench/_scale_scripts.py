"""The small programs bench/scale.py runs (as `python -c`): zygote, clients, sshd, MeshClients.

* ZYGOTE imports the agent once, then forks one agent (`callerid.agent.daemon.run`) per
  "config log" line on its stdin and prints the child's pid; the kernel reaps the children.
* CLIENT: the user's process in the source job, one TCP connection to each destination.
* LISTENER: the stand-in sshd of every destination (listening on 0.0.0.0, so all of
  127/8): one monitor process per accepted connection, which asks the agent of the address
  the connection came in on, once per wave; all monitors start a wave together.
* MESHCLIENTS: many real MeshClients in one process, each with a destination's key and
  source address, one CallerIdQuery each at a given instant, cold then warm.
"""

# Imports the agent once, then forks one agent per "config log" line on stdin (prints its pid).
ZYGOTE = r"""
import gc, logging, os, signal, sys, traceback
from pathlib import Path
from callerid.agent import daemon
import callerid.agent.backends.cgroup
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps our children
gc.freeze()
print("ready", flush=True)
for line in sys.stdin:
    cfg, out = line.split()
    pid = os.fork()
    if pid:
        print(pid, flush=True)
        continue
    rc = 1
    try:
        os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1); os.dup2(fd, 2); os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY); os.dup2(null, 0); os.close(null)
        logging.basicConfig(level="INFO", stream=sys.stderr,
                            format="%(levelname)s %(name)s: %(message)s")
        rc = daemon.run(Path(cfg))
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(rc)
"""

# The user's processes in the source job: one connection from `src` to each destination.
CLIENT = r"""
import json, socket, sys
src, port, dsts = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
keep = []
for ip in dsts:
    s = socket.socket()
    s.bind((src, 0))
    s.connect((ip, port))
    keep.append(s)
print(json.dumps([[s.getsockname()[1], s.getpeername()[0]] for s in keep]), flush=True)
sys.stdin.read()
"""

# Many real MeshClients in one process, each with a destination's key and source address.
MESHCLIENTS = r"""
import asyncio, json, sys, time
from pathlib import Path
import zmq.asyncio
from callerid.bus.peers import PeerTable
from callerid.bus.protocol import CallerIdQuery, Endpoint
from callerid.bus.transport import ClientSettings, MeshClient, load_keypair
spec = json.loads(sys.argv[1])

async def one(client, ip, cport, at):
    q = CallerIdQuery(id=client.next_id(), proto="tcp", src=Endpoint(spec["source"], cport),
                      dst=Endpoint(ip, spec["lport"]), uid=spec["uid"])
    r = await client.query(spec["source"], q)
    return {"elapsed": r.elapsed_s * 1000, "status": r.status,
            "job": getattr(r.reply, "job", None)}

async def main():
    ctx = zmq.asyncio.Context()
    peers = PeerTable.load(Path(spec["auth"]), resolve=False)
    settings = ClientSettings(timeout_ms=10000)
    clients = [(MeshClient(load_keypair(Path(spec["keys"]) / name, name), peers, settings,
                           port=spec["port"], ctx=ctx, source_address=ip), ip, cport)
               for name, ip, cport in spec["items"]]
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    for _ in range(2):
        at = float(await loop.run_in_executor(None, sys.stdin.readline))
        await asyncio.sleep(max(0.0, at - time.time()))
        res = await asyncio.gather(*(one(c, ip, cport, at) for c, ip, cport in clients))
        print(json.dumps(res), flush=True)
    for c, _, _ in clients:
        await c.close()
    ctx.term()

asyncio.run(main())
"""

# Stand-in sshd for every destination: a monitor per connection asks the agent of the address
# the connection came in on; all monitors start together at each "go" (one per wave).
LISTENER = r"""
import json, os, socket, sys, time
lst = socket.socket()
lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lst.bind(("0.0.0.0", 0))
lst.listen(4096)
print(json.dumps({"port": lst.getsockname()[1]}), flush=True)
spec = json.loads(sys.stdin.readline())
waves = [os.pipe() for _ in range(spec["waves"])]
done_r, done_w = os.pipe()
line = ("CALLERID/1 op=account user=%s service=sshd rhost=%s tty=ssh\n"
        % (spec["user"], spec["rhost"])).encode()

def monitor(conn):
    lst.close(); os.close(done_r)
    for _, w in waves:
        os.close(w)
    path = spec["socks"][conn.getsockname()[0]]
    out = []
    for r, _ in waves:
        os.read(r, 1)
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            s.sendall(line)
            reply = s.makefile("rb").readline().decode().split()[1:]
            out.append({"at": time.time(), "reply": dict(f.split("=", 1) for f in reply)})
        except OSError as exc:  # e.g. starved of CPU past the agent's read deadline
            out.append({"at": time.time(), "reply": {"reason": "client_" + type(exc).__name__}})
        s.close()
        os.write(done_w, b"d")
    with open(os.path.join(spec["out"], "%d.json" % os.getpid()), "w") as f:
        json.dump(out, f)
    os._exit(0)

kids = []
for _ in range(spec["n"]):
    conn, _peer = lst.accept()
    pid = os.fork()
    if pid == 0:
        monitor(conn)
    conn.close()
    kids.append(pid)
os.close(done_w)
for r, _ in waves:
    os.close(r)
print(json.dumps({"ready": len(kids)}), flush=True)
for i, (_, w) in enumerate(waves):
    sys.stdin.readline()
    t0 = time.time()
    os.close(w)
    got = 0
    while got < len(kids):
        chunk = os.read(done_r, 65536)
        if not chunk:
            break
        got += len(chunk)
    print(json.dumps({"wave": i, "go": t0, "answered": got}), flush=True)
for pid in kids:
    os.waitpid(pid, 0)
sys.stdin.read()
"""
