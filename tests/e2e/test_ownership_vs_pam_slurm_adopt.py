"""Whose job does bob's login land in, when his connection comes from alice's job?

pam_slurm_adopt (each release's own module: Debian's 22.05, the upstream 24.11 and 26.05) beside
callerid, with the real daemons: one Slurm node of that release (tests/support/slurm.py, slurmd
at debug3), real sshds (tests/support/slurm_site.py for pam_callerid.so and its agents,
tests/support/psa_sshd.py for pam_slurm_adopt.so by its full path), throwaway users.

The construction (no privileged tampering): bob has jobs on the node; alice's batch job runs
an ``ssh`` client that logs in *as bob* with bob's key, which alice has, as members of a
project share the key of a project or service account. The connection's client process is
alice's, inside alice's job; the login user is bob.

* pam_slurm_adopt, when it asks the source (bob has more than one job on the node, or
  ``single_job_skip_rpc=0``): the source slurmd answers REQUEST_NETWORK_CALLERID with the job
  of the process holding the socket (alice's; it answers root, which the module runs as, for
  any job), and the module hands the sshd to that job's extern step: bob's session runs in
  alice's job (her cgroup, `scontrol listpids`, ``SLURM_JOB_ID``), with no owner check.
  With one job of bob's and the default ``single_job_skip_rpc=1`` it never asks: bob's job.
* callerid, at n2 (which asks n1's agent over the mesh, as a remote node would): the source
  answers only with a job of the asking uid (bob) that holds the connection: there is none
  ("not_found"), so the destination falls back to ``unknown: newest`` among bob's OWN jobs;
  with one job of bob's, the single-job path. Never alice's job.

Each test asserts what each module did and records it (build/e2e/ownership-<release>.json),
the table of docs/performance.md ("Ownership").
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import pytest

from tests.support.psa_sshd import PsaSshd
from tests.support.slurm import LOCK_TIMEOUT, LocalSlurm, require_slurm
from tests.support.slurm_release import SlurmRelease, release_names
from tests.support.slurm_site import READY, SiteUser, SlurmSite
from tests.support.users import require_useradd

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slurm,
    pytest.mark.root,
    pytest.mark.timeout(LOCK_TIMEOUT + 300),
]

TOP = Path(__file__).resolve().parents[2]
RECORD_DIR = TOP / "build" / "e2e"
# The remote shell's report: the job pam put in its environment, then what REMOTE_CMD says
REMOTE = (
    'echo "job ${SLURM_JOB_ID:-none}"; echo "shell $$"; cat /proc/self/cgroup; '
    f"echo {READY}; exec sleep 300"
)
_FREEZER_JOB = re.compile(r"/uid_(\d+)/job_(\d+)/step_extern$")
# (alice, bob, bob's key) -> the ssh command alice's job runs, logging in as bob
ArgvFor = Callable[[SiteUser, SiteUser, Path], list[str]]


@pytest.fixture(scope="module", params=release_names())
def slurm_release(request: pytest.FixtureRequest) -> SlurmRelease:
    return require_slurm(request.param)


@pytest.fixture(scope="module")
def slurm(slurm_release: SlurmRelease) -> Iterator[LocalSlurm]:
    require_useradd()
    if not Path("/usr/sbin/sshd").exists():
        pytest.skip("/usr/sbin/sshd is missing (apt-get install openssh-server)")
    # debug3: slurmd logs which process and job it found for each callerid RPC
    with LocalSlurm(slurm_release, slurmd_debug="debug3") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def site(slurm: LocalSlurm) -> Iterator[SlurmSite]:
    with SlurmSite(slurm) as s:
        yield s


@pytest.fixture(scope="module")
def psa(site: SlurmSite) -> Iterator[PsaSshd]:
    """pam_slurm_adopt with its defaults (single_job_skip_rpc=1)."""
    with PsaSshd(site) as sshd:
        yield sshd


@pytest.fixture(scope="module")
def psa_rpc(site: SlurmSite) -> Iterator[PsaSshd]:
    """pam_slurm_adopt that always asks the source (single_job_skip_rpc=0)."""
    with PsaSshd(site, "single_job_skip_rpc=0") as sshd:
        yield sshd


@dataclass(frozen=True)
class Outcome:
    """Where bob's session landed, as the kernel, Slurm and the session itself say."""

    module: str
    bob_jobs: int
    job: str  # the job whose extern step holds the session ("" when none)
    owner: str  # "alice" | "bob" | "?"
    env_job: str  # SLURM_JOB_ID in the session
    shell_uid: int
    in_listpids: bool  # `scontrol listpids <job>` lists the session's shell
    source_rpcs: int  # REQUEST_NETWORK_CALLERID answered by slurmd during the login
    slurmd_found: str  # slurmd's "network_callerid found job ..." (debug3), or ""
    slurmd_process: str  # whose process slurmd found holding the socket: "alice" ... or ""
    callerid: str = ""  # callerid's record: decision/reason/peer status


