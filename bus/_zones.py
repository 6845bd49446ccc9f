"""Private part of `callerid.bus.protocol`: IPv6 zones (RFC 4007), which never go on the wire.

A link-local address (fe80::/10) names a host only together with an interface, its zone:
``fe80::1%eth0`` or ``fe80::1%3``. A zone means something on one host only, so endpoints on
the wire and the peer table carry the plain address; the zone is kept beside it by whoever
connects. Pure text work; import from `protocol`.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["is_link_local", "split_zone"]

_ZONE_RE: Final = re.compile(r"[A-Za-z0-9_.\-]{1,15}")  # an interface name (IFNAMSIZ) or index


def split_zone(text: str) -> tuple[str, str | None]:
    """``fe80::1%eth0`` -> ("fe80::1", "eth0"); text without a zone -> (text, None).

    A zone (RFC 4007: the interface, by name or index) is meaningful on one host only: it never
    goes on the wire, and tables are keyed by the address without it. Raises ValueError for an
    empty or malformed zone; the address itself is not checked here (see `normalize_ip`).
    """
    addr, sep, zone = text.partition("%")
    if not sep:
        return text, None
    if not _ZONE_RE.fullmatch(zone):
        msg = f"bad zone in address {text!r}"
        raise ValueError(msg)
    return addr, zone


def is_link_local(ip: str) -> bool:
    """Whether a canonical IP literal is an IPv6 link-local address (fe80::/10), which names a
    host only together with an interface (its zone)."""
    return ":" in ip and ip[:3].lower() in ("fe8", "fe9", "fea", "feb")
