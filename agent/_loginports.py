"""What `login.LoginFlow` (and the PAM server) is given: the pieces it asks and acts through.

Each is a Protocol the composition root fills with the real piece (`users.Users`,
`netinfo.SessionFinder`, `netinfo.ProcReader`, `ask.SourceAsker`) and the tests with a fake
(tests/fakes.py). Re-exported by `login`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Protocol

from callerid.agent import policy
from callerid.agent._loginstate import Outcome, Started
from callerid.agent.journal import DecisionRecord
from callerid.agent.netinfo import Connection, Proc
from callerid.agent.pamproto import PamReply, PamRequest

__all__ = [
    "AskSource",
    "Held",
    "LoginHandler",
    "Processes",
    "RecordSink",
    "SessionFinder",
    "UserSource",
]


class UserSource(Protocol):
    def facts(self, user: str) -> Awaitable[policy.Facts]:
        """The user's uid (None: no such user) and groups."""
        ...

    def remembered(self, user: str) -> policy.Facts | None:
        """The user's facts if they are at hand without asking NSS, else None."""
        ...


class SessionFinder(Protocol):
    def session_connection(
        self, pid: int, rhost: str | None = None, lent: Sequence[Connection] | None = None
    ) -> tuple[Proc, Connection]:
        """The sshd session process (``pid`` or an ancestor) and the connection it serves
        (``lent``: the socket(s) ``pid`` lent with its request as its session's, taken in place
        of what it holds); NetinfoError when there is none."""
        ...


class Held(Protocol):
    """A process pinned by its identity (`netinfo.Pin`)."""

    pid: int

    def exited(self) -> bool: ...

    def close(self) -> None: ...


class Processes(Protocol):
    """Process identity (`netinfo.ProcReader`): start times, and pins for adoption."""

    def start_time(self, pid: int) -> float | None: ...

    def pin(self, pid: int, start_time: float | None) -> Held:
        """Hold ``pid`` if it is still the process started at ``start_time``; ProcessGone
        (a NetinfoError) when it is not."""
        ...

    def hold(self, pid: int) -> Held:
        """Hold whatever process has ``pid`` now, unchecked (its identity is read after);
        ProcessGone when there is none."""
        ...


class AskSource(Protocol):
    def __call__(self, conn: Connection, uid: int) -> Awaitable[tuple[str, str | None]]:
        """(peer status, the job id the source named or None) for ``conn`` and ``uid``."""
        ...


class RecordSink(Protocol):
    """Where decision records go (`journal.Journal`); the PAM server writes to it."""

    def record(self, rec: DecisionRecord) -> None: ...


class LoginHandler(Protocol):
    """What the PAM server asks of the login flow (`login.LoginFlow`)."""

    def account_now(
        self, req: PamRequest, pid: int, received: float | None, wait_s: float
    ) -> Outcome | Started | None:
        """op=account, as far as it goes without waiting longer than ``wait_s`` (None: not
        at all)."""
        ...

    def account(
        self, req: PamRequest, pid: int, received: float | None, started: Started | None
    ) -> Awaitable[Outcome]:
        """op=account -> the decision for this login (adopt | allow | deny | error)."""
        ...

    def open_session(self, req: PamRequest, pid: int) -> Awaitable[PamReply]:
        """op=open_session -> adopt (still / again in its job) | allow (nothing to do)."""
        ...

    def close_session(self, pid: int) -> PamReply:
        """op=close_session -> allow (the session is forgotten)."""
        ...

    def error_outcome(
        self, req: PamRequest, pid: int, started: float, reason: str, text: str
    ) -> Outcome:
        """The answer and record of a login the server must end itself (verdict error)."""
        ...
