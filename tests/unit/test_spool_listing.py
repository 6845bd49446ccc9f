"""The slurm backend's remembered spool-dir listing (`SpoolListing`): how it stays true.

Real unix sockets in a real directory; only the wall clock the listing compares the dir's mtime
with is injected, so that "read long after the last change" does not need a wait.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from callerid.agent.backends._slurm_sockets import RACY_S, SpoolListing


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[tuple[Path, list[socket.socket]]]:
    held: list[socket.socket] = []
    yield tmp_path, held
    for s in held:
        s.close()


def _stepd(spool: tuple[Path, list[socket.socket]], job: int, step: int = 4294967292) -> Path:
    path = spool[0] / f"node1_{job}.{step}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    spool[1].append(s)
    return path


def _jobs(listing: SpoolListing) -> list[str]:
    return [s.job for s in listing.sockets()]


def _long_after(spool_dir: Path) -> float:
    """A wall clock reading well past the dir's last change (the listing may be remembered)."""
    return os.stat(spool_dir).st_mtime_ns / 1e9 + RACY_S + 5


def test_a_new_or_ended_step_is_seen_at_the_next_call(
    spool: tuple[Path, list[socket.socket]],
) -> None:
    _stepd(spool, 7)
    now = [_long_after(spool[0])]
    listing = SpoolListing(spool[0], wall=lambda: now[0])
    assert _jobs(listing) == ["7"]
    assert _jobs(listing) == ["7"]  # remembered: unchanged dir
    eight = _stepd(spool, 8)  # a new entry: the dir's mtime moves
    assert _jobs(listing) == ["7", "8"]
    eight.unlink()
    assert _jobs(listing) == ["7"]


def test_a_remembered_listing_is_not_read_again(spool: tuple[Path, list[socket.socket]]) -> None:
    """Proof that it is remembered: a change that keeps the mtime as it was is not seen (the
    hazard the racy rule below guards against, made here by hand with utime)."""
    _stepd(spool, 7)
    st = os.stat(spool[0])
    listing = SpoolListing(spool[0], wall=lambda: _long_after(spool[0]))
    assert _jobs(listing) == ["7"]
    _stepd(spool, 9)
    os.utime(spool[0], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _jobs(listing) == ["7"]


def test_a_listing_read_right_after_a_change_is_not_remembered(
    spool: tuple[Path, list[socket.socket]],
) -> None:
    """A second change in the same timestamp tick keeps the mtime: so a listing read within
    RACY_S of the last change is read again next time, whatever the mtime says."""
    _stepd(spool, 7)
    st = os.stat(spool[0])
    listing = SpoolListing(spool[0], wall=lambda: st.st_mtime_ns / 1e9 + RACY_S / 2)
    assert _jobs(listing) == ["7"]
    _stepd(spool, 9)
    os.utime(
        spool[0], ns=(st.st_atime_ns, st.st_mtime_ns)
    )  # the same tick, as far as the mtime says
    assert _jobs(listing) == ["7", "9"]


def test_a_replaced_spool_dir_is_read_again(tmp_path: Path) -> None:
    first = tmp_path / "spool"
    first.mkdir()
    held = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)]
    try:
        held[0].bind(str(first / "node1_7.4294967292"))
        mtime = os.stat(first).st_mtime_ns
        listing = SpoolListing(first, wall=lambda: mtime / 1e9 + RACY_S + 5)
        assert _jobs(listing) == ["7"]
        first.rename(tmp_path / "old")
        first.mkdir()  # another directory (inode) under the same path, even with the same mtime
        os.utime(first, ns=(mtime, mtime))
        assert _jobs(listing) == []
    finally:
        held[0].close()


def test_a_missing_spool_dir_lists_nothing(tmp_path: Path) -> None:
    assert SpoolListing(tmp_path / "nope").sockets() == []
