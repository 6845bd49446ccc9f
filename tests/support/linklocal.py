"""Two network namespaces joined by one veth link that only has IPv6 link-local addresses.

    with LinkLocalPair() as pair:
        pair.a.ip, pair.a.ifname, pair.a.ifindex     # fe80::a on eth0 of the first namespace
        pair.b.run([...])                            # argv run inside the second namespace

Each side has the same interface name (``eth0``, as on real nodes), so a scope-less fe80::
address is ambiguous only by the interface: exactly what a link-local login looks like. The
addresses are added with ``nodad`` (usable at once, no duplicate address detection wait) and
the kernel's own autoconfigured link-local addresses are turned off. Nothing is added to the
host's namespace; both namespaces are deleted on exit, even when the block fails.
"""

from __future__ import annotations

import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tests.support.poll import wait_for

__all__ = ["LinkLocalPair", "Side"]

IFNAME = "eth0"


def _sh(argv: list[str]) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@dataclass(frozen=True)
class Side:
    netns: str
    ip: str  # fe80::a or fe80::b, scope-less
    ifname: str
    ifindex: int

    @property
    def scoped(self) -> str:
        """The address with its zone (``fe80::a%eth0``), as a socket call on this side takes it."""
        return f"{self.ip}%{self.ifname}"

    def prefix(self) -> tuple[str, ...]:
        """argv prefix that runs a command inside this namespace."""
        return ("ip", "netns", "exec", self.netns)


class LinkLocalPair:
    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.names = (f"cid-lla-{tag}", f"cid-llb-{tag}")
        self.a: Side
        self.b: Side

    def __enter__(self) -> LinkLocalPair:
        na, nb = self.names
        try:
            for ns in self.names:
                _sh(["ip", "netns", "add", ns])
                _sh(["ip", "-n", ns, "link", "set", "lo", "up"])
            veth = ["type", "veth", "peer", IFNAME, "netns", nb]
            _sh(["ip", "-n", na, "link", "add", IFNAME, *veth])
            sides = []
            for ns, ip in ((na, "fe80::a"), (nb, "fe80::b")):
                _sh(["ip", "netns", "exec", ns, "sysctl", "-qw",
                     f"net.ipv6.conf.{IFNAME}.addr_gen_mode=1"])  # fmt: skip
                _sh(["ip", "-n", ns, "addr", "add", f"{ip}/64", "dev", IFNAME, "nodad"])
                _sh(["ip", "-n", ns, "link", "set", IFNAME, "up"])
                index = int(_sh(["ip", "netns", "exec", ns, "cat",
                                 f"/sys/class/net/{IFNAME}/ifindex"]))  # fmt: skip
                sides.append(Side(ns, ip, IFNAME, index))
            self.a, self.b = sides
            for ns in self.names:  # linkwatch brings a veth up up to 1 s later: SYNs dropped till
                wait_for(lambda ns=ns: "state UP" in _sh(["ip", "-n", ns, "-o", "link", "show",
                         IFNAME]), what=f"{IFNAME} up in {ns}")  # fmt: skip
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for ns in self.names:
            if Path("/run/netns", ns).exists():
                subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
