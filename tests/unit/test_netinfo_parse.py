"""Parsing in netinfo: /proc/net rows, /proc/<pid>/stat, sock_diag bytes, and choices made on a
fake /proc tree (ProcReader's facts, connection selection, the /proc fallback of socket_owner)."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from callerid.agent.netinfo import (
    Connection,
    NetinfoError,
    ProcessGone,
    ProcReader,
    SessionFinder,
    SocketOwners,
)
from callerid.agent.netinfo import _codec as sd
from callerid.bus.protocol import Endpoint
from tests.fakes import FakeClock

little_endian = pytest.mark.skipif(
    sys.byteorder != "little", reason="/proc/net literals below are little-endian"
)

# Rows copied from this machine's /proc/net/{tcp,tcp6,udp} (trailing columns shortened).
TCP_LISTEN = (
    "   0: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000"
    "     0        0 221 1 000000004392c40c 100 0 0 10 0"
)
TCP_ESTAB = (
    "   2: 0300007F:B261 0100007F:B03F 01 00000000:00000000 00:00000000 00000000"
    "     1000        0 23923 2 00000000564c6814 20 0 0 10 -1"
)
TCP6_MAPPED = (
    "   3: 0000000000000000FFFF00000100007F:B03F 0000000000000000FFFF00000300007F:B261 01"
    " 00000000:00000000 00:00000000 00000000     0        0 23924 1 000000006b20af6d 20 0 0 10 -1"
)
TCP6_LOOP = (
    "   2: 00000000000000000000000001000000:E394 00000000000000000000000001000000:08AE 01"
    " 00000000:00000000 00:00000000 00000000     0        0 23926 2 0000000065478b76 20 0 0 10 -1"
)
UDP_UNCONN = (
    " 8152: 0200007F:14E9 00000000:0000 07 00000000:00000000 00:00000000 00000000"
    "     0        0 23927 2 000000002dd36f01 0"
)
MAPPED_LO = str(ipaddress.IPv6Address("::ffff:127.0.0.1"))  # its spelling varies by Python
HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid"


# --------------------------------------------------------------------------- /proc/net rows


@little_endian
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0100007F:08FB", ("127.0.0.1", 2299)),
        ("00000000:0000", ("0.0.0.0", 0)),
        ("00000000000000000000000001000000:0016", ("::1", 22)),
        ("0000000000000000FFFF00000100007F:B03F", (MAPPED_LO, 45119)),
        ("B80D0120000000000000000001000000:FFFF", ("2001:db8::1", 65535)),
    ],
)
def test_decode_proc_addr(text: str, expected: tuple[str, int]) -> None:
    assert sd.decode_proc_addr(text) == expected


@little_endian
def test_encode_proc_addr_matches_kernel_text() -> None:
    assert sd.encode_proc_addr("127.0.0.1", 2299, v6=False) == "0100007F:08FB"
    assert sd.encode_proc_addr("127.0.0.1", 45119, v6=True) == (
        "0000000000000000FFFF00000100007F:B03F"
    )
    assert sd.encode_proc_addr("::1", 22, v6=True) == "00000000000000000000000001000000:0016"


@given(st.ip_addresses(), st.integers(0, 65535))
def test_proc_addr_round_trip(addr: object, port: int) -> None:
    text = str(addr)
    v6 = ":" in text
    assert sd.decode_proc_addr(sd.encode_proc_addr(text, port, v6=v6)) == (text, port)


def test_decode_proc_addr_rejects_odd_length() -> None:
    with pytest.raises(ValueError, match="bad /proc/net address"):
        sd.decode_proc_addr("0100:0016")


@little_endian
def test_parse_rows() -> None:
    assert sd.parse_proc_net_line(HEADER) is None
    listen = sd.parse_proc_net_line(TCP_LISTEN)
    assert listen == sd.ProcNetRow(("0.0.0.0", 2024), ("0.0.0.0", 0), 10, 0, 221)
    est = sd.parse_proc_net_line(TCP_ESTAB)
    assert est == sd.ProcNetRow(("127.0.0.3", 45665), ("127.0.0.1", 45119), 1, 1000, 23923)
    mapped = sd.parse_proc_net_line(TCP6_MAPPED)
    assert mapped is not None
    assert mapped.local == (MAPPED_LO, 45119)
    assert mapped.inode == 23924
    loop = sd.parse_proc_net_line(TCP6_LOOP)
    assert loop is not None
    assert (loop.local, loop.remote) == (("::1", 58260), ("::1", 2222))
    udp = sd.parse_proc_net_line(UDP_UNCONN)
    assert udp == sd.ProcNetRow(("127.0.0.2", 5353), ("0.0.0.0", 0), 7, 0, 23927)
    assert sd.row_inode(TCP_ESTAB) == 23923
    assert sd.row_inode(HEADER) == -1


def test_parse_row_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="malformed"):
        sd.parse_proc_net_line("   0: 0100007F:0016 0A")


def test_state_names() -> None:
    assert sd.state_name("tcp", 1) == "ESTABLISHED"
    assert sd.state_name("tcp", 10) == "LISTEN"
    assert sd.state_name("udp", 1) == "ESTABLISHED"
    assert sd.state_name("udp", 7) == "UNCONN"
    assert sd.state_name("tcp", 99) == "UNKNOWN(99)"


# --------------------------------------------------------------------------- /proc/<pid>/stat


def stat_line(pid: int, comm: str, ppid: int, ticks: int) -> str:
    rest = ["S", str(ppid), *["0"] * 17, str(ticks), *["0"] * 30]
    return f"{pid} ({comm}) {' '.join(rest)}\n"


@pytest.mark.parametrize("comm", ["sshd", "a b", "x) (y", "((", ") S 1 2", ""])
def test_parse_stat_odd_comm(comm: str) -> None:
    assert sd.parse_stat(stat_line(42, comm, 7, 12345)) == (comm, 7, 12345)


def test_parse_stat_rejects_truncated() -> None:
    with pytest.raises(ValueError, match="malformed"):
        sd.parse_stat("42 (sshd) S 1 2 3")


# --------------------------------------------------------------------------- sock_diag bytes


def nl_msg(kind: int, seq: int, payload: bytes, flags: int = 0) -> bytes:
    head = struct.pack("=IHHII", 16 + len(payload), kind, flags, seq, 0)
    pad = b"\0" * (-(16 + len(payload)) % 4)
    return head + payload + pad


def diag_msg(
    family: int,
    state: int,
    src: str,
    sport: int,
    dst: str,
    dport: int,
    uid: int,
    inode: int,
    cgroup: int | None = None,
) -> bytes:
    def raw(ip: str) -> bytes:
        return socket.inet_pton(family, ip).ljust(16, b"\0")

    body = struct.pack("=BBBB", family, state, 0, 0)
    body += struct.pack("!HH16s16s", sport, dport, raw(src), raw(dst))
    body += struct.pack("=III", 0, 0x1234, 0)
    body += struct.pack("=IIIII", 0, 0, 0, uid, inode)
    if cgroup is not None:
        body += struct.pack("=HH", 4, 5) + struct.pack("=HHQ", 12, 21, cgroup)
    return body


def test_build_request_layout() -> None:
    src = (socket.inet_pton(socket.AF_INET, "127.0.0.3").ljust(16, b"\0"), 40000)
    dst = (socket.inet_pton(socket.AF_INET, "127.0.0.2").ljust(16, b"\0"), 22)
    req = sd.build_request(7, socket.AF_INET, socket.IPPROTO_TCP, src, dst)
    assert len(req) == 16 + 56
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", req)
    assert (length, kind, flags, seq, pid) == (72, 20, 1, 7, 0)  # NLM_F_REQUEST, no DUMP
    family, proto, ext, states = struct.unpack_from("=BBBxI", req, 16)
    assert (family, proto, ext, states) == (2, 6, 0, 0xFFFFFFFF)
    sport, dport = struct.unpack_from("!HH", req, 24)
    assert (sport, dport) == (40000, 22)
    assert req[28:32] == bytes([127, 0, 0, 3])
    assert req[44:48] == bytes([127, 0, 0, 2])
    assert struct.unpack_from("=III", req, 60) == (0, 0xFFFFFFFF, 0xFFFFFFFF)
    dump = sd.build_request(8, socket.AF_INET, socket.IPPROTO_UDP, src, dst, dump=True, states=0)
    assert struct.unpack_from("=H", dump, 6)[0] == 0x301


def test_lookup_request_names_the_remote_end_first_for_udp() -> None:
    """udp_dump_one() reads the id with src and dst swapped: the request says remote first."""
    local, remote = ("127.0.0.3", 40000), ("127.0.0.2", 53)
    tcp = sd.lookup_request(1, socket.AF_INET, "tcp", local, remote)
    udp = sd.lookup_request(1, socket.AF_INET, "udp", local, remote)
    assert struct.unpack_from("!HH", tcp, 24) == (40000, 53)
    assert struct.unpack_from("!HH", udp, 24) == (53, 40000)
    assert (tcp[28:32], udp[28:32]) == (bytes([127, 0, 0, 3]), bytes([127, 0, 0, 2]))
    mapped = sd.lookup_request(1, socket.AF_INET6, "tcp", local, remote)
    assert mapped[28:44] == bytes(10) + b"\xff\xff" + bytes([127, 0, 0, 3])  # IPv4-mapped
    probe = sd.probe_request(2, "udp")
    assert struct.unpack_from("=H", probe, 6)[0] == 0x301  # a dump
    assert struct.unpack_from("=BBBxI", probe, 16) == (socket.AF_INET, socket.IPPROTO_UDP, 0, 0)


def test_best_match_prefers_the_exact_socket_to_an_unconnected_sender() -> None:
    src, dst = Endpoint("127.0.0.3", 5000), Endpoint("127.0.0.2", 53)
    wild = sd.DiagSocket(2, 7, ("0.0.0.0", 5000), ("0.0.0.0", 0), 0, 1, None)
    exact = sd.DiagSocket(2, 1, ("127.0.0.3", 5000), ("127.0.0.2", 53), 0, 2, None)
    other = sd.DiagSocket(2, 1, ("127.0.0.3", 5000), ("127.0.0.9", 53), 0, 3, None)
    assert sd.best_match("udp", [None, wild, exact], src, dst) == exact
    assert sd.best_match("udp", [other, wild], src, dst) == wild
    assert sd.best_match("tcp", [other, wild], src, dst) is None  # no unconnected TCP sender

    def stops_at_exact() -> Iterator[sd.DiagSocket]:
        yield exact
        raise AssertionError("read past the exact socket")

    assert sd.best_match("udp", stops_at_exact(), src, dst) == exact


def test_line_with() -> None:
    text = f"{HEADER}\n{TCP_LISTEN}\n{TCP_ESTAB}"
    assert sd.line_with(text, " 0300007F:B261 ") == TCP_ESTAB
    assert sd.line_with(text, " 00000000:07E8 ") == TCP_LISTEN
    assert sd.line_with(text, "nowhere") is None


def test_parse_reply_v4_with_cgroup() -> None:
    data = nl_msg(20, 5, diag_msg(2, 1, "127.0.0.3", 40000, "127.0.0.2", 22, 1000, 777, 99))
    found, done = sd.parse_replies(data, 5)
    assert not done
    assert found == [sd.DiagSocket(2, 1, ("127.0.0.3", 40000), ("127.0.0.2", 22), 1000, 777, 99)]


def test_parse_reply_v6_without_attributes_and_other_seq_skipped() -> None:
    stale = nl_msg(20, 4, diag_msg(2, 1, "10.0.0.1", 1, "10.0.0.2", 2, 0, 1))
    mine = nl_msg(20, 5, diag_msg(10, 1, "::ffff:127.0.0.1", 5, "::1", 6, 0, 888))
    found, _ = sd.parse_replies(stale + mine, 5)
    assert [(f.local, f.remote, f.inode, f.cgroup_id) for f in found] == [
        ((MAPPED_LO, 5), ("::1", 6), 888, None)
    ]


def test_parse_reply_errors() -> None:
    enoent = nl_msg(2, 3, struct.pack("=i", -errno.ENOENT) + bytes(16))
    with pytest.raises(sd.NetlinkError) as info:
        sd.parse_replies(enoent, 3)
    assert info.value.errno == errno.ENOENT
    ack = nl_msg(2, 3, struct.pack("=i", 0) + bytes(16))
    assert sd.parse_replies(ack, 3) == ([], True)
    assert sd.parse_replies(nl_msg(3, 3, struct.pack("=i", 0)), 3) == ([], True)
    with pytest.raises(sd.SockDiagUnavailable, match="truncated"):
        sd.parse_replies(nl_msg(20, 3, diag_msg(2, 1, "1.1.1.1", 1, "1.1.1.2", 2, 0, 1))[:40], 3)
    with pytest.raises(sd.SockDiagUnavailable, match="short"):
        sd.parse_replies(nl_msg(20, 3, b"\x02\x01" + bytes(30)), 3)
    with pytest.raises(sd.SockDiagUnavailable, match="unexpected"):
        sd.parse_replies(nl_msg(99, 3, b""), 3)


# --------------------------------------------------------------------------- a fake /proc


class FakeProc:
    """A /proc tree on disk: stat, status, fd symlinks, ns/net and per-netns socket tables."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "stat").write_text("cpu  1 2 3\nbtime 1700000000\n")
        (root / "net").mkdir()
        self.tables: dict[str, dict[str, list[str]]] = {}

    def add(
        self, pid: int, ppid: int, comm: str, inodes: tuple[int, ...] = (), ns: str = "A"
    ) -> None:
        d = self.root / str(pid)
        (d / "fd").mkdir(parents=True)
        (d / "ns").mkdir()
        (d / "stat").write_text(stat_line(pid, comm, ppid, 500))
        (d / "status").write_text(f"Name:\t{comm}\nUid:\t0\t0\t0\t0\n")
        (d / "cgroup").write_text("12:cpu,cpuacct:/job_1\n1:name=systemd:/x\n0::/slurm/job_1\n")
        os.symlink("/dev/null", d / "fd" / "0")
        for i, inode in enumerate(inodes, start=3):
            os.symlink(f"socket:[{inode}]", d / "fd" / str(i))
        os.symlink(f"net:[{ns}]", d / "ns" / "net")
        (d / "net").symlink_to(self.root / f"ns-{ns}")
        (self.root / f"ns-{ns}").mkdir(exist_ok=True)
        self.write(ns)

    def sock(
        self,
        ns: str,
        proto: str,
        local: tuple[str, int],
        remote: tuple[str, int],
        state: int,
        inode: int,
    ) -> None:
        v6 = ":" in local[0]
        name = proto + ("6" if v6 else "")
        lo = sd.encode_proc_addr(*local, v6=v6)
        re = sd.encode_proc_addr(*remote, v6=v6)
        row = f"   0: {lo} {re} {state:02X} 00000000:00000000 00:00000000 00000000"
        row += f"  1000  0 {inode} 1 0"
        self.tables.setdefault(ns, {}).setdefault(name, []).append(row)
        self.write(ns)

    def write(self, ns: str) -> None:
        for name in ("tcp", "tcp6", "udp", "udp6"):
            rows = self.tables.get(ns, {}).get(name, [])
            text = "\n".join([HEADER, *rows, ""])
            (self.root / f"ns-{ns}" / name).write_text(text)
            if ns == "A":  # the agent's own namespace, /proc/net
                (self.root / "net" / name).write_text(text)


