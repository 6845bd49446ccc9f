"""The login benchmark's report: its rows of the `make bench` table and its own printout.

Row 1: the ssh login's added wall time over plain sshd, with a 90% bootstrap interval (the
noise of a ~220 ms login on a shared 2-core VM is several ms; the module's own time is the
precise figure of what a stack adds, and the target is judged on it). Row 2: time inside the
module path, split into decision and adoption. Row 5: logins while the source stalls.

Each run is one Slurm release, against that release's own pam_slurm_adopt and slurmd. Rows of
22.05 (the first reference) keep their plain labels ("1a"); those of another release carry it
("1a (26.05)"), and every row's text names the release and, where a run used fewer rounds or
targets than the 22.05 run, says so.
"""

from __future__ import annotations

import argparse
from typing import Any

from bench._common import Row, met, ms, ratio_text, reproduce

TARGET_DECISION_RATIO = 2.0  # the decision part: at most 2x pam_slurm_adopt's
TARGET_FDM_MS = 1.0  # module time with favordynmods on
PEER_TIMEOUT_MS = 500.0
LOGIN_ROWS = (
    ("1a", "cid-slurm", "psa"),
    ("1b", "cid-slurm-rpc", "psa-rpc"),
    ("1c", "cid-cgroup", "psa"),
    ("1d", "cid-cgroup-rpc", "psa-rpc"),
)
MODULE_ROWS = (
    ("2a", "cid-slurm", "psa"),
    ("2e", "cid-cgroup", "psa"),
    ("2b", "cid-slurm-rpc", "psa-rpc"),
    ("2c", "cid-cgroup-rpc", "psa-rpc"),
)


def verdict(p: dict[str, float], at_most: float) -> str:
    """Met when the paired median is at most ``at_most``; "within noise" when it is above but
    its 90% interval reaches it; NO when the whole interval is above."""
    if p["n"] == 0:
        return "-"
    if p["median"] <= at_most:
        return "yes"
    return "within noise" if p["lo"] <= at_most else "NO"


FIRST_RELEASE = "22.05"  # the labels without a release suffix


def report_rows(args: argparse.Namespace, st: dict[str, Any]) -> list[Row]:
    opts = ["--rounds", str(args.rounds), "--stalled", str(args.stalled)]
    if args.release != FIRST_RELEASE:
        opts += ["--release", args.release]
    if args.targets:
        opts += ["--targets", ",".join(st["targets"])]
    if args.favordynmods:
        opts += ["--favordynmods", str(args.favordynmods)]
    cmd = reproduce("login", opts)
    rows = login_rows(st, cmd) + module_rows(st, cmd) + fdm_rows(st, cmd)
    if "stalled" in st:
        rows.append(stalled_row(st, cmd))
    release = st["release"]["name"]
    for row in rows:
        if release != FIRST_RELEASE:
            row.row = f"{row.row} ({release})"
        row.what = f"Slurm {st['release']['version']}: {row.what}"
        row.notes.append(f"pam_slurm_adopt: {st['psa_module']} {st['psa_options']}".strip())
    return rows


def _path(ours: str, ref: str) -> str:
    path = "RPC path" if ref == "psa-rpc" else "single-job path"
    return f"{path}, {'slurm' if 'slurm' in ours else 'cgroup'} backend"


def login_rows(st: dict[str, Any], cmd: str) -> list[Row]:
    """Row 1: the ssh login's wall time over plain sshd (with its noise), and the module time."""
    ssh, base = st["ssh"], st["ssh"]["plain"]
    plain = f"plain sshd {ms(base['median'])} / p90 {ms(base['p90'])} ms"

    def added(name: str) -> float:
        return float(ssh[name]["median"] - base["median"])

    def text(name: str) -> str:
        lo, hi = ssh[name]["ci90"]
        return (
            f"{added(name):+.1f} ms [90% CI {lo:+.0f}..{hi:+.0f}] (median "
            f"{ms(ssh[name]['median'])}, p90 {ms(ssh[name]['p90'])}); module "
            f"{ms(st['module'][name]['median'])} ms"
        )

    rows = []
    for label, ours, ref in LOGIN_ROWS:
        if ours not in ssh or ours not in st["paired"]:
            continue
        d = st["paired"][ours]["wall_diff"]
        rows.append(
            Row(
                row=label,
                what=f"ssh login from a job, added latency, {_path(ours, ref)} ({plain})",
                n=str(st["rounds"]),
                ours=text(ours),
                reference=text(ref),
                ratio=f"ours - ref, paired by round: {d['median']:+.1f} ms [90% CI "
                f"{d['lo']:+.1f}..{d['hi']:+.1f}]",
                target="added <= pam_slurm_adopt's (paired difference <= 0)",
                met=verdict(d, 0.0),
                reproduce=cmd,
                notes=[f"errors: ours {st['errors'][ours]}, ref {st['errors'][ref]}"],
            )
        )
    return rows


