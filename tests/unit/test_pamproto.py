"""The PAM socket line protocol: parsing, encoding, limits."""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import re
import time
from pathlib import Path
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from callerid.agent.journal import DecisionRecord
from callerid.agent.login import Outcome
from callerid.agent.pamproto import (
    MAX_LINE,
    MAX_USER,
    PamProtocolError,
    PamReply,
    PamRequest,
    _parse_fields,
    format_reply,
    parse_request,
    pct_decode,
    pct_encode,
)
from callerid.agent.pamserver import PamServer
from tests.fakes import FakeJournal


def test_parse_design_example() -> None:
    req = parse_request(b"CALLERID/1 op=account user=alice service=sshd rhost=10.0.0.1 tty=ssh\n")
    assert req == PamRequest("account", "alice", "sshd", "10.0.0.1", "ssh")


def test_unknown_keys_are_ignored_and_fields_optional() -> None:
    req = parse_request(b"CALLERID/1 op=open_session user=bob future=1")
    assert req == PamRequest("open_session", "bob")


def test_percent_decoding() -> None:
    req = parse_request(b"CALLERID/1 op=account user=al%2Eice tty=pts%2F0%25%20x")
    assert (req.user, req.tty) == ("al.ice", "pts/0% x")


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        (b"HELLO op=account user=a", "does not start"),
        (b"CALLERID/1 op=login user=a", "unknown op"),
        (b"CALLERID/1 user=a", "unknown op"),
        (b"CALLERID/1 op=account", "invalid user"),
        (b"CALLERID/1 op=account user=", "invalid user"),
        (b"CALLERID/1 op=account user=a user=b", "duplicate"),
        (b"CALLERID/1 op=account  user=a", "malformed field"),
        (b"CALLERID/1 op=account user=a%2", "bad percent"),
        (b"CALLERID/1 op=account user=a%zz", "bad percent"),
        (b"CALLERID/1 op=account user=a%FF", "not UTF-8"),
        (b"CALLERID/1 op=account user=\xc3\xa9", "not ASCII"),
        (b"CALLERID/1 op=account user=a%0A", "invalid user"),
        (b"CALLERID/1 op=account user=" + b"a" * MAX_LINE, "longer than"),
        (b"CALLERID/1 op=account user=a rhost=" + b"%41" * 1100, "too long"),
    ],
)
def test_malformed_requests(line: bytes, needle: str) -> None:
    with pytest.raises(PamProtocolError, match=needle):
        parse_request(line)


def test_reply_format() -> None:
    out = format_reply(PamReply("deny", "no_jobs", None, "Access denied: no job on node2"))
    assert (
        out
        == b"CALLERID/1 verdict=deny reason=no_jobs msg=Access%20denied:%20no%20job%20on%20node2\n"
    )
    out = format_reply(PamReply("adopt", "callerid", "42"))
    assert out == b"CALLERID/1 verdict=adopt reason=callerid job=42 msg=\n"


def test_long_message_is_cut_at_an_escape_boundary() -> None:
    out = format_reply(PamReply("deny", "x", None, "\u00e9" * 3000))
    assert len(out) <= MAX_LINE and out.endswith(b"\n")
    msg = out.decode().split("msg=")[1].strip()
    assert re.fullmatch(r"(%[0-9A-F]{2})+", msg)  # whole %XX escapes only
    assert set(unquote(msg, errors="strict")) == {"\u00e9"}  # whole characters only
    out = format_reply(PamReply("deny", "abcd", None, "\u00e9" * 3000))
    assert set(unquote(out.decode().split("msg=")[1].strip(), errors="strict")) == {"\u00e9"}


# -- what a request's values may hold (issue 12 item 5) ----------------------------------------


@pytest.mark.parametrize(
    "user",
    [
        b"%00",  # NUL: pwd.getpwnam raised ValueError, the reply was agent_error
        b"a%00",
        b"%01root",
        b"a%1Bb",  # ESC
        b"a%7F",  # DEL
        b"a%C2%85",  # NEL (C1, and whitespace)
        b"a%C2%9Bb",  # CSI (C1)
        b"a%20b",
        b"a%09",
        b"a%E2%80%AEb",  # RIGHT-TO-LEFT OVERRIDE (a format character)
        b"a%E2%80%A8",  # LINE SEPARATOR
        b"%E3%80%80",  # IDEOGRAPHIC SPACE
        b"a%2Fb",
        b"a:b",
        b"u" * (MAX_USER + 1),
        b"%C3%A9" * 128,  # 128 characters but 256 bytes
    ],
)
def test_impossible_user_names_are_protocol_errors(user: bytes) -> None:
    with pytest.raises(PamProtocolError, match="invalid user"):
        parse_request(b"CALLERID/1 op=account user=" + user + b" service=sshd\n")


