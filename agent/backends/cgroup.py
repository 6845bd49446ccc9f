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
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import re
import stat
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from callerid.agent.backends.base import BackendError, Job, JobVanished
from callerid.agent.config import CgroupBackendConfig

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

JOB_ID_RE = r"[A-Za-z0-9_.-]+"
UID_RE = r"[0-9]+"
_JOB_ID = re.compile(JOB_ID_RE)
_PLACEHOLDERS = {"job": JOB_ID_RE, "uid": UID_RE}
_MAX_KNOWN = 65536  # remembered job directories (owner and start never change)
EXTERN_TTL_S = 10.0  # how long a job's extern step directories are remembered

# v1 hierarchies in the order jobs are looked up in them (proctrack/cgroup uses freezer).
V1_PREFERENCE = ("freezer", "pids", "memory", "cpuset", "cpu", "cpuacct", "blkio", "devices")
# Super options of a v1 cgroup mount that do not name a controller.
_V1_NON = {"rw", "ro", "none", "noprefix", "xattr", "clone_children", "cpuset_v2_mode"}

Mode = Literal["v2", "v1", "v1-all"]


# --------------------------------------------------------------------------- the pattern


@dataclass(frozen=True, slots=True)
class JobPattern:
    """A compiled ``jobs`` pattern: a glob to list candidates and a regex to read them."""

    text: str
    regex: re.Pattern[str]
    depth: int
    has_uid: bool
    _tokens: tuple[str, ...]
    _segments: tuple[tuple[tuple[str, ...], re.Pattern[str]], ...]  # per path part

    @classmethod
    def compile(cls, text: str) -> JobPattern:
        """Compile ``text``; ValueError names what is wrong with it."""
        if "{job}" not in text:
            msg = f"pattern {text!r} must contain {{job}}"
            raise ValueError(msg)
        parts = text.split("/")
        if text.startswith("/") or any(p in ("", ".", "..") for p in parts):
            msg = f"pattern {text!r} must be a relative path without empty, '.' or '..' parts"
            raise ValueError(msg)
        tokens = _tokenize(text)
        regex = "".join(_token_regex(t) for t in tokens)
        segments = []
        for part in parts:
            toks = tuple(_tokenize(part))
            segments.append((toks, re.compile("".join(_token_regex(t) for t in toks))))
        return cls(
            text, re.compile(regex), len(parts), "{uid}" in tokens, tuple(tokens), tuple(segments)
        )

    def find(self, base: str, *, uid: int | None = None, job: str | None = None) -> list[str]:
        """Paths (relative to ``base``) that may be job directories: every job's, or only
        ``uid``'s and/or job ``job``'s. Parts that are fully known are joined without a
        look (the caller checks the directory); the others are listed and matched, skipping
        dot names as a glob would. Much cheaper than glob.glob on every login."""
        values = {"{uid}": None if uid is None else str(uid), "{job}": job}
        paths = [""]
        for toks, regex in self._segments:
            if all(t not in _WILD and values.get(t, t) is not None for t in toks):
                name = "".join(v if (v := values.get(t)) is not None else t for t in toks)
                paths = [f"{p}/{name}" if p else name for p in paths]
                continue
            wanted = {t[1:-1]: v for t in toks if (v := values.get(t)) is not None}
            found = []
            for p in paths:
                try:
                    names = os.listdir(f"{base}/{p}" if p else base)
                except OSError:
                    continue  # missing or removed meanwhile: nothing below it
                for n in names:
                    m = None if n.startswith(".") else regex.fullmatch(n)
                    if m is not None and all(m.group(k) == v for k, v in wanted.items()):
                        found.append(f"{p}/{n}" if p else n)
            paths = found
        return paths

    def glob(self, *, uid: int | None = None, job: str | None = None) -> str:
        """The glob for every job, or only for ``uid``'s and/or job ``job``."""
        values = {"{uid}": None if uid is None else str(uid), "{job}": job}
        return "".join(
            tok if tok not in values else glob.escape(v) if (v := values[tok]) else "*"
            for tok in self._tokens
        )

    def match(self, rel: str) -> tuple[str, int | None] | None:
        """(job id, uid or None) if ``rel`` (relative to the root) is a job directory."""
        m = self.regex.fullmatch(rel)
        if m is None:
            return None
        uid = m.group("uid") if self.has_uid else None
        return m.group("job"), None if uid is None else int(uid)

    def match_within(self, rel: str) -> tuple[str, str, int | None] | None:
        """(job dir, job id, uid or None) if ``rel`` is a job directory or inside one."""
        parts = rel.strip("/").split("/")
        if len(parts) < self.depth:
            return None
        head = "/".join(parts[: self.depth])
        found = self.match(head)
        return None if found is None else (head, *found)


