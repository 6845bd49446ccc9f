"""netinfo against real sockets, processes, users, cgroups and network namespaces (root)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import secrets
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

from callerid.agent.netinfo import (
    Connection,
    NetinfoError,
    ProcessGone,
    ProcReader,
    SessionFinder,
    SocketOwners,
    _sockfd,
    lent_connections,
    read_proc,
)
from callerid.agent.netinfo import _codec as sd
from callerid.agent.netinfo._listeners import HeldListeners
from callerid.agent.netinfo._netlink import SockDiag
from callerid.bus.protocol import Endpoint
from tests.fakes import FakeClock
from tests.support.cgroups import scratch_cgroup2
from tests.support.poll import wait_for

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (other uids, netns, cgroups)"),
]

# A client: optionally waits for "go" on stdin, opens one TCP/UDP socket bound to cfg["bind"],
# connects it (or only sendto()s), optionally forks a sharer, reports, then holds until EOF.
CLIENT = r"""
import json, os, socket, sys
cfg = json.loads(sys.argv[1])
def out(**kw):  # one write(2) per line: forked writers must not interleave
    os.write(1, (json.dumps(kw) + "\n").encode())
if cfg.get("wait_go"):
    out(ready=os.getpid())
    sys.stdin.readline()
fam = socket.AF_INET6 if ":" in cfg["bind"] else socket.AF_INET
kind = socket.SOCK_STREAM if cfg["proto"] == "tcp" else socket.SOCK_DGRAM
s = socket.socket(fam, kind)
s.bind((cfg["bind"], 0))
dest = socket.getaddrinfo(cfg["host"], cfg["port"], fam, kind)[0][4]  # fe80::b%eth0: its scope
if cfg.get("unconnected"):
    s.sendto(b"x", dest)
else:
    s.connect(dest)
if cfg.get("setuid"):  # drop privileges after creating the socket (it stays root's)
    os.setgid(cfg["setuid"][1])
    os.setuid(cfg["setuid"][0])
if cfg.get("fork_sharer") and os.fork() == 0:
    out(sharer=os.getpid())
    sys.stdin.read()
    os._exit(0)
out(pid=os.getpid(), ip=s.getsockname()[0], port=s.getsockname()[1])
sys.stdin.read()
"""

# A server: a TCP listener that accepts one connection, or a bound UDP socket; holds until EOF.
SERVER = r"""
import json, os, socket, sys
cfg = json.loads(sys.argv[1])
fam = socket.AF_INET6 if ":" in cfg["bind"] else socket.AF_INET
kind = socket.SOCK_STREAM if cfg["proto"] == "tcp" else socket.SOCK_DGRAM
s = socket.socket(fam, kind)
s.bind((cfg["bind"], 0))
if cfg["proto"] == "tcp":
    s.listen(4)
os.write(1, (json.dumps({"pid": os.getpid(), "port": s.getsockname()[1]}) + "\n").encode())
if cfg["proto"] == "tcp":
    conn, peer = s.accept()
    os.write(1, (json.dumps({"accepted": list(peer[:2])}) + "\n").encode())
sys.stdin.read()
"""

# An sshd look-alike: listener (LISTEN) accepts n connections, forks a monitor holding them plus
# a decoy outgoing connection, which forks a helper holding no socket at all.
TREE = r"""
import json, os, socket, sys
cfg = json.loads(sys.argv[1])
def out(**kw):  # one write(2) per line: forked writers must not interleave
    os.write(1, (json.dumps(kw) + "\n").encode())
fam = socket.AF_INET6 if ":" in cfg["bind"] else socket.AF_INET
lst = socket.socket(fam, socket.SOCK_STREAM)
if cfg.get("dual"):
    lst.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
