"""The slurm backend against a real local Slurm cluster of each release, and against fake stepds.

The real-cluster tests (marked ``slurm`` and ``root``) run once per Slurm release (the
``slurm_release`` fixture: 22.05, 24.11, 26.05; tests/support/slurm_release.py), each release
sharing one `LocalSlurm` and two jobs of a throwaway user. The fake-stepd tests (real unix
sockets, scripted `FakeStepd`) cover what a real stepd does not show on demand: a hung stepd,
a 22.05 refusal (rc -1), a 26.05 refusal (connection closed), a refused handshake.

Set ``CALLERID_CAPTURE_STEPD=1`` to rewrite tests/fixtures/stepd/*.json from the real 22.05
stepd (replayed by tests/unit/test_stepd_codec.py) and tests/fixtures/stepd/<release>/*.json
from the others; otherwise the capture goes to a temp dir.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from callerid.agent.backends import DryRun, make_backend, stepd
from callerid.agent.backends.base import Backend, BackendError, Job, JobVanished
from callerid.agent.backends.slurm import SlurmBackend, StepdTimeout
from callerid.agent.config import BackendConfig, SlurmBackendConfig
from tests.fakes import FakeClock
from tests.support.fake_stepd import Behaviour, list_pids
from tests.support.poll import wait_for
from tests.support.slurm import (
    LOCK_TIMEOUT,
    FakeStepd,
    LocalSlurm,
    namespaces_under_test,
    read_in_namespaces,
    require_slurm,
    stale_socket,
)
from tests.support.slurm_release import SlurmRelease, release_names
from tests.support.users import ThrowawayUser, require_useradd, secondary_group, throwaway_user

# the first real-cluster test may wait for another process's LocalSlurm (the machine-wide lock)
pytestmark = pytest.mark.timeout(LOCK_TIMEOUT + 180)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "stepd"
EXTERN = stepd.EXTERN_STEP


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", params=release_names())
def slurm_release(request: pytest.FixtureRequest) -> SlurmRelease:
    """Each Slurm release in turn (its tree unpacked, its packages installed)."""
    return require_slurm(request.param)


@pytest.fixture(scope="module")
def slurm(slurm_release: SlurmRelease) -> Iterator[LocalSlurm]:
    require_useradd()
    with LocalSlurm(slurm_release, namespaces=namespaces_under_test(slurm_release)) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def alice(slurm: LocalSlurm) -> Iterator[ThrowawayUser]:
    with throwaway_user() as user:
        yield user


@pytest.fixture(scope="module")
def bob(slurm: LocalSlurm) -> Iterator[ThrowawayUser]:
    with throwaway_user() as user:
        yield user


@pytest.fixture(scope="module")
def jobs(slurm: LocalSlurm, alice: ThrowawayUser) -> Iterator[list[str]]:
    """Two running jobs of alice, the second started after the first."""
    started = []
    try:
        for _ in range(2):
            jobid = slurm.submit(alice.name, wrap="sleep 300")
            started.append(jobid)
            slurm.wait_running(jobid)
        yield started
    finally:
        for jobid in started:
            with contextlib.suppress(Exception):
                slurm.cancel(jobid)


@pytest.fixture
def backend(slurm: LocalSlurm) -> SlurmBackend:
    return SlurmBackend(SlurmBackendConfig(spool_dir=slurm.spool_dir, timeout_ms=2000))


@pytest.fixture
def user_sleep(alice: ThrowawayUser) -> Iterator[subprocess.Popen[bytes]]:
    """A `sleep 600` of alice's, started by the test outside any job."""
    proc = subprocess.Popen(["sleep", "600"], user=alice.uid, group=alice.gid, extra_groups=[])
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def _freezer_path(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _id, ctrls, path = line.split(":", 2)
        if "freezer" in ctrls.split(","):
            return path
    return ""


@contextlib.contextmanager
def _euid(uid: int) -> Iterator[None]:
    """Run the block with effective uid ``uid`` (SO_PEERCRED reports it at connect time)."""
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)


# --------------------------------------------------------------------------- real cluster


@pytest.mark.slurm
@pytest.mark.root
def test_jobs_of_lists_the_users_jobs_oldest_first(
    slurm: LocalSlurm, backend: SlurmBackend, jobs: list[str], alice: ThrowawayUser
) -> None:
    found = backend.jobs_of(alice.uid)
    assert [j.id for j in found] == jobs
    assert all(j.uid == alice.uid for j in found)
    for job in found:
        assert job.start_time == slurm.extern_socket(job.id).lstat().st_ctime
    assert found[0].start_time < found[1].start_time


