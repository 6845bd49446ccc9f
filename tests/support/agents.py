"""Real callerid agents on loopback addresses, and a stand-in sshd, for integration tests.

    with LoopbackAgents(tree_a, tree_b) as agents:     # node "a" on 127.0.0.2, "b" on 127.0.0.3
        sshd = agents.sshd("b")                          # listens on 127.0.0.3
        client = tree_a.spawn_in("42", "step_batch", client_argv(sshd.port), user=alice)
        login = sshd.login(alice.name)                   # the monitor asks b's agent

Each agent is `python -m callerid.agent --config <tmp>/<node>.yaml` in a subprocess, with its
own keypair (addresses in the certificate), a shared authorized-keys directory, its own PAM
socket and the node's job tree. Both agents share a port on their own addresses; the port is
picked at random and the start retried when it is taken (never find-a-port-then-close).

The stand-in sshd is a real process tree shaped like OpenSSH's: a listener (TCP listening
socket, or an unconnected UDP socket) that forks a "monitor" per connection holding the
accepted (TCP) or connected (UDP) socket, which optionally forks a "helper" (as sshd does for
keyboard-interactive PAM) that inherits the socket; the process at the end of that chain sends
the PAM request line to the agent, as pam_callerid.so would (lending the connection with it,
unless ``lend=False``: an older module), and reports the reply.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from callerid.bus.transport import generate_keypair
from tests.support.cgroups import JobTree
from tests.support.poll import wait_for

ADDRESSES = {"a": "127.0.0.2", "b": "127.0.0.3"}

_SSHD = r"""
import json, os, signal, socket, sys
proto, host, agent_sock, helper = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
escape = sys.argv[5]  # "": nothing; else a cgroup.procs the monitor moves itself to before
                      # the session phase (what a misplaced pam_systemd would do)
lend = sys.argv[6] == "1"  # the account request lends the connection, as pam_callerid.so does
kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
lst = socket.socket(socket.AF_INET, kind)
lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
lst.bind((host, 0))
port = lst.getsockname()[1]
if proto == "tcp":
    lst.listen(8)
print(json.dumps({"port": port}), flush=True)
for line in sys.stdin:
    user = line.strip()
    if proto == "tcp":
        conn, peer = lst.accept()
    else:
        data, peer = lst.recvfrom(100)
        conn = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        conn.bind((host, port))
        conn.connect(peer)
    r, w = os.pipe()
    monitor = os.fork()
    if monitor == 0:
        lst.close()
        os.close(r)
        asker = os.fork() if helper else 0
        if asker == 0:
            s = socket.socket(socket.AF_UNIX)
            s.connect(agent_sock)
            line = f"CALLERID/1 op=account user={user} service=sshd rhost={peer[0]} tty=ssh\n"
            data = line.encode()
            sent = socket.send_fds(s, [data], [conn.fileno()]) if lend else 0
            if sent < len(data):  # (an empty send after the agent answered and closed: EPIPE)
                s.sendall(data[sent:])
            reply = s.makefile().readline().strip()
            os.write(w, (json.dumps({"reply": reply, "asker": os.getpid()}) + "\n").encode())
            if helper:
                os._exit(0)
        else:
            os.waitpid(asker, 0)
        if escape:
            with open(escape, "w") as f:
                f.write(str(os.getpid()))
            moved = open(f"/proc/{os.getpid()}/cgroup").read()
            s = socket.socket(socket.AF_UNIX)
            s.connect(agent_sock)
            s.sendall(f"CALLERID/1 op=open_session user={user} service=sshd\n".encode())
            session = s.makefile().readline().strip()
            os.write(w, (json.dumps({"session": session, "moved": moved}) + "\n").encode())
        cgroup = open(f"/proc/{os.getpid()}/cgroup").read()
        os.write(w, (json.dumps({"monitor": os.getpid(), "cgroup": cgroup}) + "\n").encode())
        os.close(w)
        sys.stdin.close()
        while True:
            signal.pause()
    os.close(w)
    conn.close()  # as sshd's listener does: only the monitor holds the connection
    out = b""
    while chunk := os.read(r, 65536):
        out += chunk
    os.close(r)
    result = {}
    for part in out.decode().splitlines():
        result.update(json.loads(part))
    result["conn_pid"] = monitor
    print(json.dumps(result), flush=True)
"""

CLIENT = r"""
import socket, sys
proto, src, host, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
s = socket.socket(socket.AF_INET, kind)
s.bind((src, 0))
s.connect((host, port))
if proto == "udp":
    s.send(b"hello")