@dataclass
class Scenario:
    alice: SiteUser
    bob: SiteUser
    alices: str  # alice's job, the one running the ssh client
    bobs: list[str]  # bob's jobs, oldest first


def set_up(site: SlurmSite, bob_jobs: int, argv_for: ArgvFor) -> Scenario:
    """bob's ``bob_jobs`` jobs; alice's job whose batch step runs ``argv_for(alice, bob,
    key)`` (an ssh command logging in as bob); waits for the remote shell's report."""
    alice, bob = site.add_user(), site.add_user()
    bobs = [site.submit(bob) for _ in range(bob_jobs)]
    key = site.give_key(bob, alice)
    argv = [*argv_for(alice, bob, key)[:-1], REMOTE]
    out, err = alice.out_dir / "out", alice.out_dir / "err"
    script = f'#!/bin/sh\n{shlex.join(argv)} >{out} 2>{err}\necho "ssh rc $?" >>{err}\n'
    alices = site.submit(alice, script)
    return Scenario(alice, bob, alices, bobs)


def outcome(
    site: SlurmSite, sc: Scenario, module: str, log_mark: int, callerid: str = ""
) -> Outcome:
    session = site.wait_session(sc.alice)
    text = (sc.alice.out_dir / "out").read_text()
    m = re.search(r"^job (\S+)$", text, re.MULTILINE)
    env_job = m.group(1) if m else "?"
    freezer = session.controller("freezer")
    found = _FREEZER_JOB.search(freezer)
    job = found.group(2) if found else ""
    uid = int(found.group(1)) if found else -1
    owner = {sc.alice.uid: "alice", sc.bob.uid: "bob"}.get(uid, "?")
    listed = bool(job) and session.shell_pid in site.slurm.step_pids(job).get("extern", [])
    log = site.slurm.slurmd_log()[log_mark:]  # what slurmd logged during this login
    found_job = re.findall(r"network_callerid found job (\S+)", log)
    found_pid = re.findall(r"network_callerid found process (\d+)", log)
    users = {sc.alice.uid: "alice", sc.bob.uid: "bob"}
    return Outcome(
        module=module,
        bob_jobs=len(sc.bobs),
        job=job,
        owner=owner,
        env_job=env_job,
        shell_uid=psutil.Process(session.shell_pid).uids().real,
        in_listpids=listed,
        source_rpcs=log.count("network_callerid matched"),
        slurmd_found=found_job[-1] if found_job else "",
        slurmd_process=users.get(_uid_of(int(found_pid[-1])), "?") if found_pid else "",
        callerid=callerid,
    )


def mark(site: SlurmSite) -> int:
    """Where slurmd's log ends now (the next login's lines start there)."""
    return len(site.slurm.slurmd_log())


def _uid_of(pid: int) -> int:
    try:
        return int(psutil.Process(pid).uids().real)
    except psutil.NoSuchProcess:
        return -1


def finish(site: SlurmSite, sc: Scenario) -> None:
    """End the scenario's jobs (alice's ends the session and the client)."""
    for job in [sc.alices, *sc.bobs]:
        site.slurm.cancel(job)


def record(release: SlurmRelease, name: str, got: Outcome, sc: Scenario) -> None:
    RECORD_DIR.mkdir(parents=True, exist_ok=True)
    path = RECORD_DIR / f"ownership-{release.name}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = {
        **asdict(got),
        "alices_job": sc.alices,
        "bobs_jobs": sc.bobs,
        "release": release.version,
    }
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def psa_argv(psa: PsaSshd) -> ArgvFor:
    return lambda alice, bob, key: psa.ssh_argv(alice, login=bob, key=key)


