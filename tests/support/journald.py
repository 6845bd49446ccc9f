"""A real, private systemd-journald for tests, in its own mount namespace.

    with PrivateJournald() as jd:
        subprocess.run([*jd.prefix, sys.executable, "-c", "from systemd import journal; ..."])
        entries = jd.wait_for_entries(1, CALLERID_DECISION="deny")

`systemd-journald` runs (without systemd as PID 1) in a mount namespace made by
`unshare --mount --propagation slave`, with fresh tmpfs on /run/systemd and /run/log (and on
/var/log/journal when the host has one), and a drop-in config that keeps everything in that
namespace: volatile storage, no kernel log import, no forwarding to syslog/kmsg/console/wall,
no rate limit; its own log goes to its stderr (`SYSTEMD_LOG_TARGET=console`, kept in
`jd.log_path`), not to the host's kmsg. The host's journal, sockets and files are never touched.

A process started with `jd.prefix` (`nsenter --mount=/proc/<pid>/ns/mnt --`) finds the private
/run/systemd/journal/socket, so `journal.send()` and `journalctl` reach this journald.
`ip netns exec NS` after the prefix works too: it copies the current mount namespace, tmpfs
included. "slave" propagation (not "private") lets network namespaces created on the host
after start-up appear in /run/netns inside, while nothing mounted inside leaks out; for that,
/run/netns must be a shared mount on the host before we start, which we ensure the way
`ip netns add` itself does (adding and deleting a throwaway namespace) when it is not yet.

Teardown stops journald and checks that no process is left in its mount namespace (the tmpfs
vanish with the namespace). Needs root, util-linux (unshare, nsenter) and the `systemd`
package; `PrivateJournald` skips the test with the reason when one is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest

from tests.support.poll import wait_for

__all__ = ["JOURNALD", "PrivateJournald", "unavailable_reason"]

JOURNALD = Path("/lib/systemd/systemd-journald")
SOCKET = "run/systemd/journal/socket"  # relative to a root
TOOLS = ("unshare", "nsenter", "journalctl", "mount")

JOURNALD_CONF = """\
# callerid tests: a private journald that keeps everything in its mount namespace.
[Journal]
Storage=volatile
ReadKMsg=no
ForwardToSyslog=no
ForwardToKMsg=no
ForwardToConsole=no
ForwardToWall=no
RateLimitIntervalSec=0
"""

# Runs inside the new mount namespace, then becomes journald (same pid as the Popen).
_SETUP = """\
set -e
mount -t tmpfs -o mode=0755 callerid-jd /run/systemd
mount -t tmpfs -o mode=0755 callerid-jd /run/log
if [ -d /var/log/journal ]; then mount -t tmpfs -o mode=0755 callerid-jd /var/log/journal; fi
mkdir -p /run/systemd/journal /run/systemd/journald.conf.d
printf '%s' "$CALLERID_JOURNALD_CONF" > /run/systemd/journald.conf.d/zz-callerid-test.conf
exec "$CALLERID_JOURNALD"
"""


def unavailable_reason() -> str | None:
    """Why a private journald cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "a private journald needs root (mount namespaces)"
    if not os.access(JOURNALD, os.X_OK):
        return f"{JOURNALD} is missing (apt-get install systemd)"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing tools for a private journald: {', '.join(missing)}"
    return None


def _mount_points() -> dict[str, str]:
    """Mount point -> optional fields (e.g. "shared:1") of this process's mount namespace."""
    points = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" - ")[0].split()
        points[fields[4]] = " ".join(fields[6:])
    return points


def ensure_netns_dir_shared() -> None:
    """Make /run/netns a shared mount, as `ip netns add` does, unless it already is one."""
    if "shared:" in _mount_points().get("/run/netns", "") or shutil.which("ip") is None:
        return
    name = f"cid-jdinit-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    subprocess.run(["ip", "netns", "del", name], check=True, capture_output=True)


