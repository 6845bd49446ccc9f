"""The .debs under a real systemd: a Debian 12 container booted with systemd-nspawn.

tests/e2e/test_packages.py installs the packages on this machine, where PID 1 is not systemd,
and plays systemd's part itself. Here the same .debs (its `built` fixture: `make deb`, under
its lock) are installed with apt inside a container whose PID 1 is Debian 12's systemd 252
(tests/support/nspawn.py: a debootstrap tree cached in /var/cache/callerid-tests, booted with
--volatile=overlay and --private-network, so the tree stays clean and every socket, sshd and
ssh included, stays inside the container). Then, against the installed unit:

- `systemctl start` returns with the agent active (Type=notify: systemd waited for READY=1);
- the sandbox is in force: the agent's /proc/PID/status (capability sets, NoNewPrivs,
  seccomp, umask), every thread's scheduling policy (SCHED_BATCH), and writes from its own
  mount namespace (ProtectSystem=strict, ProtectHome, PrivateTmp, ReadWritePaths);
- `systemd-analyze security` stays at or below the exposure the unit has now (2.8, live);
- `systemctl reload` applies a changed policy (a login decided otherwise) and keeps the old
  one on a bad file (`config_error`, still active, same process);
- a real sshd with the packaged PAM lines logs a user in, adopted into the job's
  step_extern cgroup, and journalctl shows the record and explains it from the catalog;
- the watchdog kills and restarts a stopped agent (a drop-in shortens WatchdogSec to 2 s);
- an upgrade to a later .deb (the same tree with one more changelog entry, built by
  packaging/build.sh in a copy) keeps the keys and the edited config and restarts the agent;
- purge leaves no file, user, group or unit behind.

The tests share one booted container and run in file order (upgrade and purge last). Not
root, or no systemd-nspawn/debootstrap: skipped with the reason. The first run on a machine
makes the Debian tree (about a minute); later runs take well under a minute. Nothing is left
behind: the container is halted, its cgroups and overlay are gone (`Container.leftovers()`).
"""

from __future__ import annotations

import email.utils
import json
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from tests.e2e import test_packages as packages
from tests.support.nspawn import Container, debian_tree, require_nspawn
from tests.support.poll import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.timeout(900)]

# test_packages' fixtures, shared: one lock per machine, `make deb` + `make rpm` once per module.
lock = packages.lock
built = packages.built

TOP = packages.TOP
PACKAGES = packages.PACKAGES
UNIT = "callerid-agent.service"
UNIT_FILE = "/lib/systemd/system/callerid-agent.service"
CONFIG = "/etc/callerid/agent.yaml"
PAM_SSHD = "/etc/pam.d/sshd"
PAM_EXAMPLE = "/usr/share/doc/libpam-callerid/examples/pam-sshd.example"
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}
UPGRADE_SUFFIX = "+cidtest1"
# `systemd-analyze security` of the installed unit under systemd 252, measured live (the
# offline figure of the unit file is 3.0). Raise it only with a reason in the unit.
EXPOSURE_BOUND = 2.8
WATCHDOG_DROPIN = "/etc/systemd/system/callerid-agent.service.d/cid-test-watchdog.conf"


# -- the packages, v1 and an upgrade -----------------------------------------------------------


