"""Shared pieces of the benchmarks: statistics, result rows, limits, locks, small processes.

Every part of `make bench` (bench/login.py, resolution.py, storm.py, scale.py, decision.py)
can write its summary rows as JSON (``--json PATH``); bench/run.py collects them into one
table. A `Row` is one line of that table: what was measured, N, our figure, the reference's
figure (pam_slurm_adopt / slurmd, or "-" where the reference has no such thing), the ratio,
the target and whether it was met, and the command that reproduces the row.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import resource
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

TOP = Path(__file__).resolve().parent.parent  # the repo top: the cwd of `python -m bench.*`

SLURM_LOCK = Path("/run/callerid-test-slurm.lock")
PY = ".venv/bin/python"  # how the reproduce commands name the interpreter (from the repo top)

T = TypeVar("T")


# --------------------------------------------------------------------------- statistics


def pct(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100), linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values: Sequence[float]) -> float:
    return pct(values, 50)


def ms(value: float) -> str:
    """A duration in ms, with as many digits as its size deserves."""
    if math.isnan(value):
        return "n/a"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def ratio_text(ours: float, reference: float, *, higher_is_better: bool = False) -> str:
    """'12.3x less' style ratio of reference over ours (or ours over reference)."""
    if ours <= 0 or reference <= 0 or math.isnan(ours) or math.isnan(reference):
        return "-"
    if higher_is_better:
        return f"{ours / reference:.1f}x more"
    return f"{reference / ours:.1f}x less" if reference >= ours else f"{ours / reference:.1f}x more"


# --------------------------------------------------------------------------- result rows


@dataclass
class Row:
    """One line of the `make bench` table."""

    row: str  # "1", "2a" ...: the row number
    what: str
    n: str
    ours: str
    reference: str
    ratio: str
    target: str
    met: str  # "yes" | "NO" | "-"
    reproduce: str
    notes: list[str] = field(default_factory=list)


def met(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "NO")


def reproduce(bench: str, args: Sequence[str] = ()) -> str:
    """The command (run from the repo top, as root) that reproduces a row of ``bench``."""
    return " ".join([PY, "-m", f"bench.{bench}", *map(shlex.quote, args)])


def bench_argv(module: str, *args: str, python: str = sys.executable) -> list[str]:
    """argv running ``bench.<module>`` with ``python``: start it with ``cwd=TOP``."""
    return [python, "-m", f"bench.{module}", *args]


def write_rows(path: Path | None, rows: Sequence[Row], details: dict[str, Any]) -> None:
    """Write the rows (and free-form details for docs) as JSON for bench/run.py."""
    if path is None:
        return
    data = {"rows": [asdict(r) for r in rows], "details": details}
    path.write_text(json.dumps(data, indent=1, default=str))


def read_rows(path: Path) -> tuple[list[Row], dict[str, Any]]:
    data = json.loads(path.read_text())
    return [Row(**r) for r in data["rows"]], data.get("details", {})


# --------------------------------------------------------------------------- environment


def need_root() -> None:
    """Exit unless root; and make SIGTERM unwind the stack (every clean-up runs), as
    bench/run.py stops a part that overruns its time with SIGTERM before SIGKILL."""
    if os.geteuid() != 0:
        sys.exit("this benchmark needs root (users, cgroups, sshd, PAM services, Slurm)")
    signal.signal(signal.SIGTERM, _terminated)


def _terminated(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the clean-up must not be cut short
    sys.exit(128 + signum)


def raise_nofile(wanted: int = 1 << 16) -> int:
    """Raise RLIMIT_NOFILE (soft and hard, as root) to ``wanted``; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    except OSError:
        nr_open = hard
    new = min(max(wanted, soft), nr_open)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, max(new, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        new = hard
    return new


def apt_install(packages: Sequence[str]) -> None:
    """apt-get install whichever of ``packages`` is missing (Debian; as root)."""
    missing = []
    for pkg in packages:
        proc = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", pkg], check=False, capture_output=True, text=True
        )
        if "install ok installed" not in proc.stdout:
            missing.append(pkg)
    if not missing:
        return
    print(f"# apt-get install {' '.join(missing)}", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=False, capture_output=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
        check=True,
        capture_output=True,
        env=env,
    )