@pytest.mark.slurm
@pytest.mark.root
def test_the_jobs_group_is_its_gid_as_submitted(
    slurm: LocalSlurm, backend: SlurmBackend, jobs: list[str], alice: ThrowawayUser
) -> None:
    """`sbatch --gid` of a secondary group: the stepd's GETPW tells that group (the extern
    step's own process runs as root in 22.05, so /proc could not), and job_of_pid too."""
    with secondary_group(alice.name) as gid:
        args = [f"--uid={alice.name}", f"--gid={gid}"]  # --gid is root's: submitted for alice
        other = slurm.submit("root", wrap="sleep 300", args=args)
        try:
            slurm.wait_running(other)
            found = {j.id: j for j in backend.jobs_of(alice.uid)}
            assert {found[j].gid for j in jobs} == {alice.gid}
            assert (found[other].uid, found[other].gid) == (alice.uid, gid)
            batch = slurm.step_pids(other)["batch"][0]
            assert _status_gids(batch)[1] == gid  # what the job's processes run with
            job = backend.job_of_pid(batch)
            assert job is not None
            assert (job.id, job.gid) == (other, gid)
        finally:
            slurm.cancel(other)


def _status_gids(pid: int) -> list[int]:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x[:4] == "Gid:")
    return [int(x) for x in line.split()[1:]]


@pytest.mark.slurm
@pytest.mark.root
def test_jobs_of_another_uid_is_empty(
    backend: SlurmBackend, jobs: list[str], bob: ThrowawayUser
) -> None:
    assert backend.jobs_of(bob.uid) == []
    assert backend.jobs_of(0) == []


@pytest.mark.slurm
@pytest.mark.root
def test_job_of_pid_finds_the_batch_script(
    slurm: LocalSlurm, backend: SlurmBackend, jobs: list[str], alice: ThrowawayUser
) -> None:
    for jobid in jobs:
        for pid in slurm.step_pids(jobid)["batch"]:
            job = backend.job_of_pid(pid)
            assert job is not None
            assert (job.id, job.uid) == (jobid, alice.uid)
            assert job.start_time == slurm.extern_socket(jobid).lstat().st_ctime
    assert backend.job_of_pid(os.getpid()) is None


@pytest.mark.slurm
@pytest.mark.root
def test_job_of_pid_asks_the_stepds_when_the_cgroup_says_nothing(
    slurm: LocalSlurm, jobs: list[str], alice: ThrowawayUser, tmp_path: Path
) -> None:
    batch_pid = slurm.step_pids(jobs[1])["batch"][0]
    for pid in (batch_pid, os.getpid()):  # a /proc whose cgroup files show no job
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cgroup").write_text("0::/\n")
    cfg = SlurmBackendConfig(spool_dir=slurm.spool_dir, timeout_ms=2000)
    backend = SlurmBackend(cfg, proc_root=tmp_path)
    job = backend.job_of_pid(batch_pid)
    assert job is not None
    assert (job.id, job.uid) == (jobs[1], alice.uid)
    assert backend.job_of_pid(os.getpid()) is None


@pytest.mark.slurm
@pytest.mark.root
def test_adopt_moves_the_process_into_the_extern_step_until_scancel(
    slurm: LocalSlurm,
    backend: SlurmBackend,
    alice: ThrowawayUser,
    user_sleep: subprocess.Popen[bytes],
) -> None:
    jobid = slurm.submit(alice.name, wrap="sleep 300")
    try:
        slurm.wait_running(jobid)
        job = next(j for j in backend.jobs_of(alice.uid) if j.id == jobid)
        pid = user_sleep.pid
        assert f"job_{jobid}/" not in _freezer_path(pid)
        backend.adopt(pid, job)
        assert pid in slurm.step_pids(jobid)["extern"]
        assert _freezer_path(pid).endswith(f"/job_{jobid}/step_extern")
        adopted = backend.job_of_pid(pid)
        assert adopted is not None
        assert adopted.id == jobid
    finally:
        slurm.cancel(jobid)
    wait_for(lambda: user_sleep.poll() is not None, timeout=15, what="scancel to end the pid")


@pytest.mark.slurm
@pytest.mark.root
def test_adopt_refuses_a_job_of_another_owner(
    backend: SlurmBackend,
    jobs: list[str],
    alice: ThrowawayUser,
    bob: ThrowawayUser,
) -> None:
    proc = subprocess.Popen(["sleep", "600"], user=bob.uid, group=bob.gid, extra_groups=[])
    try:
        alices = backend.jobs_of(alice.uid)[0]
        claimed = Job(alices.id, bob.uid, alices.start_time)  # as if the policy had erred
        with pytest.raises(BackendError, match=f"belongs to uid {alice.uid}"):
            backend.adopt(proc.pid, claimed)
        assert f"job_{alices.id}/" not in _freezer_path(proc.pid)
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.slurm
@pytest.mark.root
def test_adopt_into_a_job_without_stepd_raises_job_vanished(
    backend: SlurmBackend, alice: ThrowawayUser, user_sleep: subprocess.Popen[bytes]
) -> None:
    with pytest.raises(JobVanished):
        backend.adopt(user_sleep.pid, Job("999999", alice.uid, 0.0))


