"""User and group look-ups (NSS) for the policy, remembered for a while.

`Users.facts(name)` is what the policy needs to know of a user before anything else: the uid
and, when `policy.exempt_groups` is set, the names of the user's groups. NSS may be sssd or
LDAP and wait on the network, so a look-up runs in the executor passed in; its answer is
remembered (`Memo`) for ``ttl_s`` (60 s: sssd itself caches longer) so that a login storm asks
NSS once per user. An unknown user is not remembered: it may be created any moment. SIGHUP
calls `forget()`: the policy's groups, or the users' groups, may have changed.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Callable
from concurrent.futures import Executor

from callerid.agent import policy
from callerid.agent._offload import in_thread
from callerid.agent.config import PolicyConfig
from callerid.agent.memo import Memo

__all__ = ["Users", "lookup"]

USER_TTL_S = 60.0
USER_MEMORY = 4096


def lookup(user: str, cfg: PolicyConfig) -> policy.Facts:
    """The user's facts from NSS now (blocking): uid None when there is no such user.

    Groups are looked up only when the policy has exempt groups, and never for root when
    root is allowed anyway (the policy decides root before groups)."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return policy.Facts(user=user, uid=None)
    groups: frozenset[str] = frozenset()
    if cfg.exempt_groups and not (cfg.ignore_root and pw.pw_uid == 0):
        groups = _group_names(user, pw.pw_gid)
    return policy.Facts(user=user, uid=pw.pw_uid, groups=groups)


def _group_names(user: str, gid: int) -> frozenset[str]:
    names = set()
    for g in os.getgrouplist(user, gid):
        try:
            names.add(grp.getgrgid(g).gr_name)
        except KeyError:
            continue
    return frozenset(names)


class Users:
    """NSS answers for the policy, asked in ``executor`` and remembered (see the module)."""

    def __init__(
        self,
        cfg: PolicyConfig,
        *,
        executor: Executor | None,
        clock: Callable[[], float],
        ttl_s: float = USER_TTL_S,
        max_entries: int = USER_MEMORY,
        nss: Callable[[str, PolicyConfig], policy.Facts] = lookup,
    ) -> None:
        self.cfg = cfg
        self.executor = executor
        self.nss = nss
        self.memo: Memo[str, policy.Facts] = Memo(max_entries=max_entries, ttl_s=ttl_s, clock=clock)

    async def facts(self, user: str) -> policy.Facts:
        """The user's uid and groups: remembered, else asked of NSS in a worker thread."""
        hit = self.memo.get(user)
        if hit is not None:
            return hit
        facts = await in_thread(self.executor, self.nss, user, self.cfg)
        if facts.uid is not None:
            self.memo.put(user, facts)
        return facts

    def remembered(self, user: str) -> policy.Facts | None:
        """The user's uid and groups if remembered, else None (NSS is not asked)."""
        return self.memo.get(user)

    def reconfigure(self, cfg: PolicyConfig) -> None:
        """A new policy (SIGHUP): everything remembered is forgotten."""
        self.cfg = cfg
        self.memo.clear()

    def forget(self) -> None:
        self.memo.clear()