@pytest.fixture
def fake(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path)


def sshd_tree(fake: FakeProc) -> None:
    """listener 100 (LISTEN :22) -> monitor 200 (conn + decoy) -> helper 300 (no sockets)."""
    fake.add(1, 0, "init")
    fake.add(100, 1, "sshd", (11,))
    fake.add(200, 100, "sshd: alice [priv]", (21, 22))
    fake.add(300, 200, "sshd: alice [pam]")
    fake.sock("A", "tcp", ("0.0.0.0", 22), ("0.0.0.0", 0), 10, 11)
    fake.sock("A", "tcp", ("10.0.0.2", 22), ("10.0.0.1", 40000), 1, 21)
    fake.sock("A", "tcp", ("10.0.0.2", 51000), ("10.0.0.9", 389), 1, 22)  # e.g. an LDAP client


def finder(fake: FakeProc) -> SessionFinder:
    return SessionFinder(ProcReader(fake.root), clock=FakeClock())


def test_proc_reader_facts(fake: FakeProc) -> None:
    sshd_tree(fake)
    procs = ProcReader(fake.root)
    p = procs.proc(300)
    assert (p.pid, p.ppid, p.comm) == (300, 200, "sshd: alice [pam]")
    assert p.start_time == pytest.approx(1_700_000_000 + 500 / os.sysconf("SC_CLK_TCK"))
    assert procs.start_time(300) == p.start_time
    assert procs.owner_uid(300) == os.getuid()
    assert procs.cgroup_text(300) == "12:cpu,cpuacct:/job_1\n1:name=systemd:/x\n0::/slurm/job_1\n"
    assert sorted(procs.fd_links(200)) == [
        ("0", "/dev/null"),
        ("3", "socket:[21]"),
        ("4", "socket:[22]"),
    ]
    assert procs.fd_link(200, "3") == "socket:[21]"
    assert procs.fd_link(200, "7") is None
    assert procs.netns(200) == "net:[A]"
    for pid in (999, 0):
        with pytest.raises(ProcessGone):
            procs.proc(pid)
    assert procs.start_time(999) is None
    assert procs.cgroup_text(999) is None
    with pytest.raises(ProcessGone):
        list(procs.fd_links(999))


