"""NSS answers are remembered for a while (by the injected clock), and only for users that
exist; the bound and the time to live are the constructor's."""

from __future__ import annotations

import asyncio
import grp
import os
import pwd

from callerid.agent import config, policy
from callerid.agent.config import PolicyConfig
from callerid.agent.users import Users, lookup
from tests.fakes import FakeClock


def make(clock: FakeClock, **kw: object) -> tuple[Users, list[str]]:
    looked: list[str] = []

    def nss(user: str, cfg: PolicyConfig) -> policy.Facts:
        looked.append(user)
        return policy.Facts(user=user, uid=None if user == "ghost" else 1234)

    users = Users(PolicyConfig(), executor=None, clock=clock, nss=nss, **kw)  # type: ignore[arg-type]
    return users, looked


def uids(users: Users, names: list[str]) -> list[int | None]:
    async def go() -> list[int | None]:
        return [(await users.facts(n)).uid for n in names]

    return asyncio.run(go())


def test_a_user_is_looked_up_once_per_ttl() -> None:
    clock = FakeClock()
    users, looked = make(clock, ttl_s=60.0)
    assert uids(users, ["alice", "alice", "alice"]) == [1234] * 3
    assert looked == ["alice"]
    clock.advance(60.0)
    assert uids(users, ["alice"]) == [1234]
    assert looked == ["alice", "alice"]


def test_an_unknown_user_is_asked_every_time() -> None:
    users, looked = make(FakeClock())
    assert uids(users, ["ghost", "ghost"]) == [None, None]
    assert looked == ["ghost", "ghost"]


def test_the_memory_is_bounded() -> None:
    users, looked = make(FakeClock(), max_entries=3)
    uids(users, ["u1", "u2", "u3", "u4", "u1"])
    assert looked == ["u1", "u2", "u3", "u4", "u1"]  # u1 was the oldest: forgotten
    uids(users, ["u3", "u4", "u1", "u2"])
    assert looked[5:] == ["u2"]  # u2 had been pushed out by u1's return


def test_a_new_policy_forgets_what_was_remembered() -> None:
    users, looked = make(FakeClock())
    uids(users, ["alice"])
    users.reconfigure(config.parse({"policy": {"exempt_groups": ["staff"]}}).policy)
    uids(users, ["alice"])
    assert looked == ["alice", "alice"]
    assert users.cfg.exempt_groups == ["staff"]


def test_lookup_reads_groups_only_when_the_policy_has_exempt_groups() -> None:
    me = pwd.getpwuid(os.getuid())
    primary = grp.getgrgid(me.pw_gid).gr_name
    plain = lookup(me.pw_name, PolicyConfig())
    assert plain.uid == me.pw_uid and plain.groups == frozenset()
    exempt = {"exempt_groups": ["x"], "ignore_root": False}
    with_groups = lookup(me.pw_name, config.parse({"policy": exempt}).policy)
    assert primary in with_groups.groups
    assert lookup("no-such-user-callerid", PolicyConfig()).uid is None


def test_root_groups_are_not_read_when_root_is_allowed_anyway() -> None:
    cfg = config.parse({"policy": {"exempt_groups": ["root"]}}).policy  # ignore_root: default on
    assert lookup("root", cfg).groups == frozenset()
