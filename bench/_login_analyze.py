"""The login benchmark's statistics (bench/login.py): what its samples, sshd's syslog lines
and the agents' records say, per target."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from bench._common import median, pct
from bench._login_logs import (
    account_base,
    account_phases,
    bootstrap_ci,
    cid_split,
    paired,
    psa_split,
    spans,
    stats,
)

__all__ = ["analyze"]

PAIRS = (  # (ours, the reference it is compared with round by round)
    ("cid-slurm", "psa"),
    ("cid-cgroup", "psa"),
    ("cid-slurm-rpc", "psa-rpc"),
    ("cid-cgroup-rpc", "psa-rpc"),
)


def analyze(
    samples: dict[str, Any],
    lines: list[str],
    recs: dict[str, list[dict[str, str]]],
    *,
    slurmd: list[float],
    rounds: int,
    timings: dict[str, list[dict[str, float]]],
    targets: list[str],
    agent_of: dict[str, str | None],
    warmup: int,
) -> dict[str, Any]:
    """The login benchmark's statistics from its samples, syslog lines and agent records:
    ssh login time per target, module time, the agent's latency, errors, the stalled phase.
    ``agent_of`` names the agent serving each target (None: a pam_slurm_adopt target)."""

    by_target: dict[str, list[float]] = defaultdict(list)
    for login in samples["rounds"]:
        by_target[login["target"]].append(login["ms"])
    st: dict[str, Any] = {"ssh": {}, "module": {}, "agent": {}, "errors": {}, "rounds": rounds}
    for name, ms in by_target.items():
        st["ssh"][name] = {
            "n": len(ms),
            "median": median(ms),
            "p90": pct(ms, 90),
            "ci90": bootstrap_ci(ms, by_target["plain"]),
        }
    measured = spans(lines, samples["rounds"])
    st["split"] = {}
    for name, want in (("psa", "adopted into job"), ("psa-rpc", "member of job")):
        got = measured.get(name, [])
        st["module"][name] = stats([s["ms"] for s in got])
        st["errors"][name] = rounds - sum(1 for s in got if want in s["text"])
        st["split"][name] = psa_split([s["text"] for s in got])
    for name in targets:
        agent = agent_of[name]
        if agent is None:
            continue
        st["module"][name] = stats([s["ms"] for s in measured.get(name, [])])
        rs = recs[agent][warmup : warmup + rounds]
        want = "callerid" if agent.endswith("rpc") else "single_job"
        st["agent"][name] = stats([int(r["CALLERID_LATENCY_US"]) / 1000 for r in rs])
        st["split"][name] = cid_split(timings[agent][warmup : warmup + rounds])
        st["errors"][name] = rounds - sum(
            1
            for r in rs
            if (r.get("CALLERID_DECISION"), r.get("CALLERID_REASON")) == ("adopt", want)
        )
    st["paired"] = _paired(samples, measured, recs, agent_of=agent_of, warmup=warmup, rounds=rounds)
    acct = account_phases(lines, samples["rounds"])
    st["account"] = {t: stats([a["ms"] for a in acct.get(t, [])]) for t in by_target}
    base = st["account_base"] = account_base([a["ms"] for a in acct.get("plain", [])])
    for ours, p in st["paired"].items():
        mine = {a["start"]: a["ms"] - base for a in acct.get(ours, [])}
        theirs = {a["start"]: a["ms"] - base for a in acct.get(p["ref"], [])}
        p["account_ratio"] = paired(_by_round(samples, ours, p["ref"], mine, theirs), "ratio")
    st["slurmd_callerid"] = stats(slurmd)
    if samples.get("stalled"):
        stalled: dict[str, list[float]] = defaultdict(list)
        for login in samples["stalled"]:
            stalled[login["target"]].append(login["ms"])
        st["stalled"] = {n: stats(v) for n, v in stalled.items()}
        sp = spans(lines, samples["stalled"]).get("psa-rpc", [])
        st["stalled"]["psa-rpc module"] = stats([s["ms"] for s in sp])
        rs = recs["dslurmrpc"][warmup + rounds :]
        st["stalled"]["cid agent"] = stats([int(r["CALLERID_LATENCY_US"]) / 1000 for r in rs])
        st["stalled"]["cid peer status"] = [r.get("CALLERID_PEER_STATUS") for r in rs]
        st["stalled"]["psa text"] = sp[0]["text"] if sp else ""
    return st


def _paired(
    samples: dict[str, Any],
    measured: dict[str, list[dict[str, Any]]],
    recs: dict[str, list[dict[str, str]]],
    *,
    agent_of: dict[str, str | None],
    warmup: int,
    rounds: int,
) -> dict[str, Any]:
    """Ours against the reference round by round: the ssh login's wall time (difference, ms)
    and the module time (ratio: the agent's record against pam_slurm_adopt's span)."""
    wall: dict[str, list[float]] = defaultdict(list)
    round_of: dict[tuple[str, float], int] = {}
    for login in samples["rounds"]:
        round_of[login["target"], login["start"]] = len(wall[login["target"]])
        wall[login["target"]].append(login["ms"])
    out: dict[str, Any] = {}
    for ours, ref in PAIRS:
        agent = agent_of.get(ours)
        if ours not in wall or ref not in wall or agent is None:
            continue
        mine = [int(r["CALLERID_LATENCY_US"]) / 1000 for r in recs[agent][warmup : warmup + rounds]]
        theirs = {round_of[ref, s["start"]]: s["ms"] for s in measured.get(ref, [])}
        out[ours] = {
            "ref": ref,
            "wall_diff": paired(list(zip(wall[ours], wall[ref], strict=False)), "diff"),
            "module_ratio": paired(
                [(m, theirs[k]) for k, m in enumerate(mine) if k in theirs], "ratio"
            ),
        }
    return out


def _by_round(
    samples: dict[str, Any],
    ours: str,
    ref: str,
    mine: dict[float, float],
    theirs: dict[float, float],
) -> list[tuple[float, float]]:
    """(ours, ref) per interleaved round, from values keyed by each login's start."""
    a = [mine[s["start"]] for s in samples["rounds"] if s["target"] == ours and s["start"] in mine]
    b = [
        theirs[s["start"]] for s in samples["rounds"] if s["target"] == ref and s["start"] in theirs
    ]
    return list(zip(a, b, strict=False))
