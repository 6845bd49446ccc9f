"""ssh logins from inside a Slurm job: callerid beside pam_slurm_adopt, on a real Slurm.

Rows 1, 2 and 5 of `make bench`, for one Slurm release (``--release``: Debian's 22.05, the
default, or the upstream trees 24.11 and 26.05 of tests/support/slurm_release.py). One real
single-node Slurm of that release (tests/support/slurm.py LocalSlurm(release=...): its
slurmctld, slurmd, slurmstepd; a private munged; PrologFlags=contain, proctrack/cgroup) and
one sshd per target on 127.0.0.3, each with its own PAM service; the stacks differ only in the
account line, and pam_slurm_adopt is THAT release's module, by its full path (`PSA_MODULES`):

    plain           (none: the baseline)
    psa             <release's pam_slurm_adopt.so> service=<svc> log_level=debug [PSA_OPTIONS]
    psa-rpc         ... single_job_skip_rpc=0     (always the callerid RPC to the source slurmd)
    cid-slurm       pam_callerid.so socket=<agent> debug   agent: backend slurm (slurmstepd)
    cid-slurm-rpc   the same, agent with single_job_shortcut: false (always asks the source)
    cid-cgroup      agent: backend cgroup (Slurm's freezer tree, the pid written by the agent)
    cid-cgroup-rpc  the same, single_job_shortcut: false

The source of every connection is 127.0.0.1 (the ssh client's address), where slurmd and the
source callerid agent listen; the destination agents listen on their own addresses, so an
RPC-path login really crosses the CURVE mesh (no local short-cut). A throwaway user runs the
timing loop as a Slurm batch job (the ssh clients are inside the job's step, as the reference
measure_job.py did): `ssh -p PORT 127.0.0.3 true`, targets interleaved (order reversed every
round), 3 warm-up rounds, N measured. Every measured login is checked: psa "adopted into job",
psa-rpc "member of job", callerid "adopt" with reason single_job / callerid.

Module time: pam_slurm_adopt's own first-to-last syslog line (log_level=debug, its timings);
for callerid the agent's CALLERID_LATENCY_US (request -> reply, incl. the adoption) and the
module's own first-to-last syslog line (`debug`). Stalled source (row 5): the job then asks to
be stalled; slurmd and the source agent are SIGSTOPped, and psa-rpc / cid-slurm-rpc logins
are timed (pam_slurm_adopt waits MessageTimeout, callerid peer.timeout_ms), then SIGCONT.

The timing loop that runs inside the job is bench/_login_job.py; the syslog sink, sshd
instances and agents are bench/_sshbench.py; bench/_login_logs.py reads the logs and
bench/_login_report.py prints the report and the rows.

``--targets`` runs a subset (plain, psa and psa-rpc always included); bench/run.py runs 24.11
and 26.05 with the slurm-backend targets only, fewer rounds and no stalled phase (their rows
say so).

Reproduce (root, from the repo top):  .venv/bin/python -m bench.login [--rounds 30] [--stalled 3]
    [--release 26.05 --targets plain,psa,psa-rpc,cid-slurm,cid-slurm-rpc]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench._common import TOP, apt_install, bench_argv, need_root, poll, write_rows
from bench._login_analyze import analyze
from bench._login_fdm import favordynmods_phase
from bench._login_logs import (
    records,
    slurmd_callerid_ms,
    timing_marks,
)
from bench._login_report import print_report, report_rows
from bench._sshbench import SSHD_HOST, AgentSet, SshdFarm, SyslogSink, user_keys
from tests.support.psa_sshd import psa_module
from tests.support.slurm import PACKAGES, LocalSlurm
from tests.support.slurm_release import RELEASES, SlurmRelease, prepare
from tests.support.users import ThrowawayUser, create_user, delete_user

PAM_SO = TOP / "pam" / "pam_callerid.so"
WARMUP = 3
SOURCE_IP = "127.0.0.1"
AGENTS = {  # name -> address; "src" answers for the ssh clients (127.0.0.1)
    "src": SOURCE_IP,
    "dslurm": "127.0.0.4",
    "dslurmrpc": "127.0.0.5",
    "dcg": "127.0.0.6",
    "dcgrpc": "127.0.0.7",
}
TARGETS = {  # target -> (agent serving it or None, pam_slurm_adopt options or None)
    "plain": (None, None),
    "psa": (None, ""),
    "psa-rpc": (None, "single_job_skip_rpc=0"),
    "cid-slurm": ("dslurm", None),
    "cid-slurm-rpc": ("dslurmrpc", None),
    "cid-cgroup": ("dcg", None),
    "cid-cgroup-rpc": ("dcgrpc", None),
}
STALLED = ("psa-rpc", "cid-slurm-rpc")
ALWAYS = ("plain", "psa", "psa-rpc")  # every run measures the baseline and the reference
# Each release's own pam_slurm_adopt, by full path (tests/support/psa_sshd.py): Debian's in
# /lib/security, each tree's in <prefix>/lib/security (reference/slurm-builds/README.md, "Trap")
PSA_MODULES = {name: str(psa_module(rel)) for name, rel in RELEASES.items()}
# Options a release's module needs beyond service= and log_level= (none so far: NodeName is
# the short hostname, which every release's module guesses; see docs/performance.md).
PSA_OPTIONS: dict[str, str] = {"22.05": "", "24.11": "", "26.05": ""}
JOB_PYTHON = "/usr/bin/python3"  # the timing job's (the user cannot read the venv)


def account_line(name: str, farm: SshdFarm, agents: AgentSet, release: str) -> str | None:
    agent, psa = TARGETS[name]
    if agent is not None:
        return f"account    required     {PAM_SO} socket={agents.socket(agent)} debug"
    if psa is not None:
        extra = f"{PSA_OPTIONS[release]} {psa}".strip()
        opts = f"service={farm.service(name)} log_level=debug {extra}".strip()
        return f"account    required     {PSA_MODULES[release]} {opts}"
    return None


def agent_overrides(slurm: LocalSlurm) -> dict[str, dict[str, Any]]:
    slurm_backend = {
        "type": "slurm",
        "slurm": {"spool_dir": str(slurm.spool_dir), "node_name": slurm.node},
    }
    cgroup_backend = {
        "type": "cgroup",
        "cgroup": {
            "root": "/sys/fs/cgroup/freezer",
            "jobs": slurm.cgroup_prefix().lstrip("/") + "/uid_{uid}/job_{job}",
            "extern": "step_extern",
        },
    }
    return {
        "src": {"backend": slurm_backend},
        "dslurm": {"backend": slurm_backend},
        "dslurmrpc": {"backend": slurm_backend, "policy": {"single_job_shortcut": False}},
        "dcg": {"backend": cgroup_backend},
        "dcgrpc": {"backend": cgroup_backend, "policy": {"single_job_shortcut": False}},
    }


def slurmd_pid(slurm: LocalSlurm) -> int:
    pid = int((slurm.top / "slurmd.pid").read_text().split()[0])
    if os.readlink(f"/proc/{pid}/exe") != os.path.realpath(slurm.release.sbin / "slurmd"):
        msg = f"pid {pid} is not our slurmd"
        raise RuntimeError(msg)
    return pid


def run_job(
    stack: contextlib.ExitStack,
    slurm: LocalSlurm,
    user: ThrowawayUser,
    work: Path,
    *,
    spec: dict[str, Any],
    stall_pids: list[int],
) -> dict[str, Any]:
    """Submit the timing job; stall the source for its second phase; return its samples."""
    (work / "spec.json").write_text(json.dumps(spec))
    (work / "spec.json").chmod(0o644)
    args = [f"--output={work}/job.out", f"--error={work}/job.out", "--job-name=cidbench"]
    args.append(f"--chdir={TOP}")  # the user runs bench/_login_job.py from the repo top
    job_argv = bench_argv("_login_job", f"{work}/spec.json", python=JOB_PYTHON)
    job = slurm.submit(user.name, wrap=shlex.join(job_argv), args=args)
    minutes = 10
    got = poll(
        lambda: Path(spec["out"]).exists() or job_failed(slurm, job, work),
        minutes * 60,
        "the timing job",
        0.2,
    )
    if got == "failed":
        msg = f"the timing job failed: {(work / 'job.out').read_text()[-3000:]}"
        raise RuntimeError(msg)
    if spec["stalled"]:
        poll(lambda: Path(spec["ready"]).exists(), 60, "the job's stall request", 0.05)
        for pid in stall_pids:
            stack.callback(_cont, pid)  # always resumed, even if we fail from here on
            os.kill(pid, signal.SIGSTOP)
        Path(spec["go"]).touch()
        got = poll(
            lambda: Path(spec["stalled_out"]).exists() or job_failed(slurm, job, work),
            spec["stalled"] * 15 + 60,
            "the stalled logins",
            0.2,
        )
        for pid in stall_pids:
            _cont(pid)
        if got == "failed":
            msg = f"the timing job failed: {(work / 'job.out').read_text()[-3000:]}"
            raise RuntimeError(msg)
        return dict(json.loads(Path(spec["stalled_out"]).read_text()))
    return dict(json.loads(Path(spec["out"]).read_text()))


def migration_probe(idle_s: float = 1.0) -> float:
    """ms to move a sleeping process into a fresh freezer cgroup after ``idle_s`` without
    any migration of ours: the kernel cost every adoption pays (reference: 11-14 ms)."""
    import time

    top = Path(f"/sys/fs/cgroup/freezer/cidbench-{secrets.token_hex(3)}")
    top.mkdir()
    proc = subprocess.Popen(["sleep", "60"])
    try:
        time.sleep(idle_s)  # the idle gap is what is measured, not a synchronisation
        t0 = time.perf_counter()
        (top / "cgroup.procs").write_text(str(proc.pid))
        took = (time.perf_counter() - t0) * 1000
        Path("/sys/fs/cgroup/freezer/cgroup.procs").write_text(str(proc.pid))
    finally:
        proc.kill()
        proc.wait()
        poll(lambda: not (top / "cgroup.procs").read_text().strip(), 10, "an empty cgroup")
        top.rmdir()
    return took


def _cont(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


def job_failed(slurm: LocalSlurm, job: str, work: Path) -> str | None:
    state = slurm.job_state(job)
    return "failed" if state in ("", "FAILED", "CANCELLED", "COMPLETED") else None


def chosen_targets(arg: str | None) -> list[str]:
    """The targets to measure, in TARGETS order (`ALWAYS` included)."""
    wanted = set(arg.split(",")) if arg else set(TARGETS)
    unknown = wanted - set(TARGETS)
    if unknown:
        msg = f"unknown targets {sorted(unknown)}; known: {list(TARGETS)}"
        raise SystemExit(msg)
    return [t for t in TARGETS if t in wanted or t in ALWAYS]


def measure(args: argparse.Namespace, release: SlurmRelease) -> dict[str, Any]:
    targets = chosen_targets(args.targets)
    names = {"src"} | {a for t in targets if (a := TARGETS[t][0]) is not None}
    nodes = {n: ip for n, ip in AGENTS.items() if n in names}
    stalled = args.stalled if all(t in targets for t in STALLED) else 0
    with contextlib.ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="cidlogin-", dir="/tmp"))
        work.chmod(0o755)  # the job (the user) reads its script and writes its results here
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        sink = SyslogSink(work)
        stack.callback(sink.close)
        user = create_user(home=True, shell="/bin/bash", locked=False)
        stack.callback(delete_user, user)
        os.chown(work, user.uid, user.gid)
        slurm = stack.enter_context(LocalSlurm(release, slurmd_debug="debug2"))
        agents = AgentSet(work, nodes)
        stack.callback(agents.close)
        agents.start(agent_overrides(slurm), args.agent_log_level)
        trace = Path(args.trace) if args.trace else None
        if trace is not None:
            trace.mkdir(parents=True, exist_ok=True)
        farm = SshdFarm(
            work,
            f"cidb{secrets.token_hex(2)}",
            sink.prefix(),
            trace=trace,
            strace=args.strace,
            syslog_level="DEBUG1",
        )
        stack.callback(farm.close)
        for name in targets:
            farm.add(name, account_line(name, farm, agents, release.name))
        spec = {
            "ssh_opts": user_keys(user, farm),
            "host": SSHD_HOST,
            "ports": farm.ports,
            "order": targets,
            "warmup": WARMUP,
            "rounds": args.rounds,
            "out": str(work / "phase1.json"),
            "stalled_out": str(work / "phase2.json"),
            "stalled": stalled,
            "stalled_targets": list(STALLED),
            "ready": str(work / "stall.ready"),
            "go": str(work / "stall.go"),
        }
        mark = len(sink.lines())
        stall = [slurmd_pid(slurm), agents.procs["src"].pid]
        samples = run_job(stack, slurm, user, work, spec=spec, stall_pids=stall)
        lines = sink.lines()[mark:]
        fdm = None
        if args.favordynmods:
            job = functools.partial(run_job, stack, slurm, user, work, stall_pids=[])
            fdm = favordynmods_phase(
                lambda s: job(spec=s), sink.lines, migration_probe, spec,
                targets=targets, rounds=args.favordynmods,
            )  # fmt: skip
        recs = {a: records(agents.log(a)) for a in nodes}
        timings = {a: timing_marks(agents.log(a)) for a in nodes}
        slurmd = slurmd_callerid_ms(slurm.log_dir / "slurmd.log")
        if args.keep:
            keep = Path(args.keep)
            keep.mkdir(parents=True, exist_ok=True)
            (keep / "syslog.log").write_text("\n".join(lines) + "\n")
            (keep / "samples.json").write_text(json.dumps(samples))
            for a in nodes:
                shutil.copy(agents.log(a), keep / f"agent-{a}.log")
            shutil.copy(slurm.log_dir / "slurmd.log", keep / "slurmd.log")
        st = analyze(
            samples,
            lines,
            recs,
            slurmd=slurmd,
            rounds=args.rounds,
            timings=timings,
            targets=targets,
            agent_of={name: agent for name, (agent, _) in TARGETS.items()},
            warmup=WARMUP,
        )
        st["migration_ms"] = [migration_probe(), migration_probe()]
        st["favordynmods"] = fdm
        st["release"] = {"name": release.name, "version": release.version}
        st["psa_module"] = PSA_MODULES[release.name]
        st["psa_options"] = PSA_OPTIONS[release.name]
        st["targets"] = targets
        return st


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30, help="measured rounds (each target once)")
    ap.add_argument("--stalled", type=int, default=3, help="stalled-source logins per target")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", help="copy the raw logs and samples into this directory")
    ap.add_argument(
        "--trace",
        help="follow logins end to end into this directory: sshd at DEBUG3 into the syslog "
        "sink (implies --keep DIR); bench/_login_trace.py reads it",
    )
    ap.add_argument(
        "--strace",
        action="store_true",
        help="with --trace: each sshd under strace -f -tt too (slow: for a few rounds)",
    )
    ap.add_argument(
        "--release",
        default="22.05",
        choices=list(RELEASES),
        help="the Slurm release (daemons and its own pam_slurm_adopt.so); default 22.05",
    )
    ap.add_argument(
        "--targets",
        help=f"comma-separated subset of {','.join(TARGETS)} (plain, psa, psa-rpc always)",
    )
    ap.add_argument(
        "--favordynmods",
        type=int,
        default=0,
        metavar="N",
        help="then N more rounds of the single-job targets with cgroup2 mounted favordynmods "
        "(set for them, restored after); 0: not measured",
    )
    ap.add_argument(
        "--agent-log-level",
        default="debug",
        choices=["debug", "info"],
        help="debug (default) logs each login's timing marks, as psa logs at debug",
    )
    args = ap.parse_args()
    if args.trace and not args.keep:
        args.keep = args.trace
    need_root()
    release = RELEASES[args.release]
    # Debian's libpam-slurm-adopt always: 22.05's module, and the trees' must not replace it
    apt_install([*PACKAGES, *release.packages, "libpam-slurm-adopt"])
    apt_install(["openssh-server", "openssh-client"])
    prepare(release)  # the tree unpacked under /opt (idempotent), its slurmd checked
    if not PAM_SO.exists():
        subprocess.run(["make", "-s", "-C", str(TOP / "pam")], check=True)
    st = measure(args, release)
    print(f"Slurm {release.version}: pam_slurm_adopt {st['psa_module']} {st['psa_options']}")
    print_report(st, {t: TARGETS[t] for t in st["targets"]}, STALLED, WARMUP)
    rows = report_rows(args, st)
    print(f"reproduce: {rows[0].reproduce}")
    write_rows(args.json, rows, st)
    return 0


if __name__ == "__main__":
    sys.exit(main())
