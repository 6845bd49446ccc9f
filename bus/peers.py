"""The mesh table: which node (and which CURVE public key) answers at which address.

Built from the authorized-keys directory (``keys.authorized``): one zmq public certificate
(``<node>.key``) per node allowed in the mesh. A certificate is ZPL text::

    metadata
        name = "node1"
        addresses = "10.0.0.1 fd00::1"
    curve
        public-key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"

Each address listed in ``addresses`` maps to that node; with ``resolve`` the addresses the
node name resolves to (``socket.getaddrinfo``) are added too, without overriding an explicit
one. The table is built at start and on reload, never per query, and is immutable: a reload
builds a new table. No zmq here: the certificate format is parsed by hand.
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from callerid.bus.protocol import MAX_NAME_LEN, normalize_ip, split_zone

__all__ = [
    "Certificate",
    "Peer",
    "PeerTable",
    "check_node_name",
    "local_node_name",
    "parse_certificate",
    "resolve_name",
]

log = logging.getLogger(__name__)

Z85_KEY_LEN: Final = 40
MAX_CERT_SIZE: Final = 16 * 1024  # a certificate is ~400 bytes; bound what we read
_NODE_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_Z85_RE: Final = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")

Resolver = Callable[[str], Iterable[str]]


def check_node_name(name: str) -> str:
    """Return ``name`` if it is a valid node name (also safe as a file name), else ValueError."""
    if not isinstance(name, str) or len(name) > MAX_NAME_LEN or not _NODE_RE.fullmatch(name):
        msg = f"invalid node name {name!r}: use letters, digits, '_', '.', '-' (max {MAX_NAME_LEN})"
        raise ValueError(msg)
    return name


def local_node_name(configured: str | None) -> str:
    """This node's name: the configured one, else the short host name."""
    return check_node_name(configured or socket.gethostname().split(".", 1)[0])


def check_z85_key(key: str) -> str:
    """Return ``key`` if it is a 40-character Z85 CURVE key, else ValueError."""
    if not isinstance(key, str) or not _Z85_RE.fullmatch(key):
        msg = "not a 40-character Z85 CURVE key"
        raise ValueError(msg)
    return key


@dataclass(frozen=True, slots=True)
class Certificate:
    """The fields of one zmq certificate file that we use."""

    public_key: str
    secret_key: str | None = field(default=None, repr=False)
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str | None:
        return self.metadata.get("name")

    @property
    def addresses(self) -> tuple[str, ...]:
        """The ``addresses`` metadata as canonical IP literals; invalid entries raise ValueError."""
        return tuple(normalize_ip(a) for a in self.metadata.get("addresses", "").split())


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def parse_certificate(text: str) -> Certificate:
    """Parse zmq certificate text (the ZPL subset zmq writes); ValueError if unusable."""
    section = ""
    values: dict[str, dict[str, str]] = {"metadata": {}, "curve": {}}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not raw[0].isspace():
            section = line
            continue
        key, sep, value = line.partition("=")
        if sep and section in values:
            values[section][key.strip()] = _unquote(value)
    curve = values["curve"]
    if "public-key" not in curve:
        msg = "no curve public-key"
        raise ValueError(msg)
    public = check_z85_key(curve["public-key"])
    secret = curve.get("secret-key")
    if secret is not None:
        check_z85_key(secret)
    return Certificate(public_key=public, secret_key=secret, metadata=values["metadata"])


def resolve_name(name: str) -> list[str]:
    """Addresses ``name`` resolves to (canonical IP literals); [] when it does not resolve."""
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as exc:
        log.debug("peer name %s does not resolve: %s", name, exc)
        return []
    found: list[str] = []
    for info in infos:
        try:
            ip = normalize_ip(str(info[4][0]))
        except ValueError:
            continue
        if ip not in found:
            found.append(ip)
    return found


@dataclass(frozen=True, slots=True)
class Peer:
    """One node of the mesh: its name, its CURVE public key (Z85) and its addresses."""

    node: str
    public_key: str
    addresses: tuple[str, ...] = ()
    resolved: tuple[str, ...] = ()
    source: Path | None = None


