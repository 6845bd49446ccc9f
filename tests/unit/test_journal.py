"""The journal output: exact field sets, priorities, the stderr fallback, the catalog."""

from __future__ import annotations

import io
import logging
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from callerid.agent import journal as journal_mod
from callerid.agent.journal import (
    DECISION_MESSAGE_IDS,
    EVENT_MESSAGE_IDS,
    DecisionRecord,
    Journal,
    format_line,
)

CATALOG = Path(__file__).resolve().parents[2] / "packaging" / "callerid.catalog"
LOGGER = "callerid.agent.journal"
WARNING = "journald not running (no {}): decision records go to stderr"


class FakeSender:
    """Stands in for systemd.journal.send: records each call; can fail with an OSError."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.fail: OSError | None = None

    def __call__(self, message: str, /, **fields: str) -> None:
        if self.fail is not None:
            raise self.fail
        self.calls.append((message, fields))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def adopt_record(**changes: object) -> DecisionRecord:
    values: dict[str, object] = {
        "decision": "adopt",
        "reason": "callerid",
        "user": "alice",
        "uid": 1001,
        "pid": 4242,
        "job": "42",
        "src": "10.0.0.1:40022",
        "dst": "10.0.0.2:22",
        "peer_status": "found",
        "latency_us": 1234,
        "message": "alice (uid 1001) from 10.0.0.1:40022 adopted into job 42 (callerid)",
        "service": "sshd",
        "node": "node2",
    }
    values.update(changes)
    return DecisionRecord(**values)  # type: ignore[arg-type]


@pytest.fixture
def socket_path(tmp_path: Path) -> Path:
    """A stand-in for /run/systemd/journal/socket: journald counts as running while it exists."""
    path = tmp_path / "socket"
    path.touch()
    return path


@pytest.fixture
def sender() -> FakeSender:
    return FakeSender()


def make_journal(
    sender: FakeSender, socket_path: Path, stream: io.StringIO | None = None, **kw: object
) -> Journal:
    return Journal(
        sender=sender,
        socket_path=str(socket_path),
        stream=stream if stream is not None else io.StringIO(),
        **kw,  # type: ignore[arg-type]
    )


def test_adopt_record_has_exactly_the_design_fields(sender: FakeSender, socket_path: Path) -> None:
    j = make_journal(sender, socket_path)
    j.record(adopt_record())
    assert sender.calls == [
        (
            "alice (uid 1001) from 10.0.0.1:40022 adopted into job 42 (callerid)",
            {
                "PRIORITY": "6",
                "SYSLOG_IDENTIFIER": "callerid-agent",
                "MESSAGE_ID": "4fd8afc545a94a109e165a233ab6cc75",
                "CALLERID_DECISION": "adopt",
                "CALLERID_REASON": "callerid",
                "CALLERID_USER": "alice",
                "CALLERID_UID": "1001",
                "CALLERID_PID": "4242",
                "CALLERID_JOB_ID": "42",
                "CALLERID_SRC": "10.0.0.1:40022",
                "CALLERID_DST": "10.0.0.2:22",
                "CALLERID_PEER_STATUS": "found",
                "CALLERID_LATENCY_US": "1234",
                "CALLERID_SERVICE": "sshd",
                "CALLERID_NODE": "node2",
            },
        )
    ]
    assert (j.sent, j.to_stream, j.send_errors) == (1, 0, 0)


@pytest.mark.parametrize(
    ("decision", "priority"), [("adopt", "6"), ("allow", "6"), ("deny", "5"), ("error", "3")]
)
def test_priority_and_message_id_per_decision(
    sender: FakeSender, socket_path: Path, decision: str, priority: str
) -> None:
    make_journal(sender, socket_path).record(adopt_record(decision=decision))
    fields = sender.calls[0][1]
    assert fields["PRIORITY"] == priority
    assert fields["MESSAGE_ID"] == DECISION_MESSAGE_IDS[decision]
    assert fields["CALLERID_DECISION"] == decision


def test_none_fields_are_omitted(sender: FakeSender, socket_path: Path) -> None:
    rec = adopt_record(
        decision="deny",
        reason="no_jobs",
        uid=None,
        pid=None,
        job=None,
        src=None,
        dst=None,
        peer_status=None,
        service=None,
        node=None,
    )
    make_journal(sender, socket_path).record(rec)
    assert set(sender.calls[0][1]) == {
        "PRIORITY",
        "SYSLOG_IDENTIFIER",
        "MESSAGE_ID",
        "CALLERID_DECISION",
        "CALLERID_REASON",
        "CALLERID_USER",
        "CALLERID_LATENCY_US",
    }


def test_zero_values_are_kept(sender: FakeSender, socket_path: Path) -> None:
    make_journal(sender, socket_path).record(adopt_record(uid=0, latency_us=0, job="0"))
    fields = sender.calls[0][1]
    assert (fields["CALLERID_UID"], fields["CALLERID_LATENCY_US"], fields["CALLERID_JOB_ID"]) == (
        "0",
        "0",
        "0",
    )


def test_identifier_is_configurable(sender: FakeSender, socket_path: Path) -> None:
    make_journal(sender, socket_path, identifier="cid-test").record(adopt_record())
    assert sender.calls[0][1]["SYSLOG_IDENTIFIER"] == "cid-test"


def test_bad_decision_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="decision must be one of"):
        adopt_record(decision="maybe")


def test_event_fields(sender: FakeSender, socket_path: Path) -> None:
    j = make_journal(sender, socket_path)
    j.event("peer_error", "node1: timeout", peer="10.0.0.1", CALLERID_ERROR="timeout")
    assert sender.calls == [
        (
            "node1: timeout",
            {
                "PRIORITY": "4",
                "SYSLOG_IDENTIFIER": "callerid-agent",
                "MESSAGE_ID": EVENT_MESSAGE_IDS["peer_error"],
                "CALLERID_EVENT": "peer_error",
                "CALLERID_PEER": "10.0.0.1",
                "CALLERID_ERROR": "timeout",
            },
        )
    ]


@pytest.mark.parametrize(
    ("kind", "priority"),
    [("started", "6"), ("stopping", "6"), ("reloaded", "6"), ("config_error", "3")],
)
def test_event_priorities(sender: FakeSender, socket_path: Path, kind: str, priority: str) -> None:
    make_journal(sender, socket_path).event(kind, "x")
    assert sender.calls[0][1]["PRIORITY"] == priority
    assert sender.calls[0][1]["MESSAGE_ID"] == EVENT_MESSAGE_IDS[kind]


@pytest.mark.parametrize(
    ("kind", "fields", "needle"),
    [
        ("exploded", {}, "unknown journal event kind"),
        ("started", {"bad-name": "x"}, "not a journal field name"),
        ("started", {"x" * 60: "x"}, "not a journal field name"),
    ],
)
def test_event_misuse_is_a_value_error(
    sender: FakeSender, socket_path: Path, kind: str, fields: dict[str, str], needle: str
) -> None:
    with pytest.raises(ValueError, match=needle):
        make_journal(sender, socket_path).event(kind, "x", **fields)
    assert sender.calls == []


# -- without journald ---------------------------------------------------------------------


def test_no_socket_writes_one_line_per_record_and_warns_once(
    sender: FakeSender, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "no-socket"
    out = io.StringIO()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        j = make_journal(sender, missing, out)
        j.record(adopt_record())
        j.record(adopt_record(decision="deny", reason="no_jobs", job=None, peer_status=None))
        j.event("started", "agent up")
    assert sender.calls == []
    assert out.getvalue().splitlines() == [
        "callerid-agent: alice (uid 1001) from 10.0.0.1:40022 adopted into job 42 (callerid) "
        "[CALLERID_DECISION=adopt CALLERID_REASON=callerid CALLERID_USER=alice "
        "CALLERID_UID=1001 CALLERID_PID=4242 CALLERID_JOB_ID=42 CALLERID_SRC=10.0.0.1:40022 "
        "CALLERID_DST=10.0.0.2:22 CALLERID_PEER_STATUS=found CALLERID_LATENCY_US=1234 "
        "CALLERID_SERVICE=sshd CALLERID_NODE=node2]",
        "callerid-agent: alice (uid 1001) from 10.0.0.1:40022 adopted into job 42 (callerid) "
        "[CALLERID_DECISION=deny CALLERID_REASON=no_jobs CALLERID_USER=alice "
        "CALLERID_UID=1001 CALLERID_PID=4242 CALLERID_SRC=10.0.0.1:40022 "
        "CALLERID_DST=10.0.0.2:22 CALLERID_LATENCY_US=1234 "
        "CALLERID_SERVICE=sshd CALLERID_NODE=node2]",
        "callerid-agent: agent up [CALLERID_EVENT=started]",
    ]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [WARNING.format(missing)]
    assert (j.sent, j.to_stream) == (0, 3)


def test_line_quotes_awkward_values_and_escapes_newlines() -> None:
    line = format_line(
        "callerid-agent",
        "two\nlines",
        {"PRIORITY": "3", "CALLERID_A": "has space", "CALLERID_B": "", "CALLERID_C": 'q"'},
    )
    assert (
        line
        == 'callerid-agent: two\\nlines [CALLERID_A="has space" CALLERID_B="" CALLERID_C="q\\""]'
    )


def test_journald_started_later_is_picked_up_after_recheck(
    sender: FakeSender, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sock, clock, out = tmp_path / "socket", FakeClock(), io.StringIO()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        j = make_journal(sender, sock, out, clock=clock, recheck_s=5.0)
        sock.touch()
        clock.now += 4.9
        j.record(adopt_record())  # not looked for again yet
        assert (len(sender.calls), j.to_stream) == (0, 1)
        clock.now += 0.2
        j.record(adopt_record())
        assert (len(sender.calls), j.to_stream) == (1, 1)
        assert j.journald_running
        sock.unlink()  # journald gone again: back to the stream, with a new warning
        clock.now += 5.0
        j.record(adopt_record())
    assert (len(sender.calls), j.to_stream) == (1, 2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [WARNING.format(sock)] * 2
    assert any("journald found" in r.getMessage() for r in caplog.records)


def test_disabled_journal_does_nothing_at_all(
    sender: FakeSender, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = io.StringIO()
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        j = Journal(False, sender=sender, socket_path=str(tmp_path / "none"), stream=out)
        j.record(adopt_record())
        j.event("started", "up")
    assert (sender.calls, out.getvalue(), caplog.records) == ([], "", [])
    assert not j.journald_running


def test_send_oserror_is_counted_and_record_goes_to_stream(
    sender: FakeSender, socket_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = io.StringIO()
    j = make_journal(sender, socket_path, out)
    sender.fail = ConnectionRefusedError(111, "Connection refused")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        j.record(adopt_record())
        j.record(adopt_record(decision="deny", reason="no_jobs"))
        sender.fail = None
        j.record(adopt_record())
    assert (j.send_errors, j.sent, j.to_stream, j.lost) == (2, 1, 2, 2)
    assert [line.split(" [")[1][:26] for line in out.getvalue().splitlines()] == [
        "CALLERID_DECISION=adopt CA",
        "CALLERID_DECISION=deny CAL",
    ]
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "journald send failed" in m]) == 1  # once per streak
    assert len([m for m in messages if "journald takes records again; 2 lost" in m]) == 1


def test_would_block_drops_the_record_counts_it_and_logs_once_per_streak(
    sender: FakeSender, socket_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = io.StringIO()
    j = make_journal(sender, socket_path, out)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        sender.fail = BlockingIOError(11, "Resource temporarily unavailable")
        for _ in range(5):
            j.record(adopt_record())
        sender.fail = None
        j.record(adopt_record())
        sender.fail = BlockingIOError(11, "Resource temporarily unavailable")
        j.record(adopt_record())
    # a hung journald's stderr pipe may be just as stuck: nothing goes to the stream
    assert (j.dropped, j.lost, j.sent, j.to_stream, out.getvalue()) == (6, 6, 1, 0, "")
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "would block" in m]) == 2
    assert [m for m in messages if "again" in m] == [
        "journald takes records again; 5 lost meanwhile (5 in all)"
    ]


# -- the native protocol, on real sockets --------------------------------------------------


def test_encode_entry_plain_and_binary_safe_fields() -> None:
    data = journal_mod.encode_entry("two\nlines", {"PRIORITY": "6", "CALLERID_USER": "\u00e9"})
    value = b"two\nlines"
    assert data == (
        b"MESSAGE\n" + len(value).to_bytes(8, "little") + value + b"\n"
        b"PRIORITY=6\nCALLERID_USER=\xc3\xa9\n"
    )


@pytest.fixture
def journald_socket(tmp_path: Path) -> Iterator[socket.socket]:
    """A datagram socket standing where journald's is; it reads only when the test does."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "jsocket"))
        yield sock


