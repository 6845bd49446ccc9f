"""The slurm backend's job namespaces under 26.05's namespace/linux (mount and PID namespaces).

A module of its own: under namespace/linux Slurm reports a job's pids as its PID namespace
numbers them (``scontrol listpids`` shows the batch script as pid 10 or so), which the other
backend tests (tests/integration/test_slurm_backend.py: 22.05 without a plugin, 24.11
job_container/tmpfs, 26.05 namespace/tmpfs) read as the node's pids. Here the job's processes
are found in its freezer cgroup instead. The plugin runs on this hybrid cgroup-v1 host for mnt
and pid (Slurm documents it for cgroup/v2; user namespaces were not tried).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from callerid.agent.backends.slurm import SlurmBackend
from callerid.agent.config import SlurmBackendConfig
from tests.support.poll import wait_for
from tests.support.slurm import (
    CGROUP_ROOT,
    LOCK_TIMEOUT,
    LocalSlurm,
    read_in_namespaces,
    require_slurm,
)
from tests.support.slurm_release import release_names
from tests.support.users import ThrowawayUser, require_useradd, throwaway_user

# the test may wait for another process's LocalSlurm (the machine-wide lock)
pytestmark = [pytest.mark.slurm, pytest.mark.root, pytest.mark.timeout(LOCK_TIMEOUT + 180)]

RELEASES = [r for r in release_names() if r == "26.05"]


@pytest.fixture(scope="module", params=RELEASES)
def slurm(request: pytest.FixtureRequest) -> Iterator[LocalSlurm]:
    release = require_slurm(request.param)
    require_useradd()
    with LocalSlurm(release, namespaces="linux") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def alice(slurm: LocalSlurm) -> Iterator[ThrowawayUser]:
    with throwaway_user() as user:
        yield user


def batch_pids(slurm: LocalSlurm, user: ThrowawayUser, jobid: str) -> list[int]:
    """The node's pids of the job's batch step processes running as ``user`` (its cgroup)."""
    step = f"{slurm.cgroup_prefix()}/uid_{user.uid}/job_{jobid}/step_batch".lstrip("/")
    try:
        text = (CGROUP_ROOT / "freezer" / step / "cgroup.procs").read_text()
    except OSError:
        return []
    pids = []
    for pid in map(int, text.split()):
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{pid}").st_uid == user.uid:
                pids.append(pid)
    return pids


def test_namespace_linux_gives_the_jobs_pid_and_mount_namespaces(
    slurm: LocalSlurm, alice: ThrowawayUser
) -> None:
    token = secrets.token_hex(6)
    path = f"/tmp/cid-ns-{token}"
    jobid = slurm.submit(alice.name, wrap=f"echo {token} > {path}; sleep 300")
    try:
        slurm.wait_running(jobid)
        pids = wait_for(
            lambda: [
                p for p in batch_pids(slurm, alice, jobid) if Path(f"/proc/{p}/root{path}").exists()
            ],
            timeout=10,
            what="the batch script's file",
        )
        batch = pids[0]
        backend = SlurmBackend(SlurmBackendConfig(spool_dir=slurm.spool_dir, timeout_ms=2000))
        job = next(j for j in backend.jobs_of(alice.uid) if j.id == jobid)
        found = backend.namespaces(job)
        assert found is not None
        try:
            assert found.kinds == ("pid", "mnt")  # the stepd's order, as pam_slurm_adopt's
            for kind, fd in found.fds:
                assert os.fstat(fd).st_ino == os.stat(f"/proc/{batch}/ns/{kind}").st_ino, kind
                assert os.fstat(fd).st_ino != os.stat(f"/proc/self/ns/{kind}").st_ino, kind
            assert not Path(path).exists()
            seen = read_in_namespaces(found.fds, path)
            assert seen[0] == token, seen
            ino, pid = (int(x) for x in seen[1].split())
            assert ino == os.stat(f"/proc/{batch}/ns/pid").st_ino  # the job's PID namespace
            assert pid < batch, seen  # numbered there (a low pid), not as the node numbers it
        finally:
            found.close()
        off = SlurmBackendConfig(spool_dir=slurm.spool_dir, join_container=False)
        assert SlurmBackend(off).namespaces(job) is None
    finally:
        with contextlib.suppress(Exception):
            slurm.cancel(jobid)
