"""Real job cgroup trees for tests: a unique test root, job directories, processes inside.

    with JobTree("v2") as tree:              # /sys/fs/cgroup/unified/cid-test-<hex>
        tree.add_job("42", alice.uid)         # slurm/uid_<uid>/job_42/{step_extern,step_batch}
        proc = tree.spawn_in("42", "step_batch", ["sleep", "60"], user=alice)
        backend = CgroupBackend(tree.backend_config())

Modes: ``v2`` (a directory in the cgroup2 mount), ``v1`` (a directory in the freezer
hierarchy), ``v1-all`` (the same directory in several v1 hierarchies, freezer and pids by
default; the backend root is then the directory holding the hierarchies, /sys/fs/cgroup, with
the test directory as the first part of the pattern). No controller is ever enabled
(no subtree_control writes), so processes may sit in any directory of the tree.

`spawn_in` is race-free: the child is started through a tiny wrapper that writes its own pid
into the step's cgroup.procs (every hierarchy), drops to the user, then execs the program; the
call returns only once the exec has happened, so the program never runs outside the job.
Teardown kills the process groups this tree started, moves any other process still in the tree
back to the test runner's own cgroup (a test that adopted a process of its own should end it
itself), removes every directory bottom-up (polling while the kernel still reports it busy)
and checks that the test root is gone.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import pwd
import secrets
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import pytest

from callerid.agent.config import CgroupBackendConfig
from tests.support.poll import wait_for
from tests.support.users import ThrowawayUser

__all__ = ["CGROUP_ROOT", "JobTree", "Mode", "cgroup_mounts", "require_cgroups"]

Mode = Literal["v2", "v1", "v1-all"]
CGROUP_ROOT = Path("/sys/fs/cgroup")
DEFAULT_PATTERN = "slurm/uid_{uid}/job_{job}"
V1_ALL_CONTROLLERS = ("freezer", "pids")  # not memory: the runner's memory cgroup stays put
_TIMEOUT = 10.0
_NOT_CONTROLLERS = {"rw", "ro", "none", "noprefix", "xattr", "clone_children", "cpuset_v2_mode"}

# Runs as root in the child: join the cgroups, drop privileges, exec. Reports failures on the
# status pipe; a successful exec closes the pipe (it is close-on-exec) with nothing written.
_WRAPPER = """\
import json, os, sys
spec = json.loads(sys.argv[1])
fd = spec["fd"]
try:
    for procs in spec["procs"]:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    if spec["uid"] is not None:
        os.setgroups(spec["groups"])
        os.setgid(spec["gid"])
        os.setuid(spec["uid"])
    if spec["cwd"] is not None:
        os.chdir(spec["cwd"])
    os.set_inheritable(fd, False)
    os.execvp(sys.argv[2], sys.argv[2:])
except BaseException as exc:
    os.write(fd, repr(exc).encode() or b"?")
    os._exit(127)
