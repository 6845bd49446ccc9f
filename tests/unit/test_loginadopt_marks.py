"""`Adopter`'s frame around an adoption (`_loginadopt._Adopting`, `_loginstate.pinned`): the
login's "adopt" mark once the adoption is over, whichever way it ended, none while it is still
pending, and the pin closed every time.

The frame is a class rather than a generator (every adopted login passes through it); these
pin its contract down. Fakes at the edges (tests/fakes.py): nothing real is moved.
"""

from __future__ import annotations

import asyncio

import pytest

from callerid.agent import policy
from callerid.agent._loginadopt import Adopter, _NotYet
from callerid.agent._loginstate import Login, pinned
from callerid.agent.backends.base import BackendError, Job
from callerid.agent.config import parse
from callerid.agent.netinfo import ProcessGone
from callerid.agent.pamproto import PamRequest
from tests.fakes import FakeBackend, FakeClock, FakeProcs

PID = 4242
JOB = Job("42", 1000, 100.0)
ADOPT = policy.Decision("adopt", "single_job", job=JOB)


def setup(procs: FakeProcs) -> tuple[Adopter, Login, FakeBackend]:
    backend = FakeBackend([JOB])
    adopter = Adopter(
        parse({}).policy, node="b", procs=procs, backend=backend, executor=None, clock=FakeClock()
    )
    req = PamRequest("account", "alice", "sshd", "10.0.0.1", "ssh")  # type: ignore[arg-type]
    login = Login(req, PID, 0.0, policy.Facts(user="alice", uid=1000))
    login.target_pid, login.target_start = PID, 1.0
    return adopter, login, backend


def adopt_marks(login: Login) -> int:
    return sum(1 for what, _t in login.marks if what == "adopt")


def test_an_adoption_carried_out_is_marked_once_and_its_pin_closed() -> None:
    procs = FakeProcs({PID: 1.0})
    adopter, login, backend = setup(procs)
    assert adopter.carry_out(login, ADOPT) is ADOPT
    assert backend.adopted == [(PID, "42")]
    assert adopt_marks(login) == 1 and procs.open_pins == []


@pytest.mark.parametrize("how", ["exits_meanwhile", "gone_before"])
def test_a_failed_adoption_is_marked_too_and_its_pin_closed(how: str) -> None:
    procs = FakeProcs({PID: 1.0 if how == "exits_meanwhile" else 2.0})
    procs.exiting.add(PID)
    adopter, login, backend = setup(procs)
    got = adopter.carry_out(login, ADOPT)
    assert (got.verdict, got.reason) == ("deny", "adopt_failed")
    assert backend.adopted == ([(PID, "42")] if how == "exits_meanwhile" else [])
    assert adopt_marks(login) == 1 and procs.open_pins == []


def test_an_adoption_left_pending_is_not_marked_and_its_pin_closed() -> None:
    procs = FakeProcs({PID: 1.0})
    adopter, login, _backend = setup(procs)
    with pytest.raises(_NotYet), adopter._adopting(login, ADOPT, pending=_NotYet) as target:
        assert target == (PID, JOB)
        raise _NotYet
    assert adopt_marks(login) == 0 and procs.open_pins == []
    with pytest.raises(KeyError), adopter._adopting(login, ADOPT, pending=_NotYet):
        raise KeyError("any other error ends it")
    assert adopt_marks(login) == 1 and procs.open_pins == []


def test_pinned_refuses_a_held_process_gone_and_one_that_exits_during_the_body() -> None:
    procs = FakeProcs({PID: 1.0})
    held = procs.hold(PID)
    procs.exiting.add(PID)
    with pytest.raises(ProcessGone), pinned(procs, PID, 1.0, held):
        raise AssertionError("the body of a gone process never runs")
    assert procs.open_pins == []
    procs.exiting.clear()
    ran = []
    with (
        pytest.raises(BackendError, match="exited while it was being adopted"),
        pinned(procs, PID, 1.0),
    ):
        ran.append(True)
        procs.exiting.add(PID)  # exits while the body runs
    assert ran == [True] and procs.open_pins == []


def test_a_begun_adoption_is_not_polled_again_before_but_still_after() -> None:
    """``sent``: the requests are out (the pin was found alive just before): a check before the
    body would stop nothing; the one after still turns an exit into a failure."""
    procs = FakeProcs({PID: 1.0})
    held = procs.hold(PID)
    polls = []
    exited = held.exited
    held.exited = lambda: polls.append(True) or exited()  # type: ignore[method-assign]
    procs.exiting.add(PID)  # gone by the time the adoption is finished
    ran = []
    with (
        pytest.raises(BackendError, match="exited while it was being adopted"),
        pinned(procs, PID, 1.0, held, sent=True),
    ):
        ran.append(True)
    assert ran == [True] and polls == [True] and procs.open_pins == []


class LoopBackend:
    """A `LoopAdoption` whose adoptions succeed; asked whether a job has namespaces, it says
    "maybe" and counts the question (each one a spool-directory look for the slurm backend)."""

    def __init__(self) -> None:
        self.adopted: list[tuple[int, str, object]] = []
        self.asked = 0

    async def adopt_async(self, pid: int, job: Job, begun: object = None) -> None:
        self.adopted.append((pid, job.id, begun))

    def no_namespaces(self, job: Job) -> bool:
        self.asked += 1
        return False


class BegunAdoption:
    def __init__(self, job: Job, no_namespaces: bool) -> None:
        self.pid, self.job, self.no_namespaces = PID, job, no_namespaces

    def close(self) -> None:
        pass


@pytest.mark.parametrize("no_namespaces", [True, False])
def test_a_begun_adoption_finished_on_the_loop_tells_whether_to_fetch_namespaces(
    no_namespaces: bool,
) -> None:
    """What the begun adoption knew of its job's namespaces is not looked up again; when it
    did not know there are none, the backend is asked (and here says "maybe": a fetch)."""
    procs = FakeProcs({PID: 1.0})
    adopter, login, _backend = setup(procs)
    lb = LoopBackend()
    begun = BegunAdoption(JOB, no_namespaces)
    login.adopting = begun  # type: ignore[assignment]
    got = asyncio.run(adopter.on_loop(login, ADOPT, lb))  # type: ignore[arg-type]
    assert got is ADOPT and lb.adopted == [(PID, "42", begun)] and login.adopting is None
    assert lb.asked == (0 if no_namespaces else 1)
    assert adopt_marks(login) == 1 and procs.open_pins == []
