"""calleridctl commands that read what the agent did: status (its counters, over its
root-only socket) and audit (its decision records, from the journal)."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from collections import Counter
from urllib.parse import unquote

from callerid.agent.config import Config
from callerid.agent.ctl._common import CtlError, agent_line

__all__ = ["audit_args", "cmd_audit", "cmd_status", "status_args"]


def status_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the agent's answer as JSON")


def cmd_status(args: argparse.Namespace, cfg: Config) -> int:
    """Ask the running agent (over its root-only socket) for its state and counters."""
    try:
        line = agent_line(cfg, b"CALLERID/1 op=status user=root service=calleridctl\n")
    except OSError as exc:
        msg = f"no agent answers on {cfg.pam_socket}: {exc.strerror or exc}"
        raise CtlError(msg) from exc
    fields = dict(f.split("=", 1) for f in line.split(" ")[1:] if "=" in f)
    if fields.get("reason") != "status":
        msg = f"unexpected answer from the agent: {line[:200]!r}"
        raise CtlError(msg)
    body = json.loads(unquote(fields.get("msg", ""), errors="strict"))
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    print(f"callerid-agent {body['version']} on {body['node']}, pid {body['pid']}, "
          f"up {body['uptime_s']:.0f} s, backend {body['backend']}, "
          f"scheduling {body.get('scheduling', '?')}")  # fmt: skip
    print(f"mesh: {' '.join(body['mesh'])}; {body['peers']} authorized peers, "
          f"{body['pooled']} connections open to peers")  # fmt: skip
    served, asked, pam = body["served"], body["asked"], body["pam"]
    print(f"served: {served['answered']} answered, {served['malformed']} malformed, "
          f"{served['unauthorized']} unauthorized, {served['internal_errors']} internal "
          "errors")  # fmt: skip
    print(f"refused handshakes: {served.get('refused_handshakes', 0)} (unknown keys), "
          f"{served.get('refusals_not_logged', 0)} of them not logged one by one")  # fmt: skip
    print(f"asked: {asked['sockets_opened']} connections opened, "
          f"{asked['negative_cache_hits']} skipped (no agent there), "
          f"{asked.get('stalled_fast_fails', 0)} answered at once (a silent peer)")  # fmt: skip
    journald = "on" if body["journald"] else "OFF"
    journald += f", {body.get('journal_lost', 0)} records lost"
    print(f"PAM socket: {pam['in_flight']} in flight ({pam['waiting']} waiting their turn), "
          f"{pam['refused']} refused, {pam['malformed']} malformed, {pam['abandoned']} given "
          f"up by the client before their turn, {pam['accept_errors']} accept errors; "
          f"journald {journald}")  # fmt: skip
    return 0


def audit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--decision", choices=["adopt", "allow", "deny", "error"])
    p.add_argument("--user")
    p.add_argument("--job")
    p.add_argument("--since", help="passed to journalctl --since (e.g. '1 hour ago')")
    p.add_argument("--json", action="store_true", help="one JSON record per line")
    p.add_argument(
        "--would-deny",
        action="store_true",
        help="only the logins audit mode let through (what enforce mode would deny)",
    )
    p.add_argument(
        "--summary",
        action="store_true",
        help="counts instead of records: decisions, and the would-be denials by reason, "
        "node and user",
    )


def cmd_audit(args: argparse.Namespace, cfg: Config) -> int:
    """List decision records from the journal (journalctl with CALLERID_* matches)."""
    if shutil.which("journalctl") is None:
        msg = "journalctl is not installed"
        raise CtlError(msg)
    argv = ["journalctl", "--no-pager", "-o", "json", "SYSLOG_IDENTIFIER=callerid-agent"]
    for field, value in (
        ("CALLERID_DECISION", args.decision),
        ("CALLERID_USER", args.user),
        ("CALLERID_JOB_ID", args.job),
        ("CALLERID_REASON", "audit" if args.would_deny else None),
    ):
        if value:
            argv.append(f"{field}={value}")
    if args.since:
        argv += ["--since", args.since]
    out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    if out.returncode != 0:
        raise CtlError(out.stderr.strip() or "journalctl failed")
    records = [r for r in map(json.loads, out.stdout.splitlines()) if "CALLERID_DECISION" in r]
    if args.summary:
        _summary(records)
        return 0
    for rec in records:
        if args.json:
            print(
                json.dumps({k: v for k, v in rec.items() if k.startswith(("CALLERID_", "MESSAGE"))})
            )
            continue
        when = time.strftime(
            "%Y-%m-%d %H:%M:%S", time.localtime(int(rec["__REALTIME_TIMESTAMP"]) / 1e6)
        )
        print(
            f"{when} {rec.get('CALLERID_NODE', '-')} {rec['CALLERID_DECISION']:6} "
            f"{rec.get('CALLERID_REASON', '-'):16} {rec.get('CALLERID_USER', '-')} "
            f"job={rec.get('CALLERID_JOB_ID', '-')} src={rec.get('CALLERID_SRC', '-')} "
            f"peer={rec.get('CALLERID_PEER_STATUS', '-')} {rec.get('CALLERID_LATENCY_US', '?')}us"
            + (f" would={rec['CALLERID_WOULD_DECISION']}:{rec.get('CALLERID_WOULD_REASON', '-')}"
               if "CALLERID_WOULD_DECISION" in rec else "")
        )  # fmt: skip
    return 0


def _summary(records: list[dict[str, str]]) -> None:
    """Decisions by kind, then what audit mode let through, by would-be reason, node, user."""
    decisions = Counter(r["CALLERID_DECISION"] for r in records)
    print(f"{len(records)} decisions: " + ", ".join(f"{n} {d}" for d, n in decisions.most_common()))
    would = [r for r in records if r.get("CALLERID_REASON") == "audit"]
    if not would:
        print("no login was let through by audit mode (none that enforce would deny)")
        return
    print(f"{len(would)} logins enforce mode would deny (let through by audit mode):")
    for title, key in (
        ("by reason", "CALLERID_WOULD_REASON"),
        ("by node", "CALLERID_NODE"),
        ("by user", "CALLERID_USER"),
    ):
        counts = Counter(r.get(key, "-") for r in would)
        listed = ", ".join(f"{v} {n}" for v, n in counts.most_common(20))
        more = f" (+{len(counts) - 20} more)" if len(counts) > 20 else ""
        print(f"  {title}: {listed}{more}")