@pytest.mark.parametrize(
    ("user", "want"),
    [
        (b"u" * MAX_USER, "u" * MAX_USER),
        (b"%C3%A9" * 127, "\u00e9" * 127),
        (b"d%C3%A9v", "d\u00e9v"),
        (b"alice@EXAMPLE.COM", "alice@EXAMPLE.COM"),
        (b"AD%5Cbob", "AD\\bob"),
        (b"_svc-1.x$", "_svc-1.x$"),
    ],
)
def test_possible_user_names_pass(user: bytes, want: str) -> None:
    assert parse_request(b"CALLERID/1 op=account user=" + user).user == want


@pytest.mark.parametrize("key", ["service", "rhost", "tty"])
@pytest.mark.parametrize("value", [b"%00", b"a%0Ab", b"%1B%5B31m", b"x%7F", b"%C2%9B"])
def test_control_characters_in_service_rhost_tty_are_protocol_errors(
    key: str, value: bytes
) -> None:
    line = b"CALLERID/1 op=account user=alice " + key.encode() + b"=" + value
    with pytest.raises(PamProtocolError, match=f"control character in {key}"):
        parse_request(line)


def test_other_characters_in_service_rhost_tty_pass() -> None:
    req = parse_request(
        b"CALLERID/1 op=account user=a service=s%20d rhost=h%C3%B6st%E2%80%AE tty=%2Fdev%2Fpts%2F0"
    )
    assert (req.service, req.rhost, req.tty) == ("s d", "h\u00f6st\u202e", "/dev/pts/0")


def test_control_characters_in_unknown_keys_are_ignored() -> None:
    assert parse_request(b"CALLERID/1 op=account user=a future=%00").user == "a"


def test_reply_nul_becomes_a_question_mark_and_invalid_jobs_are_left_out() -> None:
    out = format_reply(PamReply("deny", "r\0", None, "a\0b"))
    assert out == b"CALLERID/1 verdict=deny reason=r%3F msg=a%3Fb\n"
    for job in ["", "4/2", "j" * 65, "a b", "\u00e9"]:
        assert b"job=" not in format_reply(PamReply("adopt", "callerid", job))
    assert b" job=" + b"j" * 64 + b" " in format_reply(PamReply("adopt", "callerid", "j" * 64))


def test_the_jobs_group_is_sent_with_an_adoption_only() -> None:
    out = format_reply(PamReply("adopt", "callerid", "42", "", gid=1003))
    assert out == b"CALLERID/1 verdict=adopt reason=callerid job=42 gid=1003 msg=\n"
    assert b" gid=0 " in format_reply(PamReply("adopt", "single_job", "7", gid=0))
    for verdict in ("allow", "deny", "error"):
        assert b"gid=" not in format_reply(PamReply(verdict, "r", "42", gid=1003))  # type: ignore[arg-type]
    for gid in (None, -1, 2**32 - 1, 2**40, True):  # (gid_t)-1 is "no group": never sent
        assert b"gid=" not in format_reply(PamReply("adopt", "callerid", "42", gid=gid))
    assert b" gid=4294967294 " in format_reply(PamReply("adopt", "x", "1", gid=2**32 - 2))


def test_a_long_reason_is_cut_and_the_line_still_fits() -> None:
    out = format_reply(PamReply("error", "\u00e9" * 5000, "1", "m" * 5000))
    assert len(out) == MAX_LINE and out.endswith(b"\n")
    assert c_parse_reply(out) is not None


# -- properties ---------------------------------------------------------------------------------

PROPS = settings(max_examples=300, deadline=None)

_SAFE_C = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.:/@+,[]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def c_encode_request(op: str, user: str, service: str, rhost: str, tty: str) -> bytes:
    """pam/codec.c cid_encode_request: safe bytes raw, every other byte %XX (upper case)."""

    def enc(value: str) -> str:
        return "".join(chr(b) if b in _SAFE_C else f"%{b:02X}" for b in value.encode())

    fields = zip(
        ("op", "user", "service", "rhost", "tty"), (op, user, service, rhost, tty), strict=True
    )
    return ("CALLERID/1" + "".join(f" {k}={enc(v)}" for k, v in fields) + "\n").encode()