def cid_argv(site: SlurmSite) -> ArgvFor:
    return lambda alice, bob, key: site.ssh_argv(alice, "n2", login=bob, key=key)


def test_pam_slurm_adopt_puts_bobs_session_into_alices_job(
    site: SlurmSite, psa: PsaSshd, slurm_release: SlurmRelease
) -> None:
    """bob has two jobs here: the module asks the source slurmd, which names alice's job."""
    before = mark(site)
    sc = set_up(site, 2, psa_argv(psa))
    got = outcome(site, sc, f"pam_slurm_adopt {slurm_release.version}", before)
    record(slurm_release, "psa, bob has 2 jobs", got, sc)
    assert got.shell_uid == sc.bob.uid  # it is bob's session ...
    assert got.source_rpcs == 1, site.slurm.slurmd_log()[-3000:]
    assert (got.job, got.owner) == (sc.alices, "alice"), got  # ... in alice's job
    assert got.env_job == sc.alices
    assert got.in_listpids, site.slurm.listpids(sc.alices)
    # slurmd found alice's ssh client, in her batch step ("3" or "StepId=3.batch")
    assert got.slurmd_found.split(".")[0].removeprefix("StepId=") == sc.alices
    assert got.slurmd_process == "alice"
    finish(site, sc)


def test_pam_slurm_adopt_always_asking_does_it_with_one_job_too(
    site: SlurmSite, psa_rpc: PsaSshd, slurm_release: SlurmRelease
) -> None:
    before = mark(site)
    sc = set_up(site, 1, psa_argv(psa_rpc))
    got = outcome(site, sc, f"pam_slurm_adopt {slurm_release.version}", before)
    record(slurm_release, "psa single_job_skip_rpc=0, bob has 1 job", got, sc)
    assert got.shell_uid == sc.bob.uid and got.source_rpcs == 1
    assert got.slurmd_process == "alice"
    assert (got.job, got.owner, got.env_job) == (sc.alices, "alice", sc.alices), got
    assert got.in_listpids
    finish(site, sc)


def test_pam_slurm_adopt_with_one_job_and_defaults_never_asks(
    site: SlurmSite, psa: PsaSshd, slurm_release: SlurmRelease
) -> None:
    """Where it does not hold: one job of bob's, default single_job_skip_rpc=1."""
    before = mark(site)
    sc = set_up(site, 1, psa_argv(psa))
    got = outcome(site, sc, f"pam_slurm_adopt {slurm_release.version}", before)
    record(slurm_release, "psa, bob has 1 job", got, sc)
    assert got.source_rpcs == 0
    assert (got.job, got.owner, got.env_job) == (sc.bobs[0], "bob", sc.bobs[0]), got
    assert got.in_listpids
    finish(site, sc)


@pytest.mark.parametrize("bob_jobs", [2, 1])
def test_callerid_never_puts_bobs_session_into_alices_job(
    site: SlurmSite, slurm_release: SlurmRelease, bob_jobs: int
) -> None:
    """Same construction through pam_callerid.so at n2 (its agent asks n1's over the mesh)."""
    before = mark(site)
    sc = set_up(site, bob_jobs, cid_argv(site))
    site.wait_session(sc.alice)
    rec = site.decision("n2", sc.bob)
    summary = "/".join(
        rec.get(k, "-") for k in ("CALLERID_DECISION", "CALLERID_REASON", "CALLERID_PEER_STATUS")
    )
    got = outcome(site, sc, "callerid", before, summary)
    record(slurm_release, f"callerid, bob has {bob_jobs} job(s)", got, sc)
    assert got.shell_uid == sc.bob.uid
    assert got.source_rpcs == 0  # callerid never asks slurmd
    newest = sc.bobs[-1]
    if bob_jobs == 2:  # the source (n1) finds no job of bob's holding the connection
        assert summary == "adopt/unknown_newest/not_found", rec
    else:
        assert summary == "adopt/single_job/skipped", rec
    assert rec["CALLERID_JOB_ID"] == newest != sc.alices
    assert (got.job, got.owner, got.env_job) == (newest, "bob", newest), got
    assert got.in_listpids
    assert not site.decisions("n2", sc.alice)  # the login was bob's, never alice's
    finish(site, sc)
