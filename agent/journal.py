"""The agent's journal output: one structured systemd-journal record per decision.

Every PAM decision becomes one `DecisionRecord`; `Journal.record()` sends it to journald
with the fields of the design ("Journal fields"; docs/architecture.md):

    MESSAGE, PRIORITY (adopt/allow 6 info, deny 5 notice, error 3 err),
    SYSLOG_IDENTIFIER=callerid-agent, MESSAGE_ID (one fixed id per decision kind),
    CALLERID_DECISION, CALLERID_REASON, CALLERID_USER, CALLERID_UID, CALLERID_PID,
    CALLERID_JOB_ID, CALLERID_SRC, CALLERID_DST, CALLERID_PEER_STATUS,
    CALLERID_LATENCY_US, CALLERID_SERVICE, CALLERID_NODE, and when they apply
    CALLERID_WAITED_MS (the login waited for the job the source named to appear here) and
    CALLERID_WOULD_DECISION, CALLERID_WOULD_REASON (audit mode: what enforce would have done)

Agent lifecycle events (`Journal.event()`: started, stopping, reloaded, config_error,
peer_error) carry their own fixed MESSAGE_ID, `CALLERID_EVENT=<kind>` and any extra fields
the caller names (`peer="10.0.0.2"` becomes `CALLERID_PEER=10.0.0.2`).

Absent values (None) are omitted, not sent as empty strings: a record with no job has no
CALLERID_JOB_ID field at all. `journalctl CALLERID_JOB_ID=42` finds the same records either
way, but an empty value would read as a real (empty) job id, uid or address in exports and
catalog texts. The price: journalctl cannot match on a field's absence, so "records without
a job" are found by filtering `journalctl -o json` output (`"CALLERID_JOB_ID" not in e`).

The MESSAGE_IDs are fixed 128-bit ids, generated once and documented for administrators in
packaging/callerid.catalog (one catalog entry per id; a unit test keeps the two in step).

Delivery: journald's native protocol, written by `NativeSender` to its own non-blocking
datagram socket (the same bytes libsystemd's sd_journal_send writes: one `FIELD=value` line
per field, and the binary-safe form, name, newline, 64-bit little-endian length, value, for
a value containing a newline). It never blocks the event loop for long: when journald does
not read (hung, stopped, or too busy for its queue of `net.unix.max_dgram_qlen` datagrams)
the send waits at most `SEND_GRACE_S` for room, and not at all while records are already
being lost; a record that still does not fit is dropped and counted (`dropped`, and `lost`
in `calleridctl status`). systemd-python's `journal.send` is a blocking sendmsg with no
timeout: a hung journald would stall every login behind it.

journald silently loses nothing it has not received, but there is no journald when
/run/systemd/journal/socket does not exist, so its existence is checked at construction and
again (a cheap `os.path.exists`) at most every `recheck_s` seconds; while it is missing,
records are written to `stream` (default stderr) as one line

    callerid-agent: <MESSAGE> [CALLERID_DECISION=deny CALLERID_REASON=no_jobs ...]

(only the CALLERID_* fields; values with blanks or quotes are JSON-quoted) and a warning
says so once per change of state. `record()` never raises: any other OSError from the sender
is counted (`send_errors`, also in `lost`) and the record goes to the stream instead. One
warning is logged when records start being lost and one when journald takes them again.
`Journal(enabled=False)` writes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol, TextIO

from callerid.agent._journald import JOURNAL_SOCKET, NativeSender, encode_entry

log = logging.getLogger(__name__)

__all__ = [
    "DECISIONS",
    "DECISION_MESSAGE_IDS",
    "EVENT_MESSAGE_IDS",
    "JOURNAL_SOCKET",
    "DecisionRecord",
    "Journal",
    "NativeSender",
    "Sender",
    "decision_fields",
    "encode_entry",
    "format_line",
]

RECHECK_S: Final = 5.0
"""At most this often (seconds) the journald socket is looked for again."""

# One fixed id per kind of event, generated once with uuid4; never derive them at run time.
MESSAGE_ID_ADOPT: Final = "4fd8afc545a94a109e165a233ab6cc75"
MESSAGE_ID_ALLOW: Final = "6c0cd8fe667c43bba5fb73c39ebc6e5a"
MESSAGE_ID_DENY: Final = "ace991fef41f4c7ba0533c59df1a32fd"
MESSAGE_ID_ERROR: Final = "517e59a053144557899b2cbd28b25721"
MESSAGE_ID_STARTED: Final = "61573aec34b2455a97ff3885890c0ce8"
MESSAGE_ID_STOPPING: Final = "b924fcf9be684cd892330e584a6abd31"
MESSAGE_ID_RELOADED: Final = "949929ffc898464d81924824bf54ac23"
MESSAGE_ID_CONFIG_ERROR: Final = "d9f7611bad6e4a5885cba7a496757385"
MESSAGE_ID_PEER_ERROR: Final = "b01d62ac2cc14745bf40f86cd73eb3cf"

LOG_ERR: Final = 3
LOG_WARNING: Final = 4
LOG_NOTICE: Final = 5
LOG_INFO: Final = 6

DECISION_MESSAGE_IDS: Final[Mapping[str, str]] = {
    "adopt": MESSAGE_ID_ADOPT,
    "allow": MESSAGE_ID_ALLOW,
    "deny": MESSAGE_ID_DENY,
    "error": MESSAGE_ID_ERROR,
}
DECISION_PRIORITIES: Final[Mapping[str, int]] = {
    "adopt": LOG_INFO,
    "allow": LOG_INFO,
    "deny": LOG_NOTICE,
    "error": LOG_ERR,
}
DECISIONS: Final = frozenset(DECISION_MESSAGE_IDS)

EVENT_MESSAGE_IDS: Final[Mapping[str, str]] = {
    "started": MESSAGE_ID_STARTED,
    "stopping": MESSAGE_ID_STOPPING,
    "reloaded": MESSAGE_ID_RELOADED,
    "config_error": MESSAGE_ID_CONFIG_ERROR,
    "peer_error": MESSAGE_ID_PEER_ERROR,
}
EVENT_PRIORITIES: Final[Mapping[str, int]] = {
    "started": LOG_INFO,
    "stopping": LOG_INFO,
    "reloaded": LOG_INFO,
    "config_error": LOG_ERR,
    "peer_error": LOG_WARNING,
}

FIELD_PREFIX: Final = "CALLERID_"
_FIELD_NAME = re.compile(r"[A-Z0-9][A-Z0-9_]{0,63}")
_NEEDS_QUOTES = re.compile(r'[\s"\[\]=\\]')

NO_JOURNALD_WARNING: Final = (
    "journald not running (no %s): decision records go to stderr"  # %s: the socket path
)


class Sender(Protocol):
    """What sends one entry: `NativeSender`, or a test's fake. BlockingIOError means journald
    has no room for it now (dropped); any other OSError, that it could not be sent."""

    def __call__(self, message: str, /, **fields: str) -> object: ...


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """The facts of one PAM decision, as journaled. None means "not known / not applicable"."""

    decision: str  # adopt | allow | deny | error
    reason: str  # short machine word: root, no_jobs, callerid, unknown_newest, ...
    user: str
    uid: int | None
    pid: int | None  # the adopted / checked sshd pid
    job: str | None
    src: str | None  # "ip:port" of the ssh client end
    dst: str | None  # "ip:port" of the sshd end
    peer_status: str | None  # found | not_found | unreachable | timeout | ... | skipped
    latency_us: int
    message: str  # human MESSAGE
    service: str | None = None
    node: str | None = None
    waited_ms: int | None = None  # how long the login waited for the job the source named
    would_decision: str | None = None  # audit mode: the verdict enforce mode would have given
    would_reason: str | None = None  # ... and its reason

    def __post_init__(self) -> None:
        if self.decision not in DECISIONS:
            msg = f"decision must be one of {sorted(DECISIONS)}, not {self.decision!r}"
            raise ValueError(msg)


def decision_fields(rec: DecisionRecord, identifier: str = "callerid-agent") -> dict[str, str]:
    """The journal fields of one decision (without MESSAGE); None values are left out."""
    fields = {
        "PRIORITY": str(DECISION_PRIORITIES[rec.decision]),
        "SYSLOG_IDENTIFIER": identifier,
        "MESSAGE_ID": DECISION_MESSAGE_IDS[rec.decision],
    }
    values: list[tuple[str, object]] = [
        ("CALLERID_DECISION", rec.decision),
        ("CALLERID_REASON", rec.reason),
        ("CALLERID_USER", rec.user),
        ("CALLERID_UID", rec.uid),
        ("CALLERID_PID", rec.pid),
        ("CALLERID_JOB_ID", rec.job),
        ("CALLERID_SRC", rec.src),
        ("CALLERID_DST", rec.dst),
        ("CALLERID_PEER_STATUS", rec.peer_status),
        ("CALLERID_LATENCY_US", rec.latency_us),
        ("CALLERID_SERVICE", rec.service),
        ("CALLERID_NODE", rec.node),
        ("CALLERID_WAITED_MS", rec.waited_ms),
        ("CALLERID_WOULD_DECISION", rec.would_decision),
        ("CALLERID_WOULD_REASON", rec.would_reason),
    ]
    fields.update({k: str(v) for k, v in values if v is not None})
    return fields


def event_fields(kind: str, identifier: str, extra: Mapping[str, str]) -> dict[str, str]:
    """The journal fields of one lifecycle event; `extra` keys become CALLERID_<KEY>."""
    if kind not in EVENT_MESSAGE_IDS:
        msg = f"unknown journal event kind {kind!r}; known: {sorted(EVENT_MESSAGE_IDS)}"
        raise ValueError(msg)
    fields = {
        "PRIORITY": str(EVENT_PRIORITIES[kind]),
        "SYSLOG_IDENTIFIER": identifier,
        "MESSAGE_ID": EVENT_MESSAGE_IDS[kind],
        "CALLERID_EVENT": kind,
    }
    for key, value in extra.items():
        name = key.upper()
        name = name if name.startswith(FIELD_PREFIX) else FIELD_PREFIX + name
        if not _FIELD_NAME.fullmatch(name):
            msg = f"not a journal field name: {name!r} (from {key!r})"
            raise ValueError(msg)
        fields[name] = value
    return fields


def _quote(value: str) -> str:
    return json.dumps(value) if not value or _NEEDS_QUOTES.search(value) else value


def format_line(identifier: str, message: str, fields: Mapping[str, str]) -> str:
    """The one-line stderr form of a record: `<identifier>: <MESSAGE> [CALLERID_...=v ...]`."""
    text = message.replace("\r", "\\r").replace("\n", "\\n")
    pairs = [f"{k}={_quote(v)}" for k, v in fields.items() if k.startswith(FIELD_PREFIX)]
    return f"{identifier}: {text} [{' '.join(pairs)}]" if pairs else f"{identifier}: {text}"


class Journal:
    """Writes decision records and lifecycle events to journald, or to `stream` without it.

    Counters for `calleridctl status` and tests: `sent` (handed to journald), `to_stream`
    (written to the stream instead), `dropped` (journald had no room: lost), `send_errors`
    (other OSErrors from the sender; the record went to the stream) and `lost` (the records
    journald did not get while it was there: dropped + send errors).
    Not thread-safe: call it from the event loop.
    """

    def __init__(
        self,
        enabled: bool = True,
        *,
        identifier: str = "callerid-agent",
        stream: TextIO | None = None,
        sender: Sender | None = None,
        socket_path: str = JOURNAL_SOCKET,
        clock: Callable[[], float] = time.monotonic,
        recheck_s: float = RECHECK_S,
    ) -> None:
        self.enabled = enabled
        self.identifier = identifier
        self._stream = stream
        self._native: NativeSender | None = None
        if sender is None:
            sender = self._native = NativeSender(socket_path)
        self._sender: Sender = sender
        self._socket_path = socket_path
        self._clock = clock
        self._recheck_s = recheck_s
        self._losing = False
        self._lost_at_start = 0
        self.sent = 0
        self.to_stream = 0
        self.dropped = 0
        self.send_errors = 0
        self._up = enabled and os.path.exists(socket_path)
        self._checked_at = clock()
        if enabled and not self._up:
            log.warning(NO_JOURNALD_WARNING, socket_path)

    @property
    def lost(self) -> int:
        """Records journald did not get although it was there (dropped or failed sends)."""
        return self.dropped + self.send_errors

    @property
    def journald_running(self) -> bool:
        """Whether records currently go to journald (as of the last cheap check)."""
        return self.enabled and self._journald_up()

    def close(self) -> None:
        """Release the journald socket (a later record opens it again)."""
        if self._native is not None:
            self._native.close()

    def record(self, rec: DecisionRecord) -> None:
        """Journal one decision. Never raises."""
        if not self.enabled:
            return
        try:
            fields = decision_fields(rec, self.identifier)
        except (KeyError, ValueError):  # a record that bypassed __post_init__ (replace, etc.)
            log.exception("unjournalable decision record %r", rec)
            return
        self._emit(rec.message, fields)

    def event(self, kind: str, message: str, **fields: str) -> None:
        """Journal one agent lifecycle event (`EVENT_MESSAGE_IDS` names the kinds).

        An unknown kind or a field name journald would reject is our bug: ValueError.
        """
        if not self.enabled:
            return
        self._emit(message, event_fields(kind, self.identifier, fields))

    def _emit(self, message: str, fields: dict[str, str]) -> None:
        if self._journald_up() and self._send(message, fields):
            return
        self._write_stream(format_line(self.identifier, message, fields))

    def _send(self, message: str, fields: dict[str, str]) -> bool:
        """True when the record is dealt with (sent, or dropped); False: use the stream."""
        try:
            self._sender(message, **fields)
        except BlockingIOError:
            self.dropped += 1
            self._start_losing("journald takes no records (its socket would block): dropping")
            return True
        except OSError as exc:
            self.send_errors += 1
            self._start_losing(f"journald send failed ({exc}): records go to stderr")
            return False
        if self._losing:
            self._set_losing(False)
            log.warning(
                "journald takes records again; %d lost meanwhile (%d in all)",
                self.lost - self._lost_at_start,
                self.lost,
            )
        self.sent += 1
        return True

    def _start_losing(self, what: str) -> None:
        if not self._losing:
            self._lost_at_start = self.lost - 1
            self._set_losing(True)
            log.warning("%s meanwhile; counted as lost in calleridctl status", what)

    def _set_losing(self, losing: bool) -> None:
        self._losing = losing
        if self._native is not None:
            self._native.hurry = losing

    def _journald_up(self) -> bool:
        now = self._clock()
        if now - self._checked_at >= self._recheck_s:
            self._checked_at = now
            up = os.path.exists(self._socket_path)
            if up and not self._up:
                log.info("journald found (%s): records go to the journal", self._socket_path)
            elif self._up and not up:
                log.warning(NO_JOURNALD_WARNING, self._socket_path)
                self.close()
            self._up = up
        return self._up

    def _write_stream(self, line: str) -> None:
        stream = self._stream if self._stream is not None else sys.stderr
        try:
            stream.write(line + "\n")
            stream.flush()
        except (OSError, ValueError):  # closed or broken stderr: nothing left to tell
            return
        self.to_stream += 1
