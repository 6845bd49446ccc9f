"""The sans-IO slurmstepd codec, replayed against bytes captured from a real 22.05 stepd.

tests/fixtures/stepd/*.json were recorded on a plain unix socket from Debian's slurmstepd
(tests/integration/test_slurm_backend.py, ``CALLERID_CAPTURE_STEPD=1``): for each exchange the
request, the bytes we sent, the bytes the stepd answered and the value we decoded. The stepd's
side of the codec (and STEP_LIST_PIDS, which the backend never asks) is the test stand-in's,
tests/support/fake_stepd.py.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from callerid.agent.backends import stepd
from callerid.agent.backends.slurm import guess_node_name, job_from_cgroup
from tests.support.fake_stepd import MAX_PIDS, encode_reply, list_pids, request_reader

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "stepd"
RECORDS = sorted(FIXTURES.glob("*.json"))

ENCODERS: dict[str, Callable[[Any], stepd.Exchange[Any]]] = {
    "hello": stepd.hello,
    "STEP_UID": lambda _arg: stepd.step_uid(),
    "STATE": lambda _arg: stepd.state(),
    "DAEMON_PID": lambda _arg: stepd.daemon_pid(),
    "STEP_LIST_PIDS": lambda _arg: list_pids(),
    "PID_IN_CONTAINER": stepd.pid_in_container,
    "ADD_EXTERN_PID": stepd.add_extern_pid,
}

little_endian_only = pytest.mark.skipif(
    sys.byteorder != "little", reason="the fixtures were captured on a little-endian host"
)


def _exchanges() -> list[tuple[str, dict[str, Any]]]:
    cases = []
    for path in RECORDS:
        for i, record in enumerate(json.loads(path.read_text())["conversation"]):
            cases.append((f"{path.stem}[{i}]:{record['request']}", record))
    return cases


def test_the_captures_are_there() -> None:
    names = {p.stem for p in RECORDS}
    assert {"extern_step", "add_extern_pid", "add_extern_pid_refused", "hello_refused"} <= names
    requests = {r["request"] for _id, r in _exchanges()}
    assert requests == set(ENCODERS)


@little_endian_only
@pytest.mark.parametrize(("case", "record"), _exchanges(), ids=[c for c, _r in _exchanges()])
def test_replay_real_stepd_exchange(case: str, record: dict[str, Any]) -> None:
    exchange = ENCODERS[record["request"]](record["arg"])
    sent, received = bytes.fromhex(record["sent"]), bytes.fromhex(record["received"])
    if "error" in record:  # the stepd had closed the connection: nothing went either way
        assert (sent, received) == (b"", b"")
        return
    assert exchange.data == sent
    whole = exchange.reader()
    assert whole.feed(received + b"trailing") == len(received)
    assert whole.done
    assert whole.value == record["value"]
    trickle = exchange.reader()
    for i in range(len(received)):
        assert not trickle.done
        assert trickle.feed(received[i : i + 1]) == 1
    assert trickle.done
    assert trickle.value == record["value"]
    if record["request"] != "hello":  # what a stepd would decode from our bytes
        request = request_reader()
        assert request.feed(sent) == len(sent)
        assert request.value == (stepd.Request[record["request"]], record["arg"])
        assert encode_reply(request.value[0], record["value"]) == received


@little_endian_only
def test_real_values_make_sense() -> None:
    conv = json.loads((FIXTURES / "extern_step.json").read_text())["conversation"]
    values = {r["request"]: r["value"] for r in conv if r["request"] != "PID_IN_CONTAINER"}
    assert values["hello"] == stepd.PROTOCOL_22_05  # we sent 26.05's; a 22.05 stepd accepts
    assert stepd.version_name(values["hello"]) == "22.05"
    assert stepd.state_name(values["STATE"], values["hello"]) == "running"
    assert conv[0]["sent"] == struct.pack("<i", stepd.DEFAULT_PROTOCOL_VERSION).hex()


# --------------------------------------------------------------------------- the reader


def test_reader_reports_what_it_needs() -> None:
    reader = list_pids().reader()
    assert reader.needed == 4
    assert reader.feed(b"\x02\x00") == 2
    assert reader.needed == 2
    assert reader.feed(b"\x00\x00") == 2
    assert reader.needed == 8
    with pytest.raises(RuntimeError):
        _ = reader.value
    assert reader.feed(struct.pack("=II", 10, 11) + b"x") == 8
    assert (reader.done, reader.needed, reader.value) == (True, 0, [10, 11])
    assert reader.feed(b"more") == 0


def test_empty_pid_list_needs_no_more_bytes() -> None:
    reader = list_pids().reader()
    assert reader.feed(struct.pack("=I", 0)) == 4
    assert reader.done
    assert reader.value == []


def test_oversized_pid_list_is_a_protocol_error() -> None:
    reader = list_pids().reader()
    with pytest.raises(stepd.StepdProtocolError, match="pids"):
        reader.feed(struct.pack("=I", MAX_PIDS + 1))


def test_bool_other_than_0_or_1_is_a_protocol_error() -> None:
    with pytest.raises(stepd.StepdProtocolError, match="bool"):
        stepd.pid_in_container(5).reader().feed(b"\x07")


def test_signed_and_unsigned_replies() -> None:
    assert _decode(stepd.add_extern_pid(3), struct.pack("=i", -1)) == -1
    assert _decode(stepd.hello(), struct.pack("=i", -1)) == -1
    assert _decode(stepd.step_uid(), struct.pack("=I", 4294967294)) == 4294967294


def _decode(exchange: stepd.Exchange[Any], data: bytes) -> Any:
    reader = exchange.reader()
    assert reader.feed(data) == len(data)
    return reader.value


@pytest.mark.parametrize("pid", [0, -1, 2**31])
def test_invalid_pids_are_not_encoded(pid: int) -> None:
    with pytest.raises(ValueError, match="invalid pid"):
        stepd.add_extern_pid(pid)


def test_requests_encode_code_then_pid() -> None:
    assert stepd.add_extern_pid(0x1234).data == struct.pack("=ii", 22, 0x1234)
    assert stepd.pid_in_container(7).data == struct.pack("=ii", 8, 7)
    assert stepd.step_uid().data == struct.pack("=i", 20)
    assert stepd.hello(stepd.PROTOCOL_26_05).data == struct.pack("=i", 11520)


# --------------------------------------------------------------------------- server side


def test_request_reader_rejects_unknown_codes() -> None:
    with pytest.raises(stepd.StepdProtocolError, match="unknown request code 99"):
        request_reader().feed(struct.pack("=i", 99))


def test_pipelined_requests_decode_in_order() -> None:
    stream = b"".join(
        e.data for e in (stepd.step_uid(), stepd.add_extern_pid(42), stepd.pid_in_container(42))
    )
    decoded = []
    while stream:
        reader = request_reader()
        stream = stream[reader.feed(stream) :]
        decoded.append(reader.value)
    assert decoded == [
        (stepd.Request.STEP_UID, None),
        (stepd.Request.ADD_EXTERN_PID, 42),
        (stepd.Request.PID_IN_CONTAINER, 42),
    ]


@pytest.mark.parametrize(
    ("request_", "value", "exchange"),
    [
        (stepd.Request.STEP_UID, 1001, stepd.step_uid()),
        (stepd.Request.ADD_EXTERN_PID, 0, stepd.add_extern_pid(1)),
        (stepd.Request.PID_IN_CONTAINER, True, stepd.pid_in_container(1)),
        (stepd.Request.STEP_LIST_PIDS, [1, 2, 3], list_pids()),
        (stepd.Request.DAEMON_PID, 77, stepd.daemon_pid()),
        (stepd.Request.STATE, 2, stepd.state()),
        ("hello", stepd.PROTOCOL_22_05, stepd.hello()),
    ],
)
def test_encode_reply_round_trips(
    request_: stepd.Request | str, value: Any, exchange: stepd.Exchange[Any]
) -> None:
    assert _decode(exchange, encode_reply(request_, value)) == value


# --------------------------------------------------------------------------- names and helpers


def test_version_and_state_names() -> None:
    assert stepd.version_name(9728) == "22.05"
    assert stepd.version_name(11520) == "26.05"
    assert stepd.version_name(1) == "1 (0x0001)"
    assert stepd.state_name(3, stepd.PROTOCOL_22_05) == "ending"
    assert stepd.state_name(3, stepd.PROTOCOL_26_05) == "cancelled"
    assert stepd.state_name(4, stepd.PROTOCOL_26_05) == "ending"
    assert stepd.state_name(9, stepd.PROTOCOL_22_05) == "unknown(9)"


@pytest.mark.parametrize(
    ("nodes", "hostname", "expected"),
    [
        ([], "vm", "vm"),
        (["vm", "vm"], "vm", "vm"),
        (["n01"], "vm", "n01"),  # NodeName differs from the hostname
        (["n01", "vm"], "vm", "vm"),
        (["n01", "n02"], "vm", "vm"),  # several slurmds: configure node_name
    ],
)
def test_guess_node_name(nodes: list[str], hostname: str, expected: str) -> None:
    assert guess_node_name(nodes, hostname) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("6:freezer:/slurm_vm/uid_1001/job_5/step_batch\n0::/\n", "5"),
        ("6:freezer:/slurm/uid_1001/job_17/step_extern/task_0\n", "17"),
        ("0::/system.slice/slurmstepd.scope/job_42/step_0/user/task_0\n", "42"),
        ("6:freezer:/slurm_vm/uid_1001/job_5/step_batch\n4:memory:/slurm/job_6/step_0\n", None),
        ("6:freezer:/\n0::/user.slice/user-1001.slice/session-3.scope\n", None),
        ("0::/jobs/job_5\n", None),  # no step level: not Slurm's layout
    ],
)
def test_job_from_cgroup(text: str, expected: str | None) -> None:
    assert job_from_cgroup(text) == expected


# --------------------------------------------------------------------------- fuzz

READERS: list[Callable[[], stepd.Reader[Any]]] = [
    lambda: stepd.hello().reader(),
    lambda: stepd.step_uid().reader(),
    lambda: stepd.pid_in_container(1).reader(),
    lambda: list_pids().reader(),
    lambda: stepd.get_ns_fd().reader(),
    lambda: stepd.get_ns_fds().reader(),
    request_reader,
]


@given(st.sampled_from(READERS), st.binary(max_size=64), st.integers(min_value=1, max_value=9))
def test_any_bytes_decode_or_raise_protocol_error(
    make: Callable[[], stepd.Reader[Any]], data: bytes, chunk: int
) -> None:
    reader = make()
    taken = 0
    try:
        while taken < len(data) and not reader.done:
            taken += reader.feed(data[taken : taken + chunk])
    except stepd.StepdProtocolError:
        return
    assert taken <= len(data)
    assert reader.done or reader.needed > 0


# --------------------------------------------------------------------------- GETPW


def _passwd_bytes(name: bytes, uid: int, gid: int, *, shell: bytes = b"/bin/sh") -> bytes:
    """A GETPW reply laid out as 22.05-26.05 `_handle_getpw` writes it."""

    def text(value: bytes) -> bytes:
        return struct.pack("=i", len(value)) + value

    head = struct.pack("=i", 1) + text(name) + text(b"*") + struct.pack("=II", uid, gid)
    return head + text(b"") + text(b"/home/" + name) + text(shell)


def test_getpw_request_asks_always_about_nobody_in_particular() -> None:
    assert stepd.getpw().data == struct.pack("=iiIi", 24, 1, 2**32 - 1, 0)


def test_getpw_reply_gives_the_jobs_group() -> None:
    data = _passwd_bytes(b"alice", 1001, 1002)
    assert _decode(stepd.getpw(), data) == stepd.StepPasswd("alice", 1001, 1002)
    trickle = stepd.getpw().reader()
    for i in range(len(data)):
        assert not trickle.done
        assert trickle.feed(data[i : i + 1]) == 1
    assert trickle.value == stepd.StepPasswd("alice", 1001, 1002)
    assert _decode(stepd.getpw(), struct.pack("=i", 0)) is None  # "not found"


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (struct.pack("=i", 7), "found flag"),
        (struct.pack("=i", -1), "found flag"),
        (struct.pack("=ii", 1, -1), "length"),
        (struct.pack("=ii", 1, stepd.MAX_PASSWD_FIELD + 1), "length"),
    ],
)
def test_bad_getpw_replies_are_protocol_errors(data: bytes, match: str) -> None:
    with pytest.raises(stepd.StepdProtocolError, match=match):
        stepd.getpw().reader().feed(data)


def test_getpw_request_is_understood_by_the_stand_in() -> None:
    request = request_reader()
    data = stepd.getpw().data
    assert request.feed(data + b"next") == len(data)
    assert request.value == (stepd.Request.GETPW, 1)
    pw = stepd.StepPasswd("fake", 5, 6)
    assert _decode(stepd.getpw(), encode_reply(stepd.Request.GETPW, pw)) == pw


# --------------------------------------------------------------------------- namespaces

CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWUSER = 0x00020000, 0x20000000, 0x10000000


def test_namespace_requests_have_their_real_codes() -> None:
    # step_msg_t: REQUEST_GET_NS_FD = 26 (22.05-26.05), REQUEST_GET_NS_FDS = 28 (25.11 on)
    assert stepd.get_ns_fd().data == struct.pack("=i", 26)
    assert stepd.get_ns_fds().data == struct.pack("=i", 28)
    assert stepd.GET_NS_FDS_SINCE == 44 << 8  # 25.11


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (struct.pack("=i", 0), ()),  # no job_container plugin (or BasePath=none)
        (struct.pack("=i", -1), None),  # the stepd could not open <BasePath>/<job>/.ns
        (struct.pack("=i", 7) + b"\x00", (0,)),  # the stepd's fd number, then the fd's byte
    ],
)
def test_get_ns_fd_replies(data: bytes, expected: tuple[int, ...] | None) -> None:
    assert _decode(stepd.get_ns_fd(), data) == expected


def test_get_ns_fds_replies_in_the_stepds_order() -> None:
    assert _decode(stepd.get_ns_fds(), struct.pack("=i", 0)) == ()
    # namespace/linux: pid, user, mnt; each type rides before its fd's marker byte
    data = struct.pack("=i", 3) + b"".join(
        struct.pack("=i", t) + b"\x00" for t in (CLONE_NEWPID, CLONE_NEWUSER, CLONE_NEWNS)
    )
    assert _decode(stepd.get_ns_fds(), data) == (CLONE_NEWPID, CLONE_NEWUSER, CLONE_NEWNS)
    assert [stepd.ns_kind(t) for t in (CLONE_NEWPID, CLONE_NEWUSER, CLONE_NEWNS)] == [
        "pid",
        "user",
        "mnt",
    ]
    assert stepd.ns_kind(0) is None


@pytest.mark.parametrize(
    ("exchange", "data", "match"),
    [
        (stepd.get_ns_fds, struct.pack("=i", -1), "count"),
        (stepd.get_ns_fds, struct.pack("=i", stepd.MAX_NS_FDS + 1), "count"),
        (stepd.get_ns_fds, struct.pack("=ii", 1, CLONE_NEWNS) + b"x", "marker"),
        (stepd.get_ns_fd, struct.pack("=i", 3) + b"\x01", "marker"),
    ],
)
def test_bad_namespace_replies_are_protocol_errors(
    exchange: Callable[[], stepd.Exchange[Any]], data: bytes, match: str
) -> None:
    with pytest.raises(stepd.StepdProtocolError, match=match):
        exchange().reader().feed(data)
