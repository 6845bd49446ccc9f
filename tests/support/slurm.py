"""A real Slurm cluster on this machine for tests and demos (one node, or several).

    with LocalSlurm() as slurm:                       # munged + slurmctld + slurmd, node idle
        job = slurm.submit(alice.name, wrap="sleep 300")
        slurm.wait_running(job)
        slurm.extern_socket(job)                      # <spool>/<node>_<job>.4294967292
        slurm.listpids(job)                           # `scontrol listpids <job>` output
        slurm.cancel(job)

`LocalSlurm(release="22.05")` runs one Slurm release (tests/support/slurm_release.py):
Debian's packages (``slurmd slurmctld slurm-client munge``; installed with apt-get when missing)
or, with ``release="24.11"`` or ``"26.05"``, the upstream tree unpacked under
``/opt/slurm-<release>`` (`require_slurm` unpacks it), every daemon and command by its full
path. It runs them the way reference/slurm-local ran 22.05 on this machine: proctrack/cgroup,
task/cgroup, cgroup/v1 (hybrid hosts), ``PrologFlags=contain``; the releases' configs differ
only in the ``*/none`` plugin lines 23.11 removed. Everything it creates lives in one temp dir
(spool, state, logs, a private munged with its own key and socket), except ``slurm.conf`` and
``cgroup.conf`` in the release's sysconfdir (`SlurmRelease.etc`: ``/etc/slurm`` for Debian's,
``/opt/slurm-<release>/etc`` for the trees), where its tools look: any existing files are
backed up and restored at teardown. Only one LocalSlurm runs on the machine at a time: `start`
first takes an exclusive ``flock`` on ``/run/callerid-test-slurm.lock`` (waiting up to
``lock_timeout`` seconds, 15 minutes by default, for another process's LocalSlurm to finish),
and `stop` releases it last. It refuses to start while a slurmctld or slurmd (of any release)
it did not start runs. Teardown cancels every job, waits for their slurmstepd to exit, stops
exactly the daemons it started, removes the cgroups Slurm left (`cgroup_prefix` in each
hierarchy, when empty, and only if it was not there before) and the temp dir.

One node (the default): NodeName is the short hostname (or ``node_name``), daemons listen on
127.0.0.1 only (``CommunicationParameters=NoInAddrAny``) on free ports (6817/6818 when free).
With a ``node_name`` other than the hostname, ``scontrol listpids`` (hence `listpids`,
`step_pids` and `wait_running`) cannot find the node's stepds (it looks them up by hostname);
use ``nodes=`` with a UTS namespace per node for that.

Several nodes: ``nodes=[SlurmNode(name, address, entry), ...]``, where ``entry`` is the argv
prefix that runs a command inside that node (e.g. ``nsenter`` into a network namespace whose
address is ``address`` and a UTS namespace whose hostname is ``name``; see
tests/support/cluster.py). Each node runs its own slurmd (``-N name``) through its entry, with
its own spool dir (``SlurmdSpoolDir=<top>/spool/%n``); slurmctld and every client command
(sbatch, squeue, scancel, sinfo) run in the first node; ``scontrol listpids`` runs in the node
asked about (it finds the stepds by its hostname). Debian's 22.05 (built for multiple slurmds)
names each node's cgroups ``/slurm_<NodeName>``, so nodes sharing this kernel do not mix their
jobs' cgroups; the upstream 24.11 and 26.05 trees use ``/slurm`` for every node, so the nodes
of one job share its cgroups there (`cgroup_prefix`; `scontrol listpids` on one node then
lists the other's processes of that job too).

`FakeStepd` (tests/support/fake_stepd.py, re-exported here) is a slurmstepd stand-in on a real
unix socket, for failure modes a real stepd does not show on demand.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from callerid.agent.backends import stepd
from tests.support.fake_stepd import FakeStepd, stale_socket
from tests.support.poll import wait_for
from tests.support.slurm_release import (
    DEBIAN_PACKAGES,
    RELEASES,
    SlurmRelease,
    SlurmUnavailable,
    TreesNotVisible,
    missing_packages,
    prepare,
)

__all__ = [
    "LOCK_FILE",
    "PACKAGES",
    "RELEASES",
    "FakeStepd",
    "LocalSlurm",
    "SlurmError",
    "SlurmNode",
    "namespaces_under_test",
    "read_in_namespaces",
    "require_slurm",
    "stale_socket",
]

log = logging.getLogger(__name__)

PACKAGES = DEBIAN_PACKAGES
LOCK_FILE = Path("/run/callerid-test-slurm.lock")
LOCK_TIMEOUT = 15 * 60.0
CGROUP_ROOT = Path("/sys/fs/cgroup")
_DAEMONS = tuple(d for r in RELEASES.values() for d in r.daemons)
_TOOLS = frozenset({"sbatch", "scancel", "scontrol", "sinfo", "squeue", "srun"})
_START_TIMEOUT = 60.0
_JOB_TIMEOUT = 30.0

_SLURM_CONF = """\
# Written by callerid's tests/support/slurm.py (LocalSlurm); restored at teardown.
ClusterName=cid{tag}
SlurmctldHost={ctld_host}({ctld_addr})
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
CommunicationParameters=NoInAddrAny
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={top}/state
SlurmdSpoolDir={spool}
SlurmctldPidFile={top}/slurmctld.pid
SlurmdPidFile={top}/slurmd{per_node}.pid
SlurmctldLogFile={top}/log/slurmctld.log
SlurmdLogFile={top}/log/slurmd{per_node}.log
SlurmctldDebug=info
SlurmdDebug={debug}
PrologFlags=contain
ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
MpiDefault=none
MailProg=/bin/true
{none_plugins}{namespace_line}ReturnToService=2
SlurmdTimeout=300
SlurmctldTimeout=120
InactiveLimit=0
KillWait=2
MinJobAge=10
{node_lines}
PartitionName=cid Nodes={node_list} Default=YES MaxTime=INFINITE OverSubscribe=FORCE:8 State=UP
"""
# 23.11 removed these plugins (unset means none); 22.05 wants them named.
_NONE_PLUGINS = """\
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
"""
_NODE_LINE = "NodeName={name} NodeAddr={address} CPUs={cpus} RealMemory=500 State=UNKNOWN"

_CGROUP_CONF = """\
# Written by callerid's tests/support/slurm.py (LocalSlurm); restored at teardown.
CgroupPlugin=cgroup/v1
CgroupMountpoint=/sys/fs/cgroup
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no
"""


# job_container/tmpfs (24.11) and namespace/tmpfs (26.05): every job gets a private /tmp
# (bind-mounted from <BasePath>/<job>/.<job>/_tmp in a mount namespace the extern stepd makes
# and pins on <BasePath>/<job>/.ns).
_JOB_CONTAINER_CONF = """\
# Written by callerid's tests/support/slurm.py (LocalSlurm); restored at teardown.
AutoBasePath=true
BasePath={base}
Dirs=/tmp
"""
# namespace/linux (26.05): the same private /tmp, plus a PID namespace per job.
_NAMESPACE_YAML = """\
# Written by callerid's tests/support/slurm.py (LocalSlurm); restored at teardown.
defaults:
  auto_base_path: true
  base_path: "{base}"
  dirs: "/tmp"
  clone_ns_flags: "CLONE_NEWPID"