@pytest.mark.slurm
@pytest.mark.root
def test_stale_socket_is_skipped(
    slurm: LocalSlurm,
    backend: SlurmBackend,
    jobs: list[str],
    alice: ThrowawayUser,
    user_sleep: subprocess.Popen[bytes],
    caplog: pytest.LogCaptureFixture,
) -> None:
    stale = slurm.spool_dir / f"{slurm.node}_999998.{EXTERN}"
    stale_socket(stale)
    try:
        with caplog.at_level(logging.DEBUG, logger="callerid.agent.backends.slurm"):
            assert [j.id for j in backend.jobs_of(alice.uid)] == jobs
        assert any("stale" in r.getMessage() for r in caplog.records)
        assert all(r.levelno <= logging.DEBUG for r in caplog.records if "stale" in r.message)
        with pytest.raises(JobVanished):
            backend.adopt(user_sleep.pid, Job("999998", alice.uid, 0.0))
    finally:
        stale.unlink()


def _capture(conn: socket.socket, exchange: stepd.Exchange[Any], arg: int | None) -> dict[str, Any]:
    """Do one exchange on the blocking ``conn``; the bytes both ways and the decoded value
    (or ``"error": "StepdClosed"`` when the stepd closed the connection instead)."""
    reader = exchange.reader()
    sent = received = b""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        conn.sendall(exchange.data)
        sent = exchange.data
        while not reader.done and (chunk := conn.recv(reader.needed)):
            received += chunk
            reader.feed(chunk)
    record: dict[str, Any] = {
        "request": exchange.name,
        "arg": arg,
        "sent": sent.hex(),
        "received": received.hex(),
    }
    if reader.done:
        record["value"] = reader.value
    else:
        record["error"] = "StepdClosed"
    return record