def module_rows(st: dict[str, Any], cmd: str) -> list[Row]:
    """Row 2: time inside the module path. Judged on sshd's own log (the account phase over
    plain sshd's, the same instrument for both); the decision part is that less the adoption
    part (callerid: the agent's marks; pam_slurm_adopt: its span from _adopt_process on)."""
    rows = []
    base = st["account_base"]
    for label, ours, ref in MODULE_ROWS:
        if ours not in st["agent"] or ours not in st["paired"]:
            continue
        a, r = st["agent"][ours], st["module"][ref]
        ao, ar = st["split"][ours]["adoption"]["median"], st["split"][ref]["adoption"]["median"]
        acc_o = st["account"][ours]["median"] - base
        acc_r = st["account"][ref]["median"] - base
        dec_o, dec_r = acc_o - ao, acc_r - ar
        p = st["paired"][ours]["account_ratio"]
        dec = dec_o / dec_r if dec_r > 0 else float("nan")
        rows.append(
            Row(
                row=label,
                what=f"module time, {_path(ours, ref)}: sshd's account phase over plain sshd's "
                f"(its fast mode, {ms(base)} ms), from sshd's own log",
                n=str(st["rounds"]),
                ours=f"{ms(acc_o)} ms: decision {ms(dec_o)} + adoption {ms(ao)} (agent record "
                f"p50 {ms(a['median'])} / p90 {ms(a['p90'])})",
                reference=f"{ms(acc_r)} ms: decision {ms(dec_r)} + adoption {ms(ar)} (its log "
                f"span p50 {ms(r['median'])} / p90 {ms(r['p90'])})",
                ratio=f"{p['median']:.2f}x, paired by round [90% CI {p['lo']:.2f}..{p['hi']:.2f}]"
                f"; decision {dec:.2f}x",
                target=f"module <= 1.0x the reference's; decision <= {TARGET_DECISION_RATIO:g}x",
                met=f"module {verdict(p, 1.0)}, decision {met(dec <= TARGET_DECISION_RATIO)}",
                reproduce=cmd,
                notes=[
                    f"agent record against pam_slurm_adopt's log span: "
                    f"{ratio_text(a['median'], r['median'])}; one cgroup migration after 1 s "
                    f"idle: {st['migration_ms']} ms"
                ],
            )
        )
    return rows


def fdm_rows(st: dict[str, Any], cmd: str) -> list[Row]:
    """Row 2f: module time on the single-job path with cgroup2 mounted favordynmods."""
    f = st.get("favordynmods")
    if not f or "skipped" in f:
        return []
    mod = f["module"]
    ours = {t: mod[t]["median"] for t in ("cid-slurm", "cid-cgroup") if t in mod}
    ref = mod["psa"]["median"]
    text = " / ".join(f"{t.split('-')[1]} backend p50 {ms(v)} ms" for t, v in ours.items())
    return [
        Row(
            row="2f",
            what=f"module time, single-job path, {f['how']}: sshd's account phase over plain "
            f"sshd's (its fast mode, {ms(f['plain_account_ms'])} ms)",
            n=str(f["rounds"]),
            ours=text,
            reference=f"p50 {ms(ref)} / p90 {ms(mod['psa']['p90'])} ms",
            ratio="; ".join(f"{t.split('-')[1]} {ratio_text(v, ref)}" for t, v in ours.items()),
            target=f"ours <= {TARGET_FDM_MS:g} ms",
            met=", ".join(f"{t.split('-')[1]} {met(v <= TARGET_FDM_MS)}" for t, v in ours.items()),
            reproduce=cmd,
            notes=[f"one cgroup migration after 1 s idle, favordynmods on: {f['migration_ms']} ms"],
        )
    ]


def stalled_row(st: dict[str, Any], cmd: str) -> Row:
    """Row 5: logins while the source does not answer (slurmd / source agent SIGSTOPped)."""
    s = st["stalled"]
    ours, ref, agent = s["cid-slurm-rpc"], s["psa-rpc"], s["cid agent"]
    return Row(
        row="5",
        what="stalled source (SIGSTOP: slurmd / source agent), ssh login time",
        n=str(ours["n"]),
        ours=f"login {ms(ours['median'])} ms, in agent {ms(agent['median'])} ms",
        reference=(
            f"login {ms(ref['median'])} ms, module {ms(s['psa-rpc module']['median'])}"
            " ms (MessageTimeout=10 s)"
        ),
        ratio=ratio_text(ours["median"], ref["median"]),
        target=f"bounded by peer.timeout_ms ({PEER_TIMEOUT_MS:.0f} ms)",
        met=met(agent["max"] <= PEER_TIMEOUT_MS + 100),
        reproduce=cmd,
        notes=[f"peer status {s['cid peer status']}"],
    )


