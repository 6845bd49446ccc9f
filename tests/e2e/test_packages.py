"""The deb and rpm packages, built and installed for real.

CI runs as root on a disposable Debian 12 machine, so this module really installs the
.debs with apt-get (the Python dependencies are Debian's own python3-* packages), checks the
files, the conffile and the postinst's keypair, starts the agent from the installed files by
running the unit's ExecStart line (no systemd as PID 1 here: the test plays systemd's part,
with the unit's capability bounding set, NoNewPrivileges and UMask, a notify socket for
READY/RELOADING/STOPPING/WATCHDOG, and a private journald), logs in through the *installed*
pam_callerid.so with pamtester, and purges everything again. The .rpms are installed into a
scratch rpm root (--noscripts: their scriptlets would run on this host) and verified there.

Both packages are built once per module with `make deb` and `make rpm` (which also lint
them). The packages are never left installed: the `installed` fixture purges them.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest
import yaml

from tests.support.cgroups import JobTree, require_cgroups
from tests.support.journald import PrivateJournald
from tests.support.poll import wait_for
from tests.support.users import ThrowawayUser, require_useradd, throwaway_users

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.timeout(900)]

TOP = Path(__file__).resolve().parents[2]
SYS_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}
PACKAGES = ("callerid", "libpam-callerid")
UNIT = Path("/lib/systemd/system/callerid-agent.service")
PY_DIR = Path("/usr/lib/python3/dist-packages/callerid")
PY_DEPS = {"python3-zmq", "python3-msgpack", "python3-psutil", "python3-yaml", "python3-systemd"}
PY_DEPS |= {"python3-prometheus-client"}
RPM_NAMES = {  # Fedora/RHEL names where they differ
    "python3-yaml": "python3-pyyaml",
    "python3-prometheus-client": "python3-prometheus_client",
}
RPM_PY_DEPS = {RPM_NAMES.get(d, d) for d in PY_DEPS}
LOCK = Path("/run/lock/callerid-test-packages.lock")
DONE = "account management done"
STARTED_ID = "61573aec34b2455a97ff3885890c0ce8"  # "Agent started" in the catalog
LOOPBACK = "127.0.0.1"


def sh(argv: list[str], *, check: bool = True, timeout: float = 300) -> str:
    """Run a system command with the system's PATH; its stdout (stderr in the failure)."""
    r = subprocess.run(argv, capture_output=True, text=True, env=SYS_ENV, timeout=timeout)
    if check and r.returncode:
        msg = f"{shlex.join(argv)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        raise AssertionError(msg)
    return r.stdout


def multiarch() -> str:
    return sh(["dpkg-architecture", "-qDEB_HOST_MULTIARCH"]).strip()


def dpkg_status(package: str) -> str:
    """'ii', 'rc', ... or '' when dpkg does not know the package."""
    r = subprocess.run(
        ["dpkg-query", "-W", "-f=${db:Status-Abbrev}", package],
        capture_output=True, text=True, env=SYS_ENV,
    )  # fmt: skip
    return r.stdout.strip() if r.returncode == 0 else ""


def apt_get(*args: str) -> str:
    env_argv = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-y", "-q"]
    return sh([*env_argv, "-o", "DPkg::Lock::Timeout=300", *args], timeout=600)


# -- building ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Built:
    debs: dict[str, Path]  # package name -> .deb
    rpms: dict[str, Path]  # package name -> .rpm


@pytest.fixture(scope="module")
def lock() -> Iterator[None]:
    """One run of this module at a time on a machine (apt, dpkg and build/ are shared)."""
    if os.geteuid() != 0:
        pytest.skip("building and installing packages needs root")
    for tool in ("apt-get", "dpkg", "make"):
        if shutil.which(tool, path=SYS_ENV["PATH"]) is None:
            pytest.skip(f"{tool} not found: this test needs a Debian system")
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with LOCK.open("w") as fh:
        wait_for(lambda: _try_lock(fh), timeout=600, interval=0.5, what=f"the lock {LOCK}")
        yield