def _tokenize(text: str) -> list[str]:
    """Split a pattern into literals, ``*``/``?`` wildcards and ``{job}``/``{uid}``."""
    tokens: list[str] = []
    for piece in re.split(r"(\{[^{}]*\}|[*?{}\[\]])", text):
        if not piece:
            continue
        if piece.startswith("{") and piece.endswith("}") and len(piece) > 1:
            if piece[1:-1] not in _PLACEHOLDERS:
                msg = f"pattern {text!r}: unknown placeholder {piece} (known: {{job}}, {{uid}})"
                raise ValueError(msg)
            if piece in tokens:
                msg = f"pattern {text!r}: {piece} appears twice"
                raise ValueError(msg)
        elif piece in "{}":
            msg = f"pattern {text!r}: unbalanced brace"
            raise ValueError(msg)
        elif piece in "[]":
            msg = f"pattern {text!r}: character classes [...] are not supported"
            raise ValueError(msg)
        tokens.append(piece)
    return tokens


_WILD = frozenset({"*", "?"})


def _token_regex(tok: str) -> str:
    if tok == "*":
        return "[^/]*"
    if tok == "?":
        return "[^/]"
    if tok.startswith("{"):
        name = tok[1:-1]
        return f"(?P<{name}>{_PLACEHOLDERS[name]})"
    return re.escape(tok)


# --------------------------------------------------------------------------- layout detection


@dataclass(frozen=True, slots=True)
class Mount:
    """One line of /proc/self/mountinfo, as far as cgroups care."""

    device: str
    root: str
    mountpoint: str
    fstype: str
    super_options: frozenset[str]


@dataclass(frozen=True, slots=True)
class Hierarchy:
    """One cgroup hierarchy: the directory the pattern is relative to, and its cgroup path."""

    version: Literal[1, 2]
    controllers: frozenset[str]  # v1: controllers and name=...; v2: empty
    base: Path
    prefix: str  # the cgroup path of `base`, as /proc/<pid>/cgroup writes it

    @property
    def label(self) -> str:
        return "unified" if self.version == 2 else ",".join(sorted(self.controllers))

    def path_of(self, entries: list[tuple[str, frozenset[str], str]]) -> str | None:
        """This hierarchy's cgroup path among parsed /proc/<pid>/cgroup entries."""
        for hier_id, ctrls, path in entries:
            if self.version == 2 and hier_id == "0" and not ctrls:
                return path
            if self.version == 1 and ctrls and ctrls <= self.controllers:
                return path
        return None

    def relative(self, cgroup_path: str) -> str | None:
        """``cgroup_path`` relative to `base`, or None when it lies outside."""
        prefix = self.prefix.rstrip("/")
        if prefix and not cgroup_path.startswith(prefix + "/"):
            return None
        return cgroup_path[len(prefix) :].strip("/") or None

    def cgroup_path(self, directory: Path | str) -> str:
        """The /proc/<pid>/cgroup path of a directory below `base`."""
        if isinstance(directory, str):  # the hot path: plain string work, no pathlib
            base = str(self.base).rstrip("/")
            if not directory.startswith(base + "/"):
                msg = f"{directory} is not below {base}"
                raise ValueError(msg)
            rel = directory[len(base) + 1 :].strip("/")
        else:
            rel = directory.relative_to(self.base).as_posix()
        return self.prefix.rstrip("/") + "/" + rel