def c_parse_reply(line: bytes) -> dict[str, str] | None:
    """What pam/codec.c cid_parse_reply accepts (client.h), as a model: None for garbage."""
    if not 1 <= len(line) <= MAX_LINE or not line.endswith(b"\n"):
        return None
    body = line[:-1]
    if not body.startswith(b"CALLERID/1") or (body[10:] and body[10:11] != b" "):
        return None
    out: dict[str, str] = {}
    for field in body[11:].split(b" ") if body[10:] else []:
        key, sep, raw = field.partition(b"=")
        if not sep or not re.fullmatch(rb"[a-z][a-z0-9_]{0,31}", key):
            return None
        if not re.fullmatch(rb"(?:[\x21-\x24\x26-\x3c\x3e-\x7e]|%[0-9A-Fa-f]{2})*", raw):
            return None
        value = re.sub(rb"%([0-9A-Fa-f]{2})", lambda m: bytes.fromhex(m[1].decode()), raw)
        if b"\0" in value:
            return None
        name = key.decode()
        if name in ("verdict", "job", "reason", "msg", "gid"):
            if name in out:
                return None
            out[name] = value.decode("utf-8", errors="surrogateescape")
    if out.get("verdict") not in ("adopt", "allow", "deny", "error"):
        return None
    if "job" in out and not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", out["job"]):
        return None
    if "gid" in out and not (
        re.fullmatch(r"0|[1-9][0-9]{0,9}", out["gid"]) and int(out["gid"]) <= 2**32 - 2
    ):
        return None
    return out


@PROPS
@given(st.text(max_size=300))
def test_encode_decode_roundtrip(value: str) -> None:
    enc = pct_encode(value)
    assert " " not in enc and "=" not in enc and "\n" not in enc
    assert pct_decode(enc) == value


def _check_parsed(line: bytes) -> None:
    """The invariant: a PamRequest that keeps every rule, or PamProtocolError."""
    try:
        req = parse_request(line)
    except PamProtocolError:
        return
    assert isinstance(req, PamRequest)
    assert req.op in ("account", "open_session", "close_session", "status")
    assert 0 < len(req.user.encode()) <= MAX_USER and req.user.isprintable()
    assert not re.search(r"[\s/:]", req.user)
    assert not any(_CONTROL.search(v) for v in (req.service, req.rhost, req.tty))


@PROPS
@given(st.binary(max_size=600))
def test_any_line_parses_or_raises_protocol_error(line: bytes) -> None:
    _check_parsed(line)


_value = st.text(st.characters(codec="utf-8"), max_size=40)
_raw_value = st.one_of(
    _value.map(pct_encode),
    st.binary(max_size=20).map(lambda b: "".join(f"%{x:02x}" for x in b)),
    st.text(st.characters(min_codepoint=0, max_codepoint=127), max_size=20),
)
_key = st.sampled_from(["op", "user", "service", "rhost", "tty", "future", "x_1"])


@PROPS
@given(
    st.lists(st.tuples(_key, _raw_value), max_size=7),
    st.sampled_from(["account", "open_session", "close_session", "status", "x"]),
)
def test_structured_lines_parse_or_raise_protocol_error(
    fields: list[tuple[str, str]], op: str
) -> None:
    """Right magic and keys, random values: the checks after decoding are what gets exercised."""
    text = "CALLERID/1 op=" + op + "".join(f" {k}={v}" for k, v in fields)
    _check_parsed(text.encode("utf-8", errors="surrogateescape") + b"\n")