def _try_lock(fh: IO[str]) -> bool:
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@pytest.fixture(scope="module")
def built(lock: None) -> Built:
    """`make deb` and `make rpm` (each lints what it built); built once per module."""
    for target in ("deb", "rpm"):
        sh(["make", "-s", "-C", str(TOP), target], timeout=900)
    debs = {p.name.split("_")[0]: p for p in (TOP / "build/deb").glob("*.deb")}
    rpms = {}
    for path in (TOP / "build/rpm/RPMS").glob("*/*.rpm"):
        rpms[sh(["rpm", "-qp", "--qf", "%{NAME}", str(path)]).strip()] = path
    assert set(PACKAGES) <= set(debs), debs
    assert {"callerid", "callerid-pam"} == set(rpms), rpms
    return Built(debs, rpms)


@pytest.fixture(scope="module")
def installed(built: Built) -> Iterator[Built]:
    """The .debs installed with apt-get (dependencies from Debian); purged at the end."""
    present = [p for p in PACKAGES if dpkg_status(p) not in ("", "un", "pn")]
    if present:
        pytest.skip(f"{present} already installed here; this test would purge them")
    try:
        apt_get("install", *(f"./{built.debs[p].relative_to(TOP)}" for p in PACKAGES))
        yield built
    finally:
        if any(dpkg_status(p) not in ("", "un", "pn") for p in PACKAGES):
            apt_get("purge", *PACKAGES)


# -- the .deb files ----------------------------------------------------------------------------


def deb_field(deb: Path, name: str) -> str:
    return sh(["dpkg-deb", "-f", str(deb), name]).strip()


def deb_files(deb: Path) -> set[str]:
    return {line.split()[-1].lstrip(".") for line in sh(["dpkg-deb", "-c", str(deb)]).splitlines()}


def test_deb_metadata_and_contents(built: Built) -> None:
    agent, pam = built.debs["callerid"], built.debs["libpam-callerid"]
    assert deb_field(agent, "Architecture") == "all"
    depends = {d.strip().split()[0] for d in deb_field(agent, "Depends").split(",")}
    assert depends >= PY_DEPS
    files = deb_files(agent)
    for path in (
        "/usr/bin/callerid-agent",
        "/usr/bin/calleridctl",
        "/etc/callerid/agent.yaml",
        "/lib/systemd/system/callerid-agent.service",
        "/usr/lib/tmpfiles.d/callerid.conf",
        "/usr/lib/systemd/catalog/callerid.catalog",
        "/usr/share/man/man8/callerid-agent.8.gz",
        "/usr/share/man/man8/calleridctl.8.gz",
        "/usr/share/doc/callerid/README.md",
        "/usr/share/doc/callerid/rollout.md",
        f"{PY_DIR}/agent/daemon.py",
        f"{PY_DIR}/bus/protocol.py",
    ):
        assert path in files, path
    # callerid.agent / callerid.bus only: no bare agent/bus packages, no bundled wheels
    site = "/usr/lib/python3/dist-packages/"
    tops = {f[len(site) :].split("/")[0] for f in files if f.startswith(site) and f != site}
    assert {t for t in tops if t} == {"callerid", "callerid-0.1.0.dist-info"}
    assert not [f for f in files if f.endswith((".whl", ".so"))]
    conffiles = sh(["dpkg-deb", "--info", str(agent), "conffiles"]).split()
    assert conffiles == ["/etc/callerid/agent.yaml"]
    pam_files = deb_files(pam)
    assert f"/lib/{multiarch()}/security/pam_callerid.so" in pam_files
    assert "/usr/share/doc/libpam-callerid/examples/pam-sshd.example" in pam_files
    assert not [f for f in pam_files if f.startswith("/etc/pam.d")]  # never enabled by us
    assert deb_field(pam, "Multi-Arch") == "same"
    assert "libpam0g" in deb_field(pam, "Depends")


# -- installed ---------------------------------------------------------------------------------


