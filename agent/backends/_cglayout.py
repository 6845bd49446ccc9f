"""Job patterns and cgroup layouts for the cgroup backend (see cgroup.py for the rules).

`JobPattern` compiles a ``jobs`` pattern (``{job}``, ``{uid}``, ``*``, ``?``) into a walker
and a regex; `detect_layout` finds the hierarchies a root lies in from the mount table;
`parse_proc_cgroup` reads /proc/<pid>/cgroup.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from callerid.agent.backends.base import BackendError

__all__ = [
    "JOB_ID_RE",
    "Hierarchy",
    "JobPattern",
    "Layout",
    "Mode",
    "Mount",
    "detect_layout",
    "parse_mountinfo",
    "parse_proc_cgroup",
]

JOB_ID_RE = r"[A-Za-z0-9_.-]+"
UID_RE = r"[0-9]+"
_PLACEHOLDERS = {"job": JOB_ID_RE, "uid": UID_RE}

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

    def find(
        self,
        base: str,
        *,
        uid: int | None = None,
        job: str | None = None,
        listdir: Callable[[str], list[str]] = os.listdir,
    ) -> list[str]:
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
                    names = listdir(f"{base}/{p}" if p else base)
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

    def cgroup_path(self, directory: str) -> str:
        """The /proc/<pid>/cgroup path of a directory below `base`."""
        base = str(self.base).rstrip("/")
        if not directory.startswith(base + "/"):
            msg = f"{directory} is not below {base}"
            raise ValueError(msg)
        rel = directory[len(base) + 1 :].strip("/")
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