lst.bind((cfg["bind"], 0))
lst.listen(8)
out(listener=os.getpid(), port=lst.getsockname()[1])
conns = [lst.accept()[0] for _ in range(cfg["n"])]
if os.fork() == 0:
    lst.close()
    decoy = socket.create_connection(tuple(cfg["decoy"])) if cfg.get("decoy") else None
    if os.fork() == 0:
        for c in conns:
            c.close()
        if decoy is not None:
            decoy.close()
        out(helper=os.getpid())
        sys.stdin.read()
        os._exit(0)
    out(monitor=os.getpid(), decoy=decoy.getsockname()[1] if decoy else None)
    sys.stdin.read()
    os._exit(0)
for c in conns:
    c.close()
sys.stdin.read()
"""


class Child:
    """A child process group we started; reads its JSON lines with a deadline, kills on stop."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)
        self._buf = b""
        self.seen: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _line(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sel.select(left):
                raise AssertionError(f"child {self.pid} said nothing for {timeout}s")
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise AssertionError(f"child {self.pid} exited: {self.proc.wait()}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        msg: dict[str, Any] = json.loads(line)
        self.seen.update(msg)
        return msg

    def expect(self, *keys: str, timeout: float = 10.0) -> dict[str, Any]:
        while not all(k in self.seen for k in keys):
            self._line(timeout)
        return self.seen

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()
        self._sel.close()


@pytest.fixture
def spawn() -> Iterator[Any]:
    children: list[Child] = []

    def start(script: str, cfg: dict[str, Any], prefix: tuple[str, ...] = ()) -> Child:
        child = Child([*prefix, sys.executable, "-c", script, json.dumps(cfg)])
        children.append(child)
        return child

    yield start
    for child in children:
        child.stop()


@pytest.fixture
def throwaway_user() -> Iterator[pwd.struct_passwd]:
    """A fresh system user; request it before `spawn` so its processes die before userdel."""
    name = f"cidni{secrets.token_hex(4)}"
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
    )
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=True, capture_output=True)


def as_user(user: pwd.struct_passwd) -> tuple[str, ...]:
    return ("setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups")


def ep(ip: str, port: int) -> Endpoint:
    return Endpoint(ip, port)


class RecordingProcs(ProcReader):
    """The real /proc reader, recording whose fds were read (all of them, or one)."""

    def __init__(self) -> None:
        super().__init__()
        self.looked: list[int] = []

    def fd_links(self, pid: int) -> Iterator[tuple[str, str]]:
        self.looked.append(pid)
        return super().fd_links(pid)

    def fd_link(self, pid: int, fd: str) -> str | None:
        self.looked.append(pid)
        return super().fd_link(pid, fd)


def owners(**kw: Any) -> SocketOwners:
    return SocketOwners(ProcReader(), **kw)


def sessions(**kw: Any) -> SessionFinder:
    return SessionFinder(ProcReader(), clock=time.monotonic, **kw)


# --------------------------------------------------------------------------- source side


@pytest.mark.parametrize("use_netlink", [True, False], ids=["netlink", "procfs"])
@pytest.mark.parametrize(
    ("proto", "srv_ip", "cli_ip"),
    [
        ("tcp", "127.0.0.2", "127.0.0.3"),
        ("udp", "127.0.0.2", "127.0.0.3"),
        ("tcp", "::1", "::1"),
        ("udp", "::1", "::1"),
    ],
)
def test_socket_owner_finds_the_client(
    spawn: Any, proto: Literal["tcp", "udp"], srv_ip: str, cli_ip: str, use_netlink: bool
) -> None:
    server = spawn(SERVER, {"proto": proto, "bind": srv_ip})
    sport = server.expect("port")["port"]
    client = spawn(CLIENT, {"proto": proto, "bind": cli_ip, "host": srv_ip, "port": sport})
    c = client.expect("pid", "port")
    ni = owners(use_netlink=use_netlink)
    src, dst = ep(cli_ip, c["port"]), ep(srv_ip, sport)
    owner = ni.socket_owner(proto, src, dst)
    assert owner is not None
    assert owner.pid == client.pid != server.pid
    assert owner.uid == 0
    assert owner.comm.startswith("python")
    assert f"socket:[{owner.inode}]" in {
        os.readlink(f"/proc/{client.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{client.pid}/fd")
    }
    if proto == "tcp":  # the accepted end belongs to the server, not to the listener socket
        server.expect("accepted")
        back = ni.socket_owner("tcp", dst, src)
        assert back is not None
        assert back.pid == server.pid
        assert back.inode != owner.inode
    assert ni.socket_owner(proto, ep(cli_ip, c["port"] ^ 1), dst) is None
    assert ni.socket_owner(proto, src, ep(srv_ip, sport ^ 1)) is None