@pytest.fixture(scope="module")
def debs(built: packages.Built, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with v1/ (`make deb`) and v2/ (the same tree, one changelog entry later)."""
    require_nspawn()
    top = tmp_path_factory.mktemp("debs")
    (top / "v1").mkdir()
    for name in PACKAGES:
        shutil.copy2(built.debs[name], top / "v1")
    # packaging/build.sh's own copy of the working tree: build it again with a later version
    (staged,) = [p for p in (TOP / "build/deb").glob("callerid-*") if p.is_dir()]
    src = top / "src" / staged.name
    shutil.copytree(staged, src, symlinks=True)
    changelog = src / "packaging/debian/changelog"
    parse = ["dpkg-parsechangelog", "-l", str(changelog), "-S"]
    version, maintainer = (packages.sh([*parse, f]).strip() for f in ("Version", "Maintainer"))
    date = email.utils.format_datetime(datetime.now(UTC))
    entry = (
        f"callerid ({version}{UPGRADE_SUFFIX}) unstable; urgency=medium\n\n"
        "  * Test build: the upgrade path under systemd (tests/e2e/test_systemd.py).\n\n"
        f" -- {maintainer}  {date}\n\n"
    )
    changelog.write_text(entry + changelog.read_text())
    packages.sh([str(src / "packaging/build.sh"), "deb"], timeout=900)
    (top / "v2").mkdir()
    for name in PACKAGES:
        (deb,) = (src / "build/deb").glob(f"{name}_*{UPGRADE_SUFFIX}_*.deb")
        shutil.copy2(deb, top / "v2")
    shutil.rmtree(top / "src")
    return top


def deb_paths(debs: Path, which: str) -> list[str]:
    """The packages' paths inside the container (/debs/<which>/...)."""
    return [
        f"/debs/{which}/{p.name}" for name in PACKAGES for p in (debs / which).glob(f"{name}_*")
    ]


def deb_depends(directory: Path) -> set[str]:
    """The packages the .debs in ``directory`` depend on, except one another (no versions)."""
    names: set[str] = set()
    for deb in directory.glob("*.deb"):
        for dep in packages.deb_field(deb, "Depends").split(","):
            first = dep.split("|")[0].split()[0]  # of alternatives, the first
            names.add(first.removesuffix(":any"))
    return names - set(PACKAGES)


@dataclass
class Node:
    ct: Container
    debs: Path
    accounts: dict[str, str]  # /etc/passwd etc. before the packages were installed

    def sh(self, *argv: str, check: bool = True, timeout: float = 60) -> str:
        return self.ct.run(argv, check=check, timeout=timeout).stdout

    def apt_get(self, *args: str) -> str:
        argv = ["apt-get", "-y", "-q", "-o", "DPkg::Lock::Timeout=60", *args]
        return self.ct.run(argv, env=APT_ENV, timeout=300).stdout

    def prop(self, name: str, unit: str = UNIT) -> str:
        return self.sh("systemctl", "show", "-P", name, unit).strip()

    def main_pid(self) -> int:
        return int(self.prop("MainPID"))

    def journal(self, *matches: str, unit: str = UNIT) -> list[dict[str, str]]:
        """The unit's journal records matching FIELD=VALUE ``matches``, as JSON objects."""
        out = self.sh("journalctl", "--no-pager", "-o", "json", "-u", unit, *matches)
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def wait_journal(self, count: int, *matches: str, timeout: float = 20) -> list[dict[str, str]]:
        """Until at least ``count`` records match; those records."""

        def enough() -> list[dict[str, str]]:
            records = self.journal(*matches)
            return records if len(records) >= count else []

        return wait_for(enough, timeout, 0.1, f"{count} journal records {matches}")


ACCOUNT_FILES = ("/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow")


@pytest.fixture(scope="module")
def node(debs: Path) -> Iterator[Node]:
    """The booted container with the v1 packages installed by apt (the deps are in the tree)."""
    tree = debian_tree(deb_depends(debs / "v1"))
    with Container(tree, binds_ro={debs: "/debs"}) as ct:
        accounts = {f: ct.read(f) for f in ACCOUNT_FILES}
        n = Node(ct, debs, accounts)
        n.apt_get("install", *deb_paths(debs, "v1"))
        yield n
    left = ct.leftovers()
    assert not left, f"the container left things behind: {left}"


def exposure(node: Node) -> float:
    out = node.sh("systemd-analyze", "security", "--no-pager", UNIT)
    return float(re.findall(r"Overall exposure level for \S+: ([0-9.]+)", out)[0])


# -- logins through the container's sshd -------------------------------------------------------


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    key: str  # the private key's path inside the container (root's)


@pytest.fixture
def login(node: Node) -> Iterator[Callable[[str], User]]:
    """Make users with an ssh key; sshd gets the packaged PAM lines. All undone at the end."""
    pam_before = node.ct.read(PAM_SSHD)
    example = node.ct.read(PAM_EXAMPLE)
    lines = [ln for ln in example.splitlines() if ln.strip() and not ln.startswith("#")]
    assert [ln.split()[:3] for ln in lines] == [
        ["account", "required", "pam_callerid.so"],
        ["session", "optional", "pam_callerid.so"],
    ], lines
    # appended: the account line after `@include common-account`, the session line last
    node.ct.write(PAM_SSHD, pam_before + "\n".join(lines) + "\n")
    made: list[str] = []

    def make(name: str) -> User:
        key = f"/root/.cid-test-{name}"
        node.sh("useradd", "--create-home", "--shell", "/bin/sh", name)
        made.append(name)
        node.sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key)
        ssh_dir = f"/home/{name}/.ssh"
        node.sh("install", "-d", "-o", name, "-m", "0700", ssh_dir)
        node.sh("install", "-o", name, "-m", "0600", f"{key}.pub", f"{ssh_dir}/authorized_keys")
        return User(name, int(node.sh("id", "-u", name)), key)

    try:
        yield make
    finally:
        node.ct.write(PAM_SSHD, pam_before)
        for name in made:
            node.sh("userdel", "--remove", "--force", name, check=False)
            node.sh("rm", "-f", f"/root/.cid-test-{name}", f"/root/.cid-test-{name}.pub")