class PrivateJournald:
    """A systemd-journald of our own; see the module docstring.

    `parent_mount_ns`: start from a copy of that mount namespace (a path such as
    /proc/PID/ns/mnt or a bind-mounted nsfs file) instead of ours, e.g. to keep a test
    cluster's /etc/hosts.
    """

    def __init__(self, *, start_timeout: float = 10.0, parent_mount_ns: Path | None = None):
        self.start_timeout = start_timeout
        self.leftover_timeout = 5.0  # how long close() lets processes in the namespace exit
        self.parent_mount_ns = parent_mount_ns
        self.proc: subprocess.Popen[bytes] | None = None
        self.mnt_ns = ""  # e.g. "mnt:[4026532177]" while running
        self._dir: Path | None = None
        self._made_dirs: list[Path] = []

    # -- life cycle -----------------------------------------------------------------------

    def __enter__(self) -> Self:
        reason = unavailable_reason()
        if reason is not None:
            pytest.skip(reason)
        try:
            self.start()
        except BaseException:
            self.close(check=False)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(check=exc is None)

    def start(self) -> None:
        ensure_netns_dir_shared()
        for path in (Path("/run/systemd"), Path("/run/log")):  # mount points must exist
            if not path.exists():
                path.mkdir(mode=0o755)
                self._made_dirs.append(path)
        self._dir = Path(tempfile.mkdtemp(prefix="cid-jd-", dir="/tmp"))
        argv = ["unshare", "--mount", "--propagation", "slave", "--", "sh", "-c", _SETUP]
        if self.parent_mount_ns is not None:
            argv = ["nsenter", f"--mount={self.parent_mount_ns}", "--", *argv]
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "SYSTEMD_LOG_TARGET": "console",  # journald's own messages: stderr, not host kmsg
            "CALLERID_JOURNALD": str(JOURNALD),
            "CALLERID_JOURNALD_CONF": JOURNALD_CONF,
        }
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                start_new_session=True,
            )  # fmt: skip
        wait_for(self._socket_ready, timeout=self.start_timeout, what="private journald socket")
        self.mnt_ns = os.readlink(f"/proc/{self.pid}/ns/mnt")
        if self.mnt_ns == os.readlink("/proc/self/ns/mnt"):
            msg = "private journald runs in our own mount namespace"
            raise RuntimeError(msg)

    def _socket_ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            msg = f"private journald exited with {self.proc.returncode}: {self.log_text()}"
            raise RuntimeError(msg)
        return self.root_path(SOCKET).exists()

    def close(self, *, check: bool = True) -> None:
        """Stop journald (SIGTERM, then SIGKILL) and check its namespace is gone. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        leftovers: list[str] = []
        if self.mnt_ns:
            with contextlib.suppress(AssertionError):
                wait_for(
                    lambda: not self.processes_in_namespace(),
                    timeout=self.leftover_timeout,
                    what="mount namespace gone",
                )
            leftovers = self.processes_in_namespace()
            self.mnt_ns = ""
        for path in reversed(self._made_dirs):
            with contextlib.suppress(OSError):
                path.rmdir()
        self._made_dirs.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        if leftovers and check:
            msg = f"processes left in the private journald's mount namespace: {leftovers}"
            raise AssertionError(msg)

    def processes_in_namespace(self) -> list[str]:
        """'pid cmdline' of every process still in journald's mount namespace."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.readlink(entry / "ns" / "mnt") != self.mnt_ns:
                    continue
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            found.append(f"{entry.name} {cmd.strip()}")
        return found

    # -- using it -------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        if self.proc is None:
            msg = "the private journald is not running"
            raise RuntimeError(msg)
        return self.proc.pid

    @property
    def prefix(self) -> list[str]:
        """argv prefix running a command in journald's mount namespace."""
        return ["nsenter", f"--mount=/proc/{self.pid}/ns/mnt", "--"]

    def netns_prefix(self, netns: str) -> list[str]:
        """argv prefix running a command in network namespace `netns`, seeing this journald."""
        return [*self.prefix, "ip", "netns", "exec", netns]

    def root_path(self, relative: str) -> Path:
        """A path inside journald's mount namespace, reachable from ours."""
        return Path(f"/proc/{self.pid}/root") / relative.lstrip("/")

    @property
    def log_path(self) -> Path:
        """journald's own stdout/stderr."""
        assert self._dir is not None, "not started"
        return self._dir / "journald.log"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except (OSError, AssertionError):
            return ""

    def run(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """`subprocess.run(prefix + argv)`; output captured as text unless told otherwise."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 30)
        return subprocess.run([*self.prefix, *argv], **kwargs)

    def sync(self) -> None:
        """`journalctl --sync`: everything sent so far is written."""
        r = self.run(["journalctl", "--sync"])
        if r.returncode:
            msg = f"journalctl --sync failed ({r.returncode}): {r.stderr.strip()}"
            raise RuntimeError(msg)

    def read(self, **matches: str) -> list[dict[str, Any]]:
        """Entries matching every FIELD=value in `matches` (journalctl -o json), oldest first.

        `journalctl --sync` runs first. Values are str, or a list when a field repeats, or a
        list of ints for binary data.
        """
        self.sync()
        argv = ["journalctl", "-o", "json", "--no-pager", "--quiet"]
        argv += [f"{k}={v}" for k, v in matches.items()]
        r = self.run(argv)
        if r.returncode:
            msg = f"journalctl failed ({r.returncode}): {r.stderr.strip()}"
            raise RuntimeError(msg)
        return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]

    def wait_for_entries(
        self, n: int = 1, timeout: float = 5.0, **matches: str
    ) -> list[dict[str, Any]]:
        """Poll until at least `n` entries match; return them all."""

        def enough() -> list[dict[str, Any]]:
            entries = self.read(**matches)
            return entries if len(entries) >= max(n, 1) else []

        return wait_for(
            enough,
            timeout=timeout,
            interval=0.05,
            what=f"{n} journal entries matching {matches}",
        )

    def install_catalog(self, catalog: Path) -> None:
        """Make `journalctl -x` inside the namespace know `catalog`; the host's stays as is.

        The database is built from `catalog` alone with `journalctl --root=<our tmp dir>`
        and put on a tmpfs mounted over /var/lib/systemd/catalog in journald's namespace only
        (journalctl reads catalogs from /usr/lib and /usr/local/lib only, not from /run).
        """
        assert self._dir is not None, "not started"
        root = self._dir / "catalog-root"
        (root / "usr/lib/systemd/catalog").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(catalog, root / "usr/lib/systemd/catalog" / catalog.name)
        subprocess.run(
            ["journalctl", f"--root={root}", "--update-catalog"], check=True, capture_output=True
        )
        script = (
            'set -e; db=/var/lib/systemd/catalog; if ! mountpoint -q "$db"; then '
            'mount -t tmpfs -o mode=0755 callerid-jd "$db"; fi; cp "$1" "$db/database"'
        )
        database = root / "var/lib/systemd/catalog/database"
        r = self.run(["sh", "-c", script, "sh", str(database)])
        if r.returncode:
            msg = f"installing the catalog failed ({r.returncode}): {r.stderr.strip()}"
            raise RuntimeError(msg)