def test_session_connection_picks_the_monitor_and_not_the_decoy(fake: FakeProc) -> None:
    sshd_tree(fake)
    ni = finder(fake)
    for start in (300, 200):  # keyboard-interactive helper, or publickey in the monitor itself
        info, conn = ni.session_connection(start)
        assert info.pid == 200
        assert conn == Connection(
            "tcp", Endpoint("10.0.0.2", 22), Endpoint("10.0.0.1", 40000), 21, 1000, "ESTABLISHED"
        )
    assert ni.session_connection(300, "10.0.0.1")[1].inode == 21
    assert ni.session_connection(300, "sshclient.example")[1].inode == 21  # a name: no filter
    with pytest.raises(NetinfoError, match=r"no connection from 10\.0\.0\.7"):
        ni.session_connection(300, "10.0.0.7")
    with pytest.raises(ProcessGone):
        ni.session_connection(4242)


def test_session_connection_climbs_from_a_helper_that_inherited_the_socket(
    fake: FakeProc,
) -> None:
    """sshd's forked keyboard-interactive PAM helper holds the monitor's socket too."""
    fake.add(1, 0, "init")
    fake.add(100, 1, "sshd", (11,))
    fake.add(200, 100, "sshd: alice [priv]", (21,))
    fake.add(300, 200, "sshd: alice [pam]", (21,))
    fake.sock("A", "tcp", ("0.0.0.0", 22), ("0.0.0.0", 0), 10, 11)
    fake.sock("A", "tcp", ("10.0.0.2", 22), ("10.0.0.1", 40000), 1, 21)
    info, conn = finder(fake).session_connection(300)
    assert (info.pid, conn.inode) == (200, 21)