def test_native_sender_writes_one_datagram_per_entry(
    journald_socket: socket.socket, tmp_path: Path
) -> None:
    j = Journal(socket_path=str(tmp_path / "jsocket"), stream=io.StringIO())
    try:
        j.record(adopt_record())
        j.event("started", "up", node="n1")
    finally:
        j.close()
    first = journald_socket.recv(65536)
    assert first == journal_mod.encode_entry(
        adopt_record().message, journal_mod.decision_fields(adopt_record())
    )
    assert journald_socket.recv(65536).startswith(b"MESSAGE=up\nPRIORITY=6\n")
    assert (j.sent, j.lost, j.to_stream) == (2, 0, 0)


def test_native_sender_never_blocks_on_a_journald_that_does_not_read(
    journald_socket: socket.socket, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    j = Journal(socket_path=str(tmp_path / "jsocket"), stream=io.StringIO())
    n = 2000  # far beyond net.unix.max_dgram_qlen and the socket buffers
    try:
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            t0 = time.monotonic()
            for _ in range(n):
                j.record(adopt_record())
            elapsed = time.monotonic() - t0
            assert j.dropped > 0 and j.sent + j.dropped == n
            # while losing, no record waits: the whole burst takes about no time
            assert elapsed < 1.0, elapsed
            while True:  # journald catches up
                try:
                    journald_socket.recv(65536, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
            j.record(adopt_record())
    finally:
        j.close()
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "would block" in m]) == 1
    assert len([m for m in messages if "takes records again" in m]) == 1
    assert j.lost == j.dropped and j.to_stream == 0


