"""The cgroup backend's remembered job-directory listings, each true until inotify says not.

Listing a user's job directories is the cgroup backend's work at every login (a cgroupfs
directory holds a score of control files besides the job directories). `Listings` remembers
the result of each listing, keyed by what was asked, until the kernel reports a change.

How it stays true: a cgroup directory is created and removed only by mkdir(2) and rmdir(2)
(or renamed), and the VFS reports each to inotify watches on its parent directory (cgroupfs
included: IN_CREATE, IN_DELETE, IN_MOVED_*). Every directory a listing read is watched *before*
it is read, so a change after the read is queued for us; each lookup first drains the queue
(one non-blocking read) and forgets every listing a changed directory took part in. A watched
directory that is itself removed reports nothing to its own watch, so a lookup also checks that
each directory is still the one that was read (its inode: one stat). The queue overflowing
forgets everything. Without inotify (no slots, ENOSPC on watches), nothing is remembered and
every call lists, as before.
"""

from __future__ import annotations

import array
import ctypes
import errno
import fcntl
import logging
import os
import struct
import termios
import threading
from collections.abc import Callable, Hashable
from typing import Final, Generic, TypeVar

__all__ = ["Listings"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_IN_MODIFY_DIR: Final = 0x100 | 0x200 | 0x40 | 0x80 | 0x400 | 0x800  # create, delete, moves, self
_IN_Q_OVERFLOW: Final = 0x4000
_IN_IGNORED: Final = 0x8000
_EVENT: Final = struct.Struct("iIII")  # wd, mask, cookie, len (then the name)
MAX_WATCHED: Final = 4096  # directories watched at most; beyond, listings are not remembered


class Listings(Generic[T]):
    """``get(key)`` a remembered listing, or None; ``listdir(path)`` for the listing itself
    (watches first), then ``put(key, value)`` with what the listing read."""

    def __init__(self, stat_ino: Callable[[str], int | None] | None = None) -> None:
        self._lock = threading.Lock()
        self._fd = _inotify_init()
        self._stat_ino = stat_ino or _ino
        self._by_key: dict[Hashable, tuple[T, tuple[tuple[str, int, int], ...]]] = {}
        self._keys_of_wd: dict[int, set[Hashable]] = {}
        self._local = threading.local()  # .read: (dir, wd, inode) of this thread's listing
        self._queued = array.array("i", [0])  # FIONREAD's answer (used under the lock)

    @property
    def enabled(self) -> bool:
        return self._fd is not None

    def get(self, key: Hashable) -> T | None:
        with self._lock:
            if self._fd is None:
                return None
            self._drain()
            hit = self._by_key.get(key)
            if hit is None:
                return None
            value, dirs = hit
            if any(self._stat_ino(path) != ino for path, _wd, ino in dirs):
                self._forget(key)
                return None
            return value

    def listdir(self, path: str) -> list[str]:
        """`os.listdir`, with ``path`` watched (and its identity noted) before it is read."""
        watched = self._watch(path)
        names = os.listdir(path)
        # not watched: the listing is not remembered
        self._reading().append(watched if watched is not None else (path, -1, -1))
        return names

    def put(self, key: Hashable, value: T) -> None:
        """Remember ``value`` for ``key``: what the `listdir` calls since the last put read."""
        dirs = tuple(self._reading())
        self._local.read = []
        if self._fd is None or not dirs or any(wd < 0 for _p, wd, _i in dirs):
            return  # nothing listed (all parts known: the caller stats), or not watched
        with self._lock:
            if len(self._by_key) >= MAX_WATCHED:
                self._by_key.clear()
                self._keys_of_wd.clear()
            self._by_key[key] = (value, dirs)
            for _path, wd, _ino in dirs:
                self._keys_of_wd.setdefault(wd, set()).add(key)

    def begin(self) -> None:
        """Start a listing (forget what an unfinished one read)."""
        self._local.read = []

    def _reading(self) -> list[tuple[str, int, int]]:
        read: list[tuple[str, int, int]] | None = getattr(self._local, "read", None)
        if read is None:
            read = self._local.read = []
        return read

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._by_key.clear()
            self._keys_of_wd.clear()

    # ----------------------------------------------------------------------- internals

    def _watch(self, path: str) -> tuple[str, int, int] | None:
        if self._fd is None or len(self._keys_of_wd) >= MAX_WATCHED:
            return None
        ino = self._stat_ino(path)  # before the watch: a dir replaced meanwhile shows later
        wd = _libc.inotify_add_watch(self._fd, os.fsencode(path), _IN_MODIFY_DIR)
        if wd < 0 or ino is None:
            err = ctypes.get_errno()
            if wd < 0 and err not in (errno.ENOENT, errno.ENOTDIR):
                why = os.strerror(err)
                log.info("cannot watch %s (%s): its job listings are not remembered", path, why)
            return None
        return (path, wd, ino)

    def _drain(self) -> None:
        assert self._fd is not None
        while True:
            # how much is queued (FIONREAD): none, the usual case, costs no read that fails
            fcntl.ioctl(self._fd, termios.FIONREAD, self._queued, True)
            if self._queued[0] <= 0:
                return
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return
            at = 0
            while at + _EVENT.size <= len(data):
                wd, mask, _cookie, size = _EVENT.unpack_from(data, at)
                at += _EVENT.size + size
                if mask & _IN_Q_OVERFLOW:
                    self._by_key.clear()
                    self._keys_of_wd.clear()
                    continue
                for key in self._keys_of_wd.pop(wd, ()):
                    self._by_key.pop(key, None)
                if mask & _IN_IGNORED:
                    self._keys_of_wd.pop(wd, None)

    def _forget(self, key: Hashable) -> None:
        hit = self._by_key.pop(key, None)
        if hit is not None:
            for _path, wd, _ino in hit[1]:
                self._keys_of_wd.get(wd, set()).discard(key)


_libc = ctypes.CDLL(None, use_errno=True)


def _inotify_init() -> int | None:
    fd = int(_libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
    if fd < 0:
        log.info(
            "no inotify (%s): job listings are read at every login",
            os.strerror(ctypes.get_errno()),
        )
        return None
    return fd


def _ino(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None