def poll(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Call ``predicate`` until truthy (returned); RuntimeError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            msg = f"timed out after {timeout:.0f} s waiting for {what}"
            raise RuntimeError(msg)
        time.sleep(interval)


@contextlib.contextmanager
def slurm_lock(timeout: float = 900.0) -> Iterator[None]:
    """Hold the machine-wide Slurm lock while our Slurm daemons run.

    Another user of this machine's single Slurm (the test suite) takes an exclusive flock on
    SLURM_LOCK; when tests/support/slurm.py's LocalSlurm takes it itself (in __enter__), this
    is a no-op, since a second flock on the same file from this process would deadlock.
    """
    helper = (TOP / "tests" / "support" / "slurm.py").read_text()
    if str(SLURM_LOCK) in helper:
        yield
        return
    fd = os.open(SLURM_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    msg = f"{SLURM_LOCK} still held after {timeout:.0f} s"
                    raise RuntimeError(msg) from None
                time.sleep(0.5)
        yield
    finally:
        os.close(fd)  # releases the lock


def hosts_prefix(path: Path, names: dict[str, str]) -> list[str]:
    """argv prefix running a command in a private mount namespace whose /etc/hosts is the
    host's plus ``names`` (node name -> address).

    The agent resolves every peer's name when it loads the authorized keys (bus/peers.py);
    made-up node names would go to this machine's DNS server, which drops about one query in
    17 (a 5 s resolver timeout each). Clusters often list their nodes in /etc/hosts; so do we,
    for the agents only (the host's own /etc/hosts is not touched).
    """
    lines = [Path("/etc/hosts").read_text().rstrip("\n")]
    lines += [f"{ip}\t{name}" for name, ip in names.items()]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o644)
    return bind_prefix(path, Path("/etc/hosts"))


def bind_prefix(path: Path, over: Path) -> list[str]:
    """argv prefix running a command in a private mount namespace where ``path`` is
    bind-mounted over ``over`` (the host's ``over`` is not touched)."""
    mount = f'mount --bind {shlex.quote(str(path))} {shlex.quote(str(over))} && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, "sh"]


def rss_mb(pid: int) -> tuple[float, float, float]:
    """(RSS, PSS, USS) of ``pid`` in MB (from /proc/<pid>/smaps_rollup)."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                fields[parts[0][:-1]] = int(parts[1])
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return fields.get("Rss", 0) / 1024, fields.get("Pss", 0) / 1024, uss / 1024


def cpu_s(pid: int, *, children: bool = False, sys_only: bool = False) -> float:
    """User + system CPU seconds of ``pid`` (with ``children``: of its reaped children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    at = 13 if children else 11  # cutime, cstime | utime, stime (fields 16-17 | 14-15)
    return _seconds(fields, at, sys_only=sys_only)


def _seconds(fields: list[str], at: int, *, sys_only: bool = False) -> float:
    """User + system (or system only) seconds from the /proc stat fields after the comm,
    the user ticks at ``at``, the system ticks after them."""
    ticks = int(fields[at + 1]) if sys_only else int(fields[at]) + int(fields[at + 1])
    return ticks / os.sysconf("SC_CLK_TCK")


def host_speed_s(rounds: int = 3) -> float:
    """Seconds a fixed pure-Python loop (5 million additions) takes here, best of ``rounds``:
    how fast this (shared) machine runs Python right now, to read CPU figures by."""
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        x = 0
        for i in range(5_000_000):
            x += i
        best = min(best, time.perf_counter() - t)
    return best


def thread_cpu_s(pid: int) -> dict[str, float]:
    """User + system CPU seconds of each thread of ``pid``, summed by thread name (comm)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            stat = (task / "stat").read_text()
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            out[name] = out.get(name, 0.0) + _seconds(stat.rpartition(")")[2].split(), 11)
    return out


def kill_wait(procs: Sequence[subprocess.Popen[Any]], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``, exactly these processes (ours); reap them."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


def end_procs(procs: Sequence[subprocess.Popen[Any]], *, group: bool = False) -> None:
    """`kill_wait` these processes (with ``group``: SIGKILL their process groups first, for
    the children they forked); close our ends of their pipes."""
    for p in procs:
        if group and p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
    kill_wait(procs)
    for p in procs:
        for f in (p.stdin, p.stdout):
            if f is not None:
                f.close()