def test_socket_owner_unconnected_udp_sender(spawn: Any) -> None:
    server = spawn(SERVER, {"proto": "udp", "bind": "127.0.0.2"})
    sport = server.expect("port")["port"]
    cfg = {"proto": "udp", "bind": "127.0.0.3", "host": "127.0.0.2", "port": sport}
    client = spawn(CLIENT, {**cfg, "unconnected": True})
    cport = client.expect("port")["port"]
    for use_netlink in (True, False):
        owner = owners(use_netlink=use_netlink).socket_owner(
            "udp", ep("127.0.0.3", cport), ep("127.0.0.2", sport)
        )
        assert owner is not None
        assert owner.pid == client.pid


def test_socket_owner_other_uid_scans_only_that_uid(
    throwaway_user: pwd.struct_passwd, spawn: Any
) -> None:
    server = spawn(SERVER, {"proto": "tcp", "bind": "127.0.0.2"})
    sport = server.expect("port")["port"]
    cfg = {"proto": "tcp", "bind": "127.0.0.3", "host": "127.0.0.2", "port": sport}
    client = spawn(CLIENT, cfg, prefix=as_user(throwaway_user))
    cport = client.expect("port")["port"]
    procs = RecordingProcs()
    ni = SocketOwners(procs, use_cgroups=False)
    owner = ni.socket_owner("tcp", ep("127.0.0.3", cport), ep("127.0.0.2", sport))
    assert owner is not None
    assert owner.pid == client.pid
    assert owner.uid == throwaway_user.pw_uid
    assert list(procs.pids_of_uid(throwaway_user.pw_uid)) == [client.pid]
    assert procs.looked == [client.pid]  # no other process's fds were read


def test_socket_owner_never_scans_beyond_the_candidates(
    throwaway_user: pwd.struct_passwd, spawn: Any
) -> None:
    """The socket is root's but its holder now runs as another uid: not every fd is scanned."""
    server = spawn(SERVER, {"proto": "tcp", "bind": "127.0.0.2"})
    sport = server.expect("port")["port"]
    cfg = {"proto": "tcp", "bind": "127.0.0.3", "host": "127.0.0.2", "port": sport}
    ids = [throwaway_user.pw_uid, throwaway_user.pw_gid]
    client = spawn(CLIENT, {**cfg, "setuid": ids})
    cport = client.expect("port")["port"]
    assert os.stat(f"/proc/{client.pid}").st_uid == throwaway_user.pw_uid
    ni = owners(use_cgroups=False)
    assert ni.socket_owner("tcp", ep("127.0.0.3", cport), ep("127.0.0.2", sport)) is None
    owner = ni.socket_owner("tcp", ep("127.0.0.2", sport), ep("127.0.0.3", cport))
    assert owner is not None and owner.pid == server.pid  # the other end: a root candidate
    assert ni.socket_owner("tcp", ep("127.0.0.2", sport), ep("127.0.0.3", cport), uid=1) is None