print(s.getsockname()[1], flush=True)
sys.stdin.read()
"""


# runs as a test user, who cannot reach a Python under /root (pyenv): use the system one
USER_PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable


def client_argv(proto: str, src: str, host: str, port: int) -> list[str]:
    return [USER_PYTHON, "-c", CLIENT, proto, src, host, str(port)]


def end_client(client: subprocess.Popen[bytes]) -> None:
    """End a client started with `client_argv` (stdin and stdout piped): it exits when its
    stdin closes."""
    if client.stdin is not None:
        client.stdin.close()
    client.wait(timeout=10)
    if client.stdout is not None:
        client.stdout.close()


class FakeSshd:
    def __init__(
        self,
        proto: str,
        host: str,
        agent_socket: Path,
        *,
        helper: bool,
        escape: str = "",
        lend: bool = True,
    ) -> None:
        argv = [proto, host, str(agent_socket), "1" if helper else "0", escape, str(int(lend))]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SSHD, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.port = int(json.loads(self.proc.stdout.readline())["port"])

    def login(self, user: str) -> dict[str, Any]:
        """Accept the next connection, have its monitor (or helper) ask the agent."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(user + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the stand-in sshd died"
        result: dict[str, Any] = json.loads(line)
        fields = dict(f.split("=", 1) for f in result["reply"].split(" ")[1:])
        result["fields"] = fields
        return result

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


class LoopbackAgents:
    def __init__(
        self,
        trees: dict[str, JobTree],
        *,
        policy: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        prefix: list[str] | None = None,
        log_level: str = "info",
    ) -> None:
        self.log_level = log_level
        self.trees = trees
        self.policy = policy or {}
        self.extra = extra or {}
        self.env = env or {}
        self.prefix = prefix or []
        self.dir = Path(tempfile.mkdtemp(prefix="cida-", dir="/tmp"))
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.port = 0
        self._sshds: list[FakeSshd] = []

    def __enter__(self) -> LoopbackAgents:
        try:
            self._keys()
            for _ in range(20):
                self.port = 20000 + secrets.randbelow(40000)
                if self._start_all():
                    return self
            msg = "no free port for the agents after 20 tries"
            raise RuntimeError(msg)
        except BaseException:
            self.close()
            raise

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _keys(self) -> None:
        authorized = self.dir / "authorized"
        authorized.mkdir()
        for node, ip in ADDRESSES.items():
            pub, _ = generate_keypair(self.dir / "keys" / node, node, addresses=[ip])
            shutil.copy(pub, authorized / pub.name)

    def socket(self, node: str) -> Path:
        return self.dir / f"{node}.sock"

    def config(self, node: str) -> Path:
        return self.dir / f"{node}.yaml"

    def write_config(self, node: str, **override: Any) -> Path:
        cg = self.trees[node].backend_config()
        cfg: dict[str, Any] = {
            "node_name": node,
            "listen": [ADDRESSES[node]],
            "port": self.port,
            "keys": {
                "dir": str(self.dir / "keys" / node),
                "authorized": str(self.dir / "authorized"),
            },
            "pam_socket": str(self.socket(node)),
            "pam_timeout_ms": 1500,
            "peer": {"timeout_ms": 500, "unreachable_ttl_s": 0},
            "policy": self.policy,
            "backend": {"cgroup": {"root": str(cg.root), "jobs": cg.jobs, "extern": cg.extern}},
            **self.extra,
            **override,
        }
        self.config(node).write_text(yaml.safe_dump(cfg))
        return self.config(node)

    def start(self, node: str) -> subprocess.Popen[str]:
        self.write_config(node)
        log = open(self.dir / f"{node}.log", "a")  # noqa: SIM115 - owned by the process
        proc = subprocess.Popen(
            [
                *self.prefix,
                sys.executable,
                "-m",
                "callerid.agent",
                "--config",
                str(self.config(node)),
                "--log-level",
                self.log_level,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **self.env},
        )
        log.close()
        self.procs[node] = proc
        return proc

    def log(self, node: str) -> str:
        return (self.dir / f"{node}.log").read_text()

    def _start_all(self) -> bool:
        for node in ADDRESSES:
            self.start(node)
        for node, proc in self.procs.items():
            ready = wait_for(
                lambda p=proc, n=node: p.poll() is not None or unix_listening(self.socket(n)),
                timeout=15,
                what=f"agent {node} ready",
            )
            if proc.poll() is not None:
                if "Address already in use" in self.log(node):
                    self.stop_all()
                    return False
                msg = f"agent {node} exited {proc.returncode}: {self.log(node)}"
                raise RuntimeError(msg)
            assert ready
        return True

    def stop(self, node: str, sig: int = signal.SIGTERM) -> int:
        proc = self.procs.pop(node)
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(timeout=10)

    def stop_all(self) -> None:
        for node in list(self.procs):
            self.stop(node)

    def sshd(
        self,
        node: str,
        proto: str = "tcp",
        *,
        helper: bool = False,
        escape: str = "",
        lend: bool = True,
    ) -> FakeSshd:
        """A stand-in sshd on ``node``'s address (see the module docstring)."""
        sock = self.socket(node)
        sshd = FakeSshd(proto, ADDRESSES[node], sock, helper=helper, escape=escape, lend=lend)
        self._sshds.append(sshd)
        return sshd

    def close(self) -> None:
        for sshd in self._sshds:
            sshd.close()
        self.stop_all()
        shutil.rmtree(self.dir, ignore_errors=True)


def unix_listening(path: Path) -> bool:
    """Whether something accepts connections on the unix stream socket ``path``."""
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True