@dataclass(frozen=True, slots=True)
class Layout:
    mode: Mode
    hierarchies: tuple[Hierarchy, ...]


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts of a /proc/<pid>/mountinfo text (octal escapes decoded)."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        root, mountpoint = _unescape(fields[3]), _unescape(fields[4])
        mounts.append(Mount(fields[2], root, mountpoint, tail[0], frozenset(tail[2].split(","))))
    return mounts


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _within(path: str, top: str) -> bool:
    return top in ("/", path) or path.startswith(top.rstrip("/") + "/")


def _v1_controllers(m: Mount) -> frozenset[str]:
    opts = m.super_options
    return frozenset(o for o in opts if o.startswith("name=") or not (o in _V1_NON or "=" in o))


def _v1_rank(h: Hierarchy) -> tuple[int, str]:
    ranks = [V1_PREFERENCE.index(c) for c in h.controllers if c in V1_PREFERENCE]
    named_only = all(c.startswith("name=") for c in h.controllers)
    rank = min(ranks) if ranks else len(V1_PREFERENCE) + int(named_only)
    return rank, str(h.base)


def detect_layout(root: str, mounts: list[Mount]) -> Layout:
    """How ``root`` (an absolute, resolved path) maps onto cgroup hierarchies."""
    owner: Mount | None = None
    for m in mounts:  # the deepest mount holding root; a later mount shadows an earlier one
        if _within(root, m.mountpoint) and (
            owner is None or len(m.mountpoint) >= len(owner.mountpoint)
        ):
            owner = m
    if owner is not None and owner.fstype in ("cgroup", "cgroup2"):
        rel = root[len(owner.mountpoint) :].strip("/")
        prefix = "/" + "/".join(p for p in (owner.root.strip("/"), rel) if p)
        if owner.fstype == "cgroup2":
            return Layout("v2", (Hierarchy(2, frozenset(), Path(root), prefix),))
        return Layout("v1", (Hierarchy(1, _v1_controllers(owner), Path(root), prefix),))
    found: dict[str, Hierarchy] = {}
    for m in mounts:
        if m.fstype == "cgroup" and _within(m.mountpoint, root) and m.mountpoint != root:
            h = Hierarchy(1, _v1_controllers(m), Path(m.mountpoint), m.root)
            seen = found.get(m.device)
            if seen is None or len(str(seen.base)) > len(m.mountpoint):
                found[m.device] = h
    if not found:
        msg = f"{root} is neither in a cgroup hierarchy nor a directory holding cgroup v1 ones"
        raise BackendError(msg)
    return Layout("v1-all", tuple(sorted(found.values(), key=_v1_rank)))


def parse_proc_cgroup(text: str) -> list[tuple[str, frozenset[str], str]]:
    """(hierarchy id, controllers, path) of each line of a /proc/<pid>/cgroup text."""
    entries = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            ctrls = frozenset(c for c in parts[1].split(",") if c)
            entries.append((parts[0], ctrls, parts[2]))
    return entries


# --------------------------------------------------------------------------- the backend