def test_socket_owner_prefers_the_parent_over_a_forked_sharer(spawn: Any) -> None:
    server = spawn(SERVER, {"proto": "tcp", "bind": "127.0.0.2"})
    sport = server.expect("port")["port"]
    cfg = {"proto": "tcp", "bind": "127.0.0.3", "host": "127.0.0.2", "port": sport}
    client = spawn(CLIENT, {**cfg, "fork_sharer": True})
    seen = client.expect("pid", "port", "sharer")
    assert seen["sharer"] != client.pid
    owner = owners().socket_owner("tcp", ep("127.0.0.3", seen["port"]), ep("127.0.0.2", sport))
    assert owner is not None
    assert owner.pid == client.pid


@pytest.fixture
def cgroup2_dir() -> Iterator[Path]:
    with scratch_cgroup2("cid-ni") as path:
        yield path


def test_socket_owner_searches_the_sockets_cgroup_first(spawn: Any, cgroup2_dir: Path) -> None:
    server = spawn(SERVER, {"proto": "tcp", "bind": "127.0.0.2"})
    sport = server.expect("port")["port"]
    cfg = {"proto": "tcp", "bind": "127.0.0.3", "host": "127.0.0.2", "port": sport}
    client = spawn(CLIENT, {**cfg, "wait_go": True})
    client.expect("ready")
    (cgroup2_dir / "cgroup.procs").write_text(str(client.pid))
    client.send("go\n")  # the socket is created inside the cgroup: its cgroup id is ours
    cport = client.expect("port")["port"]
    diag = SockDiag()
    try:
        got = diag.lookup(socket.AF_INET, "tcp", ("127.0.0.3", cport), ("127.0.0.2", sport))
    finally:
        diag.close()
    assert got is not None
    assert got.cgroup_id == cgroup2_dir.stat().st_ino
    procs = RecordingProcs()
    owner = SocketOwners(procs).socket_owner("tcp", ep("127.0.0.3", cport), ep("127.0.0.2", sport))
    assert owner is not None
    assert owner.pid == client.pid
    # no other root process was read, except the parent: is it a forked sharer?
    assert procs.looked == [client.pid, os.getpid()]


def test_socket_owner_remembers_sockets_seen_while_searching(spawn: Any, cgroup2_dir: Path) -> None:
    """A fan-out asks for one job's sockets one after another: each process is read once."""
    server = spawn(SERVER, {"proto": "tcp", "bind": "127.0.0.2"})
    sport = server.expect("port")["port"]
    cfg = {"proto": "tcp", "bind": "127.0.0.3", "host": "127.0.0.2", "port": sport}
    clients, ports = [], []
    for _ in range(2):
        client = spawn(CLIENT, {**cfg, "wait_go": True})
        client.expect("ready")
        (cgroup2_dir / "cgroup.procs").write_text(str(client.pid))
        client.send("go\n")
        clients.append(client)
        ports.append(client.expect("port")["port"])
    procs = RecordingProcs()
    ni = SocketOwners(procs)
    first = ni.socket_owner("tcp", ep("127.0.0.3", ports[0]), ep("127.0.0.2", sport))
    assert first is not None and first.pid == clients[0].pid
    assert clients[1].pid in procs.looked  # newest first: the second client was read on the way
    procs.looked.clear()
    second = ni.socket_owner("tcp", ep("127.0.0.3", ports[1]), ep("127.0.0.2", sport))
    assert second is not None and second.pid == clients[1].pid
    # checked from memory (one readlink of the remembered fd), then its parent: not searched
    assert procs.looked == [clients[1].pid, os.getpid()]


def test_netlink_failure_falls_back_and_logs_once(
    spawn: Any, caplog: pytest.LogCaptureFixture
) -> None:
    class BrokenNetlink(SocketOwners):
        def _netlink_socket(self, *args: Any) -> sd.DiagSocket | None:
            raise sd.SockDiagUnavailable("EPERM (test)")

    server = spawn(SERVER, {"proto": "tcp", "bind": "127.0.0.2"})
    sport = server.expect("port")["port"]
    cfg = {"proto": "tcp", "bind": "127.0.0.3", "host": "127.0.0.2", "port": sport}
    client = spawn(CLIENT, cfg)
    cport = client.expect("port")["port"]
    ni = BrokenNetlink(ProcReader())
    with caplog.at_level(logging.WARNING, logger="callerid.agent.netinfo"):
        for _ in range(3):
            owner = ni.socket_owner("tcp", ep("127.0.0.3", cport), ep("127.0.0.2", sport))
            assert owner is not None
            assert owner.pid == client.pid
    assert len([r for r in caplog.records if r.name.startswith("callerid.agent.netinfo")]) == 1