@pytest.mark.slurm
@pytest.mark.root
def test_capture_real_stepd_exchanges(
    slurm: LocalSlurm, jobs: list[str], alice: ThrowawayUser, tmp_path: Path
) -> None:
    """What each release's stepd really answers. They differ in: the version it answers (and
    the lowest it accepts: 24.11 and 26.05 refuse 22.05's); whether the extern step holds a
    process of its own (22.05 and 24.11 a `sleep`, 26.05 none); and how an unauthorised
    ADD_EXTERN_PID is refused (22.05, 24.11: rc -1; 26.05: the connection is closed)."""
    release = slurm.release
    out = tmp_path
    if os.environ.get("CALLERID_CAPTURE_STEPD") == "1":
        out = FIXTURES if release.name == "22.05" else FIXTURES / release.name
    out.mkdir(parents=True, exist_ok=True)
    path = slurm.extern_socket(jobs[0])
    extern_pids = slurm.step_pids(jobs[0]).get("extern", [])
    assert bool(extern_pids) == (release.name != "26.05"), slurm.listpids(jobs[0])
    slurmd = str(release.sbin / "slurmd")
    version = subprocess.run([slurmd, "-V"], capture_output=True, text=True).stdout.strip()
    head = {"source": f"{version}, Debian 12, {os.uname().machine}", "byteorder": "little"}

    def talk(
        name: str, steps: list[tuple[stepd.Exchange[Any], int | None]], uid: int = 0
    ) -> list[Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(5)
            with _euid(uid):
                conn.connect(str(path))
            records = [_capture(conn, ex, arg) for ex, arg in steps]
        (out / f"{name}.json").write_text(
            json.dumps({**head, "conversation": records}, indent=1) + "\n"
        )
        return [r.get("value", r.get("error")) for r in records]

    v = stepd.DEFAULT_PROTOCOL_VERSION
    values = talk(
        "extern_step",
        [
            (stepd.hello(v), v),
            (stepd.step_uid(), None),
            (stepd.state(), None),
            (stepd.daemon_pid(), None),
            (list_pids(), None),
            (stepd.pid_in_container(os.getpid()), os.getpid()),
            *[(stepd.pid_in_container(pid), pid) for pid in extern_pids],
        ],
    )
    own = release.protocol_version
    assert values[0] == own
    assert values[1] == alice.uid
    assert stepd.state_name(values[2], values[0]) == "running"
    assert Path(f"/proc/{values[3]}/exe").resolve().name.startswith("slurmstepd")
    assert sorted(values[4]) == sorted(extern_pids)
    assert values[5:] == [False] + [True] * len(extern_pids)

    old = stepd.PROTOCOL_22_05  # accepted by a stepd whose minimum is 22.05 or below
    accepted = talk("hello_22_05", [(stepd.hello(old), old), (stepd.step_uid(), None)])
    if release.min_protocol_version <= old:
        assert accepted == [own, alice.uid]
    else:
        assert accepted == [-1, "StepdClosed"]
    refused = talk("hello_refused", [(stepd.hello(1), 1), (stepd.step_uid(), None)])
    assert refused == [-1, "StepdClosed"]

    proc = subprocess.Popen(["sleep", "600"], user=alice.uid, group=alice.gid, extra_groups=[])
    try:
        pid = proc.pid
        as_user = talk(
            "add_extern_pid_refused",
            [
                (stepd.hello(v), v),
                (stepd.add_extern_pid(pid), pid),
                (stepd.pid_in_container(pid), pid),
            ],
            uid=alice.uid,
        )
        if release.name == "26.05":
            assert as_user == [own, "StepdClosed", "StepdClosed"]
        else:
            assert as_user == [own, -1, False]
        as_root = talk(
            "add_extern_pid",
            [
                (stepd.hello(v), v),
                (stepd.step_uid(), None),
                (stepd.state(), None),
                (stepd.add_extern_pid(pid), pid),
                (stepd.pid_in_container(pid), pid),
            ],
        )
        assert as_root == [own, alice.uid, 2, 0, True]
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.slurm
@pytest.mark.root
def test_timings(
    slurm: LocalSlurm,
    backend: SlurmBackend,
    jobs: list[str],
    alice: ThrowawayUser,
    user_sleep: subprocess.Popen[bytes],
    record_property: Any,
) -> None:
    """Not a benchmark: sanity bounds, and the figures for the report (-rP shows them)."""
    t0 = time.perf_counter()
    listed = backend.jobs_of(alice.uid)
    t1 = time.perf_counter()
    job = backend.job_of_pid(slurm.step_pids(jobs[0])["batch"][0])
    t2 = time.perf_counter()
    backend.adopt(user_sleep.pid, listed[0])
    t3 = time.perf_counter()
    assert job is not None
    ms = {"jobs_of_2": (t1 - t0) * 1e3, "job_of_pid": (t2 - t1) * 1e3, "adopt": (t3 - t2) * 1e3}
    for key, value in ms.items():
        record_property(key + "_ms", round(value, 2))
    print(" ".join(f"{k}={v:.2f}ms" for k, v in ms.items()))
    assert max(ms.values()) < 2000


# --------------------------------------------------------------------------- fake stepds


def _fake_backend(
    spool: Path, timeout_ms: int = 2000, clock: FakeClock | None = None, **kw: Any
) -> SlurmBackend:
    cfg = SlurmBackendConfig(spool_dir=spool, node_name="fake", timeout_ms=timeout_ms, **kw)
    return SlurmBackend(cfg) if clock is None else SlurmBackend(cfg, clock=clock)


def _ext(spool: Path, jobid: int, node: str = "fake") -> Path:
    return spool / f"{node}_{jobid}.{EXTERN}"


UID = 4242
GID = 4343
ASK_OWNER = [stepd.Request.STEP_UID, stepd.Request.GETPW]  # pipelined on one connection


def test_fake_stepd_adopt_and_list(spool: Path) -> None:
    with FakeStepd(_ext(spool, 7), uid=UID) as fake, FakeStepd(_ext(spool, 8), uid=UID + 1):
        backend: Backend = _fake_backend(spool)  # the Protocol, checked by mypy
        assert backend.name == "slurm"
        assert [j.id for j in backend.jobs_of(UID)] == ["7"]
        backend.adopt(os.getpid(), backend.jobs_of(UID)[0])
        assert fake.adopted == [os.getpid()]


def test_a_steps_owner_is_asked_once_and_a_new_stepd_is_asked_again(spool: Path) -> None:
    clock = FakeClock()
    backend = _fake_backend(spool, clock=clock)
    with FakeStepd(_ext(spool, 7), uid=UID) as fake:
        for _ in range(3):
            assert [j.id for j in backend.jobs_of(UID)] == ["7"]
        clock.advance(9.0)
        assert [j.id for j in backend.jobs_of(UID)] == ["7"]
        assert [r for r, _arg in fake.requests] == ASK_OWNER
        clock.advance(1.0)  # remembered for 10 s: then asked again
        assert [j.id for j in backend.jobs_of(UID)] == ["7"]
        assert [r for r, _arg in fake.requests] == ASK_OWNER * 2
    assert backend.jobs_of(UID) == []  # the step ended: its socket is gone, so is the job
    with FakeStepd(_ext(spool, 7), uid=UID + 1) as again:  # requeued under another owner
        assert backend.jobs_of(UID) == []
        assert [j.uid for j in backend.jobs_of(UID + 1)] == [UID + 1]
        assert [r for r, _arg in again.requests] == ASK_OWNER


def test_the_jobs_group_comes_with_its_owner_and_is_remembered_with_it(spool: Path) -> None:
    backend = _fake_backend(spool, clock=FakeClock())
    with (
        FakeStepd(_ext(spool, 7), uid=UID, gid=GID) as fake,
        FakeStepd(_ext(spool, 8), uid=UID) as no_entry,  # GETPW "not found"
    ):
        for _ in range(3):
            assert [(j.id, j.gid) for j in backend.jobs_of(UID)] == [("7", GID), ("8", None)]
        assert [r for r, _arg in fake.requests] == ASK_OWNER  # one pipelined exchange
        assert [r for r, _arg in no_entry.requests] == ASK_OWNER
        (mode,) = [arg for r, arg in fake.requests if r == stepd.Request.GETPW]
        assert mode == 1  # GETPW_MATCH_ALWAYS


@pytest.mark.parametrize("how", ["close", "refuse"])
def test_a_failed_getpw_keeps_the_job_without_a_group(spool: Path, how: Behaviour) -> None:
    """A stepd that closes on GETPW (or answers garbage) still told the owner: the job is
    listed and adoptable, its group unknown, and GETPW is asked again next time."""
    backend = _fake_backend(spool, clock=FakeClock())
    with FakeStepd(_ext(spool, 7), uid=UID, gid=GID, on_getpw=how) as fake:
        for _ in range(2):
            assert [(j.id, j.uid, j.gid) for j in backend.jobs_of(UID)] == [("7", UID, None)]
        assert [r for r, _arg in fake.requests] == ASK_OWNER * 2
        backend.adopt(os.getpid(), backend.jobs_of(UID)[0])
        assert fake.adopted == [os.getpid()]


def test_job_of_pid_tells_the_group_too(spool: Path, tmp_path: Path) -> None:
    pid = os.getpid()
    (tmp_path / str(pid)).mkdir()
    (tmp_path / str(pid) / "cgroup").write_text("0::/user.slice\n")
    with FakeStepd(_ext(spool, 8), uid=UID, gid=GID, pids=(pid,)):
        cfg = SlurmBackendConfig(spool_dir=spool, node_name="fake", timeout_ms=2000)
        job = SlurmBackend(cfg, proc_root=tmp_path).job_of_pid(pid)
    assert job is not None
    assert (job.id, job.uid, job.gid) == ("8", UID, GID)


def test_the_factory_builds_the_configured_backend_and_a_dry_run_never_adopts(
    spool: Path,
) -> None:
    cfg = SlurmBackendConfig(spool_dir=spool, node_name="fake", timeout_ms=2000)
    with FakeStepd(_ext(spool, 7), uid=UID) as fake:
        backend = make_backend(BackendConfig(type="slurm", slurm=cfg), clock=FakeClock())
        assert isinstance(backend, SlurmBackend)
        dry = DryRun(backend)
        assert (dry.name, dry.blocking) == ("slurm", True)
        (job,) = dry.jobs_of(UID)
        assert dry.job_of_pid(os.getpid()) is None
        dry.adopt(os.getpid(), job)
        assert fake.adopted == []
        assert stepd.Request.ADD_EXTERN_PID not in [r for r, _arg in fake.requests]
        dry.close()


def test_fake_stepd_wrong_owner_never_sees_add_extern_pid(spool: Path) -> None:
    with FakeStepd(_ext(spool, 7), uid=UID) as fake:
        with pytest.raises(BackendError, match=f"belongs to uid {UID}, not {UID + 1}"):
            _fake_backend(spool).adopt(os.getpid(), Job("7", UID + 1, 0.0))
        asked = [r for r, _arg in fake.requests]
        assert asked[0] == stepd.Request.STEP_UID
        assert stepd.Request.ADD_EXTERN_PID not in asked
        assert fake.adopted == []


@pytest.mark.parametrize("count", [1, 3])
def test_hung_stepd_is_bounded_by_the_timeout(spool: Path, count: int) -> None:
    """One deadline for all stepds of a call: 3 hung stepds cost 0.4 s, not 1.2 s."""
    with contextlib.ExitStack() as stack:
        for jobid in range(count):
            stack.enter_context(FakeStepd(_ext(spool, jobid), uid=UID, on_hello="hang"))
        backend = _fake_backend(spool, timeout_ms=400)
        t0 = time.monotonic()
        assert backend.jobs_of(UID) == []  # skipped: a stepd that does not answer cannot adopt
        assert 0.4 <= time.monotonic() - t0 < 1.0
        t0 = time.monotonic()
        with pytest.raises(StepdTimeout):
            backend.adopt(os.getpid(), Job("0", UID, 0.0))
        assert 0.4 <= time.monotonic() - t0 < 1.0


def test_stepd_hanging_on_add_extern_pid_is_bounded(spool: Path) -> None:
    with FakeStepd(_ext(spool, 7), uid=UID, on_add="hang"):
        backend = _fake_backend(spool, timeout_ms=400)
        t0 = time.monotonic()
        with pytest.raises(StepdTimeout, match="ADD_EXTERN_PID"):
            backend.adopt(os.getpid(), Job("7", UID, 0.0))
        assert 0.4 <= time.monotonic() - t0 < 1.0


def test_refusal_with_rc_minus_one_is_a_backend_error(spool: Path) -> None:
    """22.05: an unauthorised ADD_EXTERN_PID is answered -1."""
    with (
        FakeStepd(_ext(spool, 7), uid=UID, on_add="refuse"),
        pytest.raises(BackendError, match=r"refused to adopt pid \d+ \(rc -1\)"),
    ):
        _fake_backend(spool).adopt(os.getpid(), Job("7", UID, 0.0))


def test_refusal_by_closing_is_a_backend_error(spool: Path) -> None:
    """26.05: an unauthorised ADD_EXTERN_PID (or one into an ending step) gets no reply."""
    with FakeStepd(_ext(spool, 7), uid=UID, version=stepd.PROTOCOL_26_05, on_add="close"):
        with pytest.raises(BackendError, match="closed the connection") as err:
            _fake_backend(spool).adopt(os.getpid(), Job("7", UID, 0.0))
        assert not isinstance(err.value, JobVanished)


@pytest.mark.parametrize(
    ("version", "state"), [(stepd.PROTOCOL_22_05, 3), (42 << 8, 4), (stepd.PROTOCOL_26_05, 4)]
)
def test_adopt_into_an_ending_step_raises_job_vanished(
    spool: Path, version: int, state: int
) -> None:
    with FakeStepd(_ext(spool, 7), uid=UID, version=version, state=state) as fake:
        with pytest.raises(JobVanished, match="ending"):
            _fake_backend(spool).adopt(os.getpid(), Job("7", UID, 0.0))
        assert fake.adopted == []


def test_a_remembered_owner_adopts_in_one_round_trip(spool: Path) -> None:
    """Owner known for this socket file (listed just before): STATE, ADD_EXTERN_PID and
    PID_IN_CONTAINER go out together, and STEP_UID is not asked again; an owner not known is
    asked first (two round trips, nothing added before the answer:
    test_fake_stepd_wrong_owner_never_sees_add_extern_pid)."""
    with FakeStepd(_ext(spool, 7), uid=UID) as fake:
        backend = _fake_backend(spool)
        (job,) = backend.jobs_of(UID)  # remembers the owner of this stepd's socket file
        fake.requests.clear()
        backend.adopt(os.getpid(), job)
        assert fake.adopted == [os.getpid()]
        assert [r for r, _arg in fake.requests] == [
            stepd.Request.STATE,
            stepd.Request.ADD_EXTERN_PID,
            stepd.Request.PID_IN_CONTAINER,
        ]


def test_a_stepd_that_confirmed_an_adoption_is_not_asked_again(spool: Path) -> None:
    """PID_IN_CONTAINER confirms the first adoption through a stepd; later ones through that
    stepd (its proctrack plugin is loaded once) skip it. A new stepd under the same name is a
    new socket file: asked again."""

    def adopt_once(fake: FakeStepd, backend: SlurmBackend) -> list[stepd.Request]:
        fake.requests.clear()
        (job,) = backend.jobs_of(UID)
        backend.adopt(os.getpid(), job)
        return [r for r, _arg in fake.requests if r != stepd.Request.STEP_UID]

    backend = _fake_backend(spool)
    with FakeStepd(_ext(spool, 7), uid=UID) as fake:
        assert stepd.Request.PID_IN_CONTAINER in adopt_once(fake, backend)
        assert stepd.Request.PID_IN_CONTAINER not in adopt_once(fake, backend)
        assert fake.adopted == [os.getpid(), os.getpid()]
    with FakeStepd(_ext(spool, 7), uid=UID) as fake:  # the job requeued: a new stepd
        assert stepd.Request.PID_IN_CONTAINER in adopt_once(fake, backend)


def test_a_stepd_that_cannot_contain_is_asked_every_time(spool: Path) -> None:
    """proctrack/pgid: ADD_EXTERN_PID says yes, PID_IN_CONTAINER no; every adoption fails and
    nothing is remembered."""
    with FakeStepd(_ext(spool, 7), uid=UID, contains=False) as fake:
        backend = _fake_backend(spool)
        (job,) = backend.jobs_of(UID)
        for _ in range(2):
            fake.requests.clear()
            with pytest.raises(BackendError, match="does not contain it"):
                backend.adopt(os.getpid(), job)
            assert stepd.Request.PID_IN_CONTAINER in [r for r, _arg in fake.requests]


def test_a_remembered_owner_into_an_ending_step_is_still_refused(spool: Path) -> None:
    """Sent at once, the pid reaches the ending step (and ends with it); the login is refused
    all the same: JobVanished, as with the owner asked first."""
    with FakeStepd(_ext(spool, 7), uid=UID, state=3) as fake:
        backend = _fake_backend(spool)
        (job,) = backend.jobs_of(UID)
        with pytest.raises(JobVanished, match="ending"):
            backend.adopt(os.getpid(), job)
        assert stepd.Request.STATE in [r for r, _arg in fake.requests]


def test_refused_handshake_names_the_protocol_version(spool: Path) -> None:
    with FakeStepd(_ext(spool, 7), uid=UID, on_hello="refuse"):
        backend = _fake_backend(spool, protocol_version=stepd.PROTOCOL_22_05)
        with pytest.raises(BackendError, match="refused our protocol version 9728"):
            backend.adopt(os.getpid(), Job("7", UID, 0.0))
        assert backend.jobs_of(UID) == []


def test_node_name_is_guessed_from_the_only_prefix(spool: Path) -> None:
    with FakeStepd(_ext(spool, 7, node="n0042"), uid=UID):
        cfg = SlurmBackendConfig(spool_dir=spool, timeout_ms=2000)  # no node_name
        assert [j.id for j in SlurmBackend(cfg).jobs_of(UID)] == ["7"]
        wrong = SlurmBackendConfig(spool_dir=spool, node_name="other", timeout_ms=2000)
        assert SlurmBackend(wrong).jobs_of(UID) == []


def test_spool_dir_placeholders_are_expanded(spool: Path) -> None:
    (spool / "fake").mkdir()
    with FakeStepd(_ext(spool / "fake", 7), uid=UID):
        cfg = SlurmBackendConfig(spool_dir=spool / "%n", node_name="fake", timeout_ms=2000)
        assert [j.id for j in SlurmBackend(cfg).jobs_of(UID)] == ["7"]


def test_job_of_pid_without_cgroup_hint_asks_every_stepd(spool: Path, tmp_path: Path) -> None:
    pid = os.getpid()
    (tmp_path / str(pid)).mkdir()
    (tmp_path / str(pid) / "cgroup").write_text("0::/user.slice\n")
    with FakeStepd(_ext(spool, 7), uid=UID), FakeStepd(_ext(spool, 8), uid=UID + 1, pids=(pid,)):
        cfg = SlurmBackendConfig(spool_dir=spool, node_name="fake", timeout_ms=2000)
        job = SlurmBackend(cfg, proc_root=tmp_path).job_of_pid(pid)
    assert job is not None
    assert (job.id, job.uid) == ("8", UID + 1)


def test_job_vanishing_between_listing_and_adoption(spool: Path) -> None:
    path = _ext(spool, 7)
    with FakeStepd(path, uid=UID):
        backend = _fake_backend(spool)
        (job,) = backend.jobs_of(UID)
    with pytest.raises(JobVanished):
        backend.adopt(os.getpid(), job)
    stale_socket(path)
    with pytest.raises(JobVanished):
        backend.adopt(os.getpid(), job)
    assert backend.jobs_of(UID) == []


# --------------------------------------------------------------------------- job namespaces


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module")
def tmp_job(slurm: LocalSlurm, alice: ThrowawayUser) -> Iterator[tuple[str, str, str]]:
    """A job of alice's whose batch script wrote a file into its /tmp: (job, path, content)."""
    token = secrets.token_hex(6)
    path = f"/tmp/cid-ns-{token}"
    jobid = slurm.submit(alice.name, wrap=f"echo {token} > {path}; sleep 300")
    try:
        slurm.wait_running(jobid)
        wait_for(lambda: _batch_wrote(slurm, jobid, path), timeout=10, what="the batch's file")
        yield jobid, path, f"{token}\n"
    finally:
        with contextlib.suppress(Exception):
            slurm.cancel(jobid)
        Path(path).unlink(missing_ok=True)  # written to the node's /tmp without a plugin


def _batch_wrote(slurm: LocalSlurm, jobid: str, path: str) -> bool:
    pids = slurm.step_pids(jobid).get("batch", [])
    return any(Path(f"/proc/{pid}/root{path}").exists() for pid in pids)


@pytest.mark.slurm
@pytest.mark.root
def test_namespaces_are_the_jobs_private_tmp(
    slurm: LocalSlurm,
    backend: SlurmBackend,
    alice: ThrowawayUser,
    tmp_job: tuple[str, str, str],
) -> None:
    jobid, path, content = tmp_job
    job = next(j for j in backend.jobs_of(alice.uid) if j.id == jobid)
    before = _open_fds()
    found = backend.namespaces(job)
    if slurm.namespaces is None:  # 22.05 here: no plugin, the stepd answers 0
        assert found is None
        assert Path(path).read_text() == content  # the job's /tmp is the node's
        return
    assert found is not None
    try:
        # job_container/tmpfs, namespace/tmpfs: mnt; namespace/linux: pid, then mnt
        assert found.kinds == (("pid", "mnt") if slurm.namespaces == "linux" else ("mnt",))
        batch = slurm.step_pids(jobid)["batch"][-1]
        for kind, fd in found.fds:
            assert os.fstat(fd).st_ino == os.stat(f"/proc/{batch}/ns/{kind}").st_ino, kind
            assert os.fstat(fd).st_ino != os.stat(f"/proc/self/ns/{kind}").st_ino, kind
        assert not Path(path).exists()  # not in the node's /tmp
        seen = read_in_namespaces(found.fds, path)
        assert seen[0] == content.strip(), seen
        ino, pid = (int(x) for x in seen[1].split())
        if slurm.namespaces == "linux":  # the job's PID namespace, its own numbering
            assert ino == os.stat(f"/proc/{batch}/ns/pid").st_ino
            assert pid < 100, seen  # a low pid of the job's namespace, not the node's
        else:
            assert ino == os.stat("/proc/self/ns/pid").st_ino
    finally:
        found.close()
    assert _open_fds() == before


@pytest.mark.slurm
@pytest.mark.root
def test_namespaces_off_and_refused(
    slurm: LocalSlurm, alice: ThrowawayUser, tmp_job: tuple[str, str, str]
) -> None:
    jobid, _path, _content = tmp_job
    cfg = SlurmBackendConfig(spool_dir=slurm.spool_dir, timeout_ms=2000, join_container=False)
    job = Job(jobid, alice.uid, 0.0)
    assert SlurmBackend(cfg).namespaces(job) is None
    on = SlurmBackend(SlurmBackendConfig(spool_dir=slurm.spool_dir, timeout_ms=2000))
    before = _open_fds()
    with pytest.raises(BackendError, match="belongs to uid"):  # never another owner's
        on.namespaces(Job(jobid, alice.uid + 1, 0.0))
    with pytest.raises(JobVanished):
        on.namespaces(Job("999999", alice.uid, 0.0))
    assert _open_fds() == before


# fake stepds passing fds: what a real one does not do on demand


@contextlib.contextmanager
def _fd_stepd(
    path: Path, reply: bytes, fds: list[int], *, version: int = stepd.PROTOCOL_26_05
) -> Iterator[None]:
    """A one-connection stepd: handshake, STEP_UID (UID), then ``reply`` with ``fds`` passed
    on its last byte (none: the connection is closed after ``reply``)."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(8)  # handshake + STEP_UID
            conn.sendall(struct.pack("=iI", version, UID))
            conn.recv(4)  # the namespace request
            if not fds:
                conn.sendall(reply)
                return
            conn.sendall(reply[:-1])
            socket.send_fds(conn, [reply[-1:]], fds)
            conn.recv(4)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join(timeout=5)
        server.close()


def _ns_fds_reply(*types: int) -> bytes:
    return struct.pack("=i", len(types)) + b"".join(struct.pack("=i", t) + b"\0" for t in types)


@pytest.mark.parametrize("version", [stepd.PROTOCOL_26_05, 42 << 8])
def test_fake_stepd_passes_a_namespace(spool: Path, version: int) -> None:
    mine = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    reply = _ns_fds_reply(0x00020000) if version >= stepd.GET_NS_FDS_SINCE else b"\7\0\0\0\0"
    try:
        with _fd_stepd(_ext(spool, 1), reply, [mine], version=version):
            found = _fake_backend(spool).namespaces(Job("1", UID, 0.0))
    finally:
        os.close(mine)
    assert found is not None
    assert found.kinds == ("mnt",)
    assert os.fstat(found.fds[0][1]).st_ino == os.stat("/proc/self/ns/mnt").st_ino
    found.close()


@pytest.mark.parametrize(
    ("reply", "what", "match"),
    [
        (_ns_fds_reply(0x00020000, 0x20000000), "mnt", "announced 2 namespace fds, passed 1"),
        (_ns_fds_reply(0x20000000), "mnt", "kind mnt for namespace type 0x20000000"),
        (_ns_fds_reply(0x00020000), "pipe", "not a namespace"),
        (struct.pack("=i", 1), "none", "closed the connection"),
    ],
)
def test_fake_stepd_bad_namespaces_close_every_fd(
    spool: Path, reply: bytes, what: str, match: str
) -> None:
    r, w = os.pipe()
    passed = os.open("/proc/self/ns/mnt", os.O_RDONLY) if what == "mnt" else r
    before = _open_fds()
    try:
        with (
            _fd_stepd(_ext(spool, 1), reply, [passed] if what != "none" else []),
            pytest.raises(BackendError, match=match),
        ):
            _fake_backend(spool).namespaces(Job("1", UID, 0.0))
        assert _open_fds() == before  # nothing received is left open
    finally:
        for fd in {r, w, passed}:
            os.close(fd)


def test_fake_stepd_passing_too_many_fds_is_refused(spool: Path) -> None:
    fds = [os.open("/proc/self/ns/mnt", os.O_RDONLY) for _ in range(stepd.MAX_NS_FDS + 4)]
    before = _open_fds()
    try:
        reply = _ns_fds_reply(*[0x00020000] * stepd.MAX_NS_FDS)
        with _fd_stepd(_ext(spool, 1), reply, fds), pytest.raises(BackendError):
            _fake_backend(spool).namespaces(Job("1", UID, 0.0))
        assert _open_fds() == before
    finally:
        for fd in fds:
            os.close(fd)


def test_fake_stepd_without_namespaces(spool: Path) -> None:
    """None; and remembered for the step: the next login into the job does not ask again (the
    one-connection stepd would not answer a second connection in time)."""
    with _fd_stepd(_ext(spool, 1), struct.pack("=i", 0), []):
        backend = _fake_backend(spool)
        assert backend.namespaces(Job("1", UID, 0.0)) is None
        assert backend.namespaces(Job("1", UID, 0.0)) is None