def test_native_sender_reconnects_to_a_restarted_journald(tmp_path: Path) -> None:
    path = tmp_path / "jsocket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as first:
        first.bind(str(path))
        first.settimeout(5)
        j = Journal(socket_path=str(path), stream=io.StringIO())
        j.record(adopt_record())
        assert first.recv(65536)
    try:
        path.unlink()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as second:
            second.bind(str(path))
            second.settimeout(5)
            j.record(adopt_record())  # the old peer is gone: a new connection, sent
            assert second.recv(65536)
    finally:
        j.close()
    assert (j.sent, j.lost) == (2, 0)


def test_broken_stream_never_raises(sender: FakeSender, tmp_path: Path) -> None:
    out = io.StringIO()
    j = make_journal(sender, tmp_path / "none", out)
    out.close()
    j.record(adopt_record())
    assert j.to_stream == 0


# -- the catalog --------------------------------------------------------------------------


def _catalog_entries() -> dict[str, list[str]]:
    entries: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in CATALOG.read_text().splitlines():
        if m := re.fullmatch(r"-- ([0-9a-f]{32})", line):
            assert m.group(1) not in entries, f"duplicate catalog entry {m.group(1)}"
            current = entries[m.group(1)] = []
        elif current is not None:
            current.append(line)
    return entries