"""


class SlurmError(RuntimeError):
    """The local cluster could not be started or driven; the message carries log tails."""


def require_slurm(release: str | SlurmRelease = "22.05") -> SlurmRelease:
    """Skip unless we are root on Debian; install the packages ``release`` needs, unpack its
    tree (24.11, 26.05) and check its slurmd. A tree that cannot be had fails the test."""
    rel = RELEASES[release] if isinstance(release, str) else release
    if os.geteuid() != 0:
        pytest.skip("a local Slurm cluster needs root")
    if shutil.which("dpkg-query") is None:
        pytest.skip("not a Debian system: cannot install " + " ".join(rel.packages))
    missing = missing_packages(rel)
    if missing:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
        update = subprocess.run(
            ["apt-get", "update", "-q"], capture_output=True, text=True, env=env
        )
        proc = subprocess.run(install, capture_output=True, text=True, env=env)
        if proc.returncode != 0 or missing_packages(rel):
            tail = (update.stderr + proc.stderr).strip()[-400:]
            pytest.skip(f"cannot install {' '.join(missing)} with apt-get: {tail}")
    try:
        prepare(rel)
    except TreesNotVisible as exc:
        pytest.skip(f"Slurm {rel.name}: {exc}")
    except SlurmUnavailable as exc:
        pytest.fail(f"Slurm {rel.name}: {exc}", pytrace=False)
    return rel


def namespaces_under_test(release: str | SlurmRelease) -> str | None:
    """The namespace plugin the slurm tests run ``release`` with (`LocalSlurm(namespaces=)`):
    ``"tmpfs"`` from 24.11 on (job_container/tmpfs, namespace/tmpfs: the job's private /tmp);
    None for 22.05, which then shows a stepd without one (no namespaces to join)."""
    rel = RELEASES[release] if isinstance(release, str) else release
    return None if rel.name == "22.05" else "tmpfs"


def read_in_namespaces(fds: tuple[tuple[str, int], ...], path: str) -> list[str]:
    """Seen from the namespaces ``fds`` (entered in a forked child, in order): what ``path``
    holds, then the pid namespace inode and pid of a process started there (a grandchild:
    a PID namespace applies to the children of who enters it)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        try:
            for _kind, fd in fds:
                if ctypes.CDLL(None, use_errno=True).setns(fd, 0) != 0:
                    os.write(w, f"setns: {os.strerror(ctypes.get_errno())}".encode())
                    os._exit(1)
            os.write(w, Path(path).read_bytes())
            grandchild = os.fork()
            if grandchild == 0:
                ino = os.stat("/proc/self/ns/pid").st_ino
                os.write(w, f"{ino} {os.getpid()}\n".encode())
                os._exit(0)
            os.waitpid(grandchild, 0)
        except OSError as exc:
            os.write(w, f"error: {exc}".encode())
        os._exit(0)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as out:
            return out.read().decode().splitlines()
    finally:
        os.waitpid(pid, 0)


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    return True


def _exe_pids(exes: tuple[str, ...]) -> dict[int, str]:
    """Running processes whose executable is one of ``exes``: pid -> exe."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            exe = os.readlink(entry / "exe")
        except OSError:
            continue
        if exe in exes:
            found[int(entry.name)] = exe
    return found


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_ports() -> tuple[int, int]:
    """6817/6818 when both are free, else a free random pair (checked, not reserved)."""
    candidates = [(6817, 6818)]
    for _ in range(50):
        base = 20000 + secrets.randbelow(20000)
        candidates.append((base, base + 1))
    for pair in candidates:
        if all(_port_free(p) for p in pair):
            return pair
    msg = "no free pair of TCP ports for slurmctld/slurmd"
    raise SlurmError(msg)


@dataclass(frozen=True)
class SlurmNode:
    """One Slurm node: its NodeName, NodeAddr and the argv prefix running a command in it."""

    name: str
    address: str = "127.0.0.1"
    entry: tuple[str, ...] = ()


@dataclass
class _Daemon:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path


class LocalSlurm:
    """One Slurm release (munged, slurmctld, one slurmd per node) owned by this object."""

    def __init__(
        self,
        release: str | SlurmRelease = "22.05",
        *,
        node_name: str | None = None,
        nodes: Sequence[SlurmNode] | None = None,
        slurmd_debug: str = "debug",
        lock_timeout: float = LOCK_TIMEOUT,
        namespaces: str | None = None,
    ) -> None:
        self.release = RELEASES[release] if isinstance(release, str) else release
        plugins = dict(self.release.namespace_plugins)
        if namespaces is not None and namespaces not in plugins:
            msg = f"Slurm {self.release.name} has no {namespaces!r} namespace plugin ({plugins})"
            raise ValueError(msg)
        self.namespaces = namespaces
        self.namespace_plugin = plugins.get(namespaces or "")
        host = socket.gethostname().split(".")[0]
        self.multi = nodes is not None
        self.nodes = list(nodes) if nodes is not None else [SlurmNode(node_name or host)]
        if not self.nodes or len({n.name for n in self.nodes}) != len(self.nodes):
            msg = f"nodes must be distinct and at least one: {self.nodes}"
            raise ValueError(msg)
        self.node = self.nodes[0].name
        # slurmctld checks that it runs on SlurmctldHost: this host, or the first node's
        self._ctld = self.nodes[0] if self.multi else SlurmNode(host)
        self.slurmd_debug = slurmd_debug
        self.lock_timeout = lock_timeout
        self._lock_fd: int | None = None
        self.top = Path("/nonexistent")
        self.ctld_port = self.slurmd_port = 0
        self._daemons: list[_Daemon] = []
        self._backups: dict[Path, bytes | None] = {}
        self._cgroups_before: set[Path] = set()
        self._etc_created = False

    # ----------------------------------------------------------------------- paths

    @property
    def etc(self) -> Path:
        """Where this release's slurm.conf and cgroup.conf are (written while we run)."""
        return self.release.etc

    @property
    def conf(self) -> Path:
        return self.etc / "slurm.conf"

    @property
    def spool_dir(self) -> Path:
        """The (first) node's SlurmdSpoolDir."""
        return self.spool_of(self.node)

    def spool_of(self, node: str) -> Path:
        """Node ``node``'s SlurmdSpoolDir."""
        return self.top / "spool" / node if self.multi else self.top / "spool"

    @property
    def ns_base(self) -> Path:
        """The namespace plugin's BasePath: ``<BasePath>/<job>/.ns`` pins a job's mount
        namespace. Not under /tmp: the job's private /tmp is mounted over /tmp in its
        namespace before the plugin chowns ``<BasePath>/<job>/.<job>``, which must stay
        visible there (under /tmp it is not: "chown failed ... No such file or directory",
        and the extern step fails with "container_g_stepd_create(1): Not a directory").
        So with ``namespaces`` the whole `top` (spool dir with the batch scripts, munge
        socket) is under /var/tmp, where the jobs see it."""
        return self.top / "ns"

    @property
    def log_dir(self) -> Path:
        return self.top / "log"

    @property
    def munge_socket(self) -> Path:
        return self.top / "munge" / "munge.socket"

    def cgroup_prefix(self, node: str | None = None) -> str:
        """The top of the cgroups ``node``'s slurmd makes in each v1 hierarchy:
        ``/slurm_<node>`` (a multiple-slurmd build, Debian's), else ``/slurm`` for every node
        (then the nodes of one kernel share a job's cgroups)."""
        return f"/slurm_{node or self.node}" if self.release.multiple_slurmd else "/slurm"

    def slurmd_log(self, node: str | None = None) -> str:
        """The node's slurmd log (its slurmstepds write there too)."""
        name = f"slurmd-{node or self.node}.log" if self.multi else "slurmd.log"
        with contextlib.suppress(OSError):
            return (self.log_dir / name).read_text(errors="replace")
        return ""

    def node_of(self, name: str) -> SlurmNode:
        for node in self.nodes:
            if node.name == name:
                return node
        msg = f"no node {name!r} in this cluster ({[n.name for n in self.nodes]})"
        raise KeyError(msg)

    def extern_socket(self, jobid: str, node: str | None = None) -> Path:
        """The socket of the job's extern step on ``node`` (default: the first node); it may
        not exist yet, or any more."""
        node = node or self.node
        return self.spool_of(node) / f"{node}_{jobid}.{stepd.EXTERN_STEP}"

    def step_sockets(self, jobid: str | None = None, node: str | None = None) -> list[Path]:
        """Every stepd socket in the spool dirs (of one job, of one node, when given)."""
        found = []
        for name in [node] if node else [n.name for n in self.nodes]:
            found += self._node_sockets(name, jobid)
        return sorted(found)

    def _node_sockets(self, node: str, jobid: str | None) -> list[Path]:
        pattern = re.compile(rf"{re.escape(node)}_(\d+)\.\d+(\.\d+)?")
        spool = self.spool_of(node)
        try:
            names = os.listdir(spool)
        except FileNotFoundError:
            return []
        return [
            spool / name
            for name in names
            if (m := pattern.fullmatch(name)) is not None and (jobid is None or m[1] == jobid)
        ]

    # ----------------------------------------------------------------------- lifecycle

    def __enter__(self) -> LocalSlurm:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Take the machine-wide lock, write the configs and start munged, slurmctld and the
        slurmds; wait until every node is idle."""
        self._lock()
        foreign = _exe_pids(_DAEMONS)
        if foreign:
            listing = ", ".join(f"{exe} (pid {pid})" for pid, exe in sorted(foreign.items()))
            msg = f"refusing to start: Slurm daemons not started by us are running: {listing}"
            raise SlurmError(msg)
        missing = missing_packages(self.release)
        if missing or not Path(self.release.daemons[1]).exists():
            what = " ".join(missing) or self.release.daemons[1]
            msg = f"Slurm {self.release.name}: missing {what} (see require_slurm)"
            raise SlurmError(msg)
        where = "/tmp" if self.namespaces is None else "/var/tmp"  # see ns_base
        self.top = Path(tempfile.mkdtemp(prefix="cidslurm", dir=where))
        self.top.chmod(0o755)  # job users reach the munge socket below it
        for sub in ("state", "spool", "log"):
            (self.top / sub).mkdir(mode=0o755)
        for node in self.nodes:
            self.spool_of(node.name).mkdir(mode=0o755, exist_ok=True)
        self._cgroups_before = set(self._slurm_cgroups())
        self.ctld_port, self.slurmd_port = _pick_ports()
        self._start_munged()
        self._write_configs()
        conf = str(self.conf)
        ctld, slurmd = self.release.daemons
        self._spawn("slurmctld", [ctld, "-D", "-f", conf], self._ctld)
        self._wait("slurmctld to answer", lambda: self._run(["scontrol", "ping"]).returncode == 0)
        for node in self.nodes:
            name = f"slurmd-{node.name}" if self.multi else "slurmd"
            self._spawn(name, [slurmd, "-D", "-f", conf, "-N", node.name], node)
        self._wait("every node to become idle", self._nodes_idle)

    def stop(self) -> None:
        """Cancel jobs, stop our daemons, restore /etc/slurm, remove cgroups and temp files;
        release the lock. Does nothing when the lock was never taken (nothing was started)."""
        if self._lock_fd is None:
            return
        try:
            self._stop_all()
        finally:
            self._unlock()

    def _stop_all(self) -> None:
        errors: list[str] = []
        if self._alive("slurmctld") and self._alive("slurmd"):
            with contextlib.suppress(SlurmError, AssertionError):
                self._cancel_all()
        left = self.step_sockets()
        if left:
            errors.append(f"slurmstepd still running for {', '.join(p.name for p in left)}")
        for daemon in reversed(self._daemons):
            self._stop_daemon(daemon, errors)
        self._daemons.clear()
        self._restore_etc()
        self._remove_cgroups()
        if self.top != Path("/nonexistent"):
            shutil.rmtree(self.top, ignore_errors=True)
            self.top = Path("/nonexistent")
        if errors:
            raise SlurmError("; ".join(errors))

    def _lock(self) -> None:
        """Exclusive flock on LOCK_FILE: one LocalSlurm per machine (other processes wait)."""
        if self._lock_fd is not None:
            return
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            if not _try_flock(fd):
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                log.warning(
                    "LocalSlurm: %s is held by another process (pid %s); waiting up to %.0f s",
                    LOCK_FILE,
                    holder,
                    self.lock_timeout,
                )
                t0 = time.monotonic()
                self._wait(f"the lock {LOCK_FILE}", lambda: _try_flock(fd), self.lock_timeout)
                log.warning("LocalSlurm: got %s after %.1f s", LOCK_FILE, time.monotonic() - t0)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # releases the flock

    # ----------------------------------------------------------------------- jobs

    def submit(
        self,
        user: str,
        script: str | None = None,
        *,
        wrap: str | None = None,
        args: list[str] | None = None,
    ) -> str:
        """sbatch as ``user`` (a script text, or ``wrap`` for --wrap); returns the job id."""
        sbatch = self.release.tool("sbatch")
        argv = ["runuser", "-u", user, "--", sbatch, "--parsable", "--chdir=/tmp",
                "--output=/dev/null", "--error=/dev/null", *(args or [])]  # fmt: skip
        if wrap is not None:
            argv.append(f"--wrap={wrap}")
        proc = self._run(argv, input=script if wrap is None else None)
        if proc.returncode != 0:
            msg = f"sbatch as {user} failed: {proc.stderr.strip()}"
            raise SlurmError(msg)
        return proc.stdout.strip().split(";")[0]

    def job_state(self, jobid: str) -> str:
        """squeue's state of the job (RUNNING, PENDING ...), or "" once it has left the queue."""
        return self._run(["squeue", "-h", "-j", jobid, "-o", "%T"]).stdout.strip()

    def job_nodes(self, jobid: str) -> list[str]:
        """The nodes the job runs on, the batch host first ([] when it does not run)."""
        if not self.multi:
            return [self.node] if self.job_state(jobid) == "RUNNING" else []
        listed = self._run(["squeue", "-h", "-j", jobid, "-t", "R", "-o", "%B %N"]).stdout.split()
        if len(listed) != 2:
            return []
        names = self._run(["scontrol", "show", "hostnames", listed[1]]).stdout.split()
        return [listed[0], *(n for n in names if n != listed[0])]

    def wait_running(self, jobid: str, timeout: float = _JOB_TIMEOUT) -> None:
        """Wait until the job runs, its extern step socket exists on each of its nodes and its
        batch step has a pid."""

        def ready() -> bool:
            nodes = self.job_nodes(jobid)
            return (
                bool(nodes)
                and all(self.extern_socket(jobid, n).exists() for n in nodes)
                and bool(self.step_pids(jobid, nodes[0]).get("batch"))
            )

        self._wait(f"job {jobid} to run", ready, timeout)

    def listpids(self, jobid: str, node: str | None = None) -> str:
        """The output of ``scontrol listpids <jobid>`` on ``node`` (default: the first)."""
        proc = self._run(["scontrol", "listpids", jobid], node=node or self.node)
        if proc.returncode != 0:
            msg = f"scontrol listpids {jobid} on {node or self.node}: {proc.stderr.strip()}"
            raise SlurmError(msg)
        return proc.stdout

    def step_pids(self, jobid: str, node: str | None = None) -> dict[str, list[int]]:
        """`listpids` on ``node`` parsed: step id ("batch", "extern", "0" ...) -> pids."""
        steps: dict[str, list[int]] = {}
        proc = self._run(["scontrol", "listpids", jobid], node=node or self.node)
        for line in proc.stdout.splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 3 and fields[0].isdigit():
                steps.setdefault(fields[2], []).append(int(fields[0]))
        return steps

    def cancel(self, jobid: str, timeout: float = _JOB_TIMEOUT) -> None:
        """scancel the job and wait until its slurmstepd processes have removed their sockets."""
        self._run(["scancel", jobid])
        self._wait(
            f"job {jobid}'s stepd sockets to go", lambda: not self.step_sockets(jobid), timeout
        )

    def _cancel_all(self) -> None:
        listed = self._run(["squeue", "-h", "-o", "%i"]).stdout.split()
        if listed:
            self._run(["scancel", *listed])
        self._wait(
            "every job to leave the queue",
            lambda: not self._run(["squeue", "-h", "-o", "%i"]).stdout.strip(),
        )
        self._wait("every slurmstepd to exit", lambda: not self.step_sockets())

    # ----------------------------------------------------------------------- internals

    def _run(
        self, argv: list[str], input: str | None = None, node: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """A Slurm command (this release's, when named bare: "scontrol"), in ``node``
        (default: where slurmctld runs)."""
        entry = self.node_of(node).entry if node else self._ctld.entry
        env = dict(os.environ, SLURM_CONF=str(self.conf))
        if argv[0] in _TOOLS:
            argv = [self.release.tool(argv[0]), *argv[1:]]
        return subprocess.run(
            [*entry, *argv], capture_output=True, text=True, input=input, env=env, timeout=30
        )

    def _wait(
        self, what: str, predicate: Callable[[], object], timeout: float = _START_TIMEOUT
    ) -> None:
        try:
            wait_for(predicate, timeout=timeout, interval=0.1, what=what)
        except AssertionError as exc:
            raise SlurmError(f"{exc}\n{self._log_tails()}") from None

    def _log_tails(self) -> str:
        parts = []
        for log in sorted(self.log_dir.glob("*")):
            with contextlib.suppress(OSError):
                lines = log.read_text(errors="replace").splitlines()[-15:]
                parts.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def _nodes_idle(self) -> bool:
        listed = self._run(["sinfo", "-h", "-N", "-o", "%N %T"]).stdout.split("\n")
        states = dict(line.split() for line in listed if len(line.split()) == 2)
        for name, state in states.items():
            if state.startswith(("down", "drain", "fail")) and not state.endswith("*"):
                self._run(["scontrol", "update", f"nodename={name}", "state=resume"])
        return all(states.get(n.name) == "idle" for n in self.nodes)

    def _start_munged(self) -> None:
        mdir = self.top / "munge"
        mdir.mkdir(mode=0o755)
        key = mdir / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True)
        shutil.chown(mdir, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        argv = [
            "setpriv", "--reuid=munge", "--regid=munge", "--init-groups",
            "/usr/sbin/munged", "-F", f"--socket={self.munge_socket}", f"--key-file={key}",
            f"--log-file={mdir / 'munged.log'}", f"--pid-file={mdir / 'munged.pid'}",
            f"--seed-file={mdir / 'munged.seed'}",
        ]  # fmt: skip
        self._spawn("munged", argv)
        self._wait("munged's socket", self.munge_socket.exists)

    def _write_configs(self) -> None:
        if not self.etc.exists():
            self.etc.mkdir(mode=0o755)
            self._etc_created = True
        cpus = os.cpu_count() or 1
        text = _SLURM_CONF.format(
            tag=secrets.token_hex(3),
            ctld_host=self._ctld.name,
            ctld_addr=self._ctld.address,
            ctld_port=self.ctld_port,
            slurmd_port=self.slurmd_port,
            munge_socket=self.munge_socket,
            top=self.top,
            spool=self.top / "spool" / "%n" if self.multi else self.top / "spool",
            per_node="-%n" if self.multi else "",
            debug=self.slurmd_debug,
            none_plugins=_NONE_PLUGINS if self.release.none_plugins else "",
            namespace_line=(
                f"{self.release.namespace_key}={self.namespace_plugin}\n"
                if self.namespace_plugin
                else ""
            ),
            node_lines="\n".join(
                _NODE_LINE.format(name=n.name, address=n.address, cpus=cpus) for n in self.nodes
            ),
            node_list=",".join(n.name for n in self.nodes),
        )
        files = [("slurm.conf", text), ("cgroup.conf", _CGROUP_CONF)]
        if self.namespaces == "tmpfs":
            files.append(("job_container.conf", _JOB_CONTAINER_CONF.format(base=self.ns_base)))
        elif self.namespaces == "linux":
            files.append(("namespace.yaml", _NAMESPACE_YAML.format(base=self.ns_base)))
        for name, content in files:
            path = self.etc / name
            if path not in self._backups:
                self._backups[path] = path.read_bytes() if path.exists() else None
            tmp = path.with_name(f".{name}.cid-tmp")
            tmp.write_text(content)
            tmp.chmod(0o644)
            tmp.replace(path)

    def _restore_etc(self) -> None:
        for path, content in self._backups.items():
            if content is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(content)
        self._backups.clear()
        if self._etc_created:
            with contextlib.suppress(OSError):
                self.etc.rmdir()
            self._etc_created = False

    def _spawn(self, name: str, argv: list[str], node: SlurmNode | None = None) -> None:
        """Start a daemon (in ``node``, through its entry); the entry must exec, not fork."""
        log = self.log_dir / f"{name}.out"
        argv = [*node.entry, *argv] if node is not None else argv
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )
        self._daemons.append(_Daemon(name, proc, log))

    def _alive(self, name: str) -> bool:
        """Whether every daemon called ``name`` (or ``name-<node>``) runs."""
        mine = [d for d in self._daemons if d.name == name or d.name.startswith(f"{name}-")]
        return bool(mine) and all(d.proc.poll() is None for d in mine)

    def _stop_daemon(self, daemon: _Daemon, errors: list[str]) -> None:
        if daemon.proc.poll() is not None:
            return
        daemon.proc.send_signal(signal.SIGTERM)
        try:
            daemon.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            daemon.proc.kill()
            daemon.proc.wait(timeout=10)
            errors.append(f"{daemon.name} (pid {daemon.proc.pid}) ignored SIGTERM")

    def _slurm_cgroups(self) -> Iterator[Path]:
        tops = {self.cgroup_prefix(node.name).lstrip("/") for node in self.nodes}
        for hierarchy in CGROUP_ROOT.iterdir():
            for top in sorted(tops):
                candidate = hierarchy / top
                if candidate.is_dir():
                    yield candidate

    def _remove_cgroups(self) -> None:
        """rmdir the `cgroup_prefix` trees Slurm created (bottom-up; busy ones are left)."""
        for top in self._slurm_cgroups():
            if top in self._cgroups_before:
                continue
            for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: -len(w[0])):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)
