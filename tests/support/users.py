"""Throwaway local users for tests: created with useradd, always removed with userdel.

    with throwaway_user(home=True) as alice:      # name like cidt3f9a01bc
        ...alice.uid, alice.name, alice.home...

    with throwaway_users(2) as (alice, bob):
        ...

`create_user` / `delete_user` are the same steps for fixtures whose set-up and tear-down are
apart (e.g. a virtual cluster). Names are random (`cidt` + 8 hex digits) so parallel runs do not
collide. useradd/userdel are retried while another run holds the /etc/passwd lock. The helper
never kills processes: whoever started processes as the user ends them (userdel -f is used so a
leftover process cannot keep the account alive).
"""

from __future__ import annotations

import grp
import os
import pwd
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.poll import wait_for

__all__ = [
    "ThrowawayUser",
    "create_user",
    "delete_user",
    "require_useradd",
    "throwaway_user",
    "throwaway_users",
]

PREFIX = "cidt"
_USERADD_NAME_IN_USE = 9
_USERDEL_NO_SUCH_USER = 6
_LOCK_TIMEOUT = 30.0


@dataclass(frozen=True)
class ThrowawayUser:
    """A user created for one test (or one fixture)."""

    name: str
    uid: int
    gid: int
    home: Path | None  # None: no home directory was created
    shell: str

    @property
    def groups(self) -> list[int]:
        return os.getgrouplist(self.name, self.gid)


def require_useradd() -> None:
    """Skip the calling test unless users can be created here (root and shadow's tools)."""
    if os.geteuid() != 0:
        pytest.skip("creating users needs root")
    for tool in ("useradd", "userdel"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found (Debian package 'passwd')")


def _shadow(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a shadow tool, retrying while another process holds the passwd/group lock."""
    last: list[subprocess.CompletedProcess[str]] = []

    def attempt() -> bool:
        proc = subprocess.run(argv, capture_output=True, text=True)
        last[:] = [proc]
        return "lock" not in proc.stderr.lower() or proc.returncode == 0

    wait_for(attempt, timeout=_LOCK_TIMEOUT, interval=0.05, what=f"{argv[0]}: the passwd lock")
    return last[0]


def create_user(
    *,
    home: bool | Path = False,
    shell: str = "/bin/sh",
    locked: bool = True,
    prefix: str = PREFIX,
) -> ThrowawayUser:
    """Create a user with a random name, its own group, and a home if asked.

    ``home``: False (none created; the passwd entry says /nonexistent), True (/home/<name>) or
    a path. ``locked=False`` sets the password field to ``*``: no password login, but the
    account is not locked, so sshd lets it in with a key even without PAM.
    """
    argv = ["useradd", "--user-group", "--shell", shell]
    if home is False:
        argv += ["--no-create-home", "--home-dir", "/nonexistent"]
    elif home is True:
        argv += ["--create-home"]
    else:
        argv += ["--create-home", "--home-dir", str(home)]
    if not locked:
        argv += ["--password", "*"]
    for _ in range(20):
        name = prefix + secrets.token_hex(4)
        proc = _shadow([*argv, name])
        if proc.returncode == _USERADD_NAME_IN_USE:
            continue
        if proc.returncode:
            msg = f"useradd {name} failed ({proc.returncode}): {proc.stderr.strip()}"
            raise RuntimeError(msg)
        pw = pwd.getpwnam(name)
        home_dir = None if home is False else Path(pw.pw_dir)
        return ThrowawayUser(name, pw.pw_uid, pw.pw_gid, home_dir, pw.pw_shell)
    msg = "useradd: no free random user name after 20 tries"
    raise RuntimeError(msg)


def delete_user(user: ThrowawayUser) -> None:
    """Remove the user, its group and its home (if one was created); idempotent."""
    argv = ["userdel", "--force"]
    if user.home is not None:
        argv.append("--remove")
    proc = _shadow([*argv, user.name])
    if user.home is not None and user.home.exists():
        shutil.rmtree(user.home)
    if proc.returncode not in (0, _USERDEL_NO_SUCH_USER):
        try:
            pwd.getpwnam(user.name)
        except KeyError:
            return  # gone; userdel only complained about e.g. the mail spool
        msg = f"userdel {user.name} failed ({proc.returncode}): {proc.stderr.strip()}"
        raise RuntimeError(msg)


@contextmanager
def throwaway_user(
    *, home: bool | Path = False, shell: str = "/bin/sh", locked: bool = True
) -> Iterator[ThrowawayUser]:
    """A fresh user for the duration of the block; deleted even if the block fails."""
    user = create_user(home=home, shell=shell, locked=locked)
    try:
        yield user
    finally:
        delete_user(user)


@contextmanager
def throwaway_users(
    count: int, *, home: bool = False, shell: str = "/bin/sh", locked: bool = True
) -> Iterator[list[ThrowawayUser]]:
    """``count`` fresh users for the duration of the block; all deleted at its end."""
    with ExitStack() as stack:
        yield [
            stack.enter_context(throwaway_user(home=home, shell=shell, locked=locked))
            for _ in range(count)
        ]


@contextmanager
def secondary_group(user_name: str) -> Iterator[int]:
    """A throwaway group with ``user_name`` as a (secondary) member; its gid. Removed after."""
    name = f"cidg{secrets.token_hex(4)}"
    subprocess.run(["groupadd", name], check=True, capture_output=True)
    try:
        subprocess.run(["usermod", "-aG", name, user_name], check=True, capture_output=True)
        yield grp.getgrnam(name).gr_gid
    finally:
        subprocess.run(["groupdel", name], check=False, capture_output=True)
