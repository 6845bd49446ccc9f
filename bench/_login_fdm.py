"""The login benchmark's favordynmods row (bench/login.py ``--favordynmods N``).

After the main rounds, the timing job runs again with the single-job targets only (plain, psa,
cid-slurm, cid-cgroup), while cgroup2 is mounted ``favordynmods`` (`_favordynmods`: set for
this phase, the mount's options restored after). Module time per target as row 2 judges it:
sshd's account phase (its own DEBUG1 log) over plain sshd's (`account_base`). A machine
without the option says why and has no row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench._common import median
from bench._favordynmods import Unavailable, favordynmods
from bench._login_logs import account_base, account_phases, stats

__all__ = ["FDM_TARGETS", "favordynmods_phase"]

FDM_TARGETS = ("plain", "psa", "cid-slurm", "cid-cgroup")
FDM_WARMUP = 2


def favordynmods_phase(
    run: Callable[[dict[str, Any]], dict[str, Any]],
    lines: Callable[[], list[str]],
    probe: Callable[[], float],
    spec: dict[str, Any],
    *,
    targets: list[str],
    rounds: int,
) -> dict[str, Any]:
    """``run(spec)``: the timing job's samples; ``lines()``: the syslog sink's lines so far;
    ``probe()``: one cgroup migration after an idle second, ms."""
    order = [t for t in FDM_TARGETS if t in targets]
    phase = {
        **spec,
        "order": order,
        "warmup": FDM_WARMUP,
        "rounds": rounds,
        "stalled": 0,
        "out": spec["out"].replace("phase1", "phase3"),
    }
    try:
        with favordynmods() as how:
            mark = len(lines())
            samples = run(phase)
            got = lines()[mark:]
            migration = [probe(), probe()]
    except Unavailable as exc:
        return {"skipped": str(exc)}
    acct = account_phases(got, samples["rounds"])
    base = account_base([a["ms"] for a in acct.get("plain", [])])
    ssh = {t: median([s["ms"] for s in samples["rounds"] if s["target"] == t]) for t in order}
    return {
        "how": how,
        "rounds": rounds,
        "migration_ms": migration,
        "ssh": ssh,
        "plain_account_ms": base,
        "module": {
            t: stats([a["ms"] - base for a in acct.get(t, [])]) for t in order if t != "plain"
        },
    }