def ssh(node: Node, user: User, command: str) -> tuple[int, str]:
    """ssh user@127.0.0.1 (the container's own loopback and sshd): exit status and output."""
    argv = [
        "ssh", "-i", user.key, "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
        f"{user.name}@127.0.0.1", command,
    ]  # fmt: skip
    r = node.ct.run(argv, check=False, timeout=60)
    return r.returncode, r.stdout + r.stderr


def decision(node: Node, user: User, count: int) -> dict[str, str]:
    """The ``count``-th decision record of ``user`` (1-based), waited for."""
    records = node.wait_journal(count, f"CALLERID_USER={user.name}")
    return records[count - 1]


# -- the tests, in order -----------------------------------------------------------------------


def test_start_reaches_active_after_ready(node: Node) -> None:
    assert node.prop("UnitFileState") == "enabled"  # the postinst enabled it ...
    assert node.prop("ActiveState") == "active"  # ... and started it
    node.sh("systemctl", "stop", UNIT)
    assert node.prop("ActiveState") == "inactive"
    # Type=notify: `systemctl start` returns once the agent has sent READY=1
    node.sh("systemctl", "start", UNIT, timeout=60)
    props = {k: node.prop(k) for k in ("ActiveState", "SubState", "Type", "NotifyAccess")}
    assert props == {
        "ActiveState": "active",
        "SubState": "running",
        "Type": "notify",
        "NotifyAccess": "main",
    }
    assert node.prop("WatchdogUSec") == "30s"
    invocation = node.prop("InvocationID")
    started = node.wait_journal(
        1, f"MESSAGE_ID={packages.STARTED_ID}", f"_SYSTEMD_INVOCATION_ID={invocation}"
    )
    assert started[0]["_PID"] == str(node.main_pid())
    sock = node.sh("stat", "-c", "%F %a %U", "/run/callerid/agent.sock").strip()
    assert sock == "socket 600 root"


def status_fields(node: Node, pid: int) -> dict[str, str]:
    text = node.ct.read(f"/proc/{pid}/status")
    return {k: v.strip() for k, _, v in (ln.partition(":") for ln in text.splitlines())}


