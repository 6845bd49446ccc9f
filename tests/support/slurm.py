"""A real single-node Slurm 22.05 cluster for tests and demos, and a fake slurmstepd.

    with LocalSlurm() as slurm:                       # munged + slurmctld + slurmd, node idle
        job = slurm.submit(alice.name, wrap="sleep 300")
        slurm.wait_running(job)
        slurm.extern_socket(job)                      # <spool>/<node>_<job>.4294967292
        slurm.listpids(job)                           # `scontrol listpids <job>` output
        slurm.cancel(job)

`LocalSlurm` runs Debian's packages (``slurmd slurmctld slurm-client munge``; installed with
apt-get when missing) the way reference/slurm-local ran them on this machine: proctrack/cgroup,
task/cgroup, cgroup/v1 (hybrid hosts), ``PrologFlags=contain``. Everything it creates lives in
one temp dir (spool, state, logs, a private munged with its own key and socket), except
``/etc/slurm/slurm.conf`` and ``cgroup.conf``, which Debian's tools read: any existing files are
backed up and restored at teardown. Daemons listen on 127.0.0.1 only
(``CommunicationParameters=NoInAddrAny``) on free ports (6817/6818 when free). It refuses to
start while a slurmctld or slurmd it did not start runs. Teardown cancels every job, waits for
their slurmstepd to exit, stops exactly the daemons it started, removes the cgroups Slurm left
(``<hierarchy>/slurm_<node>`` when empty, and only if it was not there before) and the temp dir.

`FakeStepd` is a slurmstepd stand-in on a real unix socket, for failure modes a real stepd
does not show on demand (a hung stepd, refusals, closed connections).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from callerid.agent.backends import stepd
from tests.support.poll import wait_for

__all__ = ["PACKAGES", "FakeStepd", "LocalSlurm", "SlurmError", "require_slurm", "stale_socket"]

PACKAGES = ("slurmd", "slurmctld", "slurm-client", "munge")
ETC = Path("/etc/slurm")
CGROUP_ROOT = Path("/sys/fs/cgroup")
_DAEMONS = ("/usr/sbin/slurmctld", "/usr/sbin/slurmd")
_START_TIMEOUT = 60.0
_JOB_TIMEOUT = 30.0

_SLURM_CONF = """\
# Written by callerid's tests/support/slurm.py (LocalSlurm); restored at teardown.
ClusterName=cid{tag}
SlurmctldHost={node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
CommunicationParameters=NoInAddrAny
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={top}/state
SlurmdSpoolDir={top}/spool
SlurmctldPidFile={top}/slurmctld.pid
SlurmdPidFile={top}/slurmd.pid
SlurmctldLogFile={top}/log/slurmctld.log
SlurmdLogFile={top}/log/slurmd.log
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
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
SlurmdTimeout=300
SlurmctldTimeout=120
InactiveLimit=0
KillWait=2
MinJobAge=10
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=500 State=UNKNOWN
PartitionName=cid Nodes={node} Default=YES MaxTime=INFINITE OverSubscribe=FORCE:8 State=UP
"""

_CGROUP_CONF = """\
# Written by callerid's tests/support/slurm.py (LocalSlurm); restored at teardown.
CgroupPlugin=cgroup/v1
CgroupMountpoint=/sys/fs/cgroup
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no
"""


class SlurmError(RuntimeError):
    """The local cluster could not be started or driven; the message carries log tails."""


def _missing_packages() -> list[str]:
    missing = []
    for pkg in PACKAGES:
        proc = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True
        )
        if "install ok installed" not in proc.stdout:
            missing.append(pkg)
    return missing


def require_slurm() -> None:
    """Skip unless we are root and Slurm's packages are (or can be made) installed."""
    if os.geteuid() != 0:
        pytest.skip("a local Slurm cluster needs root")
    if shutil.which("dpkg-query") is None:
        pytest.skip("not a Debian system: cannot install " + " ".join(PACKAGES))
    missing = _missing_packages()
    if not missing:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    update = subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, env=env)
    proc = subprocess.run(install, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or _missing_packages():
        tail = (update.stderr + proc.stderr).strip()[-400:]
        pytest.skip(f"cannot install {' '.join(missing)} with apt-get: {tail}")


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


@dataclass
class _Daemon:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path


class LocalSlurm:
    """One-node Slurm 22.05 (munged, slurmctld, slurmd) owned by this object."""

    def __init__(self, *, node_name: str | None = None, slurmd_debug: str = "debug") -> None:
        self.node = node_name or socket.gethostname().split(".")[0]
        self.slurmd_debug = slurmd_debug
        self.top = Path("/nonexistent")
        self.ctld_port = self.slurmd_port = 0
        self._daemons: list[_Daemon] = []
        self._backups: dict[Path, bytes | None] = {}
        self._cgroups_before: set[Path] = set()
        self._etc_created = False

    # ----------------------------------------------------------------------- paths

    @property
    def spool_dir(self) -> Path:
        return self.top / "spool"

    @property
    def log_dir(self) -> Path:
        return self.top / "log"

    @property
    def munge_socket(self) -> Path:
        return self.top / "munge" / "munge.socket"

    def extern_socket(self, jobid: str) -> Path:
        """The socket of the job's extern step (which may not exist yet, or any more)."""
        return self.spool_dir / f"{self.node}_{jobid}.{stepd.EXTERN_STEP}"

    def step_sockets(self, jobid: str | None = None) -> list[Path]:
        """Every stepd socket in the spool dir (of one job, when given)."""
        pattern = re.compile(rf"{re.escape(self.node)}_(\d+)\.\d+(\.\d+)?")
        try:
            names = os.listdir(self.spool_dir)
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            m = pattern.fullmatch(name)
            if m is not None and (jobid is None or m.group(1) == jobid):
                found.append(self.spool_dir / name)
        return sorted(found)

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
        """Write the configs and start munged, slurmctld and slurmd; wait for an idle node."""
        foreign = _exe_pids(_DAEMONS)
        if foreign:
            listing = ", ".join(f"{exe} (pid {pid})" for pid, exe in sorted(foreign.items()))
            msg = f"refusing to start: Slurm daemons not started by us are running: {listing}"
            raise SlurmError(msg)
        missing = _missing_packages()
        if missing:
            msg = f"packages missing: {' '.join(missing)} (see require_slurm)"
            raise SlurmError(msg)
        self.top = Path(tempfile.mkdtemp(prefix="cidslurm", dir="/tmp"))
        self.top.chmod(0o755)  # job users reach the munge socket below it
        for sub in ("state", "spool", "log"):
            (self.top / sub).mkdir(mode=0o755)
        self._cgroups_before = set(self._slurm_cgroups())
        self.ctld_port, self.slurmd_port = _pick_ports()
        self._start_munged()
        self._write_configs()
        conf = str(ETC / "slurm.conf")
        self._spawn("slurmctld", ["/usr/sbin/slurmctld", "-D", "-f", conf])
        self._wait("slurmctld to answer", lambda: self._run(["scontrol", "ping"]).returncode == 0)
        self._spawn("slurmd", ["/usr/sbin/slurmd", "-D", "-f", conf, "-N", self.node])
        self._wait("the node to become idle", self._node_idle)

    def stop(self) -> None:
        """Cancel jobs, stop our daemons, restore /etc/slurm, remove cgroups and temp files."""
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
        argv = ["runuser", "-u", user, "--", "sbatch", "--parsable", "--chdir=/tmp",
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

    def wait_running(self, jobid: str, timeout: float = _JOB_TIMEOUT) -> None:
        """Wait until the job runs, its extern step socket exists and its batch step has a pid."""

        def ready() -> bool:
            return (
                self.job_state(jobid) == "RUNNING"
                and self.extern_socket(jobid).exists()
                and bool(self.step_pids(jobid).get("batch"))
            )

        self._wait(f"job {jobid} to run", ready, timeout)

    def listpids(self, jobid: str) -> str:
        """The output of ``scontrol listpids <jobid>``."""
        proc = self._run(["scontrol", "listpids", jobid])
        if proc.returncode != 0:
            msg = f"scontrol listpids {jobid}: {proc.stderr.strip()}"
            raise SlurmError(msg)
        return proc.stdout

    def step_pids(self, jobid: str) -> dict[str, list[int]]:
        """`listpids` parsed: step id ("batch", "extern", "0" ...) -> pids."""
        steps: dict[str, list[int]] = {}
        proc = self._run(["scontrol", "listpids", jobid])
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

    def _run(self, argv: list[str], input: str | None = None) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, SLURM_CONF=str(ETC / "slurm.conf"))
        return subprocess.run(
            argv, capture_output=True, text=True, input=input, env=env, timeout=30
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

    def _node_idle(self) -> bool:
        state = self._run(["sinfo", "-h", "-n", self.node, "-o", "%T"]).stdout.strip()
        if state.startswith(("down", "drain", "fail")) and not state.endswith("*"):
            self._run(["scontrol", "update", f"nodename={self.node}", "state=resume"])
        return state == "idle"

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
        if not ETC.exists():
            ETC.mkdir(mode=0o755)
            self._etc_created = True
        text = _SLURM_CONF.format(
            tag=secrets.token_hex(3),
            node=self.node,
            ctld_port=self.ctld_port,
            slurmd_port=self.slurmd_port,
            munge_socket=self.munge_socket,
            top=self.top,
            debug=self.slurmd_debug,
            cpus=os.cpu_count() or 1,
        )
        for name, content in (("slurm.conf", text), ("cgroup.conf", _CGROUP_CONF)):
            path = ETC / name
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
                ETC.rmdir()
            self._etc_created = False

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = self.log_dir / f"{name}.out"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )
        self._daemons.append(_Daemon(name, proc, log))

    def _alive(self, name: str) -> bool:
        return any(d.name == name and d.proc.poll() is None for d in self._daemons)

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
        for hierarchy in CGROUP_ROOT.iterdir():
            candidate = hierarchy / f"slurm_{self.node}"
            if candidate.is_dir():
                yield candidate

    def _remove_cgroups(self) -> None:
        """rmdir the slurm_<node> trees Slurm created (bottom-up; busy ones are left)."""
        for top in self._slurm_cgroups():
            if top in self._cgroups_before:
                continue
            for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: -len(w[0])):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)