class PeerTable:
    """Immutable lookups address -> Peer and public key -> Peer."""

    def __init__(self, peers: Iterable[Peer] = ()) -> None:
        self._peers = tuple(peers)
        self._by_key: dict[str, Peer] = {}
        self._by_address: dict[str, Peer] = {}
        for peer in self._peers:
            first = self._by_key.setdefault(peer.public_key, peer)
            if first is not peer:
                log.warning("peer %s has the same key as %s: ignored", peer.node, first.node)
        for peer in self._peers:  # explicit addresses first, then resolved ones
            self._map(peer, peer.addresses, explicit=True)
        for peer in self._peers:
            self._map(peer, peer.resolved, explicit=False)

    def _map(self, peer: Peer, addresses: Iterable[str], *, explicit: bool) -> None:
        if self._by_key[peer.public_key] is not peer:
            return
        for ip in addresses:
            first = self._by_address.setdefault(normalize_ip(ip), peer)
            if first is not peer and explicit:
                log.warning("address %s of %s already belongs to %s", ip, peer.node, first.node)

    @classmethod
    def load(
        cls, authorized_dir: Path, *, resolve: bool = True, resolver: Resolver = resolve_name
    ) -> PeerTable:
        """Read every ``*.key`` in ``authorized_dir``; unusable files are logged and skipped.

        A key whose file names its ``addresses`` is taken at its word; only the others have
        their node name resolved (a thousand name lookups at start-up would make the agent
        wait on DNS). Raises OSError when the directory itself cannot be read.
        """
        if not Path(authorized_dir).is_dir():
            msg = f"authorized keys directory {authorized_dir} does not exist"
            raise FileNotFoundError(msg)
        peers = []
        for path in sorted(Path(authorized_dir).glob("*.key")):
            peer = _read_peer(path)
            if peer is None:
                continue
            if resolve and not peer.addresses:
                extra = tuple(ip for ip in resolver(peer.node) if ip not in peer.addresses)
                peer = Peer(peer.node, peer.public_key, peer.addresses, extra, path)
            peers.append(peer)
        log.debug("loaded %d peer keys from %s", len(peers), authorized_dir)
        return cls(peers)

    def by_address(self, ip: str) -> Peer | None:
        """The peer reached at ``ip`` (IPv4-mapped IPv6 is looked up as IPv4; a link-local
        one's zone, ``fe80::1%eth0``, is dropped: the table is keyed by address), or None."""
        try:
            return self._by_address.get(normalize_ip(split_zone(ip)[0]))
        except ValueError:
            return None

    def by_key(self, z85: str | bytes) -> Peer | None:
        """The peer owning this Z85 public key, or None."""
        if isinstance(z85, bytes):
            z85 = z85.decode("ascii", "replace")
        return self._by_key.get(z85)

    def keys(self) -> frozenset[str]:
        """Every authorized public key (Z85)."""
        return frozenset(self._by_key)

    def addresses(self) -> dict[str, str]:
        """address -> node name, for display."""
        return {ip: peer.node for ip, peer in self._by_address.items()}

    def __iter__(self) -> Iterator[Peer]:
        return iter(self._by_key.values())

    def __len__(self) -> int:
        return len(self._by_key)


def _read_peer(path: Path) -> Peer | None:
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_CERT_SIZE + 1)
        if len(data) > MAX_CERT_SIZE:
            msg = f"larger than {MAX_CERT_SIZE} bytes"
            raise ValueError(msg)
        cert = parse_certificate(data.decode("utf-8"))
        node = cert.name if cert.name else path.stem
        check_node_name(node)
        addresses = cert.addresses
    except (OSError, UnicodeError, ValueError) as exc:
        log.warning("skipping peer certificate %s: %s", path, exc)
        return None
    return Peer(node=node, public_key=cert.public_key, addresses=addresses, source=path)