def test_session_connection_ambiguous_then_rhost_decides(fake: FakeProc) -> None:
    sshd_tree(fake)
    (fake.root / "200" / "fd" / "9").symlink_to("socket:[23]")
    fake.sock("A", "tcp", ("10.0.0.2", 22), ("10.0.0.5", 41000), 1, 23)
    ni = finder(fake)
    with pytest.raises(NetinfoError, match="ambiguous: pid 200 holds 2"):
        ni.session_connection(300)
    assert ni.session_connection(300, "10.0.0.5")[1].inode == 23


def test_session_connection_ipv4_mapped_and_socket_activation(fake: FakeProc) -> None:
    """pid 1 holds the listener (systemd Accept=yes); a dual-stack socket yields plain IPv4."""
    fake.add(1, 0, "systemd", (11,))
    fake.add(500, 1, "sshd", (51,))
    fake.sock("A", "tcp", ("::", 22), ("::", 0), 10, 11)
    fake.sock("A", "tcp", ("::ffff:10.0.0.2", 22), ("::ffff:10.0.0.1", 40000), 1, 51)
    info, conn = finder(fake).session_connection(500, "::ffff:10.0.0.1")
    assert info.pid == 500
    assert (conn.local, conn.remote) == (Endpoint("10.0.0.2", 22), Endpoint("10.0.0.1", 40000))
    assert conn.local.ip == "10.0.0.2"


