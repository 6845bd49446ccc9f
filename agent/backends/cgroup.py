"""The embedded `cgroup` backend: jobs are cgroup directories matched by a configured pattern.

A job is a directory below the configured ``root`` whose path matches ``jobs``, a glob with a
``{job}`` placeholder (the job id) and an optional ``{uid}`` one (the owner), e.g. Slurm's
``slurm/uid_{uid}/job_{job}``. Adoption writes the pid into ``<job dir>/<extern>/cgroup.procs``
(which moves the whole process); the backend never creates a cgroup: those belong to the
resource manager.

Layouts (detected once, from the mount table, when the backend is built):

- ``v2``: ``root`` is a cgroup2 mount or a directory inside one.
- ``v1``: ``root`` is one cgroup v1 hierarchy (e.g. ``/sys/fs/cgroup/freezer``) or inside one.
- ``v1-all``: ``root`` holds v1 hierarchies (the tmpfs at ``/sys/fs/cgroup`` of a legacy or
  hybrid host; the cgroup2 ``unified`` mount is not one of them). The pattern is then relative
  to each hierarchy. Jobs are listed from the first hierarchy that has any (freezer first,
  then pids, memory, cpuset, cpu ...), and adoption writes the pid into the extern step of
  every hierarchy where that job has one, as Slurm's proctrack and task plugins do.

Job start time (for the ``newest``/``oldest`` policies): the earliest start time of any
process in the job's cgroup tree (``/proc/<pid>/stat`` starttime over boot time). Only a job
with no process at all falls back to its directory's ctime (its creation time on cgroupfs,
where nothing else changes it), never to a modification-time guess.

Without ``{uid}`` in the pattern the owner of a job is the most common non-root uid among
its processes; a job without any user process has no known owner and is not listed.

The job's group (`Job.gid`, told to the PAM module on adoption) is the effective gid of the
owner's oldest process in the job: the job's first process runs with the group the job was
started with (``sbatch --gid``, or the group the user submitted from), while sessions adopted
later and their children run with the user's primary group, so counting them could outvote
it. A job without a process of its owner has no known group (None) yet.

Namespaces (``join_namespaces``, off by default): those of the owner's oldest process in the
job that differ from the agent's own, of the configured kinds (`_cgns`).
"""

from __future__ import annotations

import logging
import os
import re
import stat
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from callerid.agent.backends._cglayout import (
    JOB_ID_RE,
    Hierarchy,
    JobPattern,
    Layout,
    Mount,
    detect_layout,
    parse_mountinfo,
    parse_proc_cgroup,
)
from callerid.agent.backends._cgns import oldest_owner_namespaces
from callerid.agent.backends._cgwatch import Listings
from callerid.agent.backends._procsfd import ProcsWriter
from callerid.agent.backends.base import BackendError, Job, JobNamespaces, JobVanished
from callerid.agent.config import CgroupBackendConfig
from callerid.agent.memo import Memo
from callerid.agent.netinfo import NetinfoError, ProcReader

__all__ = [
    "CgroupBackend",
    "Hierarchy",
    "JobPattern",
    "Layout",
    "Mount",
    "detect_layout",
    "parse_mountinfo",
    "parse_proc_cgroup",
]

log = logging.getLogger(__name__)
MAX_USERS_SEEN = 4096  # users whose job list is remembered (the least recent go first)

_JOB_ID = re.compile(JOB_ID_RE)


# --------------------------------------------------------------------------- the backend


