"""The cgroup backend's remembered job listings (`backends._cgwatch.Listings`) stay true.

Real cgroupfs (v2 and v1 freezer trees under a unique test root): a job that starts, ends, or
is replaced under the same id, and a user directory removed and made again, all show at the
very next call; a listing is really remembered (no directory read) while nothing changed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from callerid.agent.backends._cgwatch import Listings
from callerid.agent.backends.cgroup import CgroupBackend
from tests.support.cgroups import JobTree, Mode, require_cgroups, rmtree_cgroup

UID = 4242


@pytest.fixture(params=["v2", "v1"])
def tree(request: pytest.FixtureRequest) -> Iterator[JobTree]:
    mode: Mode = request.param
    require_cgroups(mode)
    with JobTree(mode) as t:
        yield t


def _ids(backend: CgroupBackend) -> list[str]:
    return [j.id for j in backend.jobs_of(UID)]


def test_a_job_that_starts_or_ends_shows_at_once(tree: JobTree) -> None:
    tree.add_job("42", UID)
    backend = CgroupBackend(tree.backend_config())
    try:
        assert _ids(backend) == ["42"]
        assert _ids(backend) == ["42"]  # remembered
        tree.add_job("43", UID)
        assert sorted(_ids(backend)) == ["42", "43"]
        tree.remove_job("42")
        assert _ids(backend) == ["43"]
    finally:
        backend.close()


def test_a_job_replaced_under_its_id_is_the_new_one(tree: JobTree) -> None:
    first = tree.add_job("42", UID)
    backend = CgroupBackend(tree.backend_config())
    try:
        assert [j.id for j in backend.jobs_of(UID)] == ["42"]
        ino = os.stat(first).st_ino
        tree.remove_job("42")
        again = tree.add_job("42", UID)
        assert os.stat(again).st_ino != ino
        (new,) = backend.jobs_of(UID)
        assert new.id == "42"
        assert backend._job_dirs(backend.layout.hierarchies[0], uid=UID)[0].inode != ino
    finally:
        backend.close()


def test_a_users_directory_made_again_is_read_again(tree: JobTree) -> None:
    """The watched directory itself goes (its own watch hears nothing): its inode tells."""
    job_dir = tree.add_job("42", UID)
    backend = CgroupBackend(tree.backend_config())
    try:
        assert _ids(backend) == ["42"]
        tree.remove_job("42")
        rmtree_cgroup(job_dir.parent)  # the uid_4242 directory
        tree.add_job("7", UID)  # makes uid_4242 anew
        assert _ids(backend) == ["7"]
    finally:
        backend.close()


def test_a_remembered_listing_reads_no_directory(tmp_path: Path, tree: JobTree) -> None:
    watched = tree.add_job("42", UID).parent
    listings: Listings[list[str]] = Listings()
    reads: list[str] = []

    def listdir(path: str) -> list[str]:
        reads.append(path)
        return listings.listdir(path)

    try:
        assert listings.enabled
        listings.begin()
        listings.put("k", sorted(listdir(str(watched))))
        assert listings.get("k") is not None
        assert listings.get("k") == listings.get("k")
        assert reads == [str(watched)]  # the lookups read nothing
        (watched / "job_43").mkdir()
        try:
            assert listings.get("k") is None  # inotify said: changed
        finally:
            (watched / "job_43").rmdir()
    finally:
        listings.close()
    assert listings.get("k") is None  # closed: nothing is remembered