# --------------------------------------------------------------------------- destination side


def _connect(src_ip: str, dst: tuple[str, int]) -> socket.socket:
    fam = socket.AF_INET6 if ":" in src_ip else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.bind((src_ip, 0))
    s.connect(dst)
    return s


@pytest.fixture
def decoy_server() -> Iterator[socket.socket]:
    s = socket.socket()
    s.bind(("127.0.0.4", 0))
    s.listen(4)
    yield s
    s.close()


@pytest.mark.parametrize("use_pidfd", [True, False], ids=["pidfd_getfd", "proc_net"])
def test_session_connection_returns_the_monitor_not_the_decoy(
    spawn: Any, decoy_server: socket.socket, use_pidfd: bool
) -> None:
    tree = spawn(TREE, {"bind": "127.0.0.2", "n": 1, "decoy": decoy_server.getsockname()})
    port = tree.expect("port")["port"]
    client = _connect("127.0.0.3", ("127.0.0.2", port))
    try:
        seen = tree.expect("monitor", "helper", "decoy")
        ni = sessions(use_pidfd=use_pidfd)
        for start in (seen["helper"], seen["monitor"]):
            info, conn = ni.session_connection(start)
            assert info.pid == seen["monitor"] != seen["helper"]
            assert info.ppid == seen["listener"]
            assert conn.proto == "tcp"
            assert conn.state == "ESTABLISHED"
            assert conn.local == ep("127.0.0.2", port)
            assert conn.remote == ep("127.0.0.3", client.getsockname()[1])
            assert conn.local.port != seen["decoy"]
        info, conn = ni.session_connection(seen["helper"], "127.0.0.3")
        assert conn.remote.ip == "127.0.0.3"
        with pytest.raises(NetinfoError, match="no connection"):
            ni.session_connection(seen["helper"], "127.0.0.9")
    finally:
        client.close()


def lent_by(pid: int, remote_port: int) -> tuple[Connection, ...]:
    """What ``pid`` would lend with its request if its one connection from ``remote_port``
    were all it held: its sockets borrowed (pidfd_getfd), read by `lent_connections`."""
    dups = []
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                dups.append(_sockfd._getfd(pidfd, int(name)))
    finally:
        os.close(pidfd)
    return tuple(c for c in lent_connections(dups) if c.remote.port == remote_port)


def test_session_connection_ambiguous_unless_rhost_decides_or_the_socket_is_lent(
    spawn: Any,
) -> None:
    """Two connections in one monitor: ambiguous, unless rhost picks one. With ``lent``, the
    caller's own fds are not walked: what it lent stands for what it holds (here one of the
    two, so not ambiguous: the answer the walk gives when rhost picks it); lending nothing is
    holding nothing."""
    tree = spawn(TREE, {"bind": "127.0.0.2", "n": 2})
    port = tree.expect("port")["port"]
    clients = [_connect(ip, ("127.0.0.2", port)) for ip in ("127.0.0.3", "127.0.0.5")]
    try:
        seen = tree.expect("monitor", "helper")
        ni = sessions()
        with pytest.raises(NetinfoError, match="ambiguous"):
            ni.session_connection(seen["helper"])
        info, conn = ni.session_connection(seen["helper"], "127.0.0.5")
        assert info.pid == seen["monitor"]
        assert conn.remote == ep("127.0.0.5", clients[1].getsockname()[1])
        lent = lent_by(seen["monitor"], clients[1].getsockname()[1])
        assert len(lent) == 1
        assert ni.session_connection(seen["monitor"], None, lent) == (info, conn)
        with pytest.raises(NetinfoError, match="no connection"):
            ni.session_connection(seen["monitor"], None, ())
    finally:
        for c in clients:
            c.close()