class CgroupBackend:
    """Jobs from cgroup directories; adoption by writing the extern step's cgroup.procs."""

    name = "cgroup"
    blocking = False  # listing and look-ups only read cgroupfs and /proc

    def __init__(self, cfg: CgroupBackendConfig, *, proc_root: Path = Path("/proc")) -> None:
        try:
            self._pattern = JobPattern.compile(cfg.jobs)
        except ValueError as exc:
            msg = f"backend.cgroup.jobs: {exc}"
            raise BackendError(msg) from exc
        if "/" in cfg.extern or cfg.extern in ("", ".", ".."):
            msg = f"backend.cgroup.extern: {cfg.extern!r} is not a directory name"
            raise BackendError(msg)
        self._extern = cfg.extern
        self._proc = proc_root
        mounts = parse_mountinfo(_read_text(proc_root / "self" / "mountinfo"))
        self.layout = detect_layout(os.path.realpath(cfg.root), mounts)
        self._btime = _boot_time(proc_root)
        self._known: dict[tuple[str, int], tuple[int, float]] = {}  # job dir -> (uid, start)
        self._externs: dict[tuple[str, int], tuple[float, list[tuple[Hierarchy, str]]]] = {}
        self._hz = os.sysconf("SC_CLK_TCK")
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
        jobs: dict[str, Job] = {}
        for d in found:
            job = self._describe(d)
            if job is not None and job.uid == uid:
                jobs.setdefault(job.id, job)
        return sorted(jobs.values(), key=Job.sort_key)

    def job_of_pid(self, pid: int) -> Job | None:
        """The job whose cgroup tree holds ``pid`` (first matching hierarchy), or None."""
        text = _read_proc_cgroup(self._proc, pid)
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
        try:
            for _h, extern in targets:
                _write_pid(extern, pid, job)
        except JobVanished:
            self._externs.pop((job.id, job.uid), None)
            raise
        self._verify(pid, targets)
        log.debug("adopted pid %d into job %s (%s)", pid, job.id, targets[0][1])

    def close(self) -> None:
        """Nothing to release: the backend holds no open file or socket."""

    # ----------------------------------------------------------------------- internals

    def _job_dirs(
        self, h: Hierarchy, *, uid: int | None = None, job: str | None = None
    ) -> list[_JobDir]:
        """Job directories in ``h`` (only ``uid``'s / job ``job``'s when given)."""
        out = []
        base = str(h.base)
        for rel in sorted(self._pattern.find(base, uid=uid, job=job)):
            found = self._pattern.match(rel)
            if found is None or (job is not None and found[0] != job):
                continue
            if uid is not None and found[1] != uid:
                continue
            d = _stat_dir(f"{base}/{rel}", *found)
            if d is not None:
                out.append(d)
        return out

    def _targets(self, job: Job) -> list[tuple[Hierarchy, str]]:
        """The extern step directories of ``job``, one per hierarchy that has one.

        Remembered for EXTERN_TTL_S (a login storm adopts into the same few jobs again and
        again); a job that has gone since shows at the write (JobVanished) and is forgotten.
        """
        key = (job.id, job.uid)
        now = time.monotonic()
        hit = self._externs.get(key)
        if hit is not None and now < hit[0]:
            return hit[1]
        found = self._locate(job)
        targets = [(h, e) for h, d in found if os.path.isdir(e := f"{d}/{self._extern}")]
        if not targets:
            msg = f"job {job.id} has no extern step cgroup ({found[0][1]}/{self._extern})"
            raise BackendError(msg)
        if len(self._externs) >= _MAX_KNOWN:
            self._externs.clear()
        self._externs[key] = (now + EXTERN_TTL_S, targets)
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
        """The Job in ``d``: owner from the path or the processes, start from the processes.

        A job's owner and start never change, so they are remembered per job directory (its
        path and inode: a new job of the same id is a new directory) and each job's processes
        are read once, not at every login (an MPI job may have thousands).
        """
        key = (d.path, d.inode)
        known = self._known.get(key)
        if known is not None:
            return Job(d.job_id, known[0], known[1])
        job, from_processes = self._read_job(d)
        if job is not None and from_processes:
            if len(self._known) >= _MAX_KNOWN:
                self._known.pop(next(iter(self._known)))
            self._known[key] = (job.uid, job.start_time)
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
        starts = [t for p in pids if (t := self._start_time(p)) is not None]
        if starts:
            return Job(d.job_id, uid, min(starts)), True
        # no process yet: the directory's creation time, not remembered (processes will come)
        return Job(d.job_id, uid, d.ctime), False

    def _owner(self, pids: list[int]) -> int | None:
        counts = Counter(u for p in pids if (u := _proc_uid(self._proc, p)) not in (None, 0))
        if not counts:
            return None
        # the most common non-root uid; a tie goes to the lower uid
        return max(counts.items(), key=lambda kv: (kv[1], -kv[0]))[0]

    def _start_time(self, pid: int) -> float | None:
        ticks = _proc_start_ticks(self._proc, pid)
        return None if ticks is None else self._btime + ticks / self._hz

    def _verify(self, pid: int, targets: list[tuple[Hierarchy, str]]) -> None:
        text = _read_proc_cgroup(self._proc, pid)
        if text is None:
            msg = f"process {pid} vanished"
            raise BackendError(msg)
        entries: list[tuple[str, frozenset[str], str]] | None = None
        for h, extern in targets:
            want = h.cgroup_path(extern)
            if h.version == 2 and f"\n0::{want}\n" in f"\n{text}":
                continue  # the usual case, found without parsing
            if entries is None:
                entries = parse_proc_cgroup(text)
            got = h.path_of(entries)
            if got != want:
                msg = f"process {pid} is in {h.label}:{got}, not in {want} after adoption"
                raise BackendError(msg)


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


