"""The adopter remembers users (NSS answers) for a while, and only those that exist."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from callerid.agent import adoption, config, policy
from callerid.agent.adoption import Adopter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(clock: Clock) -> tuple[Adopter, list[str]]:
    looked: list[str] = []
    adopter = Adopter(
        config.parse({"node_name": "n1"}),
        node="n1",
        netinfo=None,  # type: ignore[arg-type]
        backend=None,  # type: ignore[arg-type]
        ask_peer=None,  # type: ignore[arg-type]
        is_local=lambda ip: False,
        executor=None,
        clock=clock,
    )

    def facts(user: str) -> policy.Facts:
        looked.append(user)
        return policy.Facts(user=user, uid=None if user == "ghost" else 1234)

    adopter._user_facts = facts  # type: ignore[method-assign]
    return adopter, looked


def users(adopter: Adopter, names: list[str]) -> list[Any]:
    async def go() -> list[Any]:
        return [(await adopter._user(n)).uid for n in names]

    return asyncio.run(go())


def test_a_user_is_looked_up_once_per_ttl() -> None:
    clock = Clock()
    adopter, looked = make(clock)
    assert users(adopter, ["alice", "alice", "alice"]) == [1234] * 3
    assert looked == ["alice"]
    clock.now += adoption.USER_TTL_S + 1
    assert users(adopter, ["alice"]) == [1234]
    assert looked == ["alice", "alice"]


def test_an_unknown_user_is_asked_every_time() -> None:
    adopter, looked = make(Clock())
    assert users(adopter, ["ghost", "ghost"]) == [None, None]
    assert looked == ["ghost", "ghost"]


def test_the_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(adoption, "USER_MEMORY", 3)
    adopter, looked = make(Clock())
    users(adopter, ["u1", "u2", "u3", "u4", "u1"])
    assert looked == ["u1", "u2", "u3", "u4", "u1"]  # u1 was the oldest: forgotten
    assert list(adopter._users) == ["u3", "u4", "u1"]


def test_forget_users_makes_the_next_login_ask_again() -> None:
    adopter, looked = make(Clock())
    users(adopter, ["alice"])
    adopter.forget_users()
    users(adopter, ["alice"])
    assert looked == ["alice", "alice"]