def test_sandbox_is_in_force(node: Node) -> None:
    pid = node.main_pid()
    unit = packages.unit_settings(node.ct.read(UNIT_FILE))
    numbers = {}
    for line in node.sh("systemd-analyze", "capability").splitlines()[1:]:
        name, number = line.split()
        numbers[name.upper()] = int(number)
    mask = sum(1 << numbers[c] for c in unit["CapabilityBoundingSet"][0].split())
    st = status_fields(node, pid)
    caps = {k: int(st[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
    assert caps == {"CapInh": 0, "CapPrm": mask, "CapEff": mask, "CapBnd": mask, "CapAmb": 0}
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"  # a filter (SystemCallFilter=)
    assert int(st["Seccomp_filters"]) >= 1
    assert st["Umask"] == unit["UMask"][0]
    # the sandbox lets the agent put every thread under SCHED_BATCH (policy 3; config default)
    sched = [
        node.ct.read(f"/proc/{pid}/task/{t}/sched")
        for t in node.sh("ls", f"/proc/{pid}/task").split()
    ]
    assert {tuple(re.findall(r"^policy\s*:\s*(\d+)$", text, re.M)) for text in sched} == {("3",)}

    # Writes as the agent's mount namespace sees the file system (as root, all capabilities)
    def write(path: str) -> tuple[int, str]:
        cmd = f"echo probe >{path} && rm {path}"
        r = node.ct.run(["nsenter", "-t", str(pid), "-m", "sh", "-c", cmd], check=False)
        return r.returncode, r.stderr

    for path in ("/etc/cid-probe", "/usr/cid-probe", "/var/lib/cid-probe", "/boot/cid-probe"):
        rc, err = write(path)
        assert rc != 0 and "Read-only file system" in err, (path, err)  # ProtectSystem=strict
    rc, err = write("/root/cid-probe")  # ProtectHome=yes
    assert rc != 0, err
    assert write("/run/callerid/cid-probe") == (0, "")  # RuntimeDirectory
    probe_cg = "/sys/fs/cgroup/cid-probe"  # ReadWritePaths=/sys/fs/cgroup
    mk = node.ct.run(["nsenter", "-t", str(pid), "-m", "mkdir", probe_cg], check=False)
    assert mk.returncode == 0, mk.stderr
    node.sh("rmdir", probe_cg)
    assert write("/tmp/cid-probe") == (0, "")
    node.ct.run(["nsenter", "-t", str(pid), "-m", "touch", "/tmp/cid-private"])
    assert (
        node.ct.run(["test", "-e", "/tmp/cid-private"], check=False).returncode == 1
    )  # PrivateTmp
    node.ct.run(["nsenter", "-t", str(pid), "-m", "rm", "/tmp/cid-private"])


def test_security_exposure_stays_within_bound(node: Node) -> None:
    assert exposure(node) <= EXPOSURE_BOUND


def test_reload_applies_a_changed_config_and_keeps_the_old_on_a_bad_file(
    node: Node, login: Callable[[str], User]
) -> None:
    bob = login("cidbob")
    original = node.ct.read(CONFIG)
    pid = node.main_pid()
    invocation = f"_SYSTEMD_INVOCATION_ID={node.prop('InvocationID')}"
    reloads = len(node.journal(invocation, "CALLERID_EVENT=reloaded"))
    try:
        rc, out = ssh(node, bob, "true")
        assert rc == 255, out
        rec = decision(node, bob, 1)
        assert (rec["CALLERID_DECISION"], rec["CALLERID_REASON"]) == ("deny", "no_jobs")

        cfg = yaml.safe_load(original)
        cfg["policy"]["no_jobs"] = "allow"
        node.ct.write(CONFIG, yaml.safe_dump(cfg))
        node.sh("systemctl", "reload", UNIT)
        node.wait_journal(reloads + 1, invocation, "CALLERID_EVENT=reloaded")
        rc, out = ssh(node, bob, "true")
        assert rc == 0, out
        rec = decision(node, bob, 2)
        assert (rec["CALLERID_DECISION"], rec["CALLERID_REASON"]) == ("allow", "no_jobs")

        node.ct.write(CONFIG, "policy:\n  no_jobs: perhaps\n")
        node.sh("systemctl", "reload", UNIT)
        error = node.wait_journal(1, invocation, "CALLERID_EVENT=config_error")[-1]
        assert "no_jobs" in error["MESSAGE"], error
        assert node.prop("ActiveState") == "active"
        assert node.main_pid() == pid
        rc, out = ssh(node, bob, "true")  # the old (changed) config still rules
        assert rc == 0, out
        assert decision(node, bob, 3)["CALLERID_DECISION"] == "allow"
    finally:
        node.ct.write(CONFIG, original)
        node.sh("systemctl", "reload", UNIT)
    node.wait_journal(reloads + 2, invocation, "CALLERID_EVENT=reloaded")


def test_ssh_login_is_adopted_into_the_job_and_journaled(
    node: Node, login: Callable[[str], User]
) -> None:
    alice = login("cidalice")
    # the packaged config: backend cgroup, root /sys/fs/cgroup (the container's cgroup2
    # tree), jobs slurm/uid_{uid}/job_{job}, extern step_extern
    job = f"/sys/fs/cgroup/slurm/uid_{alice.uid}/job_42"
    node.sh("mkdir", "-p", f"{job}/step_extern", f"{job}/step_batch")
    try:
        rc, out = ssh(node, alice, "cat /proc/self/cgroup")
        assert rc == 0, out
        assert f"0::/slurm/uid_{alice.uid}/job_42/step_extern" in out.splitlines(), out
        rec = node.wait_journal(1, "CALLERID_DECISION=adopt", f"CALLERID_USER={alice.name}")[0]
        assert rec["CALLERID_JOB_ID"] == "42"
        assert rec["CALLERID_REASON"] == "single_job"
        assert rec["CALLERID_SERVICE"] == "sshd"
        assert rec["CALLERID_DST"] == "127.0.0.1:22"
        assert rec["_SYSTEMD_UNIT"] == UNIT
        assert rec["CALLERID_NODE"] == node.ct.name
        explained = node.sh(
            "journalctl", "--no-pager", "-x", "-u", UNIT, "CALLERID_DECISION=adopt",
            f"CALLERID_USER={alice.name}",
        )  # fmt: skip
        assert f"Login of {alice.name} adopted into job 42 (single_job)" in explained
        assert "From now on the job's accounting, limits and clean-up cover" in explained
    finally:
        wait_for(
            lambda: not node.sh("cat", f"{job}/step_extern/cgroup.procs").strip(),
            10, 0.1, "the session to leave the job",
        )  # fmt: skip
        node.sh("rmdir", f"{job}/step_extern", f"{job}/step_batch", job)
        node.sh("rmdir", f"/sys/fs/cgroup/slurm/uid_{alice.uid}", "/sys/fs/cgroup/slurm")


def test_watchdog_restarts_a_hung_agent(node: Node) -> None:
    node.ct.write(WATCHDOG_DROPIN, "[Service]\nWatchdogSec=2s\n")
    try:
        node.sh("systemctl", "daemon-reload")
        node.sh("systemctl", "restart", UNIT)
        assert node.prop("WatchdogUSec") == "2s"
        pid, restarts = node.main_pid(), int(node.prop("NRestarts"))
        node.sh("kill", "-STOP", str(pid))  # the loop stops sending WATCHDOG=1
        wait_for(
            lambda: int(node.prop("NRestarts")) > restarts and node.prop("SubState") == "running",
            30, 0.2, "systemd to restart the stopped agent",
        )  # fmt: skip
        assert node.main_pid() not in (0, pid)
        log = node.sh("journalctl", "--no-pager", "-u", UNIT, "-o", "cat")
        assert "Watchdog timeout" in log, log[-2000:]
    finally:
        node.sh("rm", "-f", WATCHDOG_DROPIN)
        node.sh("rmdir", str(Path(WATCHDOG_DROPIN).parent), check=False)
        node.sh("systemctl", "daemon-reload")
        node.sh("systemctl", "restart", UNIT)
    assert node.prop("WatchdogUSec") == "30s"


def test_upgrade_keeps_keys_and_edited_config_and_restarts(node: Node) -> None:
    keys = "/etc/callerid/keys"
    digest = ["sh", "-c", f"cd {keys} && find . -type f | sort | xargs sha256sum"]
    keys_before = node.ct.run(digest).stdout
    assert ".key_secret" in keys_before
    cfg = yaml.safe_load(node.ct.read(CONFIG))
    cfg["peer"]["timeout_ms"] = 750  # a local edit of the conffile
    edited = yaml.safe_dump(cfg)
    node.ct.write(CONFIG, edited)
    node.sh("systemctl", "restart", UNIT)
    pid, invocation = node.main_pid(), node.prop("InvocationID")
    v1 = node.sh("dpkg-query", "-W", "-f=${Version}", "callerid")

    node.apt_get("install", *deb_paths(node.debs, "v2"))  # no prompt: the packaged file is the same
    for name in PACKAGES:
        version = node.sh("dpkg-query", "-W", "-f=${Version}", name)
        assert version == v1 + UPGRADE_SUFFIX, (name, version)
    assert node.ct.run(digest).stdout == keys_before
    assert node.ct.read(CONFIG) == edited
    wait_for(lambda: node.prop("ActiveState") == "active", 30, 0.1, "the agent active again")
    assert node.prop("InvocationID") != invocation  # restarted by the upgrade
    assert node.main_pid() not in (0, pid)
    assert node.prop("NRestarts") == "0"  # a restart by the package, not a crash
    new = f"_SYSTEMD_INVOCATION_ID={node.prop('InvocationID')}"
    node.wait_journal(1, new, f"MESSAGE_ID={packages.STARTED_ID}")


def test_purge_leaves_nothing(node: Node) -> None:
    listed = set(node.sh("dpkg", "-L", *PACKAGES).split())
    not_dirs = 'for p; do [ -d "$p" ] || echo "$p"; done'
    files = node.sh("sh", "-c", not_dirs, "sh", *sorted(listed)).split()
    assert "/usr/bin/callerid-agent" in files
    node.apt_get("purge", *PACKAGES)
    for name in PACKAGES:
        status = node.sh("dpkg-query", "-W", "-f=${db:Status-Abbrev}", name, check=False).strip()
        assert status in ("", "un", "pn"), (name, status)
    still = node.ct.run(["ls", "-d", *files], check=False).stdout.split()
    assert not still, still
    for path in (
        "/etc/callerid",
        "/run/callerid",
        "/usr/lib/python3/dist-packages/callerid",
        "/etc/systemd/system/multi-user.target.wants/callerid-agent.service",
    ):
        assert node.ct.run(["test", "-e", path], check=False).returncode == 1, path
    assert {f: node.ct.read(f) for f in ACCOUNT_FILES} == node.accounts  # no users, no groups
    assert node.prop("LoadState") == "not-found"
    assert node.prop("ActiveState") == "inactive"
    assert not node.sh("pgrep", "-f", "callerid-agent", check=False).strip()
    units = node.sh("systemctl", "list-unit-files", "--no-legend", "callerid*", check=False)
    assert not units.strip(), units
    catalog = node.sh("journalctl", "--list-catalog", packages.STARTED_ID, check=False)
    assert "Agent started" not in catalog