def test_session_connection_dual_stack_yields_plain_ipv4(spawn: Any) -> None:
    tree = spawn(TREE, {"bind": "::", "dual": True, "n": 1})
    port = tree.expect("port")["port"]
    client = _connect("127.0.0.3", ("127.0.0.2", port))
    try:
        seen = tree.expect("monitor", "helper")
        ni = sessions()
        info, conn = ni.session_connection(seen["helper"], "::ffff:127.0.0.3")
        assert info.pid == seen["monitor"]
        assert conn.local == ep("127.0.0.2", port)
        assert conn.local.ip == "127.0.0.2"
        assert conn.remote.ip == "127.0.0.3"
        # the same connection from the source side, through the AF_INET6 socket it lives in
        source = owners()
        owner = source.socket_owner("tcp", conn.local, conn.remote)
        assert owner is not None
        assert (owner.pid, owner.inode) == (seen["monitor"], conn.inode)
        mine = source.socket_owner("tcp", conn.remote, conn.local)
        assert mine is not None
        assert mine.pid == os.getpid()
    finally:
        client.close()


def test_session_connection_udp(spawn: Any) -> None:
    """A UDP server forks a monitor holding a socket connected to the peer on the served port."""
    script = r"""
import json, os, socket, sys
srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.2", 0))
port = srv.getsockname()[1]
os.write(1, (json.dumps({"port": port}) + "\n").encode())
data, peer = srv.recvfrom(16)
if os.fork() == 0:
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    c.bind(("127.0.0.2", port))
    c.connect(peer)
    srv.close()
    os.write(1, (json.dumps({"monitor": os.getpid()}) + "\n").encode())
    sys.stdin.read()
    os._exit(0)
sys.stdin.read()
"""
    tree = spawn(script, {})
    port = tree.expect("port")["port"]
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        peer.bind(("127.0.0.3", 0))
        peer.sendto(b"hi", ("127.0.0.2", port))
        seen = tree.expect("monitor")
        info, conn = sessions().session_connection(seen["monitor"], "127.0.0.3")
        assert info.pid == seen["monitor"]
        assert (conn.proto, conn.state) == ("udp", "ESTABLISHED")
        assert conn.local == ep("127.0.0.2", port)
        assert conn.remote == ep("127.0.0.3", peer.getsockname()[1])
    finally:
        peer.close()


def test_session_connection_inside_a_network_namespace(spawn: Any) -> None:
    name = f"cid-ni-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        inside = ("ip", "netns", "exec", name)
        tree = spawn(TREE, {"bind": "127.0.0.2", "n": 1}, prefix=inside)
        port = tree.expect("port")["port"]
        cfg = {"proto": "tcp", "bind": "127.0.0.3", "host": "127.0.0.2", "port": port}
        client = spawn(CLIENT, cfg, prefix=inside)
        cport = client.expect("port")["port"]
        seen = tree.expect("monitor", "helper")
        ni = sessions()
        info, conn = ni.session_connection(seen["helper"])
        assert info.pid == seen["monitor"]
        assert (conn.local, conn.remote) == (ep("127.0.0.2", port), ep("127.0.0.3", cport))
        host_rows = [
            sd.parse_proc_net_line(line) for line in Path("/proc/net/tcp").read_text().splitlines()
        ]
        assert conn.inode not in {r.inode for r in host_rows if r is not None}
        assert owners().socket_owner("tcp", conn.remote, conn.local) is None  # not our netns
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


# --------------------------------------------------------------------------- vanished processes