def print_report(
    st: dict[str, Any], targets: dict[str, Any], stalled: tuple[str, ...], warmup: int
) -> None:
    print(
        f"ssh login from inside a Slurm job, {st['rounds']} interleaved rounds "
        f"(+{warmup} warm-up), wall time of `ssh -p PORT <sshd> true`, ms:"
    )
    base = st["ssh"]["plain"]["median"]
    for name, s in st["ssh"].items():
        lo, hi = s["ci90"]
        print(
            f"  {name:15} median {ms(s['median']):>6}  p90 {ms(s['p90']):>6}  added "
            f"{s['median'] - base:+6.1f} [90% CI {lo:+5.1f}..{hi:+5.1f}]  errors "
            f"{st['errors'].get(name, 0)}"
        )
    print("module time, ms (psa: first..last pam_slurm_adopt syslog line at log_level=debug;")
    print("  callerid: agent CALLERID_LATENCY_US | pam_callerid first..last syslog line):")
    for name in targets:
        if name in st["module"]:
            m, a = st["module"][name], st["agent"].get(name)
            extra = (
                f"  agent p50 {ms(a['median'])} p90 {ms(a['p90'])} p99 {ms(a['p99'])}" if a else ""
            )
            print(f"  {name:15} span p50 {ms(m['median']):>6} p90 {ms(m['p90']):>6}{extra}")
    print("  decision | adoption medians (psa: its span cut at _adopt_process; callerid: the")
    print("  agent's timing marks):")
    for name, sp in st["split"].items():
        print(
            f"  {name:15} decision {ms(sp['decision']['median']):>6}  adoption "
            f"{ms(sp['adoption']['median']):>6}"
        )
    print(f"  one cgroup migration after 1 s idle (probe): {st['migration_ms']} ms")
    sd = st["slurmd_callerid"]
    print(
        f"  slurmd REQUEST_NETWORK_CALLERID: n={sd['n']} p50 {ms(sd['median'])} ms "
        f"max {ms(sd['max'])} ms (1 ms log resolution)"
    )
    base = st["account_base"]
    print(
        f"sshd's account phase (do_pam_account .. Accepted, its DEBUG1 log), ms (plain's fast "
        f"mode {base:.2f}):"
    )
    for name, acc in st["account"].items():
        print(
            f"  {name:15} p50 {ms(acc['median']):>6} p90 {ms(acc['p90']):>6}  added "
            f"{acc['median'] - base:+.2f}"
        )
    print("ours against pam_slurm_adopt, paired by round (median, 90% bootstrap interval):")
    for ours, p in st["paired"].items():
        d, r, c = p["wall_diff"], p["module_ratio"], p["account_ratio"]
        print(
            f"  {ours:15} vs {p['ref']:8} login {d['median']:+6.1f} ms [{d['lo']:+.1f}.."
            f"{d['hi']:+.1f}]  account phase {c['median']:.2f}x [{c['lo']:.2f}..{c['hi']:.2f}]"
            f"  agent record / psa span {r['median']:.2f}x [{r['lo']:.2f}..{r['hi']:.2f}]"
        )
    f = st.get("favordynmods")
    if f and "skipped" in f:
        print(f"favordynmods phase: not measured: {f['skipped']}")
    elif f:
        print(f"favordynmods phase ({f['how']}), {f['rounds']} rounds, module time p50 / p90 ms:")
        for name, m in f["module"].items():
            print(f"  {name:15} {ms(m['median']):>6} / {ms(m['p90']):>6}")
        print(f"  one cgroup migration after 1 s idle: {f['migration_ms']} ms")
    if "stalled" in st:
        s = st["stalled"]
        print("stalled source (slurmd and the source agent SIGSTOPped):")
        for name in stalled:
            print(f"  {name:15} login median {ms(s[name]['median'])} max {ms(s[name]['max'])} ms")
        print(
            f"  psa-rpc module span median {ms(s['psa-rpc module']['median'])} ms; callerid "
            f"agent median {ms(s['cid agent']['median'])} ms, peer status "
            f"{s['cid peer status']}"
        )