class CgroupBackend:
    """Jobs from cgroup directories; adoption by writing the extern step's cgroup.procs.

    ``clock`` (seconds) ages the extern step memory (``extern_ttl_s``); ``max_jobs`` bounds
    how many jobs each memory holds.
    """

    name = "cgroup"
    blocking = False  # listing and look-ups only read cgroupfs and /proc

    def __init__(
        self,
        cfg: CgroupBackendConfig,
        *,
        proc_root: Path = Path("/proc"),
        clock: Callable[[], float] = time.monotonic,
        extern_ttl_s: float = 10.0,
        max_jobs: int = 65536,
    ) -> None:
        try:
            self._pattern = JobPattern.compile(cfg.jobs)
        except ValueError as exc:
            msg = f"backend.cgroup.jobs: {exc}"
            raise BackendError(msg) from exc
        if "/" in cfg.extern or cfg.extern in ("", ".", ".."):
            msg = f"backend.cgroup.extern: {cfg.extern!r} is not a directory name"
            raise BackendError(msg)
        self._extern = cfg.extern
        self._ns_kinds = tuple(cfg.namespace_kinds) if cfg.join_namespaces else ()
        self._proc_root = proc_root
        self._procs = ProcReader(proc_root)
        mounts = parse_mountinfo(_read_text(proc_root / "self" / "mountinfo"))
        self.layout = detect_layout(os.path.realpath(cfg.root), mounts)
        try:
            self._procs.boot_time()  # read once, now: a /proc without it is a set-up error
        except (OSError, NetinfoError) as exc:
            msg = f"cannot read the boot time from {proc_root}/stat: {exc}"
            raise BackendError(msg) from exc
        # job dir (path, inode) -> (uid, start, gid): a job's owner, start and group never
        # change, and a new job of the same id is a new directory (a new inode)
        self._known: Memo[tuple[str, int], tuple[int, float, int]] = Memo(
            max_entries=max_jobs, ttl_s=None, clock=clock
        )
        # (job id, uid) -> its extern step dirs: they live as long as the job; one that has
        # gone shows at the write (JobVanished) and is forgotten then, the TTL bounds the rest
        self._externs: Memo[tuple[str, int], list[tuple[Hierarchy, str]]] = Memo(
            max_entries=max_jobs, ttl_s=extern_ttl_s, clock=clock
        )
        self._listings: Listings[list[_JobDir]] = Listings()
        self._writer = ProcsWriter(ttl_s=extern_ttl_s, max_open=256, clock=clock)
        # uid -> (the listing object its jobs came from, the jobs): while `_listings` gives
        # that very object (no directory changed) and each job is in _known, they are the same
        self._jobs_seen: Memo[int, tuple[list[_JobDir], list[Job]]] = Memo(
            max_entries=MAX_USERS_SEEN, ttl_s=None, clock=clock
        )
        log.info(
            "cgroup backend: %s, hierarchies %s, jobs %s",
            self.layout.mode,
            ", ".join(f"{h.label}={h.base}" for h in self.layout.hierarchies),
            self._pattern.text,
        )

    def jobs_of(self, uid: int) -> list[Job]:
        """``uid``'s jobs, from the first hierarchy (in preference order) that has any."""
        found: list[_JobDir] = []
        for h in self.layout.hierarchies:
            found = self._job_dirs(h, uid=uid if self._pattern.has_uid else None)
            if found:
                break
        seen = self._jobs_seen.get(uid)
        if seen is not None and seen[0] is found:  # the same listing, every job known
            return list(seen[1])
        jobs: dict[str, Job] = {}
        for d in found:
            job = self._describe(d)
            if job is not None and job.uid == uid:
                jobs.setdefault(job.id, job)
        out = sorted(jobs.values(), key=Job.sort_key)
        if all(self._known.get((d.path, d.inode)) is not None for d in found):
            self._jobs_seen.put(uid, (found, out))
        return list(out)

    def job_of_pid(self, pid: int) -> Job | None:
        """The job whose cgroup tree holds ``pid`` (first matching hierarchy), or None."""
        text = self._procs.cgroup_text(pid)
        if text is None:
            return None
        # a v2 layout needs only the "0::<path>" line: found without a full parse
        entries = _v2_entry(text) if self.layout.mode == "v2" else parse_proc_cgroup(text)
        for h in self.layout.hierarchies:
            path = h.path_of(entries)
            rel = None if path is None else h.relative(path)
            found = None if rel is None else self._pattern.match_within(rel)
            if found is not None:
                job_dir, job_id, uid = found
                d = _stat_dir(f"{h.base}/{job_dir}", job_id, uid)
                return None if d is None else self._describe(d)
        return None

    def adopt(self, pid: int, job: Job) -> None:
        """Move ``pid`` into ``job``'s extern step (in every hierarchy that has one)."""
        if _JOB_ID.fullmatch(job.id) is None:
            msg = f"invalid job id {job.id!r}"
            raise BackendError(msg)
        if pid <= 0:  # "0" written to cgroup.procs would move the agent itself
            msg = f"invalid pid {pid}"
            raise BackendError(msg)
        targets = self._targets(job)
        # A write to cgroup.procs that returns has moved the process (the migration is done
        # within the write): nothing is read back. What it cannot tell, a process exiting
        # meanwhile, the login flow's pin tells (`netinfo.Pin.exited`).
        try:
            for _h, extern in targets:
                self._writer.write(extern, pid, job)
        except JobVanished:
            self._externs.pop((job.id, job.uid))
            raise

    def namespaces(self, job: Job) -> JobNamespaces | None:
        """The namespaces of ``job``'s oldest process of its owner that differ from the
        agent's (`_cgns`); None unless ``join_namespaces`` or when there are none."""
        if not self._ns_kinds:
            return None
        pids = _tree_pids(self._locate(job)[0][1])
        return oldest_owner_namespaces(self._procs, self._proc_root, job.uid, pids, self._ns_kinds)

    def close(self) -> None:
        """Release the inotify fd of the remembered listings and the open cgroup.procs."""
        self._listings.close()
        self._writer.close()

    # ----------------------------------------------------------------------- internals

    def _job_dirs(
        self, h: Hierarchy, *, uid: int | None = None, job: str | None = None
    ) -> list[_JobDir]:
        """Job directories in ``h`` (only ``uid``'s / job ``job``'s when given); remembered
        until inotify reports a change in a directory read for them (`_cgwatch`)."""
        base = str(h.base)
        key = (base, uid, job)
        hit = self._listings.get(key)
        if hit is not None:
            return hit
        self._listings.begin()
        out = []
        for rel in sorted(
            self._pattern.find(base, uid=uid, job=job, listdir=self._listings.listdir)
        ):
            found = self._pattern.match(rel)
            if found is None or (job is not None and found[0] != job):
                continue
            if uid is not None and found[1] != uid:
                continue
            d = _stat_dir(f"{base}/{rel}", *found)
            if d is not None:
                out.append(d)
        self._listings.put(key, out)
        return out

    def _targets(self, job: Job) -> list[tuple[Hierarchy, str]]:
        """The extern step directories of ``job``, one per hierarchy that has one.

        Remembered (a login storm adopts into the same few jobs again and again); a job that
        has gone since shows at the write (JobVanished) and is forgotten.
        """
        key = (job.id, job.uid)
        hit = self._externs.get(key)
        if hit is not None:
            return hit
        found = self._locate(job)
        targets = [(h, e) for h, d in found if os.path.isdir(e := f"{d}/{self._extern}")]
        if not targets:
            msg = f"job {job.id} has no extern step cgroup ({found[0][1]}/{self._extern})"
            raise BackendError(msg)
        self._externs.put(key, targets)
        return targets

    def _locate(self, job: Job) -> list[tuple[Hierarchy, str]]:
        """``job``'s directory in every hierarchy that has it; JobVanished if none has."""
        uid = job.uid if self._pattern.has_uid else None
        found: list[tuple[Hierarchy, str]] = []
        for h in self.layout.hierarchies:
            dirs = self._job_dirs(h, uid=uid, job=job.id)
            if len(dirs) > 1:
                msg = f"job {job.id} is ambiguous: {', '.join(d.path for d in dirs)}"
                raise BackendError(msg)
            found.extend((h, d.path) for d in dirs)
        if not found:
            where = self.layout.hierarchies[0].base / self._pattern.glob(uid=uid, job=job.id)
            msg = f"job {job.id} no longer exists ({where})"
            raise JobVanished(msg)
        return found

    def _describe(self, d: _JobDir) -> Job | None:
        """The Job in ``d``: owner from the path or the processes, start and group from the
        processes.

        A job's owner, start and group never change, so they are remembered per job directory
        (its path and inode: a new job of the same id is a new directory) once all three are
        known, and each job's processes are read once, not at every login (an MPI job may
        have thousands).
        """
        key = (d.path, d.inode)
        known = self._known.get(key)
        if known is not None:
            return Job(d.job_id, known[0], known[1], known[2])
        job, from_processes = self._read_job(d)
        if job is not None and from_processes and job.gid is not None:
            self._known.put(key, (job.uid, job.start_time, job.gid))
        return job

    def _read_job(self, d: _JobDir) -> tuple[Job | None, bool]:
        pids = _tree_pids(d.path)
        uid = d.uid
        if uid is None:
            uid = self._owner(pids)
            if uid is None:
                log.debug(
                    "job %s (%s) has no user process: owner unknown, skipped", d.job_id, d.path
                )
                return None, False
        starts = {p: t for p in pids if (t := self._procs.start_time(p)) is not None}
        if starts:
            return Job(d.job_id, uid, min(starts.values()), self._group(uid, starts)), True
        # no process yet: the directory's creation time, not remembered (processes will come)
        return Job(d.job_id, uid, d.ctime), False

    def _group(self, uid: int, starts: dict[int, float]) -> int | None:
        """The effective gid of ``uid``'s oldest process among ``starts`` (pid -> start)."""
        for pid in sorted(starts, key=lambda p: (starts[p], p)):
            if self._procs.owner_uid(pid) != uid:
                continue
            gid = self._procs.effective_gid(pid)
            if gid is not None:  # else it exited meanwhile: the next oldest
                return gid
        return None

    def _owner(self, pids: list[int]) -> int | None:
        counts = Counter(u for p in pids if (u := self._procs.owner_uid(p)) not in (None, 0))
        if not counts:
            return None
        # the most common non-root uid; a tie goes to the lower uid
        return max(counts.items(), key=lambda kv: (kv[1], -kv[0]))[0]