"""


def cgroup_mounts() -> dict[str, Path]:
    """Mounted cgroup hierarchies: ``"v2"`` -> the cgroup2 mount; v1 controller -> its mount."""
    found: dict[str, Path] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        mountpoint = Path(fields[4].replace("\\040", " "))
        if tail[0] == "cgroup2":
            found.setdefault("v2", mountpoint)
        elif tail[0] == "cgroup":
            for opt in tail[2].split(","):
                if opt not in _NOT_CONTROLLERS and not opt.startswith("release_agent="):
                    found.setdefault(opt, mountpoint)
    return found


@contextlib.contextmanager
def scratch_cgroup2(prefix: str) -> Iterator[Path]:
    """A fresh cgroup v2 directory ``<mount>/<prefix>-<random>`` (pytest.skip without a
    cgroup2 mount); at the end the processes left in it or below go back to the mount's root
    and every directory is removed."""
    mount = cgroup_mounts().get("v2")
    if mount is None:
        pytest.skip("no cgroup2 mount")
    path = mount / f"{prefix}-{secrets.token_hex(4)}"
    path.mkdir()
    try:
        yield path
    finally:
        for d in [*sorted((p for p in path.rglob("*") if p.is_dir()), reverse=True), path]:
            for pid in (d / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    (mount / "cgroup.procs").write_text(pid)
        rmtree_cgroup(path)


def require_cgroups(mode: Mode) -> None:
    """Skip the calling test unless ``mode`` can be set up here (root and the mounts)."""
    if os.geteuid() != 0:
        pytest.skip("cgroup tests need root")
    mounts = cgroup_mounts()
    needed = {"v2": ("v2",), "v1": ("freezer",), "v1-all": V1_ALL_CONTROLLERS}[mode]
    missing = [n for n in needed if n not in mounts]
    if missing:
        pytest.skip(f"no mounted cgroup hierarchy for {', '.join(missing)} (mode {mode})")
    if mode == "v1-all" and any(mounts[n].parent != CGROUP_ROOT for n in needed):
        pytest.skip(f"the v1 hierarchies are not directly below {CGROUP_ROOT}")


class JobTree:
    """A unique test root holding job cgroups; a context manager that removes all of it."""

    def __init__(
        self,
        mode: Mode,
        *,
        pattern: str = DEFAULT_PATTERN,
        extern: str = "step_extern",
        controllers: Sequence[str] = V1_ALL_CONTROLLERS,
    ) -> None:
        self.mode = mode
        self.pattern = pattern
        self.extern = extern
        self.name = f"cid-test-{secrets.token_hex(4)}"
        mounts = cgroup_mounts()
        keys = {"v2": ["v2"], "v1": ["freezer"], "v1-all": list(controllers)}[mode]
        self.mounts: list[Path] = [mounts[k] for k in keys]  # mounts[0] is the primary one
        self.roots: list[Path] = [m / self.name for m in self.mounts]
        self._procs: list[subprocess.Popen[bytes]] = []
        self._jobs: dict[str, list[Path]] = {}

    @property
    def root(self) -> Path:
        """The test root in the primary hierarchy."""
        return self.roots[0]

    def __enter__(self) -> JobTree:
        try:
            for root in self.roots:
                root.mkdir()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ set-up

    def backend_config(self) -> CgroupBackendConfig:
        """The backend config that sees exactly this tree's jobs."""
        if self.mode == "v1-all":
            return CgroupBackendConfig(
                root=CGROUP_ROOT, jobs=f"{self.name}/{self.pattern}", extern=self.extern
            )
        return CgroupBackendConfig(root=self.root, jobs=self.pattern, extern=self.extern)

    def job_dirs(self, job_id: str) -> list[Path]:
        """The job's directory in every hierarchy of the tree (primary first)."""
        return self._jobs[job_id]

    def add_job(
        self, job_id: str, uid: int, *, extern: bool = True, steps: Sequence[str] = ("step_batch",)
    ) -> Path:
        """Create the job (and its extern and other steps) in every hierarchy; its primary dir."""
        rel = self.pattern.format(job=job_id, uid=uid)
        dirs = [root / rel for root in self.roots]
        for job_dir in dirs:
            job_dir.mkdir(parents=True)
            for step in ([self.extern] if extern else []) + list(steps):
                (job_dir / step).mkdir()
        self._jobs[job_id] = dirs
        return dirs[0]

    def remove_job(self, job_id: str) -> None:
        """Remove the job's directories (its processes must be gone)."""
        for job_dir in self._jobs.pop(job_id):
            rmtree_cgroup(job_dir)

    def remove_step(self, job_id: str, step: str) -> None:
        """Remove one step of the job in every hierarchy (its processes must be gone)."""
        for job_dir in self._jobs[job_id]:
            rmtree_cgroup(job_dir / step)

    def cgroup_path(self, job_id: str, step: str | None = None) -> str:
        """How /proc/<pid>/cgroup names the job (or one step) in the primary hierarchy."""
        path = self._jobs[job_id][0] / (step or "")
        return "/" + path.relative_to(self.mounts[0]).as_posix().rstrip("/")

    def cgroup_of(self, pid: int, mount: Path | None = None) -> str | None:
        """The cgroup path of ``pid`` in the hierarchy mounted at ``mount`` (default: primary)."""
        mount = mount or self.mounts[0]
        return _proc_cgroup(pid, mount)

    # ------------------------------------------------------------------ processes

    def spawn_in(
        self,
        job_id: str,
        step: str,
        argv: Sequence[str],
        user: ThrowawayUser | str | int | None = None,
        **popen: Any,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` as ``user`` inside the job's ``step`` cgroup (every hierarchy)."""
        procs = [str(d / step / "cgroup.procs") for d in self._jobs[job_id]]
        return self._spawn(procs, argv, user, popen)

    def spawn(
        self, argv: Sequence[str], user: ThrowawayUser | str | int | None = None, **popen: Any
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` outside any job (in the runner's cgroup); teardown kills it too."""
        return self._spawn([], argv, user, popen)

    def _spawn(
        self,
        procs: list[str],
        argv: Sequence[str],
        user: ThrowawayUser | str | int | None,
        popen: dict[str, Any],
    ) -> subprocess.Popen[bytes]:
        spec: dict[str, Any] = {"procs": procs, "uid": None, "cwd": popen.pop("cwd", None)}
        env = dict(popen.pop("env", os.environ))
        if user is not None:
            pw = _passwd(user)
            groups = os.getgrouplist(pw.pw_name, pw.pw_gid)
            spec.update(uid=pw.pw_uid, gid=pw.pw_gid, groups=groups)
            env.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name)
        read_end, write_end = os.pipe()
        spec["fd"] = write_end
        popen.setdefault("stdin", subprocess.DEVNULL)
        popen.setdefault("stdout", subprocess.DEVNULL)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _WRAPPER, json.dumps(spec), *argv],
                pass_fds=(write_end,),
                start_new_session=True,
                env=env,
                **popen,
            )
        finally:
            os.close(write_end)
        self._procs.append(proc)
        try:
            error = _read_until_eof(read_end, _TIMEOUT)
        finally:
            os.close(read_end)
        if error:
            proc.wait(_TIMEOUT)
            msg = f"spawning {list(argv)} failed: {error.decode(errors='replace')}"
            raise RuntimeError(msg)
        return proc

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        """Kill what this tree started, move leftovers out, remove every directory."""
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.kill()  # in case it left its process group
            proc.wait(_TIMEOUT)
        self._procs.clear()
        errors: list[BaseException] = []
        for mount, root in zip(self.mounts, self.roots, strict=True):
            try:
                if root.exists():
                    _evacuate(root, mount)
                    rmtree_cgroup(root)
            except (OSError, AssertionError) as exc:  # go on with the other hierarchies
                errors.append(exc)
        left = [str(r) for r in self.roots if r.exists()]
        assert not left, f"test cgroups left behind: {left} ({errors})"


