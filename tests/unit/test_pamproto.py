"""The PAM socket line protocol: parsing, encoding, limits."""

from __future__ import annotations

import contextlib
import re
from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from callerid.agent.pamproto import (
    MAX_LINE,
    PamProtocolError,
    PamReply,
    PamRequest,
    format_reply,
    parse_request,
    pct_decode,
    pct_encode,
)


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


@given(st.text(max_size=300))
def test_encode_decode_roundtrip(value: str) -> None:
    enc = pct_encode(value)
    assert " " not in enc and "=" not in enc and "\n" not in enc
    assert pct_decode(enc) == value


@given(st.binary(max_size=600))
def test_any_line_parses_or_raises_protocol_error(line: bytes) -> None:
    with contextlib.suppress(PamProtocolError):
        parse_request(line)
