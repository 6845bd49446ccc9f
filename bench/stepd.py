"""The extern slurmstepd's own answer to an adoption, after idle: what no agent can take away.

Both callerid's slurm backend and pam_slurm_adopt adopt through the job's extern stepd: one
connection per adoption, the handshake, STATE and ADD_EXTERN_PID (the stepd moves the pid into
the step's cgroups, adds it to its accounting and starts a thread to wait for it). This times
that exchange alone, from a minimal client, one adoption of a fresh ``sleep`` process per
round after ``--idle`` seconds (a lone login's case), beside the same requests on a connection
kept open from round to round, and STATE alone both ways (the exchange without the adoption):

- ``fresh``: connect, handshake, STATE, ADD_EXTERN_PID: what an adoption sends (callerid's
  with the step's owner remembered; pam_slurm_adopt's likewise, and more before it);
- ``kept open``: STATE and ADD_EXTERN_PID on one connection opened before the first round.

A kept-open connection is not something an agent may do: a stepd waits for its open message
connections before it exits (up to STEPD_MESSAGE_COMP_WAIT, 3 s, in req.c), so every job's end
would wait for the agent's. It is measured to show what the connection itself costs.

A real Slurm (tests/support/slurm.py), a job of root's with the extern step; cgroup2 mounted
``favordynmods`` for the run (as row 2f; restored after) unless ``--no-favordynmods``.

Reproduce (root, from the repo top):
    .venv/bin/python -m bench.stepd [--rounds 15] [--idle 1.0] [--release 22.05]
"""

from __future__ import annotations

import argparse
import contextlib
import selectors
import subprocess
import sys
import time
from pathlib import Path

from bench._common import median, need_root, pct, reproduce
from bench._favordynmods import Unavailable, favordynmods
from callerid.agent.backends import stepd
from callerid.agent.backends._stepd_io import StepdConnection, drive
from tests.support.poll import wait_for
from tests.support.slurm import LocalSlurm
from tests.support.slurm_release import RELEASES, prepare

CLOCK = time.monotonic
# (name, with ADD_EXTERN_PID, on a connection kept open)
VARIANTS = (
    ("STATE, fresh", False, False),
    ("STATE, kept open", False, True),
    ("adoption, fresh", True, False),
    ("adoption, kept open", True, True),
)


def _exchange(conn: StepdConnection, pid: int | None) -> None:
    """STATE (and ADD_EXTERN_PID of ``pid``) on ``conn``, to the replies; raises if refused."""
    state = conn.queue(stepd.state())
    added = conn.queue(stepd.add_extern_pid(pid)) if pid is not None else None
    conn.on_ready(selectors.EVENT_WRITE)  # sent now
    drive([conn], CLOCK() + 5, CLOCK)
    if conn.error is not None or not state.done or (added is not None and added.value != 0):
        msg = f"the stepd did not answer as expected: {conn.error or 'refused'}"
        raise RuntimeError(msg)


def _greeted(sock: Path) -> StepdConnection:
    conn = StepdConnection(sock)
    conn.queue(stepd.hello())
    return conn


def _round(sock: Path, kept: StepdConnection | None, adopt: bool, idle: float) -> float:
    """One timed exchange (ms) after ``idle`` s, of a fresh ``sleep`` when ``adopt``."""
    child = subprocess.Popen(["sleep", "1000"]) if adopt else None
    try:
        time.sleep(idle)  # the pause is what is measured after, not a synchronisation
        t0 = time.perf_counter()
        conn = kept if kept is not None else _greeted(sock)
        try:
            _exchange(conn, child.pid if child is not None else None)
        finally:
            if kept is None:
                conn.close()
        return (time.perf_counter() - t0) * 1e3
    finally:
        if child is not None:
            child.kill()
            child.wait()


def _variant(sock: Path, adopt: bool, keep: bool, args: argparse.Namespace) -> list[float]:
    kept = None
    if keep:
        kept = _greeted(sock)
        _exchange(kept, None)  # the handshake answered before the first timed round
    try:
        return [_round(sock, kept, adopt, args.idle) for _ in range(args.rounds)]
    finally:
        if kept is not None:
            kept.close()


def _measure(sock: Path, args: argparse.Namespace) -> dict[str, list[float]]:
    got: dict[str, list[float]] = {name: [] for name, _adopt, _keep in VARIANTS}
    for _ in range(2):  # two passes, interleaved, so a slow spell of the host hits all alike
        for name, adopt, keep in VARIANTS:
            got[name] += _variant(sock, adopt, keep, args)
    return got


def main() -> int:
    args = _args()
    need_root()
    release = RELEASES[args.release]
    prepare(release)
    with LocalSlurm(release) as slurm:
        job = slurm.submit("root", wrap="sleep 3600")
        slurm.wait_running(job)
        sock = slurm.extern_socket(job)
        wait_for(sock.exists, timeout=30, what="the job's extern stepd socket")
        fdm: contextlib.AbstractContextManager[str] = contextlib.nullcontext("favordynmods not set")
        if args.favordynmods:
            fdm = favordynmods()
        try:
            with fdm as how:
                got = _measure(sock, args)
        except Unavailable as exc:
            sys.exit(f"favordynmods: {exc} (or run with --no-favordynmods)")
        finally:
            slurm.cancel(job)
    _report(got, release.version, how, args)
    return 0


def _report(got: dict[str, list[float]], version: str, how: str, args: argparse.Namespace) -> None:
    def p50(variant: str) -> float:
        return median(got[variant])

    n, idle = 2 * args.rounds, args.idle
    print(f"Slurm {version} extern stepd, {n} rounds each after {idle} s idle ({how}):")
    for name, times in got.items():
        print(f"  {name:20} p50 {median(times):.3f}  p90 {pct(times, 90):.3f}  "
              f"min {min(times):.3f} ms")  # fmt: skip
    print(f"  the connection's own cost (STATE fresh - kept open): "
          f"{p50('STATE, fresh') - p50('STATE, kept open'):.3f} ms")  # fmt: skip
    print(f"  ADD_EXTERN_PID's own cost (adoption - STATE, fresh): "
          f"{p50('adoption, fresh') - p50('STATE, fresh'):.3f} ms")  # fmt: skip
    print("reproduce:", reproduce("stepd", sys.argv[1:]))


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=15, help="rounds per variant and pass")
    parser.add_argument("--idle", type=float, default=1.0, help="seconds idle before each")
    parser.add_argument("--release", choices=list(RELEASES), default="22.05")
    parser.add_argument("--no-favordynmods", dest="favordynmods", action="store_false")
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(main())