def _passwd(user: ThrowawayUser | str | int) -> pwd.struct_passwd:
    if isinstance(user, ThrowawayUser):
        return pwd.getpwnam(user.name)
    if isinstance(user, int):
        return pwd.getpwuid(user)
    return pwd.getpwnam(user)


def _read_until_eof(fd: int, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            msg = "the spawn wrapper did not exec in time"
            raise RuntimeError(msg)
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                return data
            data += chunk


def _proc_cgroup(pid: int, mount: Path) -> str | None:
    """The cgroup path of ``pid`` in the hierarchy mounted at ``mount``, None if gone."""
    mounts = cgroup_mounts()
    keys = {k for k, m in mounts.items() if m == mount}
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in text.splitlines():
        hier_id, ctrls, path = line.split(":", 2)
        if "v2" in keys and hier_id == "0" and not ctrls:
            return path
        if ctrls and set(ctrls.split(",")) & keys:
            return path
    return None


def _evacuate(root: Path, mount: Path) -> None:
    """Move every process still under ``root`` back to the runner's own cgroup."""
    home = _proc_cgroup(os.getpid(), mount) or "/"
    target = mount / home.lstrip("/") / "cgroup.procs"
    if target.is_relative_to(root):
        target = mount / "cgroup.procs"
    for dirpath, _dirs, _files in os.walk(root):
        for pid in Path(dirpath, "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                target.write_text(pid)


def rmtree_cgroup(top: Path) -> None:
    """rmdir every cgroup below and at ``top``, deepest first, while busy retry."""
    dirs = [Path(d) for d, _subdirs, _files in os.walk(top)]
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        wait_for(functools.partial(_try_rmdir, d), timeout=_TIMEOUT, what=f"rmdir {d}")


def _try_rmdir(path: Path) -> bool:
    try:
        path.rmdir()
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return False
        raise
    return True