_user = st.text(
    st.characters(codec="utf-8", blacklist_characters="/:",
                  blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp")),
    min_size=1, max_size=60,
).filter(lambda u: len(u.encode()) <= MAX_USER and not re.search(r"\s", u))  # fmt: skip
_field = st.text(st.characters(codec="utf-8", blacklist_categories=("Cc", "Cs")), max_size=100)


@PROPS
@given(
    st.sampled_from(["account", "open_session", "close_session", "status"]),
    _user,
    _field,
    _field,
    _field,
)
def test_what_the_module_encodes_parses_back(
    op: str, user: str, service: str, rhost: str, tty: str
) -> None:
    line = c_encode_request(op, user, service, rhost, tty)
    assert parse_request(line) == PamRequest(op, user, service, rhost, tty)  # type: ignore[arg-type]


def _same_as_the_field_walk(line: bytes) -> None:
    """`parse_request`'s one-match path gives what the field walk gives (or both refuse)."""
    try:
        walked: PamRequest | str = _parse_fields(line, None)
    except PamProtocolError:
        walked = "refused"
    try:
        got: PamRequest | str = parse_request(line)
    except PamProtocolError:
        got = "refused"
    assert got == walked


_ascii = st.text(st.characters(min_codepoint=0, max_codepoint=127), max_size=30)


@PROPS
@given(
    st.sampled_from(["account", "open_session", "close_session", "status", "x"]),
    _ascii, _ascii, _ascii, _ascii,
    st.sampled_from(["", " ns=0", " ns=1", " ns=2", " ns=", " x=1"]),
    st.sampled_from(["\n", "", "\n\n", " \n"]),
)  # fmt: skip
def test_the_common_line_parses_as_every_line_does(
    op: str, user: str, service: str, rhost: str, tty: str, tail: str, end: str
) -> None:
    """The module's field order with any ASCII values (escapes, spaces, "/", ":", "%",
    controls, empty or overlong names): the one-match path and the field walk agree."""
    line = f"CALLERID/1 op={op} user={user} service={service} rhost={rhost} tty={tty}{tail}{end}"
    _same_as_the_field_walk(line.encode())


@PROPS
@given(st.binary(max_size=300))
def test_any_line_parses_as_the_field_walk_does(line: bytes) -> None:
    _same_as_the_field_walk(b"CALLERID/1 op=account user=" + line)


def test_long_values_at_the_limits_agree() -> None:
    for user in ("u" * 255, "u" * 256):
        for value in ("v" * 1024, "v" * 1025):
            line = f"CALLERID/1 op=account user={user} service={value} rhost=h tty=t\n"
            _same_as_the_field_walk(line.encode())


_verdict = st.sampled_from(["adopt", "allow", "deny", "error"])
_any_text = st.text(max_size=120) | st.text(max_size=6000, alphabet="\u00e9\0x %\x1b")


@PROPS
@given(
    _verdict,
    _any_text,
    st.none() | st.text(max_size=70),
    _any_text,
    st.none() | st.integers(min_value=-3, max_value=2**33),
)
def test_every_reply_is_one_line_the_module_accepts(
    verdict: str, reason: str, job: str | None, msg: str, gid: int | None
) -> None:
    out = format_reply(PamReply(verdict, reason, job, msg, gid))  # type: ignore[arg-type]
    assert len(out) <= MAX_LINE and out.isascii()
    assert out.endswith(b"\n") and out.count(b"\n") == 1
    assert all(0x20 <= b <= 0x7E for b in out[:-1])
    parsed = c_parse_reply(out)
    assert parsed is not None, out[:200]
    assert parsed["verdict"] == verdict
    assert reason.replace("\0", "?").startswith(parsed["reason"])
    assert msg.replace("\0", "?").startswith(parsed["msg"])
    if len(out) < MAX_LINE - 12:  # nothing was cut
        assert parsed["msg"] == msg.replace("\0", "?")
    assert parsed.get("job") == (
        job if job and re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", job) else None
    )
    sent = verdict == "adopt" and gid is not None and 0 <= gid <= 2**32 - 2
    assert parsed.get("gid") == (str(gid) if sent else None)


# -- through the real PAM server on a real unix socket ------------------------------------------


class NssFlow:
    """A stand-in login flow that looks the user up as the real one does (users.py:
    pwd.getpwnam, which raises ValueError on a NUL: what issue 12 item 5 saw)."""

    def __init__(self) -> None:
        self.users: list[str] = []

    def account_now(self, req: PamRequest, pid: int, received: float | None, wait_s: float) -> None:
        return None  # NSS is always asked (a worker thread): never decided at once

    async def account(
        self, req: PamRequest, pid: int, received: float | None, started: object = None
    ) -> Outcome:
        self.users.append(req.user)
        pwd.getpwnam(req.user)
        rec = DecisionRecord(
            decision="allow", reason="root", user=req.user, uid=0, pid=pid, job=None, src=None,
            dst=None, peer_status=None, latency_us=0, message="root",
        )  # fmt: skip
        return Outcome(PamReply("allow", "root"), rec)

    async def open_session(self, req: PamRequest, pid: int) -> PamReply:
        self.users.append(req.user)
        return PamReply("allow", "not_adopted")

    def close_session(self, pid: int) -> PamReply:
        return PamReply("allow", "closed")

    def error_outcome(
        self, req: PamRequest, pid: int, started: float, reason: str, text: str
    ) -> Outcome:
        return Outcome(PamReply("error", reason), DecisionRecord(
            decision="error", reason=reason, user=req.user, uid=None, pid=pid, job=None, src=None,
            dst=None, peer_status=None, latency_us=0, message=text,
        ))  # fmt: skip


async def _ask_server(sock_dir: Path, line: bytes) -> tuple[bytes, PamServer, NssFlow, FakeJournal]:
    flow, journal = NssFlow(), FakeJournal()
    server = PamServer(flow, journal, timeout_s=2.0, clock=time.monotonic, allowed_uid=os.getuid())
    await server.start(sock_dir / "agent.sock")
    try:
        reader, writer = await asyncio.open_unix_connection(str(sock_dir / "agent.sock"))
        writer.write(line)
        writer.write_eof()
        try:
            reply = await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()
        return reply, server, flow, journal
    finally:
        await server.stop()


@pytest.mark.parametrize(
    ("op", "user"),
    [("account", b"%00"), ("account", b"root%00"), ("account", b"a%1B%5B2J"),
     ("open_session", b"a%C2%9B"), ("account", b"a%20b")],
)  # fmt: skip
def test_the_server_answers_a_bad_user_name_with_bad_request_in_one_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, op: str, user: bytes
) -> None:
    line = b"CALLERID/1 op=" + op.encode() + b" user=" + user + b" service=sshd\n"
    with caplog.at_level(logging.DEBUG, logger="callerid"):
        reply, server, flow, journal = asyncio.run(_ask_server(tmp_path, line))
    assert reply == b"CALLERID/1 verdict=error reason=bad_request msg=\n"
    assert flow.users == [] and journal.records == []  # refused before any look-up
    assert server.malformed == 1 and server.in_flight == 0
    logged = [r for r in caplog.records if r.name.startswith("callerid")]
    assert [r.levelno for r in logged] == [logging.WARNING], logged
    assert logged[0].exc_info is None and "\n" not in logged[0].getMessage()


