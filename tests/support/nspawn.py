"""A Debian 12 tree booted with a real systemd as PID 1, in a systemd-nspawn container.

    tree = debian_tree(["python3-zmq"])       # made once, cached in /var/cache/callerid-tests
    with Container(tree, binds_ro={debs: "/debs"}) as ct:
        ct.run(["apt-get", "install", "-y", "/debs/callerid_0.1.0-1_all.deb"])
        ct.run(["systemctl", "is-active", "callerid-agent"])

The tree is made by `debootstrap --variant=minbase` from Debian's registry with the packages
in `TREE_PACKAGES` (systemd, sshd, procps for `ExecReload=/bin/kill`) plus the ones asked
for (the dependencies of the packages to test, so apt inside needs no network). It is cached
outside the checkout under a name holding a hash of the suite, mirror and package list, so
only the first run pays for it (one to three minutes); a tree not used for two weeks is
removed when another one is made. It is built into a temporary directory
next to it and renamed when complete, under a lock: two runs never build it twice, and a run
killed half-way leaves only a temporary directory, which the next run removes.

The container boots with `--volatile=overlay` (every write goes to a tmpfs overlay: the
cached tree stays clean), `--private-network` (only its own loopback: sshd, the agent's mesh
port and ssh stay inside; nothing listens on the host) and, on a host without systemd as PID
1, `--keep-unit --register=no` (no machined, no scope). `machinectl` and `systemd-run -M` need
machined, so commands run through `nsenter -t LEADER -a` (every namespace of the container's
PID 1). Boot is awaited with `--notify-ready=yes` on a notify socket of our own (nspawn sends
`X_NSPAWN_LEADER_PID=` and then `READY=1` when the container's systemd is up), then
`systemctl is-system-running --wait`.

Cgroups: the host is hybrid (cgroup v1 controllers, cgroup2 at /sys/fs/cgroup/unified).
nspawn gives the container the host's layout; `SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1` makes it
mount the container's own cgroup2 tree (the host's unified hierarchy, seen through a cgroup
namespace) at the container's /sys/fs/cgroup, so the systemd inside runs in unified mode.

Teardown sends SIGTERM to nspawn (the container halts), waits for it, and removes what nspawn
leaves behind on a host without systemd: the empty `payload/` and `supervisor/` cgroups it
made below its own cgroup, and `/run/systemd/nspawn/`. `Container.leftovers()` names anything
still there. Needs root, `systemd-container` and `debootstrap`; `require_nspawn()` skips with
the reason otherwise.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from tests.support.cgroups import rmtree_cgroup
from tests.support.harness import Harness
from tests.support.poll import wait_for

__all__ = ["CACHE", "TREE_PACKAGES", "Container", "debian_tree", "require_nspawn"]

CACHE = Path("/var/cache/callerid-tests")
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# The base; debian_tree() adds what the packages under test depend on.
TREE_PACKAGES = (
    "systemd",
    "dbus",
    "procps",  # /bin/kill, pgrep
    "openssh-server",
    "openssh-client",
    "libpam-runtime",
    "python3",
    "python3-cffi-backend",  # python3-zmq's virtual dependency, which debootstrap cannot resolve
)
_UNUSED_DAYS = 14  # a cached tree not booted for this long is removed when a new one is made
SYS_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}
TOOLS = ("systemd-nspawn", "debootstrap", "nsenter")
_TREE_TIMEOUT = 600.0
_BOOT_TIMEOUT = 60.0


def require_nspawn() -> None:
    """Skip the calling test unless a container can be made and booted here."""
    if os.geteuid() != 0:
        pytest.skip("booting a systemd container needs root")
    missing = [t for t in TOOLS if shutil.which(t, path=SYS_ENV["PATH"]) is None]
    if missing:
        pytest.skip(
            f"{', '.join(missing)} not found (apt-get install systemd-container debootstrap)"
        )


def _sh(argv: Sequence[str], *, timeout: float = 120) -> str:
    r = subprocess.run(
        list(argv), capture_output=True, text=True, env=SYS_ENV, timeout=timeout, check=False
    )
    if r.returncode:
        msg = f"{' '.join(argv)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        raise AssertionError(msg)
    return r.stdout


# -- the tree ----------------------------------------------------------------------------------


def tree_path(packages: Sequence[str], cache: Path = CACHE) -> Path:
    """Where the tree with ``packages`` is cached (whether or not it exists yet)."""
    key = "\n".join([SUITE, MIRROR, "minbase", *sorted(set(packages))]).encode()
    return cache / f"debian12-{hashlib.sha256(key).hexdigest()[:12]}"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        wait_for(lambda: _try_lock(fh.fileno()), _TREE_TIMEOUT, 0.5, f"the lock {path}")
        yield


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def debian_tree(extra: Iterable[str] = (), cache: Path = CACHE) -> Path:
    """The cached Debian 12 tree with `TREE_PACKAGES` and ``extra``; made if not there yet.

    Making it takes one to three minutes (debootstrap from Debian's registry).
    """
    packages = sorted({*TREE_PACKAGES, *extra})
    final = tree_path(packages, cache)
    if final.is_dir():
        os.utime(final)  # in use: not pruned
        return final
    with _locked(cache / ".lock"):
        if final.is_dir():  # made by another run while we waited
            return final
        for stale in cache.glob(f".{final.name}-*"):  # a run killed half-way
            shutil.rmtree(stale, ignore_errors=True)
        for old in cache.glob("debian12-*"):  # trees of package lists long gone
            if time.time() - old.stat().st_mtime > _UNUSED_DAYS * 86400:
                shutil.rmtree(old, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=cache))
        try:
            _debootstrap(tmp, packages)
            tmp.chmod(0o755)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _debootstrap(root: Path, packages: Sequence[str]) -> None:
    argv = ["debootstrap", "--variant=minbase", f"--include={','.join(packages)}"]
    _sh([*argv, SUITE, str(root), MIRROR], timeout=_TREE_TIMEOUT)
    # No package lists, no downloaded .debs: apt inside installs only local files.
    _sh(["chroot", str(root), "apt-get", "clean"])
    (root / "etc/hostname").unlink(missing_ok=True)
    (root / "etc/.callerid-tree").write_text(" ".join(sorted(packages)) + "\n")


# -- the container -----------------------------------------------------------------------------

# Joins the cgroups named by the first N arguments, then execs the rest: nspawn starts in a
# cgroup of its own, so its payload/ and supervisor/ cgroups land below it (and go with it).
_JOIN = (
    'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ >"$1" || exit 125; shift; n=$((n - 1)); done; '
    'exec "$@"'
)
_NSPAWN_RUN = Path("/run/systemd/nspawn")


class Container(Harness):
    """A booted container of ``tree``; a context manager that stops it and removes its traces."""

    def __init__(
        self,
        tree: Path,
        *,
        binds_ro: Mapping[Path, str] | None = None,
        name: str | None = None,
    ) -> None:
        self.tree = tree
        self.binds_ro = dict(binds_ro or {})
        self.name = name or f"cid-{secrets.token_hex(4)}"
        self.cgroups: list[Path] = []  # one per hierarchy nspawn uses, made for it
        self.leader = 0  # the container's PID 1, as the host sees it
        self.boot_seconds = 0.0
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        """nspawn's output and the container's console."""
        assert self._dir is not None
        return self._dir / "console.log"

    def _start(self) -> None:
        from tests.support.cgroups import cgroup_mounts

        self._dir = Path(tempfile.mkdtemp(prefix="cid-nspawn-", dir="/tmp"))
        mounts = cgroup_mounts()
        for key in ("name=systemd", "v2"):
            if key in mounts:
                self.cgroups.append(mounts[key] / f"cid-nspawn-{self.name}")
        for cg in self.cgroups:
            cg.mkdir()
        argv = [
            "systemd-nspawn", "--quiet", "--boot", f"--directory={self.tree}",
            f"--machine={self.name}", "--volatile=overlay", "--private-network",
            "--notify-ready=yes", "--console=read-only", "--keep-unit", "--register=no",
            *(f"--bind-ro={src}:{dst}" for src, dst in self.binds_ro.items()),
        ]  # fmt: skip
        procs = [str(cg / "cgroup.procs") for cg in self.cgroups]
        notify_path = self._dir / "notify"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(str(notify_path))
            env = {**SYS_ENV, "NOTIFY_SOCKET": str(notify_path)}
            # the container's own cgroup2 tree at its /sys/fs/cgroup: systemd inside is unified
            env["SYSTEMD_NSPAWN_UNIFIED_HIERARCHY"] = "1"
            start = time.monotonic()
            with self.log.open("wb") as log:
                self._proc = subprocess.Popen(
                    ["sh", "-c", _JOIN, "sh", str(len(procs)), *procs, *argv],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                    start_new_session=True,
                )  # fmt: skip
            self._await_ready(notify, start + _BOOT_TIMEOUT)
            self.boot_seconds = time.monotonic() - start
        state = self.run(["systemctl", "is-system-running", "--wait"], check=False, timeout=60)
        if state.stdout.strip() != "running":
            failed = self.run(["systemctl", "--failed", "--no-legend"], check=False).stdout
            msg = f"the container booted {state.stdout.strip()!r}; failed units:\n{failed}"
            raise AssertionError(msg)

    def _await_ready(self, notify: socket.socket, deadline: float) -> None:
        """X_NSPAWN_LEADER_PID= then READY=1 from nspawn; fails if nspawn exits first."""
        assert self._proc is not None
        while True:
            if self._proc.poll() is not None:
                msg = f"systemd-nspawn exited {self._proc.returncode}:\n{self._console_tail()}"
                raise AssertionError(msg)
            left = deadline - time.monotonic()
            if left <= 0:
                msg = f"the container did not boot in {_BOOT_TIMEOUT:.0f}s:\n{self._console_tail()}"
                raise AssertionError(msg)
            notify.settimeout(min(left, 0.5))
            try:
                lines = notify.recv(4096).decode().splitlines()
            except TimeoutError:
                continue
            for line in lines:
                key, _, value = line.partition("=")
                if key == "X_NSPAWN_LEADER_PID":
                    self.leader = int(value)
            if "READY=1" in lines and self.leader:
                return

    def _console_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    # ------------------------------------------------------------------ inside

    def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in every namespace of the container (as its root), with a clean env."""
        assert self.leader, "the container is not running"
        inner = {**SYS_ENV, **(env or {})}
        full = ["nsenter", "-t", str(self.leader), "-a", "env", "-i"]
        full += [f"{k}={v}" for k, v in inner.items()]
        r = subprocess.run(
            [*full, *argv], input=input, capture_output=True, text=True, env=SYS_ENV,
            timeout=timeout, check=False,
        )  # fmt: skip
        if check and r.returncode:
            msg = f"in {self.name}: {' '.join(argv)} exited {r.returncode}:\n"
            raise AssertionError(msg + f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return r

    def write(self, path: str, text: str, mode: str = "0644") -> None:
        """Write ``text`` to ``path`` inside the container (parents made)."""
        script = 'mkdir -p "$(dirname "$1")" && cat >"$1" && chmod "$2" "$1"'
        self.run(["sh", "-c", script, "sh", path, mode], input=text)

    def read(self, path: str) -> str:
        return self.run(["cat", path]).stdout

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        """Halt the container (SIGTERM to nspawn), then remove what nspawn leaves behind."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                self._kill_cgroups()
                proc.kill()
                proc.wait(30)
        self.leader = 0
        for cg in self.cgroups:
            rmtree_cgroup(cg)
        propagate = _NSPAWN_RUN / "propagate"
        with contextlib.suppress(OSError):
            shutil.rmtree(propagate / self.name)
        for d in (propagate, _NSPAWN_RUN / "locks", _NSPAWN_RUN):  # only while empty: a
            with contextlib.suppress(OSError):  # container of another run may use them
                d.rmdir()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def _kill_cgroups(self) -> None:
        for cg in self.cgroups:
            with contextlib.suppress(OSError):
                (cg / "cgroup.kill").write_text("1")

    def leftovers(self) -> list[str]:
        """What this container left on the host (empty after a clean close)."""
        left = [str(cg) for cg in self.cgroups if cg.exists()]
        if (_NSPAWN_RUN / "propagate" / self.name).exists():
            left.append(str(_NSPAWN_RUN / "propagate" / self.name))
        mounts = Path("/proc/self/mountinfo").read_text()
        left += [line for line in mounts.splitlines() if str(self.tree) in line]
        if self._proc is not None and self._proc.poll() is None:
            left.append(f"systemd-nspawn pid {self._proc.pid}")
        return left
