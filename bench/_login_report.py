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

TARGET_ADDED_MS = 2.0
TARGET_MODULE_RATIO = 10.0
PEER_TIMEOUT_MS = 500.0
LOGIN_ROWS = (
    ("1a", "cid-slurm", "psa"),
    ("1b", "cid-slurm-rpc", "psa-rpc"),
    ("1c", "cid-cgroup", "psa"),
    ("1d", "cid-cgroup-rpc", "psa-rpc"),
)
MODULE_ROWS = (
    ("2a", "cid-slurm", "psa"),
    ("2b", "cid-slurm-rpc", "psa-rpc"),
    ("2c", "cid-cgroup-rpc", "psa-rpc"),
)


FIRST_RELEASE = "22.05"  # the labels without a release suffix


def report_rows(args: argparse.Namespace, st: dict[str, Any]) -> list[Row]:
    opts = ["--rounds", str(args.rounds), "--stalled", str(args.stalled)]
    if args.release != FIRST_RELEASE:
        opts += ["--release", args.release]
    if args.targets:
        opts += ["--targets", ",".join(st["targets"])]
    cmd = reproduce("login", opts)
    rows = login_rows(st, cmd) + module_rows(st, cmd)
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
        if ours not in ssh:
            continue
        clear = ssh[ours]["ci90"][0] > 0 and ssh[ref]["ci90"][0] > 0
        rows.append(
            Row(
                row=label,
                what=f"ssh login from a job, added latency, {_path(ours, ref)} ({plain})",
                n=str(st["rounds"]),
                ours=text(ours),
                reference=text(ref),
                ratio=ratio_text(added(ours), added(ref)) if clear else "n/a (within noise)",
                target=f"added <= {TARGET_ADDED_MS:g} ms (module time)",
                met=met(st["module"][ours]["median"] <= TARGET_ADDED_MS),
                reproduce=cmd,
                notes=[f"errors: ours {st['errors'][ours]}, ref {st['errors'][ref]}"],
            )
        )
    return rows


def module_rows(st: dict[str, Any], cmd: str) -> list[Row]:
    """Row 2: time inside the module path, total and split into decision and adoption."""
    rows = []
    for label, ours, ref in MODULE_ROWS:
        if ours not in st["agent"]:
            continue
        a, mod, r = st["agent"][ours], st["module"][ours], st["module"][ref]
        so, sr = st["split"][ours]["decision"], st["split"][ref]["decision"]
        ao, ar = st["split"][ours]["adoption"], st["split"][ref]["adoption"]
        rows.append(
            Row(
                row=label,
                what=f"module time, {_path(ours, ref)}: agent record (module's own timing)",
                n=str(st["rounds"]),
                ours=(
                    f"p50 {ms(a['median'])} / p90 {ms(a['p90'])} ms ({ms(mod['median'])}); "
                    f"decision {ms(so['median'])} + adoption {ms(ao['median'])}"
                ),
                reference=(
                    f"p50 {ms(r['median'])} / p90 {ms(r['p90'])} ms; decision "
                    f"{ms(sr['median'])} + adoption {ms(ar['median'])}"
                ),
                ratio=ratio_text(a["median"], r["median"]),
                target=f">= {TARGET_MODULE_RATIO:g}x less",
                met=met(r["median"] / a["median"] >= TARGET_MODULE_RATIO if a["median"] else None),
                reproduce=cmd,
                notes=[
                    f"decision alone: {ratio_text(so['median'], sr['median'])}; one cgroup "
                    f"migration after 1 s idle: {st['migration_ms']} ms"
                ],
            )
        )
    return rows


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
