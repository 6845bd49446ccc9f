"""The sans-IO mesh protocol: round trips, strict validation, versions, fuzzing."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from callerid.bus.protocol import (
    MAX_MESSAGE_SIZE,
    PROTOCOL_VERSION,
    CallerIdQuery,
    CallerIdReply,
    Endpoint,
    ErrorCode,
    LocalProtocolError,
    Message,
    Ping,
    Pong,
    ProtocolError,
    UnsupportedVersion,
    decode,
    decode_frames,
    encode,
    error_reply,
    normalize_ip,
)

Q4 = CallerIdQuery(
    id=1, proto="tcp", src=Endpoint("10.0.0.1", 40000), dst=Endpoint("10.0.0.2", 22), uid=1000
)
MESSAGES: list[Message] = [
    Q4,
    CallerIdQuery(
        id=2**64 - 1, proto="udp", src=Endpoint("fd00::1", 1), dst=Endpoint("::1", 65535), uid=0
    ),
    CallerIdQuery(
        id=0, proto="tcp", src=Endpoint("0.0.0.0", 0), dst=Endpoint("1.2.3.4", 22), uid=2**32 - 2
    ),
    CallerIdReply(id=1, status="found", node="node-1", job="42"),
    CallerIdReply(id=1, status="found", node="n", job="42_7.extern-x"),
    CallerIdReply(id=9, status="not_found", node="node1.cluster", reason="no such connection"),
    CallerIdReply(id=3, status="error", node="n2", code=ErrorCode.BACKEND, reason="stepd down"),
    Ping(id=5),
    Pong(id=5, node="node_2"),
]


def body(msg: Message) -> dict[str, Any]:
    data: dict[str, Any] = msgpack.unpackb(encode(msg), raw=False)
    return data


def pack(data: Any) -> bytes:
    packed: bytes = msgpack.packb(data, use_bin_type=True)
    return packed


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    data = encode(msg)
    assert len(data) <= MAX_MESSAGE_SIZE
    assert decode(data) == msg
    assert decode_frames([data]) == msg
    assert decode(memoryview(data)) == msg


@pytest.mark.parametrize("frames", [[], [encode(Q4), encode(Q4)], [b"", encode(Q4)]])
def test_exactly_one_frame(frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError, match="frame"):
        decode_frames(frames)


def test_wire_shape_is_the_documented_one() -> None:
    assert body(Q4) == {
        "t": "q",
        "v": PROTOCOL_VERSION,
        "id": 1,
        "proto": "tcp",
        "src": ["10.0.0.1", 40000],
        "dst": ["10.0.0.2", 22],
        "uid": 1000,
    }
    assert body(Pong(id=5, node="b")) == {"t": "pong", "v": 1, "id": 5, "node": "b"}


# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("text", "canon"),
    [
        ("10.1.2.3", "10.1.2.3"),
        ("::1", "::1"),
        ("0:0:0:0:0:0:0:1", "::1"),
        ("FD00::0001", "fd00::1"),
        ("::ffff:10.1.2.3", "10.1.2.3"),
        ("::FFFF:7f00:2", "127.0.0.2"),
        ("::10.1.2.3", "::a01:203"),  # IPv4-compatible is not IPv4-mapped
    ],
)
def test_normalize_ip(text: str, canon: str) -> None:
    assert normalize_ip(text) == canon
    assert Endpoint(text, 22).ip == canon


@pytest.mark.parametrize(
    "text",
    ["", "localhost", "1.2.3", "1.2.3.4.5", "256.1.1.1", " 1.2.3.4", "fe80::1%eth0", "::1/128",
     "01.2.3.4", "1" * 46],
)  # fmt: skip
def test_normalize_ip_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        normalize_ip(text)


def test_mapped_addresses_are_normalised_on_the_wire() -> None:
    data = body(Q4) | {"src": ["::ffff:10.0.0.1", 40000], "dst": ["::ffff:10.0.0.2", 22]}
    msg = decode(pack(data))
    assert isinstance(msg, CallerIdQuery)
    assert (msg.src.ip, msg.dst.ip) == ("10.0.0.1", "10.0.0.2")


@pytest.mark.parametrize(
    ("text", "ip", "port"),
    [
        ("1.2.3.4:22", "1.2.3.4", 22),
        ("[::1]:6820", "::1", 6820),
        ("[::ffff:1.2.3.4]:1", "1.2.3.4", 1),
    ],
)
def test_endpoint_parse(text: str, ip: str, port: int) -> None:
    ep = Endpoint.parse(text)
    assert (ep.ip, ep.port) == (ip, port)
    assert Endpoint.parse(str(ep)) == ep


@pytest.mark.parametrize("text", ["1.2.3.4", "1.2.3.4:", "1.2.3.4:x", "[::1]:70000", "host:22"])
def test_endpoint_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        Endpoint.parse(text)


# --------------------------------------------------------------------------- strict validation

QUERY = body(Q4)
REPLY = body(CallerIdReply(id=1, status="found", node="n1", job="42"))
ERROR = body(CallerIdReply(id=1, status="error", node="n1", code=ErrorCode.INTERNAL, reason="x"))


@pytest.mark.parametrize(
    ("base", "change"),
    [
        (QUERY, {"id": -1}),
        (QUERY, {"id": "1"}),
        (QUERY, {"id": True}),
        (QUERY, {"id": 1.0}),
        (QUERY, {"id": None}),
        (QUERY, {"uid": 2**32 - 1}),
        (QUERY, {"uid": -1}),
        (QUERY, {"uid": False}),
        (QUERY, {"proto": "sctp"}),
        (QUERY, {"proto": "TCP"}),
        (QUERY, {"src": ["10.0.0.1"]}),
        (QUERY, {"src": ["10.0.0.1", 1, 2]}),
        (QUERY, {"src": {"ip": "10.0.0.1", "port": 1}}),
        (QUERY, {"src": ["10.0.0.1", 65536]}),
        (QUERY, {"src": ["10.0.0.1", -1]}),
        (QUERY, {"src": ["10.0.0.1", "22"]}),
        (QUERY, {"src": ["10.0.0.1", True]}),
        (QUERY, {"src": [167772161, 22]}),
        (QUERY, {"src": ["node1", 22]}),
        (QUERY, {"src": ["fe80::1%eth0", 22]}),
        (QUERY, {"src": ["::1", 22]}),  # family differs from dst
        (QUERY, {"dst": ["10.0.0.2", 22.0]}),
        (QUERY, {"t": "r"}),
        (QUERY, {"t": "nope"}),
        (QUERY, {"t": 1}),
        (QUERY, {"extra": 1}),
        (REPLY, {"status": "maybe"}),
        (REPLY, {"job": None}),  # found without a job
        (REPLY, {"job": "4/2"}),
        (REPLY, {"job": ""}),
        (REPLY, {"job": 42}),
        (REPLY, {"job": "j" * 65}),
        (REPLY, {"node": "-lead"}),
        (REPLY, {"node": "a b"}),
        (REPLY, {"node": "n" * 65}),
        (REPLY, {"node": ""}),
        (REPLY, {"code": ErrorCode.INTERNAL}),  # found with an error code
        (REPLY, {"reason": 7}),
        (ERROR, {"code": 0}),  # error without a code
        (ERROR, {"code": 99}),
        (ERROR, {"code": True}),
        (ERROR, {"reason": "r" * 201}),
        (ERROR, {"job": "42"}),  # error with a job
        (body(Ping(id=1)), {"node": "x"}),
        (body(Pong(id=1, node="x")), {"node": None}),
    ],
)
def test_invalid_fields_are_protocol_errors(base: dict[str, Any], change: dict[str, Any]) -> None:
    data = base | change
    with pytest.raises(ProtocolError) as exc:
        decode(pack(data))
    assert not isinstance(exc.value, UnsupportedVersion)


@pytest.mark.parametrize("field", sorted(QUERY))
def test_every_query_field_is_required(field: str) -> None:
    data = {k: v for k, v in QUERY.items() if k != field}
    with pytest.raises(ProtocolError):
        decode(pack(data))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # never used in msgpack
        b"\x92\x01\x02",  # an array, not a map
        pack("q"),
        pack(None),
        pack({1: 2}),  # non-string key
        pack({b"t": "ping", b"v": 1, b"id": 1}),  # binary keys
        pack({"t": "ping", "v": 1, "id": 1, "x": b"bin"}),
        pack({"t": "ping", "id": 1}),  # no version
        pack({"t": "ping", "v": "1", "id": 1}),
        pack({"t": "ping", "v": True, "id": 1}),
        pack(QUERY)[:-1],  # truncated
        pack(QUERY) + b"\x00",  # trailing data
        pack({"t": "ping", "v": 1, "id": 1, "pad": "x" * MAX_MESSAGE_SIZE}),  # too large
        b"\x91" * 500 + b"\x90",  # deeply nested arrays
        pack({"t": "ping", "v": 1, "id": list(range(17))}),  # array over the limit
        pack(dict.fromkeys((str(i) for i in range(17)), 0)),  # map over the limit
        b"\xd4\x01\x00",  # ext type
        b"\xd6\xff\x00\x00\x00\x00",  # timestamp ext
    ],
)
def test_garbage_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError) as exc:
        decode(data)
    assert not isinstance(exc.value, UnsupportedVersion)


def test_non_bytes_frame_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        decode("a string")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- versions


@pytest.mark.parametrize(
    ("version", "rid", "expect"),
    [(2, 7, 7), (0, 2**64 - 1, 2**64 - 1), (-3, 7, 7), (2, None, None), (2, "7", None),
     (2, -1, None), (2, True, None)],
)  # fmt: skip
def test_unknown_version_carries_the_request_id(version: int, rid: Any, expect: int | None) -> None:
    data = {"t": "q", "v": version, "whatever": [1, 2]}
    if rid is not None:
        data["id"] = rid
    with pytest.raises(UnsupportedVersion) as exc:
        decode(pack(data))
    assert exc.value.version == version
    assert exc.value.request_id == expect
    assert isinstance(exc.value, ProtocolError)


def test_error_reply_for_a_bad_version_fits_and_round_trips() -> None:
    exc = UnsupportedVersion(2**63, 7)
    reply = error_reply(7, "node1", ErrorCode.BAD_VERSION, str(exc) * 10)
    assert len(reply.reason) == 200
    assert decode(encode(reply)) == reply
    assert reply.code == ErrorCode.BAD_VERSION
    assert reply.status == "error"


# --------------------------------------------------------------------------- building


@pytest.mark.parametrize(
    "build",
    [
        lambda: Endpoint("localhost", 22),
        lambda: Endpoint("1.2.3.4", 65536),
        lambda: Ping(id=-1),
        lambda: Ping(id=2**64),
        lambda: Pong(id=1, node="bad name"),
        lambda: CallerIdQuery(1, "tcp", Endpoint("::1", 1), Endpoint("1.2.3.4", 2), 0),
        lambda: CallerIdReply(id=1, status="found", node="n"),
        lambda: CallerIdReply(id=1, status="not_found", node="n", code=ErrorCode.BACKEND),
    ],
)
def test_building_an_invalid_message_is_a_local_error(build: Any) -> None:
    with pytest.raises(LocalProtocolError):
        build()


def test_encoding_an_oversized_message_is_a_local_error() -> None:
    msg = CallerIdReply(id=1, status="error", node="n" * 64, code=3, reason="r" * 200)
    assert len(encode(msg)) <= MAX_MESSAGE_SIZE  # the largest legal reply fits
    with pytest.raises(LocalProtocolError):
        encode("not a message")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- fuzzing

FUZZ = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check_decode(data: bytes) -> None:
    """The invariant: decode or raise ProtocolError, and what decodes re-encodes identically."""
    try:
        msg = decode(data)
    except ProtocolError:
        return
    assert decode(encode(msg)) == msg


@FUZZ
@given(st.binary(max_size=2 * MAX_MESSAGE_SIZE))
def test_any_bytes_decode_or_raise_protocol_error(data: bytes) -> None:
    _check_decode(data)


@FUZZ
@given(st.sampled_from([encode(m) for m in MESSAGES]), st.data())
def test_mutated_messages_decode_or_raise_protocol_error(good: bytes, data: st.DataObject) -> None:
    buf = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(buf) - 1))
        buf[pos] = data.draw(st.integers(0, 255))
    _check_decode(bytes(buf))


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=80)
    | st.binary(max_size=8)
    | st.sampled_from(["tcp", "udp", "found", "not_found", "error", "q", "r", "ping", "pong",
                       "10.0.0.1", "::ffff:10.0.0.1", "::1", "node1", "42"])
)  # fmt: skip
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=10,
)
_endpoints = st.lists(
    st.one_of(st.sampled_from(["10.0.0.1", "::1", "::ffff:1.2.3.4", "x"]), st.integers(-2, 70000)),
    min_size=0,
    max_size=3,
)
_field_values = st.one_of(_values, _endpoints, st.integers(0, 2**32))
_FIELD_NAMES = ["t", "v", "id", "proto", "src", "dst", "uid", "status", "code", "job", "node",
                "reason"]  # fmt: skip


@FUZZ
@given(
    st.dictionaries(st.sampled_from(_FIELD_NAMES) | st.text(max_size=5), _field_values, max_size=10)
)
def test_random_maps_decode_or_raise_protocol_error(fields: dict[str, Any]) -> None:
    _check_decode(pack(fields))


@FUZZ
@given(
    st.sampled_from([QUERY, REPLY, ERROR, body(Ping(id=1)), body(Pong(id=1, node="a"))]),
    st.dictionaries(st.sampled_from(_FIELD_NAMES), _field_values, min_size=1, max_size=3),
)
def test_valid_maps_with_random_field_values(base: dict[str, Any], change: dict[str, Any]) -> None:
    """Structured fuzz: the right shape, so the per-field checks are what gets exercised."""
    data = base | change
    try:
        msg = decode(pack(data))
    except UnsupportedVersion as exc:
        assert data["v"] != PROTOCOL_VERSION
        assert exc.request_id is None or exc.request_id == data.get("id")
        return
    except ProtocolError:
        return
    assert decode(encode(msg)) == msg
    assert msg.id == data["id"]


# --------------------------------------------------------------------------- generated messages

_ids = st.integers(0, 2**64 - 1)
_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}", fullmatch=True)
_jobs = st.from_regex(r"[A-Za-z0-9_.\-]{1,64}", fullmatch=True)
_ports = st.integers(0, 65535)


def _endpoints_of(version: int) -> st.SearchStrategy[Endpoint]:
    # an IPv4-mapped IPv6 address is IPv4 once normalised: it belongs to the other family
    ips = st.ip_addresses(v=version).filter(lambda a: getattr(a, "ipv4_mapped", None) is None)
    return st.builds(Endpoint, ips.map(str), _ports)


_queries = st.sampled_from([4, 6]).flatmap(
    lambda v: st.builds(
        CallerIdQuery, id=_ids, proto=st.sampled_from(["tcp", "udp"]), src=_endpoints_of(v),
        dst=_endpoints_of(v), uid=st.integers(0, 2**32 - 2),
    )
)  # fmt: skip
_reasons = st.text(max_size=200)
_replies = st.one_of(
    st.builds(CallerIdReply, id=_ids, status=st.just("found"), node=_names, job=_jobs,
              reason=_reasons),
    st.builds(CallerIdReply, id=_ids, status=st.just("not_found"), node=_names, reason=_reasons),
    st.builds(CallerIdReply, id=_ids, status=st.just("error"), node=_names, reason=_reasons,
              code=st.sampled_from([c for c in ErrorCode.NAMES if c != ErrorCode.OK])),
)  # fmt: skip
_messages = st.one_of(
    _queries, _replies, st.builds(Ping, id=_ids), st.builds(Pong, id=_ids, node=_names)
)


GENERATED = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@GENERATED
@given(_messages)
def test_every_valid_message_round_trips(msg: Message) -> None:
    data = encode(msg)
    assert len(data) <= MAX_MESSAGE_SIZE
    assert decode(data) == msg
    assert decode_frames([data]) == msg
    assert encode(decode(data)) == data


@GENERATED
@given(
    st.lists(
        st.binary(max_size=64) | st.sampled_from([b"", *(encode(m) for m in MESSAGES)]),
        max_size=4,
    )
)
def test_any_frame_list_decodes_or_raises_protocol_error(frames: list[bytes]) -> None:
    try:
        msg = decode_frames(frames)
    except ProtocolError:
        return
    assert len(frames) == 1
    assert msg == decode(frames[0])