def test_session_connection_reads_each_process_namespace(fake: FakeProc) -> None:
    """The monitor's socket exists only in its own namespace's tables."""
    fake.add(1, 0, "init")
    fake.add(100, 1, "sshd", (11,), ns="B")
    fake.add(200, 100, "sshd", (21,), ns="B")
    fake.sock("B", "udp", ("0.0.0.0", 60001), ("0.0.0.0", 0), 7, 11)
    fake.sock("B", "udp", ("192.168.1.2", 60001), ("192.168.1.1", 5000), 1, 21)
    assert "60001" not in (fake.root / "net" / "udp").read_text()  # not in the agent's ns
    info, conn = finder(fake).session_connection(200)
    assert (info.pid, conn.proto, conn.state, conn.inode) == (200, "udp", "ESTABLISHED", 21)


def test_session_connection_ignores_connections_no_ancestor_listens_for(fake: FakeProc) -> None:
    fake.add(1, 0, "init")
    fake.add(100, 1, "bash")
    fake.add(200, 100, "ssh", (21,))
    fake.sock("A", "tcp", ("10.0.0.2", 40000), ("10.0.0.1", 22), 1, 21)
    with pytest.raises(NetinfoError, match="no connection"):
        finder(fake).session_connection(200)


def test_socket_owner_from_proc_tables(fake: FakeProc) -> None:
    """Fallback path: /proc/net row -> inode -> the topmost holder among the uid's processes."""
    fake.add(1, 0, "init")
    fake.add(700, 1, "ssh", (71,))
    fake.add(701, 700, "ssh-fork", (71,))  # a forked sharer of the same socket
    fake.add(702, 1, "other", (72,))
    for pid in (700, 701, 702):
        os.chown(fake.root / str(pid), 1000, -1)  # the socket uid: candidates
    fake.sock("A", "tcp", ("127.0.0.3", 40000), ("127.0.0.2", 22), 1, 71)
    fake.sock("A", "tcp", ("127.0.0.2", 22), ("127.0.0.3", 40000), 1, 72)
    ni = SocketOwners(ProcReader(fake.root), use_netlink=False)
    owner = ni.socket_owner("tcp", Endpoint("127.0.0.3", 40000), Endpoint("127.0.0.2", 22))
    assert owner is not None
    assert (owner.pid, owner.inode, owner.uid, owner.comm) == (700, 71, 1000, "ssh")
    back = ni.socket_owner("tcp", Endpoint("127.0.0.2", 22), Endpoint("127.0.0.3", 40000))
    assert back is not None
    assert back.pid == 702
    assert ni.socket_owner("tcp", Endpoint("127.0.0.3", 40001), Endpoint("127.0.0.2", 22)) is None
    assert ni.socket_owner("udp", Endpoint("127.0.0.3", 40000), Endpoint("127.0.0.2", 22)) is None


