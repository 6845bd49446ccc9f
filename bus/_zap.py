"""Private part of `callerid.bus.transport`: the ZAP verdict on a client key, and the
server's counters.

`KeyProvider.callback` is the credentials callback of the ZAP authenticator: a CURVE client key
is allowed iff the current `PeerTable` has it. No zmq here; import from `transport`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from callerid.bus.loglimit import LogBudget, QuietLog
from callerid.bus.peers import PeerTable

__all__ = ["KeyProvider", "ServerStats"]

log = logging.getLogger("callerid.bus.transport")


@dataclass(slots=True)
class ServerStats:
    """Counters of one server (read by `calleridctl status` and tests)."""

    received: int = 0
    answered: int = 0
    pings: int = 0
    malformed: int = 0
    bad_version: int = 0
    unauthorized: int = 0
    internal_errors: int = 0
    refused_handshakes: int = 0  # CURVE handshakes with a key not in the authorized keys
    refusals_not_logged: int = 0  # of those, refused without a log line of their own


class KeyProvider:
    """ZAP credentials callback: a client key is allowed iff the current table has it.

    Anyone reaching the port can be refused, so refusals are counted in the server's stats
    but logged within a `LogBudget` (a few lines a minute, then one summary line).
    """

    def __init__(self, peers: PeerTable, stats: ServerStats, budget: LogBudget) -> None:
        self.peers = peers
        self.stats = stats
        self.budget = budget
        self._quiet = QuietLog(log, logging.INFO, "refused CURVE handshakes", budget)

    def callback(self, domain: str, key: bytes) -> bool:
        if self.peers.by_key(key) is not None:
            return True
        self.stats.refused_handshakes += 1
        if not self._quiet("refused CURVE client key %s (not in authorized keys)", key.decode()):
            self.stats.refusals_not_logged += 1
        return False

    def close(self) -> None:
        self._quiet.close()