def test_vanished_pid_is_process_gone() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=10)
    procs = ProcReader()
    with pytest.raises(ProcessGone):
        procs.proc(proc.pid)
    with pytest.raises(ProcessGone):
        list(procs.fd_links(proc.pid))
    with pytest.raises(ProcessGone):
        SessionFinder(procs, clock=time.monotonic).session_connection(proc.pid)
    assert procs.start_time(proc.pid) is None
    assert procs.cgroup_text(proc.pid) is None
    assert procs.owner_uid(proc.pid) is None


def test_the_listener_is_remembered_while_it_lives(spawn: Any) -> None:
    tree = spawn(TREE, {"bind": "127.0.0.2", "n": 1})
    port = tree.expect("port")["port"]
    client = _connect("127.0.0.3", ("127.0.0.2", port))
    try:
        seen = tree.expect("monitor", "helper")
        monitor, listener = seen["monitor"], seen["listener"]
        procs, clock = RecordingProcs(), FakeClock()
        finder = SessionFinder(procs, clock=clock, listener_ttl_s=5.0)
        for _ in range(3):
            assert finder.session_connection(monitor)[0].pid == monitor
            clock.advance(2.0)  # 4 s after it was read, at the third login
        # the monitor's fds are read at every login, its listening parent's only once
        assert procs.looked == [monitor, listener, monitor, monitor]

        procs.looked.clear()
        clock.advance(1.0)  # 5 s: remembered no longer
        assert finder.session_connection(monitor)[0].pid == monitor
        assert procs.looked == [monitor, listener]

        procs.looked.clear()
        fresh = SessionFinder(procs, clock=clock, listener_ttl_s=0.0)  # remembered no time
        for _ in range(2):
            assert fresh.session_connection(monitor)[0].pid == monitor
        assert procs.looked == [monitor, listener] * 2
    finally:
        client.close()


def test_a_held_listener_is_forgotten_once_it_exits() -> None:
    """The pidfd taken before the listener was read says when it has exited (its pid may be
    reused from then on): the entry goes, its pidfd closed; so do older entries past the bound
    and every entry at clear()."""
    procs, clock = ProcReader(), FakeClock()
    held: HeldListeners[str] = HeldListeners(ttl_s=5.0, max_entries=2, clock=clock)
    children = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
    pins = [procs.hold(c.pid) for c in children]
    try:
        held.put(children[0].pid, "first", pins[0])
        assert held.get(children[0].pid) == "first"
        children[0].kill()
        children[0].wait()  # reaped: the pid is free for another process
        assert held.get(children[0].pid) is None
        assert pins[0].fd == -1 and len(held) == 0
        held.put(children[1].pid, "second", pins[1])
        held.put(children[2].pid, "third", pins[2])
        clock.advance(5.0)
        assert held.get(children[1].pid) is None and pins[1].fd == -1  # its time is up
        held.clear()
        assert pins[2].fd == -1 and len(held) == 0
    finally:
        for c in children:
            c.kill()
            c.wait()


def test_inet_fds_keeps_only_tcp_and_udp_sockets() -> None:
    with contextlib.ExitStack() as stack:
        made = {
            "tcp": socket.socket(socket.AF_INET, socket.SOCK_STREAM),
            "tcp6": socket.socket(socket.AF_INET6, socket.SOCK_STREAM),
            "udp": socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
            "unix": socket.socket(socket.AF_UNIX, socket.SOCK_STREAM),
            "unix_dgram": socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM),
            "netlink": socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 0),
        }
        for s in made.values():
            stack.enter_context(s)
        r, w = os.pipe()
        stack.callback(os.close, r)
        stack.callback(os.close, w)
        closed = socket.socket()
        gone = closed.fileno()
        closed.close()
        fds = [s.fileno() for s in made.values()] + [gone]
        kept = _sockfd.inet_fds(f"/proc/{os.getpid()}", fds)
        assert kept == [made[k].fileno() for k in ("tcp", "tcp6", "udp")]