def test_the_server_still_decides_for_a_good_user_name(tmp_path: Path) -> None:
    line = b"CALLERID/1 op=account user=root service=sshd\n"
    reply, server, flow, journal = asyncio.run(_ask_server(tmp_path, line))
    assert reply == b"CALLERID/1 verdict=allow reason=root msg=\n"
    assert flow.users == ["root"] and server.malformed == 0
    assert [r.decision for r in journal.records] == ["allow"]


# ---- namespaces: the request's ns=0|1, the reply's ns=KINDS --------------------------------


@pytest.mark.parametrize(("field", "join"), [("", None), (" ns=1", True), (" ns=0", False)])
def test_request_says_whether_the_module_joins_namespaces(field: str, join: bool | None) -> None:
    req = parse_request(f"CALLERID/1 op=account user=alice{field}\n".encode())
    assert req.join is join


@pytest.mark.parametrize("value", ["", "2", "yes", "01", "1%20"])
def test_request_ns_other_than_0_or_1_is_refused(value: str) -> None:
    with pytest.raises(PamProtocolError):
        parse_request(f"CALLERID/1 op=account user=alice ns={value}\n".encode())


def test_reply_names_the_namespaces_in_order_after_gid() -> None:
    line = format_reply(PamReply("adopt", "callerid", "42", gid=1003, ns=("user", "mnt", "pid")))
    want = b"CALLERID/1 verdict=adopt reason=callerid job=42 gid=1003 ns=user,mnt,pid msg=\n"
    assert line == want
    assert b" ns=" not in format_reply(PamReply("adopt", "callerid", "42"))


@pytest.mark.parametrize(
    ("verdict", "job", "ns"),
    [
        ("deny", None, ("mnt",)),
        ("allow", None, ("mnt",)),
        ("adopt", "42", ("mnt", "mnt")),
        ("adopt", "42", ("time",)),
        ("adopt", "42", ("mnt,pid",)),
    ],
)
def test_a_reply_that_would_name_bad_namespaces_is_our_bug(
    verdict: str, job: str | None, ns: tuple[str, ...]
) -> None:
    with pytest.raises(ValueError, match="namespaces"):
        PamReply(verdict, "x", job, ns=ns)  # type: ignore[arg-type]


def test_ns_kinds_agree_with_the_backend_interface() -> None:
    from callerid.agent.backends.base import NAMESPACE_KINDS, JobNamespaces
    from callerid.agent.pamproto import NS_KINDS

    assert NS_KINDS == NAMESPACE_KINDS
    with pytest.raises(ValueError):
        JobNamespaces([])
    with pytest.raises(ValueError):
        JobNamespaces([("mnt", 5), ("mnt", 6)])
    with pytest.raises(ValueError):
        JobNamespaces([("time", 5)])
    with pytest.raises(ValueError):
        JobNamespaces([("mnt", -1)])
