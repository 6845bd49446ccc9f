"""Fixtures shared by the integration modules that run two loopback agents (a and b): a
throwaway user with jobs 42 and 43 on both nodes' cgroup v2 trees, so that b must ask a which
job a login comes from (no single-job shortcut). Module-scoped: each module gets its own; a
module that needs other jobs defines its own fixtures of the same names. And `spool`: an
empty slurmd spool dir for fake slurmstepds (short, under /tmp: unix socket paths are
bounded)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cgroups import JobTree, require_cgroups
from tests.support.users import ThrowawayUser, throwaway_user


@pytest.fixture(scope="module")
def user() -> Iterator[ThrowawayUser]:
    require_cgroups("v2")
    with throwaway_user() as u:
        yield u


@pytest.fixture(scope="module")
def trees(user: ThrowawayUser) -> Iterator[dict[str, JobTree]]:
    with JobTree("v2") as a, JobTree("v2") as b:
        for job in ("42", "43"):
            a.add_job(job, user.uid)
            b.add_job(job, user.uid)
        yield {"a": a, "b": b}


@pytest.fixture
def spool() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="cidsp", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
