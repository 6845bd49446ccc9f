"""Reading what the login benchmark left behind: syslog lines, agent logs, slurmd's log.

* `spans`: module time per login: pam_slurm_adopt's first to last syslog line of one sshd pid
  (its own timings at log_level=debug; other modules' lines logged under its ident are
  skipped), and pam_callerid's own timing of its exchange with the agent (`debug`: "connect
  .. send .. recv .. total N us"); each is attributed to the login
  whose wall-clock window (recorded by the job) holds it.
* `account_phases`: sshd's own view of each login's PAM account phase, the same for every
  target: from its "do_pam_account: called" line to its "Accepted" line (DEBUG1, through the
  sink), attributed to the login whose window holds it. `account_base`: what of it is not a
  module's: plain sshd's account phase, its fast mode (see there).
* `records` / `timing_marks`: the agent's decision records (journal fields on stderr, as
  there is no journald here) and its per-login timing marks (debug log).
* `psa_split` / `cid_split`: decision and adoption parts of each module time.
* `slurmd_callerid_ms`: slurmd's own REQUEST_NETWORK_CALLERID handling time (debug2).
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench._common import median, pct

_PSA = re.compile(r"^(\d+\.\d+) .*?pam_slurm_adopt\[(\d+)\]: ")
# Another module's pam_syslog line under the ident Slurm's openlog left in the sshd process
# (24.11 and 26.05 log the session's pam_unix/pam_limits lines as "pam_slurm_adopt[pid]: ").
_OTHER_MODULE = re.compile(r"pam_slurm_adopt\[\d+\]: pam_\w+\(")
_CID = re.compile(r"^(\d+\.\d+) .*?pam_callerid\(\S+\): account: .* total (\d+) us")
_FIELD = re.compile(r"(CALLERID_[A-Z_]+)=(\S+)")


def spans(lines: list[str], logins: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Module times, attributed to the login whose wall-clock window holds them: target ->
    [{ms, text}]. pam_slurm_adopt: first to last syslog line of one sshd pid; pam_callerid:
    the exchange with the agent as the module itself timed it (its `debug` line)."""
    found: list[tuple[float, float, str]] = []  # (start, ms, text)
    by_pid: dict[str, dict[str, Any]] = {}
    for line in lines:
        if (m := _PSA.match(line)) is not None and not _OTHER_MODULE.search(line):
            d = by_pid.setdefault(m[2], {"t0": float(m[1]), "t1": 0.0, "text": []})
            d["t1"] = float(m[1])
            d["text"].append(line)
        elif (m := _CID.match(line)) is not None:
            found.append((float(m[1]), int(m[2]) / 1000, line))
    for d in by_pid.values():
        found.append((d["t0"], (d["t1"] - d["t0"]) * 1000, "\n".join(d["text"])))
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for start, ms, text in sorted(found):
        for login in logins:
            if login["start"] <= start <= login["end"]:
                out[login["target"]].append({"ms": ms, "text": text, "start": login["start"]})
                break
    return out


_SSHD = re.compile(r"^(\d+\.\d+) .*?sshd-\w+?-([\w-]+)\[(\d+)\]: (.*)$")


def account_base(plain: list[float]) -> float:
    """Plain sshd's account phase (no module added), ms: its 10th percentile.

    It is bimodal here: ~0.2 ms, or ~1.0-1.4 ms in 10-60% of the rounds of a run, when sshd's
    "Accepted" line comes that much later after PAM has returned (with a module in the stack
    that line follows the module's last one within 0.12-0.2 ms, for pam_slurm_adopt and
    callerid alike). Its median would then take the slow mode, in some runs, off every
    module's time; the fast mode is the part the other targets share."""
    return pct(plain, 10)