def test_socket_facts_skips_an_fd_that_is_no_longer_a_socket() -> None:
    r, w = os.pipe()  # an fd number the caller thought was a socket
    with socket.socket() as tcp:
        try:
            before = len(os.listdir("/proc/self/fd"))
            facts = _sockfd.socket_facts(os.getpid(), [r, tcp.fileno()])
            assert [f.inode for f in facts] == [os.fstat(tcp.fileno()).st_ino]
            assert len(os.listdir("/proc/self/fd")) == before  # no borrowed fd left open
        finally:
            os.close(r)
            os.close(w)


# --------------------------------------------------------------------------- link-local IPv6

# The source side's question, asked inside a network namespace (sock_diag and /proc/net are
# per namespace): which pid holds local=src, remote=dst?
OWNER_OF = r"""
import json, sys
from callerid.agent.netinfo import ProcReader, SocketOwners
from callerid.bus.protocol import Endpoint
cfg = json.loads(sys.argv[1])
owners = SocketOwners(ProcReader(), use_netlink=cfg["netlink"])
found = owners.socket_owner(cfg["proto"], Endpoint(*cfg["src"]), Endpoint(*cfg["dst"]))
print(json.dumps(found.pid if found else None))
"""


def test_link_local_connection_between_namespaces(spawn: Any) -> None:
    """A TCP connection fe80::a -> fe80::b (each on its eth0): the destination finds it with
    its scope (both ways of reading sockets), the source finds its owner (both ways)."""
    from tests.support.linklocal import LinkLocalPair

    with LinkLocalPair() as pair:
        tree = spawn(TREE, {"bind": "::", "n": 1}, prefix=pair.b.prefix())
        port = tree.expect("port")["port"]
        cfg = {"proto": "tcp", "bind": "::", "host": pair.b.scoped, "port": port}
        client = spawn(CLIENT, cfg, prefix=pair.a.prefix())
        cport = client.expect("port")["port"]
        seen = tree.expect("monitor", "helper")
        for use_pidfd in (True, False):
            info, conn = sessions(use_pidfd=use_pidfd).session_connection(seen["helper"])
            assert info.pid == seen["monitor"]
            assert (conn.local, conn.remote) == (ep("fe80::b", port), ep("fe80::a", cport))
            assert conn.scope == pair.b.ifindex, use_pidfd
            assert conn.remote_host == f"fe80::a%{pair.b.ifindex}"
        for netlink in (True, False):
            ask = {"proto": "tcp", "src": ["fe80::a", cport], "dst": ["fe80::b", port]}
            out = subprocess.run(
                [*pair.a.prefix(), sys.executable, "-c", OWNER_OF,
                 json.dumps({**ask, "netlink": netlink})],
                check=True, capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert json.loads(out.stdout) == client.pid, (netlink, out.stderr)


@pytest.mark.parametrize("size", [0, 100, 8191, 8192, 8193, 20000])
def test_read_proc_one_record_reads_a_file_whole(tmp_path: Path, size: int) -> None:
    """One read for a small single-record file, and still the whole of a longer one."""
    f = tmp_path / "f"
    f.write_bytes(b"x" * size)
    assert read_proc(str(f), one_record=True) == "x" * size
    assert read_proc(str(f)) == "x" * size


def test_read_proc_one_record_matches_the_kernels_stat_and_cgroup() -> None:
    """Of a sleeping child (a running process's stat changes from one read to the next)."""
    child = subprocess.Popen(["sleep", "60"])
    try:
        stat = f"/proc/{child.pid}/stat"
        wait_for(lambda: Path(stat).read_text().rpartition(")")[2].split()[0] == "S", what="sleep")
        for name in ("stat", "cgroup"):
            path = f"/proc/{child.pid}/{name}"
            assert read_proc(path, one_record=True) == Path(path).read_text()
    finally:
        child.kill()
        child.wait()
