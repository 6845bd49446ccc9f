"""Keys on disk (keygen, certificates, the peer table) and `calleridctl keygen|ping`."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import zmq.auth

from callerid.agent import ctl
from callerid.bus.peers import Peer, PeerTable, parse_certificate
from callerid.bus.protocol import CallerIdQuery, CallerIdReply
from callerid.bus.transport import (
    KeyPair,
    MeshServer,
    PeerIdentity,
    generate_keypair,
    load_keypair,
)

B_IP = "127.0.0.2"


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


# --------------------------------------------------------------------------- key files


def test_generated_keys_are_zmq_certificates_with_metadata(tmp_path: Path) -> None:
    keydir = tmp_path / "new" / "keys"
    public, secret = generate_keypair(keydir, "node1", addresses=["10.0.0.1", "::ffff:10.0.0.2"])
    assert (public, secret) == (keydir / "node1.key", keydir / "node1.key_secret")
    assert mode(secret) == 0o600
    assert mode(public) == 0o644
    assert mode(keydir) == 0o700
    zpub, zsec = zmq.auth.load_certificate(secret)
    assert zmq.auth.load_certificate(public) == (zpub, None)
    assert zmq.curve_public(zsec) == zpub  # a real keypair
    kp = load_keypair(keydir, "node1")
    assert (kp.public, kp.secret, kp.name) == (zpub, zsec, "node1")
    assert kp.addresses == ("10.0.0.1", "10.0.0.2")
    assert zsec.decode() not in repr(kp)
    cert = parse_certificate(public.read_text())
    assert (cert.name, cert.addresses, cert.secret_key) == ("node1", ("10.0.0.1", "10.0.0.2"), None)


def test_generate_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    _public, secret = generate_keypair(tmp_path, "n1")
    before = secret.read_bytes()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        generate_keypair(tmp_path, "n1")
    assert secret.read_bytes() == before
    generate_keypair(tmp_path, "n1", force=True)
    assert secret.read_bytes() != before
    assert mode(secret) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n1.key", "n1.key_secret"]


@pytest.mark.parametrize(
    ("name", "addresses"), [("../evil", ()), ("", ()), ("a b", ()), ("n1", ("not-an-ip",))]
)
def test_generate_rejects_bad_names_and_addresses(
    tmp_path: Path, name: str, addresses: tuple[str, ...]
) -> None:
    with pytest.raises(ValueError, match=r"."):
        generate_keypair(tmp_path / "k", name, addresses=addresses)
    assert not (tmp_path / "k").exists()
    assert not (tmp_path / "evil.key").exists()


def test_pyzmq_certificates_are_accepted(tmp_path: Path) -> None:
    zmq.auth.create_certificates(tmp_path, "legacy")
    kp = load_keypair(tmp_path, "legacy")
    assert zmq.curve_public(kp.secret) == kp.public
    (tmp_path / "legacy.key_secret").unlink()
    table = PeerTable.load(tmp_path, resolve=False)
    assert [(p.node, p.public_key) for p in table] == [("legacy", kp.public_text)]


# --------------------------------------------------------------------------- the peer table


def test_peer_table_maps_addresses_and_keys(tmp_path: Path) -> None:
    for name, addrs in (("n1", ["10.0.0.1", "fd00::1"]), ("n2", ["::ffff:10.0.0.2"]), ("n3", [])):
        generate_keypair(tmp_path / "keys", name, addresses=addrs)
    auth = tmp_path / "authorized"
    auth.mkdir()
    for pub in (tmp_path / "keys").glob("*.key"):
        shutil.copy(pub, auth)
    (auth / "garbage.key").write_text("not a certificate\n")
    (auth / "badkey.key").write_text('curve\n    public-key = "tooshort"\n')
    (auth / "-badname.key").write_text((auth / "n3.key").read_text().replace('"n3"', '""'))
    shutil.copy(tmp_path / "keys" / "n1.key_secret", auth)  # never read as a peer

    table = PeerTable.load(auth, resolve=False)
    assert sorted(p.node for p in table) == ["n1", "n2", "n3"]
    n1 = table.by_address("10.0.0.1")
    assert n1 is not None
    assert n1.node == "n1"
    assert table.by_address("FD00:0::1") is n1
    assert table.by_address("::ffff:10.0.0.1") is n1
    n2 = table.by_address("10.0.0.2")
    assert n2 is not None
    assert n2.node == "n2"
    assert table.by_address("10.0.0.3") is None
    assert table.by_address("not an ip") is None
    assert table.by_key(n1.public_key) is n1
    assert table.by_key(n1.public_key.encode()) is n1
    assert table.keys() == {p.public_key for p in table}


def test_peer_table_resolves_only_names_without_explicit_addresses(
    tmp_path: Path,
) -> None:
    generate_keypair(tmp_path, "alpha", addresses=["10.0.0.9"])
    generate_keypair(tmp_path, "beta")
    names = {"alpha": ["10.0.0.1"], "beta": ["10.0.0.9", "::ffff:10.0.0.2"]}
    asked: list[str] = []

    def resolver(name: str) -> list[str]:
        asked.append(name)
        return names.get(name, [])

    table = PeerTable.load(tmp_path, resolver=resolver)
    assert asked == ["beta"]  # alpha's key file names its address: no DNS for it
    assert {ip: p.node for ip, p in ((ip, table.by_address(ip)) for ip in names["beta"]) if p} == {
        "10.0.0.9": "alpha",
        "::ffff:10.0.0.2": "beta",
    }
    assert table.addresses() == {"10.0.0.9": "alpha", "10.0.0.2": "beta"}
    assert PeerTable.load(tmp_path, resolve=False).addresses() == {"10.0.0.9": "alpha"}


def test_peer_table_resolves_real_names(tmp_path: Path) -> None:
    generate_keypair(tmp_path, "localhost")
    peer = PeerTable.load(tmp_path).by_address("127.0.0.1")
    assert peer is not None
    assert peer.node == "localhost"


def test_peer_table_first_holder_of_a_key_or_address_wins() -> None:
    key1, key2 = "a" * 40, "b" * 40
    table = PeerTable(
        [
            Peer("n1", key1, ("10.0.0.1",)),
            Peer("n1-copy", key1, ("10.0.0.5",)),
            Peer("n2", key2, ("10.0.0.1", "10.0.0.2")),
        ]
    )
    assert len(table) == 2
    assert table.addresses() == {"10.0.0.1": "n1", "10.0.0.2": "n2"}


def test_missing_authorized_dir_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        PeerTable.load(tmp_path / "nope")


# --------------------------------------------------------------------------- calleridctl keygen


def test_keygen_writes_a_keypair(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--config", str(tmp_path / "missing.yaml"), "keygen", "--dir", str(tmp_path / "k")]
    rc = ctl.main([*argv, "--name", "n1", "--address", "10.0.0.1", "--address", "::1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "k" / "n1.key") in out
    assert str(tmp_path / "k" / "n1.key_secret") in out
    assert mode(tmp_path / "k" / "n1.key_secret") == 0o600
    assert load_keypair(tmp_path / "k", "n1").addresses == ("10.0.0.1", "::1")

    before = (tmp_path / "k" / "n1.key_secret").read_bytes()
    assert ctl.main([*argv, "--name", "n1"]) == 1
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "k" / "n1.key_secret").read_bytes() == before
    assert ctl.main([*argv, "--name", "n1", "--force"]) == 0
    assert (tmp_path / "k" / "n1.key_secret").read_bytes() != before


def test_keygen_defaults_come_from_the_config(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"node_name: cfgnode\nkeys:\n  dir: {tmp_path / 'etc-keys'}\n")
    assert ctl.main(["--config", str(cfg), "keygen"]) == 0
    assert load_keypair(tmp_path / "etc-keys", "cfgnode").name == "cfgnode"
    cfg.write_text(f"keys:\n  dir: {tmp_path / 'k2'}\n")
    assert ctl.main(["--config", str(cfg), "keygen"]) == 0
    host = socket.gethostname().split(".")[0]
    assert (tmp_path / "k2" / f"{host}.key_secret").exists()


@pytest.mark.parametrize("args", [["--name", "../x"], ["--name", "n", "--address", "nope"]])
def test_keygen_errors_exit_1(
    tmp_path: Path, args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    rc = ctl.main(
        ["--config", str(tmp_path / "none.yaml"), "keygen", "--dir", str(tmp_path), *args]
    )
    assert rc == 1
    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr().err.startswith("calleridctl: ")


@pytest.mark.parametrize("argv", [["ping"], ["bogus"], [], ["ping", "h", "--timeout-ms", "x"]])
def test_usage_errors_exit_1_not_a_ping_code(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        ctl.main(argv)
    assert exc.value.code == 1


def test_help_documents_the_exit_codes() -> None:
    out = ctl.build_parser().format_help()
    assert "2  ping, whois: nothing listens" in out
    for code in ("3  ping", "4  ping", "5  ping"):
        assert code in out


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("10.0.0.1", ("10.0.0.1", 6820)),
        ("10.0.0.1:99", ("10.0.0.1", 99)),
        ("[::1]:6821", ("::1", 6821)),
        ("[::1]", ("::1", 6820)),
        ("::1", ("::1", 6820)),
        ("node2", ("node2", 6820)),
        ("node2:7", ("node2", 7)),
    ],
)
def test_parse_target(text: str, expect: tuple[str, int]) -> None:
    assert ctl.parse_target(text, 6820) == expect


@pytest.mark.parametrize("text", ["[::1", "[::1]x", "10.0.0.1:0", "10.0.0.1:x", ":22", "a:70000"])
def test_parse_target_rejects(text: str) -> None:
    with pytest.raises(ctl.CtlError):
        ctl.parse_target(text, 6820)


# --------------------------------------------------------------------------- calleridctl ping


class ServerThread:
    """A MeshServer on its own event loop in a thread, so the CLI under test can be a process."""

    def __init__(self, keypair: KeyPair, authorized: Path, *addresses: str) -> None:
        self.keypair, self.authorized, self.addresses = keypair, authorized, addresses
        self.ports: list[int] = []
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()

        async def handler(query: CallerIdQuery, peer: PeerIdentity) -> CallerIdReply:
            return CallerIdReply(id=query.id, status="not_found", node=self.keypair.name)

        srv = MeshServer(
            self.keypair, handler, authorized_dir=self.authorized, addresses=self.addresses,
            port=0, resolve=False,
        )  # fmt: skip
        try:
            async with srv:
                self.ports = [int(ep.rsplit(":", 1)[1]) for ep in srv.endpoints]
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        assert self._ready.wait(10), "server thread did not start"
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        assert not self._thread.is_alive()


@pytest.fixture
def mesh(tmp_path: Path) -> dict[str, Any]:
    """Node A (the CLI) with its config; node B authorized and known at B_IP and ::1."""
    auth = tmp_path / "authorized"
    auth.mkdir()
    for name, addrs in (("nodeA", []), ("nodeB", [B_IP, "::1"])):
        pub, _ = generate_keypair(tmp_path / name, name, addresses=addrs)
        shutil.copy(pub, auth)
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        f"node_name: nodeA\nkeys:\n  dir: {tmp_path / 'nodeA'}\n  authorized: {auth}\n"
        "peer:\n  timeout_ms: 1500\n"
    )
    return {
        "root": tmp_path,
        "auth": auth,
        "cfg": cfg,
        "b": load_keypair(tmp_path / "nodeB", "nodeB"),
    }


def calleridctl(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "callerid.agent.ctl", "--config", str(cfg), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_ping_prints_the_peer_node_and_rtt(mesh: dict[str, Any]) -> None:
    with ServerThread(mesh["b"], mesh["auth"], B_IP) as srv:
        proc = calleridctl(mesh["cfg"], "ping", f"{B_IP}:{srv.ports[0]}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"pong from nodeB at {B_IP}:{srv.ports[0]}: ")
    assert proc.stdout.rstrip().endswith(" ms")


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback (::1) on this host")
def test_ping_ipv6_bracket_syntax(mesh: dict[str, Any]) -> None:
    with ServerThread(mesh["b"], mesh["auth"], "::1") as srv:
        proc = calleridctl(mesh["cfg"], "ping", f"[::1]:{srv.ports[0]}")
    assert proc.returncode == 0, proc.stderr
    assert "pong from nodeB at [::1]:" in proc.stdout


def test_ping_unreachable_exits_2(mesh: dict[str, Any]) -> None:
    with socket.socket() as s:
        s.bind((B_IP, 0))  # bound, not listening: connections are refused
        proc = calleridctl(mesh["cfg"], "ping", f"{B_IP}:{s.getsockname()[1]}")
    assert proc.returncode == 2, proc.stderr
    assert "unreachable" in proc.stderr


def test_ping_refused_key_exits_3(mesh: dict[str, Any]) -> None:
    only_b = mesh["root"] / "only-b"
    only_b.mkdir()
    shutil.copy(mesh["auth"] / "nodeB.key", only_b)  # B does not know A's key
    with ServerThread(mesh["b"], only_b, B_IP) as srv:
        proc = calleridctl(mesh["cfg"], "ping", f"{B_IP}:{srv.ports[0]}")
    assert proc.returncode == 3, proc.stderr
    assert "auth_failed" in proc.stderr


def test_ping_silent_peer_exits_4_at_the_deadline(mesh: dict[str, Any]) -> None:
    with socket.socket() as hole:
        hole.bind((B_IP, 0))
        hole.listen(4)
        proc = calleridctl(
            mesh["cfg"], "ping", f"{B_IP}:{hole.getsockname()[1]}", "--timeout-ms", "200"
        )
    assert proc.returncode == 4, proc.stderr
    assert "no answer within 200 ms" in proc.stderr


def test_ping_unknown_peer_exits_5(mesh: dict[str, Any]) -> None:
    proc = calleridctl(mesh["cfg"], "ping", "127.0.0.77")
    assert proc.returncode == 5, proc.stderr
    assert "unknown_peer" in proc.stderr


def test_ping_without_config_or_keys_exits_1(mesh: dict[str, Any]) -> None:
    proc = calleridctl(mesh["root"] / "missing.yaml", "ping", B_IP)
    assert proc.returncode == 1
    assert "missing.yaml" in proc.stderr
    (mesh["root"] / "nodeA" / "nodeA.key_secret").unlink()
    proc = calleridctl(mesh["cfg"], "ping", B_IP)
    assert proc.returncode == 1
    assert "nodeA.key_secret" in proc.stderr
    assert "Traceback" not in proc.stderr