def test_socket_owner_ipv4_in_tcp6_and_unconnected_udp(fake: FakeProc) -> None:
    fake.add(1, 0, "init")
    fake.add(800, 1, "dual", (81,))
    fake.add(801, 1, "sender", (82,))
    fake.sock("A", "tcp", ("::ffff:127.0.0.3", 40000), ("::ffff:127.0.0.2", 22), 1, 81)
    fake.sock("A", "udp", ("0.0.0.0", 5000), ("0.0.0.0", 0), 7, 82)
    os.chown(fake.root / "800", 1000, -1)  # only the sockets' owners' processes are candidates
    os.chown(fake.root / "801", 1000, -1)
    ni = SocketOwners(ProcReader(fake.root), use_netlink=False)
    owner = ni.socket_owner("tcp", Endpoint("127.0.0.3", 40000), Endpoint("127.0.0.2", 22))
    assert owner is not None
    assert owner.pid == 800
    sender = ni.socket_owner("udp", Endpoint("127.0.0.3", 5000), Endpoint("127.0.0.2", 53))
    assert sender is not None
    assert sender.pid == 801
    assert ni.socket_owner("tcp", Endpoint("127.0.0.3", 5000), Endpoint("127.0.0.2", 53)) is None


def test_pids_of_uid_newest_first(fake: FakeProc) -> None:
    fake.add(1, 0, "init")
    for pid in (10, 11, 12):
        fake.add(pid, 1, "a")
    os.chown(fake.root / "11", 4321, -1)
    os.chown(fake.root / "12", 4321, -1)
    procs = ProcReader(fake.root)
    assert list(procs.pids_of_uid(4321)) == [12, 11]
    assert list(procs.pids_of_uid(4321, skip={12})) == [11]
    assert 10 in procs.pids_of_uid(os.getuid())