def _write_pid(extern: str, pid: int, job: Job) -> None:
    procs = f"{extern}/cgroup.procs"
    try:
        fd = os.open(procs, os.O_WRONLY)
    except FileNotFoundError as exc:
        msg = f"job {job.id} no longer exists ({extern})"
        raise JobVanished(msg) from exc
    except OSError as exc:
        msg = f"cannot open {procs}: {exc.strerror}"
        raise BackendError(msg) from exc
    try:
        os.write(fd, str(pid).encode())
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            msg = f"process {pid} vanished"
        else:
            msg = f"cannot move process {pid} into {extern}: {exc.strerror}"
        raise BackendError(msg) from exc
    finally:
        os.close(fd)


# /proc readers (to move into netinfo)


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        msg = f"cannot read {path}: {exc.strerror}"
        raise BackendError(msg) from exc


def _boot_time(proc_root: Path) -> float:
    """Boot time (epoch seconds) from /proc/stat's btime line (read once: it may drift)."""
    btime = re.search(r"^btime (\d+)$", _read_text(proc_root / "stat"), re.MULTILINE)
    if btime is None:
        msg = f"no btime line in {proc_root / 'stat'}"
        raise BackendError(msg)
    return float(btime.group(1))


def _read_proc_cgroup(proc_root: Path, pid: int) -> str | None:
    """The text of /proc/<pid>/cgroup, or None when the process is gone (raw os calls: this
    runs for every query a source answers)."""
    try:
        fd = os.open(f"{proc_root}/{pid}/cgroup", os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        return None
    try:
        chunks = [os.read(fd, 8192)]
        while chunks[-1]:
            chunks.append(os.read(fd, 8192))
    except ProcessLookupError:
        return None
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", "replace")


def _proc_start_ticks(proc_root: Path, pid: int) -> int | None:
    """Field 22 (starttime, clock ticks after boot) of /proc/<pid>/stat, or None."""
    try:
        text = (proc_root / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text.rpartition(")")[2].split()  # fields from 3 (state) on; comm may hold ")"
    return int(fields[19]) if len(fields) > 19 else None


def _proc_uid(proc_root: Path, pid: int) -> int | None:
    """The uid owning /proc/<pid> (the process's effective uid), or None when it is gone."""
    try:
        return (proc_root / str(pid)).stat().st_uid
    except (FileNotFoundError, ProcessLookupError):
        return None