def test_installed_files_and_conffile(installed: Built) -> None:
    listed = set(sh(["dpkg", "-L", "callerid"]).split())
    assert {"/usr/bin/callerid-agent", "/etc/callerid/agent.yaml", str(UNIT)} <= listed
    conffiles = sh(["dpkg-query", "-W", "-f=${Conffiles}", "callerid"])
    assert "/etc/callerid/agent.yaml" in conffiles
    assert (TOP / "config/agent.yaml").read_text() == Path("/etc/callerid/agent.yaml").read_text()
    so = Path(f"/lib/{multiarch()}/security/pam_callerid.so")
    assert so.is_file()
    assert sh(["dpkg", "-S", str(so)]).startswith("libpam-callerid")
    assert Path("/run/callerid").is_dir()  # tmpfiles.d, run by the postinst
    assert stat.S_IMODE(Path("/run/callerid").stat().st_mode) == 0o755
    # the catalog trigger ran: journalctl knows our message ids
    catalog = sh(["journalctl", "--list-catalog", STARTED_ID])
    assert "Agent started" in catalog
    assert not Path("/usr/lib/python3/dist-packages/agent").exists()
    assert not Path("/usr/lib/python3/dist-packages/bus").exists()


def test_commands_run_with_the_distro_python(installed: Built) -> None:
    for cmd in ("/usr/bin/callerid-agent", "/usr/bin/calleridctl"):
        assert Path(cmd).read_text().splitlines()[0] == "#!/usr/bin/python3"
    assert sh(["/usr/bin/callerid-agent", "--version"]).strip() == "callerid 0.1.0"
    help_text = sh(["/usr/bin/calleridctl", "--help"])
    assert "keygen" in help_text
    assert "ping" in help_text
    probe = (
        "import sys, zmq, msgpack, psutil, yaml, systemd.journal\n"
        "import callerid.bus.transport, callerid.agent.daemon\n"
        "assert zmq.has('curve')\n"
        "print(sys.version.split()[0], zmq.__version__, zmq.zmq_version(), "
        "callerid.agent.daemon.__file__)"
    )
    version, pyzmq, libzmq, where = sh(["/usr/bin/python3", "-c", probe]).split()
    assert where.startswith(str(PY_DIR)), where  # Debian's python3 imports the packaged copy
    assert version.startswith("3.11"), version
    assert pyzmq and libzmq


def test_postinst_keypair_is_private_and_never_replaced(installed: Built) -> None:
    keys = Path("/etc/callerid/keys")
    node = socket.gethostname().split(".")[0]
    secret, public = keys / f"{node}.key_secret", keys / f"{node}.key"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert secret.stat().st_uid == 0
    assert "secret-key" in secret.read_text()
    assert (keys / "authorized" / public.name).read_bytes() == public.read_bytes()
    before = secret.read_bytes()
    apt_get("install", "--reinstall", f"./{installed.debs['callerid'].relative_to(TOP)}")
    assert secret.read_bytes() == before  # postinst again: the key stays
    assert sorted(p.name for p in keys.glob("*.key_secret")) == [secret.name]


def unit_settings(text: str) -> dict[str, list[str]]:
    """KEY -> values (in order) of a unit file; comments and section headers dropped."""
    settings: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key, []).append(value)
    return settings


