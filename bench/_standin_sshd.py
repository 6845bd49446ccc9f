"""The stand-in sshd of bench/scale.py and bench/storm.py: accept, fork one monitor each.

    python -m bench._standin_sshd waves
    python -m bench._standin_sshd storm HOST AGENT_SOCKET OUT_DIR MONITOR_BIN

Both print {"port": P} (their listener), read a JSON spec line on stdin, accept as many
connections as it names and fork one monitor per connection, which holds that connection (as
sshd's listener does, the parent keeps none) and sends the exact line pam_callerid.so sends.

* waves (bench/scale.py; listens on 0.0.0.0, so all of 127/8): spec {"n", "waves", "user",
  "rhost", "socks": {address -> agent socket}, "out"}. Each monitor asks the agent of the
  address its connection came in on, once per wave; all start a wave together when a "go"
  line arrives, and {"wave", "go", "answered"} is printed when all have their reply. Each
  monitor writes its replies to OUT/<pid>.json.
* storm (bench/storm.py): spec {"user", "rhost", "connections", "inflight", "requests",
  "jobs": {client port -> job}}. Each monitor execs the C monitor (bench/storm_monitor.c) with
  its connection; at "go" they all start their requests; {"done": N} once all have exited.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

Monitor = Callable[[socket.socket, tuple[str, int]], NoReturn]


def listen(host: str) -> socket.socket:
    lst = socket.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind((host, 0))
    lst.listen(4096)
    print(json.dumps({"port": lst.getsockname()[1]}), flush=True)
    return lst


def pam_line(spec: dict[str, Any]) -> str:
    return f"CALLERID/1 op=account user={spec['user']} service=sshd rhost={spec['rhost']} tty=ssh\n"


def fork_monitors(lst: socket.socket, count: int, monitor: Monitor) -> list[int]:
    """Accept ``count`` connections, each handed to ``monitor`` in a forked child."""
    kids = []
    for _ in range(count):
        conn, peer = lst.accept()
        pid = os.fork()
        if pid == 0:
            monitor(conn, peer)
        conn.close()  # as sshd's listener does: only the monitor holds the connection
        kids.append(pid)
    return kids


def count_bytes(fd: int, wanted: int) -> int:
    """Read ``fd`` until ``wanted`` bytes (one per child) or EOF; how many came."""
    got = 0
    while got < wanted:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        got += len(chunk)
    return got


# --------------------------------------------------------------------------- waves (scale)


def ask(path: str, line: bytes) -> dict[str, Any]:
    """One PAM request on the agent socket ``path``: when, and the reply's fields."""
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        s.sendall(line)
        reply = s.makefile("rb").readline().decode().split()[1:]
        return {"at": time.time(), "reply": dict(f.split("=", 1) for f in reply)}
    except OSError as exc:  # e.g. starved of CPU past the agent's read deadline
        return {"at": time.time(), "reply": {"reason": "client_" + type(exc).__name__}}
    finally:
        s.close()


def waves() -> None:
    lst = listen("0.0.0.0")
    spec = json.loads(sys.stdin.readline())
    pipes = [os.pipe() for _ in range(spec["waves"])]
    done_r, done_w = os.pipe()
    line = pam_line(spec).encode()

    def monitor(conn: socket.socket, peer: tuple[str, int]) -> NoReturn:
        lst.close()
        os.close(done_r)
        for _, w in pipes:
            os.close(w)
        path = spec["socks"][conn.getsockname()[0]]
        out = []
        for r, _ in pipes:
            os.read(r, 1)  # EOF: the wave starts
            out.append(ask(path, line))
            os.write(done_w, b"d")
        with open(os.path.join(spec["out"], f"{os.getpid()}.json"), "w") as f:
            json.dump(out, f)
        os._exit(0)

    kids = fork_monitors(lst, spec["n"], monitor)
    os.close(done_w)
    for r, _ in pipes:
        os.close(r)
    print(json.dumps({"ready": len(kids)}), flush=True)
    for i, (_, w) in enumerate(pipes):
        sys.stdin.readline()
        t0 = time.time()
        os.close(w)
        got = count_bytes(done_r, len(kids))
        print(json.dumps({"wave": i, "go": t0, "answered": got}), flush=True)
    for pid in kids:
        os.waitpid(pid, 0)
    sys.stdin.read()


# --------------------------------------------------------------------------- storm


def storm(host: str, agent_sock: str, out_dir: str, monitor_bin: str) -> None:
    lst = listen(host)
    spec = json.loads(sys.stdin.readline())
    go_r, go_w = os.pipe()
    ready_r, ready_w = os.pipe()
    line = pam_line(spec)

    def monitor(conn: socket.socket, peer: tuple[str, int]) -> NoReturn:
        os.close(go_w)
        os.close(ready_r)
        lst.close()
        os.write(ready_w, b"r")
        os.close(ready_w)
        os.set_inheritable(go_r, True)
        os.set_inheritable(conn.fileno(), True)  # the session connection, held across the exec
        out = os.path.join(out_dir, f"{os.getpid()}.json")
        job = spec["jobs"][str(peer[1])]
        requests, inflight = str(spec["requests"]), str(spec["inflight"])
        argv = [monitor_bin, agent_sock, line, job, requests, inflight, str(go_r), out]
        os.execv(monitor_bin, argv)

    kids = fork_monitors(lst, spec["connections"], monitor)
    os.close(ready_w)
    print(json.dumps({"ready": count_bytes(ready_r, len(kids))}), flush=True)
    sys.stdin.readline()  # "go"
    os.close(go_w)
    for pid in kids:
        os.waitpid(pid, 0)
    print(json.dumps({"done": len(kids)}), flush=True)
    sys.stdin.read()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    sub.add_parser("waves")
    s = sub.add_parser("storm")
    for name in ("host", "agent_socket", "out_dir", "monitor_bin"):
        s.add_argument(name)
    args = ap.parse_args()
    if args.mode == "waves":
        waves()
    else:
        storm(args.host, args.agent_socket, args.out_dir, args.monitor_bin)


if __name__ == "__main__":
    main()
