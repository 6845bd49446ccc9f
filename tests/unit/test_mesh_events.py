"""How socket-monitor events become peer verdicts (and what is negative-cached)."""

from __future__ import annotations

import errno

import pytest
import zmq

from callerid.bus._deadhosts import DeadHosts
from callerid.bus._sockets import classify_event
from tests.fakes import FakeClock

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


# -- the negative cache of hosts where nothing listens -------------------------------------

A, B, C = ("10.0.0.1", 6820), ("10.0.0.2", 6820), ("10.0.0.3", 6820)


def test_dead_host_is_skipped_until_the_ttl() -> None:
    clock = FakeClock()
    dead = DeadHosts(30.0, clock)
    dead.add(A)
    clock.advance(29.9)
    assert A in dead
    assert B not in dead
    clock.advance(0.1)
    assert A not in dead
    assert len(dead) == 0  # an expired entry is forgotten when looked up


def test_zero_ttl_remembers_nothing() -> None:
    dead = DeadHosts(0.0, FakeClock())
    dead.add(A)
    assert A not in dead
    assert len(dead) == 0


def test_bound_drops_expired_entries_first_then_the_oldest() -> None:
    clock = FakeClock()
    dead = DeadHosts(10.0, clock, max_size=2)
    dead.add(A)
    clock.advance(5.0)
    dead.add(B)
    clock.advance(6.0)  # A expired, B still dead
    dead.add(C)
    assert (A in dead, B in dead, C in dead) == (False, True, True)
    dead.add(A)  # full of live entries: the oldest (B) goes
    assert (A in dead, B in dead, C in dead) == (True, False, True)