def _v2_entry(text: str) -> list[tuple[str, frozenset[str], str]]:
    """The cgroup v2 entry of a /proc/<pid>/cgroup text, as `parse_proc_cgroup` gives it."""
    if text.startswith("0::"):
        start = 3
    else:
        at = text.find("\n0::")
        if at < 0:
            return []
        start = at + 4
    end = text.find("\n", start)
    return [("0", frozenset(), text[start:] if end < 0 else text[start:end])]


@dataclass(frozen=True, slots=True)
class _JobDir:
    """A job directory found on disk: its path, the ids the pattern read from it, its stat."""

    path: str
    job_id: str
    uid: int | None
    inode: int
    ctime: float


def _stat_dir(path: str, job_id: str, uid: int | None) -> _JobDir | None:
    """The job directory at ``path``, or None when it is not (or no longer) a directory."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return None
    return _JobDir(path, job_id, uid, st.st_ino, st.st_ctime)


def _tree_pids(path: str) -> list[int]:
    """The pids in the cgroup ``path`` and every cgroup below it."""
    pids: list[int] = []
    for dirpath, _dirs, _files in os.walk(path):
        try:
            text = Path(dirpath, "cgroup.procs").read_text()
        except OSError:
            continue  # removed meanwhile, or a threaded cgroup
        pids.extend(int(x) for x in text.split())
    return pids


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        msg = f"cannot read {path}: {exc.strerror}"
        raise BackendError(msg) from exc
