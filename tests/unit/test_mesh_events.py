"""How socket-monitor events become peer verdicts (and what is negative-cached)."""

from __future__ import annotations

import errno

import pytest
import zmq

from callerid.bus._sockets import classify_event

E = zmq


@pytest.mark.parametrize(
    ("event", "value", "established", "connected", "state"),
    [
        (E.EVENT_CONNECTED, 7, False, False, "connected"),
        (E.EVENT_HANDSHAKE_SUCCEEDED, 0, False, True, "up"),
        # nothing listens: refused at once -> unreachable (negative-cached)
        (E.EVENT_CONNECT_RETRIED, 100, False, False, "unreachable"),
        (E.EVENT_CLOSED, 7, False, False, "unreachable"),
        # it accepted, then said nothing in time: a stalled agent, not a dead host
        (E.EVENT_CLOSED, 7, False, True, "stalled"),
        (E.EVENT_DISCONNECTED, 7, False, True, "stalled"),
        (E.EVENT_HANDSHAKE_FAILED_NO_DETAIL, errno.EAGAIN, False, True, "stalled"),
        # keys
        (E.EVENT_HANDSHAKE_FAILED_AUTH, 400, False, True, "auth_failed"),
        (E.EVENT_HANDSHAKE_FAILED_PROTOCOL, 0x10000011, False, True, "auth_failed"),
        (E.EVENT_HANDSHAKE_FAILED_NO_DETAIL, errno.EPROTO, False, True, "auth_failed"),
        # after the handshake
        (E.EVENT_DISCONNECTED, 7, True, True, "lost"),
    ],
)
def test_classify(event: int, value: int, established: bool, connected: bool, state: str) -> None:
    verdict = classify_event(event, value, established=established, connected=connected)
    assert verdict is not None and verdict.state == state


def test_events_that_change_nothing() -> None:
    assert classify_event(E.EVENT_CLOSED, 7, established=True, connected=True) is None
    assert classify_event(E.EVENT_LISTENING, 7, established=False) is None