def test_unit_verifies_and_is_hardened(installed: Built) -> None:
    unit = unit_settings(UNIT.read_text())
    expected = {
        "Type": "notify",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "ProtectSystem": "strict",
        "ReadWritePaths": "/sys/fs/cgroup",
        "NoNewPrivileges": "yes",
        "UMask": "0077",
        "CapabilityBoundingSet": "CAP_SYS_PTRACE CAP_DAC_READ_SEARCH",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    }
    assert {k: unit.get(k) for k in expected} == {k: [v] for k, v in expected.items()}
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    r = subprocess.run(
        ["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True, env=SYS_ENV
    )
    assert r.returncode == 0, r.stderr
    assert "callerid" not in r.stderr, r.stderr
    out = sh(["systemd-analyze", "security", "--offline=yes", str(UNIT)])
    exposure = float(re.findall(r"Overall exposure level for \S+: ([0-9.]+)", out)[0])
    assert exposure < 4.0, out[-2000:]


# -- the agent from the installed unit, a login through the installed module -------------------


def bounding_set(unit: dict[str, list[str]]) -> str:
    caps = unit["CapabilityBoundingSet"][0].split()
    return ",".join(["-all", *("+" + c.lower().removeprefix("cap_") for c in caps)])


class Notify:
    """The NOTIFY_SOCKET end of systemd: collects what the service sends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.seen: list[str] = []

    def wait(self, state: str, timeout: float = 30.0) -> None:
        """Until a datagram holding the line ``state`` arrives (after those already seen)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no {state} on the notify socket; got {self.seen}"
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            self.seen.append(data)
            if state in data.splitlines():
                return

    def close(self) -> None:
        self.sock.close()


@dataclass
class AgentRun:
    proc: subprocess.Popen[bytes]  # strace, which runs the agent
    pid: int  # the agent (MAINPID)
    notify: Notify
    log: Path
    trace: Path
    pam_socket: Path
    node: str


def agent_config(workdir: Path, tree: JobTree, node: str, port: int) -> Path:
    """A test agent.yaml: loopback only, the test's keys, socket and job tree."""
    cg = tree.backend_config()
    keys = workdir / "keys"
    config = {
        "node_name": node,
        "listen": [LOOPBACK],
        "port": port,
        "keys": {"dir": str(keys), "authorized": str(keys / "authorized")},
        "pam_socket": str(workdir / "agent.sock"),
        "backend": {
            "type": "cgroup",
            "cgroup": {"root": str(cg.root), "jobs": cg.jobs, "extern": cg.extern},
        },
        "journal": True,
    }
    path = workdir / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_as_unit(
    jd: PrivateJournald, config: Path, notify: Notify, log: Path, trace: Path
) -> subprocess.Popen[bytes]:
    """ExecStart with `config`, under the unit's bounding set, NoNewPrivileges and UMask.

    strace runs it (its syscalls go to `trace`) and exits with the agent's exit status.
    """
    unit = unit_settings(UNIT.read_text())
    argv = shlex.split(unit["ExecStart"][0])
    assert argv[:3] == ["/usr/bin/callerid-agent", "--config", "/etc/callerid/agent.yaml"], argv
    setpriv = ["setpriv", "--no-new-privs", "--bounding-set", bounding_set(unit), "--"]
    env = {**SYS_ENV, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"}
    with log.open("wb") as out:
        return subprocess.Popen(
            [*jd.prefix, "strace", "-f", "-qq", "-o", str(trace), *setpriv, *argv[:2],
             str(config), *argv[3:]],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
            umask=int(unit["UMask"][0], 8), start_new_session=True,
        )  # fmt: skip


def _exited_or_exists(proc: subprocess.Popen[bytes], path: Path) -> bool:
    return proc.poll() is not None or path.exists()


@contextlib.contextmanager
def unit_agent(jd: PrivateJournald, tree: JobTree, workdir: Path, node: str) -> Iterator[AgentRun]:
    """The installed agent, started the way its unit says, until it sent READY=1."""
    keys = workdir / "keys"
    keygen = ["/usr/bin/calleridctl", "keygen", "--dir", str(keys), "--name", node]
    sh([*keygen, "--address", LOOPBACK])
    (keys / "authorized").mkdir()
    shutil.copy(keys / f"{node}.key", keys / "authorized")
    notify = Notify(workdir / "notify")
    log, sock, trace = workdir / "agent.log", workdir / "agent.sock", workdir / "strace.out"
    proc: subprocess.Popen[bytes] | None = None
    try:
        for _attempt in range(5):  # a random port; another one if it is taken
            config = agent_config(workdir, tree, node, 20000 + secrets.randbelow(40000))
            proc = start_as_unit(jd, config, notify, log, trace)
            wait_for(
                functools.partial(_exited_or_exists, proc, sock),
                timeout=30, interval=0.05, what="the agent's PAM socket",
            )  # fmt: skip
            if proc.poll() is None:
                break
            if "Address already in use" not in log.read_text(errors="replace"):
                pytest.fail(f"the agent exited {proc.returncode}: {log.read_text()[-3000:]}")
        assert proc is not None
        assert proc.poll() is None, log.read_text()[-3000:]
        notify.wait("READY=1")
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(children) == 1, children
        yield AgentRun(proc, int(children[0]), notify, log, trace, sock, node)
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        notify.close()


def agent_trace(trace: Path) -> str:
    """An `strace -f` log from the agent's exec on (setpriv's own calls cut off)."""
    text = trace.read_text(errors="replace")
    return text[text.index('execve("/usr/bin/callerid-agent"') :]


def check_sandbox(text: str, unit: dict[str, list[str]]) -> None:
    """What the agent did (its strace log) stays within the unit's seccomp-based limits."""
    used = set(re.findall(r"^\d+ +(?:<\.\.\. )?([a-z0-9_]+)(?:\(| resumed>)", text, re.M))
    assert used - syscalls_allowed(unit) == set()  # SystemCallFilter= (else SIGSYS/EPERM)
    families = set(re.findall(r"socket\((AF_[A-Z0-9]+)", text))
    assert families <= set(unit["RestrictAddressFamilies"][0].split())
    assert unit["MemoryDenyWriteExecute"] == ["yes"]
    assert not re.search(r"mprotect\([^)\n]*PROT_EXEC", text)
    assert not re.search(r"mmap\([^)\n]*(PROT_WRITE\|PROT_EXEC|PROT_EXEC\|PROT_WRITE)", text)


def syscalls_allowed(unit: dict[str, list[str]]) -> set[str]:
    """The unit's SystemCallFilter= allow-list, its @groups expanded by systemd-analyze."""
    allowed: set[str] = set()
    todo = unit["SystemCallFilter"][0].split()
    while todo:
        name = todo.pop()
        if not name.startswith("@"):
            allowed.add(name)
            continue
        listing = sh(["systemd-analyze", "syscall-filter", name]).split("\n")[1:]
        todo += [w for w in map(str.strip, listing) if w and not w.startswith("#")]
    return allowed


@dataclass
class Pamtester:
    rc: int
    out: str
    pid: int


def pamtester(service: str, user: ThrowawayUser) -> Pamtester:
    with subprocess.Popen(
        ["pamtester", "-v", service, user.name, "acct_mgmt"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=SYS_ENV,
    ) as proc:  # fmt: skip
        out, _ = proc.communicate(timeout=60)
    return Pamtester(proc.returncode, out, proc.pid)


@pytest.fixture
def pam_service() -> Iterator[Path]:
    """/etc/pam.d/cid-pkg-<random>, removed at the end."""
    if shutil.which("pamtester") is None:
        pytest.skip("pamtester is not installed (apt-get install pamtester)")
    path = Path("/etc/pam.d") / f"cid-pkg-{secrets.token_hex(4)}"
    yield path
    path.unlink(missing_ok=True)


def test_agent_from_the_unit_and_a_login_through_the_installed_module(
    installed: Built, pam_service: Path
) -> None:
    require_cgroups("v2")
    require_useradd()
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed (apt-get install strace)")
    node = f"cidpkg{secrets.token_hex(3)}"
    workdir = Path(tempfile.mkdtemp(prefix="cid-pkg-", dir="/tmp"))
    try:
        with (
            throwaway_users(2) as (alice, bob),
            JobTree("v2") as tree,
            PrivateJournald() as jd,
            unit_agent(jd, tree, workdir, node) as agent,
        ):
            tree.add_job("42", alice.uid)
            assert stat.S_IMODE(agent.pam_socket.stat().st_mode) == 0o600
            # the module by name: libpam loads it from the distribution's directory
            pam_service.write_text(f"account required pam_callerid.so socket={agent.pam_socket}\n")

            ok = pamtester(pam_service.name, alice)
            assert ok.rc == 0, ok.out
            assert DONE in ok.out
            rec = jd.wait_for_entries(1, CALLERID_USER=alice.name, timeout=10)[-1]
            assert rec["CALLERID_DECISION"] == "adopt", rec
            assert rec["CALLERID_JOB_ID"] == "42"
            assert rec["CALLERID_REASON"] == "single_job"
            assert rec["CALLERID_PID"] == str(ok.pid)  # pamtester itself was adopted
            assert rec["SYSLOG_IDENTIFIER"] == "callerid-agent"

            no = pamtester(pam_service.name, bob)
            assert no.rc != 0, no.out
            assert f"you have no active job on {node}" in no.out
            rec = jd.wait_for_entries(1, CALLERID_USER=bob.name, timeout=10)[-1]
            assert (rec["CALLERID_DECISION"], rec["CALLERID_REASON"]) == ("deny", "no_jobs")

            # the mesh, CURVE handshake and ZAP included, through the installed calleridctl
            port = yaml.safe_load((workdir / "agent.yaml").read_text())["port"]
            cfg = str(workdir / "agent.yaml")
            pong = sh(["/usr/bin/calleridctl", "--config", cfg, "ping", f"{LOOPBACK}:{port}"])
            assert pong.startswith(f"pong from {node} at {LOOPBACK}:{port}"), pong

            agent.notify.wait("WATCHDOG=1", timeout=5)  # WATCHDOG_USEC=1s: every 0.5 s
            os.kill(agent.pid, signal.SIGHUP)  # ExecReload
            agent.notify.wait("RELOADING=1")
            agent.notify.wait("READY=1")
            assert agent.proc.poll() is None
            assert jd.read(MESSAGE_ID=STARTED_ID, CALLERID_NODE=node), "no 'Agent started'"

            os.kill(agent.pid, signal.SIGTERM)
            agent.notify.wait("STOPPING=1")
            assert agent.proc.wait(30) == 0, agent.log.read_text()[-3000:]
            check_sandbox(agent_trace(agent.trace), unit_settings(UNIT.read_text()))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_unit_capabilities_suffice_to_read_other_users_fds(installed: Built) -> None:
    """CapabilityBoundingSet keeps what reading /proc/<pid>/fd of another uid needs."""
    require_useradd()
    unit = unit_settings(UNIT.read_text())
    probe = "import os, sys; d = f'/proc/{sys.argv[1]}/fd'; print(os.readlink(f'{d}/0'))"
    with throwaway_users(1) as (alice,):
        sleeper = subprocess.Popen(
            ["setpriv", f"--reuid={alice.uid}", f"--regid={alice.gid}", "--clear-groups",
             "sleep", "60"],
            stdin=subprocess.DEVNULL, env=SYS_ENV,
        )  # fmt: skip
        try:
            wait_for(lambda: _runs_as(sleeper.pid, alice.uid), what="the sleeper as alice")

            def read_fd(caps: str) -> subprocess.CompletedProcess[str]:
                argv = ["setpriv", "--no-new-privs", "--bounding-set", caps, "--"]
                argv += ["/usr/bin/python3", "-c", probe, str(sleeper.pid)]
                return subprocess.run(argv, capture_output=True, text=True, env=SYS_ENV)

            with_unit_caps = read_fd(bounding_set(unit))
            assert with_unit_caps.returncode == 0, with_unit_caps.stderr
            assert with_unit_caps.stdout.strip() == "/dev/null"
            without = read_fd("-all")
            assert without.returncode != 0
            assert "PermissionError" in without.stderr
        finally:
            sleeper.kill()
            sleeper.wait(10)


def _runs_as(pid: int, uid: int) -> bool:
    try:
        return Path(f"/proc/{pid}").stat().st_uid == uid
    except FileNotFoundError:
        return False


def test_purge_leaves_nothing(installed: Built) -> None:
    so = f"/lib/{multiarch()}/security/pam_callerid.so"
    apt_get("purge", *PACKAGES)
    assert all(dpkg_status(p) in ("", "un", "pn") for p in PACKAGES)
    for path in (
        "/etc/callerid",
        str(PY_DIR),
        so,
        str(UNIT),
        "/etc/systemd/system/multi-user.target.wants/callerid-agent.service",
        "/usr/lib/systemd/catalog/callerid.catalog",
        "/usr/lib/tmpfiles.d/callerid.conf",
        "/usr/bin/callerid-agent",
        "/run/callerid",
    ):
        assert not Path(path).exists(), path
        r = subprocess.run(["dpkg", "-S", path], capture_output=True, env=SYS_ENV)
        assert r.returncode != 0, path
    # the catalog trigger ran again: the database no longer has our entries
    assert "Agent started" not in sh(["journalctl", "--list-catalog", STARTED_ID], check=False)


# -- rpm ---------------------------------------------------------------------------------------


def test_rpms_install_and_verify_in_a_scratch_root(built: Built, tmp_path: Path) -> None:
    agent, pam = built.rpms["callerid"], built.rpms["callerid-pam"]
    requires = set(sh(["rpm", "-qp", "--requires", str(agent)]).split())
    assert requires >= RPM_PY_DEPS
    assert "libpam.so.0()(64bit)" in sh(["rpm", "-qp", "--requires", str(pam)])
    files = set(sh(["rpm", "-qlp", str(agent)]).split())
    for path in (
        "/usr/bin/callerid-agent",
        "/usr/bin/calleridctl",
        "/etc/callerid/agent.yaml",
        "/etc/callerid/keys",
        "/usr/lib/systemd/system/callerid-agent.service",
        "/usr/lib/tmpfiles.d/callerid.conf",
        "/usr/lib/systemd/catalog/callerid.catalog",
        "/usr/share/callerid/callerid/agent/daemon.py",
        "/usr/share/callerid/callerid/bus/transport.py",
        "/usr/share/doc/callerid/rollout.md",
    ):
        assert path in files, path
    assert not [f for f in files if f.endswith(".whl") or "site-packages" in f]
    assert sh(["rpm", "-qp", "--configfiles", str(agent)]).split() == ["/etc/callerid/agent.yaml"]
    assert set(sh(["rpm", "-qlp", str(pam)]).split()) >= {
        "/usr/lib64/security/pam_callerid.so",
        "/usr/share/doc/callerid-pam/pam-sshd.example",
    }
    scripts = sh(["rpm", "-qp", "--scripts", str(agent)])
    assert "journalctl --update-catalog" in scripts
    assert "[ -d /run/systemd/system ]" in scripts

    root = tmp_path / "rpmroot"
    root.mkdir()
    sh(["rpm", "--root", str(root), "--initdb"])
    sh(["rpm", "--root", str(root), "-ivh", "--nodeps", "--noscripts", str(agent), str(pam)])
    r = subprocess.run(
        ["rpm", "--root", str(root), "-V", "--nodeps", "callerid", "callerid-pam"],
        capture_output=True, text=True, env=SYS_ENV,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert stat.S_IMODE((root / "etc/callerid/keys").stat().st_mode) == 0o700
    launcher = (root / "usr/bin/callerid-agent").read_text()
    assert launcher.startswith("#!/usr/bin/python3 -I\n")
    # the launcher runs the private tree with this machine's python3 (no deps needed for this)
    version = subprocess.run(
        ["/usr/bin/python3", "-I", "-c",
         f"import sys; sys.path.insert(0, '{root}/usr/share/callerid'); "
         "from callerid.agent import __version__; print(__version__)"],
        capture_output=True, text=True, env=SYS_ENV,
    )  # fmt: skip
    assert version.stdout.strip() == "0.1.0", version.stderr
