"""The cgroup backend's namespaces of a job (``backend.cgroup.join_namespaces``), on real
cgroups: a job whose first process lives in a private mount namespace (a tmpfs on /tmp) hands
over exactly that namespace; a job in the agent's own namespaces has none; off, nothing."""

from __future__ import annotations

import dataclasses
import os
import shutil

import pytest

from callerid.agent.backends.cgroup import CgroupBackend
from tests.integration.test_cgroup_backend import SLEEP, _uid_of, tree, users  # noqa: F401
from tests.support.cgroups import JobTree
from tests.support.poll import wait_for
from tests.support.users import ThrowawayUser

pytestmark = pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")


def test_a_jobs_private_mount_namespace_is_handed_over(
    users: list[ThrowawayUser],  # noqa: F811
    tree: JobTree,  # noqa: F811
) -> None:
    alice, _bob = users
    tree.add_job("501", alice.uid)
    tree.add_job("502", alice.uid)
    drop = ["setpriv", f"--reuid={alice.uid}", f"--regid={alice.gid}", "--init-groups"]
    script = 'mount -t tmpfs cid-tmp /tmp && touch /tmp/marker && exec "$@"'
    first = tree.spawn_in(
        "501", "step_batch",
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *drop, *SLEEP],
    )  # fmt: skip
    wait_for(lambda: _uid_of(first.pid) == alice.uid, what="the job's process to drop to alice")
    tree.spawn_in("502", "step_batch", SLEEP, user=alice)
    cfg = dataclasses.replace(tree.backend_config(), join_namespaces=True)
    backend = CgroupBackend(cfg)
    jobs = {j.id: j for j in backend.jobs_of(alice.uid)}
    ns = backend.namespaces(jobs["501"])
    assert ns is not None
    with ns:
        assert ns.kinds == ("mnt",)  # the only kind that differs from ours
        st, want = os.fstat(ns.fds[0][1]), os.stat(f"/proc/{first.pid}/ns/mnt")
        assert (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino)
    assert ns.fds == ()
    assert backend.namespaces(jobs["502"]) is None  # the agent's own namespaces
    off = CgroupBackend(tree.backend_config())
    assert off.namespaces(jobs["501"]) is None
