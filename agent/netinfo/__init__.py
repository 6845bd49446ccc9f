"""Process and socket facts: the one place that reads /proc and speaks NETLINK_SOCK_DIAG.

Two questions are answered here, both synchronous and quick enough for the event loop:

* Destination side, `SessionFinder.session_connection`: which inet connection does the sshd
  session that called PAM hold (the caller or an ancestor, served by an ancestor's listener)?
* Source side, `SocketOwners.socket_owner`: which process owns the socket local=src,
  remote=dst? An exact sock_diag lookup, then only candidate processes.

Both hold one `ProcReader` (the agent's reader of /proc, the backends' too), which the
composition root makes and passes in::

    procs = ProcReader(proc_root)
    sessions = SessionFinder(procs, clock=clock)
    owners = SocketOwners(procs)

Inside: `_codec` (pure bytes and text), `_proc` (/proc reads, the one fd walk), `_netlink`
(the sock_diag client, cgroup id -> pids), `_sockfd` (pidfd_getfd socket facts), `_session`
and `_owners` (the two sides).
"""

from callerid.agent.netinfo._owners import Owner, SocketOwners
from callerid.agent.netinfo._proc import (
    NetinfoError,
    Pin,
    Proc,
    ProcessGone,
    ProcReader,
    read_proc,
)
from callerid.agent.netinfo._session import Connection, SessionFinder, lent_connections

__all__ = [
    "Connection",
    "NetinfoError",
    "Owner",
    "Pin",
    "Proc",
    "ProcReader",
    "ProcessGone",
    "SessionFinder",
    "SocketOwners",
    "lent_connections",
    "read_proc",
]