class RecordingProcs(ProcReader):
    """A ProcReader that records whose fds were listed, and whose one fd was read."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.listed: list[int] = []
        self.read_one: list[int] = []

    def fd_links(self, pid: int) -> Iterator[tuple[str, str]]:
        self.listed.append(pid)
        return super().fd_links(pid)

    def fd_link(self, pid: int, fd: str) -> str | None:
        self.read_one.append(pid)
        return super().fd_link(pid, fd)


def test_socket_owner_remembers_the_sockets_seen_while_searching(fake: FakeProc) -> None:
    fake.add(1, 0, "init")
    fake.add(700, 1, "ssh", (71,))
    fake.add(702, 1, "other", (72,))
    for pid in (700, 702):
        os.chown(fake.root / str(pid), 1000, -1)
    fake.sock("A", "tcp", ("127.0.0.3", 40000), ("127.0.0.2", 22), 1, 71)
    fake.sock("A", "tcp", ("127.0.0.2", 22), ("127.0.0.3", 40000), 1, 72)
    procs = RecordingProcs(fake.root)
    ni = SocketOwners(procs, use_netlink=False)
    owner = ni.socket_owner("tcp", Endpoint("127.0.0.3", 40000), Endpoint("127.0.0.2", 22))
    assert owner is not None and owner.pid == 700
    assert procs.listed == [702, 700]  # newest first: 702's socket 72 was seen on the way
    procs.listed.clear()
    back = ni.socket_owner("tcp", Endpoint("127.0.0.2", 22), Endpoint("127.0.0.3", 40000))
    assert back is not None and back.pid == 702
    assert (procs.listed, procs.read_one) == ([], [702])  # from memory: one readlink
    (fake.root / "702" / "fd" / "3").unlink()  # closed: the memory is checked, then searched
    assert ni.socket_owner("tcp", Endpoint("127.0.0.2", 22), Endpoint("127.0.0.3", 40000)) is None
    assert procs.listed == [702, 700]


def test_socket_owner_remembers_at_most_max_holders(fake: FakeProc) -> None:
    fake.add(1, 0, "init")
    fake.add(700, 1, "ssh", (71, 73))
    fake.add(702, 1, "other", (72,))
    for pid in (700, 702):
        os.chown(fake.root / str(pid), 1000, -1)
    fake.sock("A", "tcp", ("127.0.0.3", 40000), ("127.0.0.2", 22), 1, 71)
    fake.sock("A", "tcp", ("127.0.0.2", 22), ("127.0.0.3", 40000), 1, 72)
    procs = RecordingProcs(fake.root)
    ni = SocketOwners(procs, use_netlink=False, max_holders=2)
    assert ni.socket_owner("tcp", Endpoint("127.0.0.3", 40000), Endpoint("127.0.0.2", 22))
    procs.listed.clear()  # 72 seen first, then 71 and 73: 72 was forgotten
    assert ni.socket_owner("tcp", Endpoint("127.0.0.2", 22), Endpoint("127.0.0.3", 40000))
    assert procs.listed == [702]