def _constants() -> dict[str, str]:
    return {k: v for k, v in vars(journal_mod).items() if k.startswith("MESSAGE_ID_")}


def test_every_message_id_has_exactly_one_catalog_entry_and_vice_versa() -> None:
    constants = _constants()
    assert len(set(constants.values())) == len(constants) == 9
    assert all(re.fullmatch(r"[0-9a-f]{32}", v) for v in constants.values())
    assert set(_catalog_entries()) == set(constants.values())
    assert set(constants.values()) == {*DECISION_MESSAGE_IDS.values(), *EVENT_MESSAGE_IDS.values()}


def test_catalog_entries_have_headers_and_substitute_only_fields_always_present() -> None:
    # journalctl -x shows a missing field's name instead of its value, so a catalog text
    # substitutes only what every record of that kind carries.
    always = frozenset(
        {"CALLERID_DECISION", "CALLERID_REASON", "CALLERID_USER", "CALLERID_LATENCY_US"}
    )
    allowed = dict.fromkeys(DECISION_MESSAGE_IDS.values(), always)
    allowed[DECISION_MESSAGE_IDS["adopt"]] = always | {
        "CALLERID_UID",
        "CALLERID_PID",
        "CALLERID_JOB_ID",
    }
    allowed.update(dict.fromkeys(EVENT_MESSAGE_IDS.values(), frozenset({"CALLERID_EVENT"})))
    for msg_id, lines in _catalog_entries().items():
        head = lines[: lines.index("")]
        assert head[0].startswith("Subject: "), msg_id
        assert "Defined-By: callerid" in head, msg_id
        assert any(h.startswith("Support: ") for h in head), msg_id
        body = "\n".join(lines[len(head) :]).strip()
        assert len(body) > 100, f"{msg_id}: the body should explain the event"
        assert set(re.findall(r"@([A-Z0-9_]+)@", "\n".join(lines))) <= allowed[msg_id], msg_id


def test_deny_entry_tells_how_to_audit() -> None:
    body = "\n".join(_catalog_entries()[DECISION_MESSAGE_IDS["deny"]])
    for word in ("no_jobs", "unknown_deny", "adopt_failed", "journalctl CALLERID_DECISION=deny"):
        assert word in body