# --------------------------------------------------------------------------- fake slurmstepd

Behaviour = Literal["answer", "refuse", "close", "hang"]


@dataclass
class _Peer:
    sock: socket.socket
    reader: stepd.Reader[Any] = field(default_factory=stepd.hello_reader)
    greeted: bool = False


class FakeStepd:
    """A stand-in slurmstepd on a real unix socket, served by a thread.

    ``on_hello``: "answer" (reply ``version``), "refuse" (reply -1 and close), "hang" (accept,
    never answer). ``on_add``: how ADD_EXTERN_PID is met: "answer" (rc 0, the pid is recorded in
    `adopted`), "refuse" (rc -1, as 22.05 does), "close" (close without a reply, as 26.05 does),
    "hang". STEP_UID answers ``uid``; PID_IN_CONTAINER answers whether the pid was adopted (or
    is in ``pids``); STEP_LIST_PIDS lists those; DAEMON_PID answers the serving thread's id (not
    the test's pid); STATE ``state`` (2: running).
    """

    def __init__(
        self,
        path: Path,
        *,
        uid: int,
        version: int = stepd.PROTOCOL_22_05,
        on_hello: Behaviour = "answer",
        on_add: Behaviour = "answer",
        pids: tuple[int, ...] = (),
        state: int = 2,
    ) -> None:
        self.path, self.uid, self.version = path, uid, version
        self.on_hello, self.on_add = on_hello, on_add
        self.adopted: list[int] = []
        self.pids = list(pids)
        self.state = state
        self.requests: list[tuple[stepd.Request, int | None]] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(16)
        self._listener.setblocking(False)
        self._stop = threading.Event()
        self._peers: list[_Peer] = []
        self._thread = threading.Thread(target=self._serve, name=f"fake-stepd {path.name}")
        self._thread.start()

    def __enter__(self) -> FakeStepd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving, close every connection and remove the socket file."""
        self._stop.set()
        self._thread.join(timeout=10)
        self._listener.close()
        for peer in self._peers:
            peer.sock.close()
        self.path.unlink(missing_ok=True)

    def _serve(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ, None)
            while not self._stop.is_set():
                for key, _mask in sel.select(timeout=0.05):
                    if key.data is None:
                        self._accept(sel)
                    else:
                        self._on_data(sel, key.data)

    def _accept(self, sel: selectors.BaseSelector) -> None:
        with contextlib.suppress(BlockingIOError):
            conn, _ = self._listener.accept()
            peer = _Peer(conn)
            self._peers.append(peer)
            sel.register(conn, selectors.EVENT_READ, peer)

    def _drop(self, sel: selectors.BaseSelector, peer: _Peer) -> None:
        sel.unregister(peer.sock)
        peer.sock.close()

    def _on_data(self, sel: selectors.BaseSelector, peer: _Peer) -> None:
        data = peer.sock.recv(4096)
        if not data:
            self._drop(sel, peer)
            return
        while data:
            data = data[peer.reader.feed(data) :]
            if not peer.reader.done:
                return
            if not self._answer(sel, peer):
                return
            peer.reader = stepd.request_reader()

    def _answer(self, sel: selectors.BaseSelector, peer: _Peer) -> bool:
        """Reply to the message just decoded; False once the connection is closed or hung."""
        if not peer.greeted:
            peer.greeted = True
            return self._act(sel, peer, self.on_hello, "hello", self.version)
        request, arg = peer.reader.value
        self.requests.append((request, arg))
        if request == stepd.Request.ADD_EXTERN_PID:
            ok = self._act(sel, peer, self.on_add, request, 0)
            if ok and self.on_add == "answer":
                self.adopted.append(arg)
            return ok
        value: object = {
            stepd.Request.STEP_UID: self.uid,
            stepd.Request.PID_IN_CONTAINER: arg in self.adopted or arg in self.pids,
            stepd.Request.STEP_LIST_PIDS: self.pids + self.adopted,
            stepd.Request.DAEMON_PID: self._thread.native_id,
            stepd.Request.STATE: self.state,
        }[request]
        peer.sock.sendall(stepd.encode_reply(request, value))
        return True

    def _act(
        self,
        sel: selectors.BaseSelector,
        peer: _Peer,
        how: Behaviour,
        request: stepd.Request | str,
        value: int,
    ) -> bool:
        if how == "answer":
            peer.sock.sendall(stepd.encode_reply(request, value))
            return True
        if how == "refuse":
            peer.sock.sendall(stepd.encode_reply(request, -1))
            if request == "hello":
                self._drop(sel, peer)
                return False
            return True
        if how == "close":
            self._drop(sel, peer)
            return False
        sel.unregister(peer.sock)  # hang: keep the connection open, never read or answer
        return False


def stale_socket(path: Path) -> None:
    """Leave a socket file at ``path`` whose listener is gone (connect: ECONNREFUSED)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))
        s.listen(1)