def account_phases(
    lines: list[str], logins: list[dict[str, Any]]
) -> dict[str, list[dict[str, Any]]]:
    """target -> [{ms, start}]: each login's account phase as sshd logged it (module docstring)."""
    begun: dict[str, float] = {}  # sshd pid -> when its account phase began
    found: list[tuple[float, float, str]] = []
    for line in lines:
        m = _SSHD.match(line)
        if m is None:
            continue
        t, target, pid, text = float(m[1]), m[2], m[3], m[4]
        if "do_pam_account: called" in text:
            begun.setdefault(pid, t)
        elif text.startswith("Accepted ") and pid in begun:
            t0 = begun.pop(pid)
            found.append((t0, (t - t0) * 1000, target))
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for start, ms, target in sorted(found):
        for login in logins:
            if login["target"] == target and login["start"] <= start <= login["end"]:
                out[target].append({"ms": ms, "start": login["start"]})
                break
    return out


def records(log: Path) -> list[dict[str, str]]:
    """The agent's decision records (journal fields), in order."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if "CALLERID_DECISION=" in line:
            out.append(dict(_FIELD.findall(line)))
    return out


def slurmd_callerid_ms(log: Path) -> list[float]:
    """slurmd's REQUEST_NETWORK_CALLERID processing times (debug2 lines, 1 ms resolution)."""
    import datetime as dt

    start, out = None, []
    for line in log.read_text(errors="replace").splitlines():
        if "REQUEST_NETWORK_CALLERID" not in line or not line.startswith("["):
            continue
        t = dt.datetime.strptime(line[1:24], "%Y-%m-%dT%H:%M:%S.%f")  # noqa: DTZ007 - local log
        if "Start processing" in line:
            start = t
        elif "Finish processing" in line and start is not None:
            out.append((t - start).total_seconds() * 1000)
            start = None
    return out


def psa_split(texts: list[str]) -> dict[str, dict[str, float]]:
    """pam_slurm_adopt's span cut where `_adopt_process` starts: decision | adoption (ms)."""
    decision, adoption = [], []
    for text in texts:
        times = [(float(ln.split()[0]), ln) for ln in text.splitlines()]
        cut = next((t for t, ln in times if "_adopt_process: trying" in ln), None)
        if cut is not None:
            decision.append((cut - times[0][0]) * 1000)
            adoption.append((times[-1][0] - cut) * 1000)
    return {"decision": stats(decision), "adoption": stats(adoption)}


def cid_split(marks: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """The agent's own timing marks (debug log): decision (request -> verdict) | adoption."""
    decision = [max(v for k, v in m.items() if k != "adopt") for m in marks if "adopt" in m]
    adoption = [
        m["adopt"] - d for m, d in zip([m for m in marks if "adopt" in m], decision, strict=True)
    ]
    return {"decision": stats(decision), "adoption": stats(adoption)}


def timing_marks(log: Path) -> list[dict[str, float]]:
    """The agent's per-login timing marks ("timings (ms since request): user=.. adopt=..")."""
    return [
        {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", m)}
        for m in re.findall(r"timings \(ms since request\): (.*)", log.read_text(errors="replace"))
    ]


def bootstrap_ci(xs: list[float], base: list[float], n: int = 2000) -> tuple[float, float]:
    """90% bootstrap interval of median(xs) - median(base): how far noise alone reaches."""
    rng = random.Random(1)
    diffs = [
        median(rng.choices(xs, k=len(xs))) - median(rng.choices(base, k=len(base)))
        for _ in range(n)
    ]
    return pct(diffs, 5), pct(diffs, 95)


def paired(pairs: list[tuple[float, float]], how: str, n: int = 2000) -> dict[str, float]:
    """Median over the interleaved rounds of ours - ref (``how`` "diff", ms) or ours / ref
    ("ratio"), with its 90% bootstrap interval (rounds resampled as pairs: both sides of a
    round saw the same machine)."""
    if not pairs:
        return {"n": 0, "median": float("nan"), "lo": float("nan"), "hi": float("nan")}
    values = [a - b if how == "diff" else a / b for a, b in pairs if how == "diff" or b > 0]
    rng = random.Random(1)
    boot = [median(rng.choices(values, k=len(values))) for _ in range(n)]
    return {"n": len(values), "median": median(values), "lo": pct(boot, 5), "hi": pct(boot, 95)}


def stats(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "median": median(values),
        "p90": pct(values, 90),
        "p99": pct(values, 99),
        "max": max(values, default=float("nan")),
    }
