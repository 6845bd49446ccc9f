"""calleridctl subcommands that look, never touch: status, whois, explain, audit.

`whois` asks an agent the question a destination asks; `explain` runs this node's decision
for a user as a dry run (the same policy code, the real backend and mesh; nothing adopted,
nothing journaled); `audit` reads the decision records back from the journal.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import pwd
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from callerid.agent import policy
from callerid.agent.config import Config
from callerid.agent.daemon import make_backend, node_name
from callerid.bus.peers import PeerTable, local_node_name
from callerid.bus.protocol import CallerIdQuery, CallerIdReply, Endpoint
from callerid.bus.transport import KeyPair, MeshClient, QueryResult, load_keypair

__all__ = [
    "InspectError",
    "audit_args",
    "cmd_audit",
    "cmd_explain",
    "cmd_whois",
    "explain_args",
    "whois_args",
]

EXIT_NOT_FOUND = 6


class InspectError(Exception):
    """Reported on stderr with exit status 1."""


def _endpoint(text: str) -> Endpoint:
    try:
        return Endpoint.parse(text)
    except ValueError as exc:
        raise InspectError(str(exc)) from exc


def mesh_identity(cfg: Config) -> tuple[KeyPair, PeerTable]:
    """This node's keypair and the authorized peers, as every mesh-speaking command needs."""
    try:
        return load_keypair(cfg.keys.dir, local_node_name(cfg.node_name)), PeerTable.load(
            cfg.keys.authorized
        )
    except (OSError, ValueError) as exc:
        raise InspectError(str(exc)) from exc


def _ask(cfg: Config, host: str, port: int, query: CallerIdQuery) -> QueryResult:
    keypair, peers = mesh_identity(cfg)

    async def run() -> QueryResult:
        async with MeshClient(keypair, peers, cfg.peer, port=port) as client:
            return await client.query(host, query, port)

    return asyncio.run(run())


# --------------------------------------------------------------------------- status


def status_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the agent's answer as JSON")


def cmd_status(args: argparse.Namespace, cfg: Config) -> int:
    """Ask the running agent (over its root-only socket) for its state and counters."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(cfg.pam_timeout_ms / 1000)
            s.connect(str(cfg.pam_socket))
            s.sendall(b"CALLERID/1 op=status user=root service=calleridctl\n")
            line = s.makefile("rb").readline().decode("ascii", "replace").strip()
    except OSError as exc:
        msg = f"no agent answers on {cfg.pam_socket}: {exc.strerror or exc}"
        raise InspectError(msg) from exc
    fields = dict(f.split("=", 1) for f in line.split(" ")[1:] if "=" in f)
    if fields.get("reason") != "status":
        msg = f"unexpected answer from the agent: {line[:200]!r}"
        raise InspectError(msg)
    body = json.loads(unquote(fields.get("msg", ""), errors="strict"))
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    print(f"callerid-agent {body['version']} on {body['node']}, pid {body['pid']}, "
          f"up {body['uptime_s']:.0f} s, backend {body['backend']}")  # fmt: skip
    print(f"mesh: {' '.join(body['mesh'])}; {body['peers']} authorized peers, "
          f"{body['pooled']} connections open to peers")  # fmt: skip
    served, asked, pam = body["served"], body["asked"], body["pam"]
    print(f"served: {served['answered']} answered, {served['malformed']} malformed, "
          f"{served['unauthorized']} unauthorized, {served['internal_errors']} internal "
          "errors")  # fmt: skip
    print(f"asked: {asked['sockets_opened']} connections opened, "
          f"{asked['negative_cache_hits']} skipped (no agent there)")  # fmt: skip
    journald = "on" if body["journald"] else "OFF"
    print(f"PAM socket: {pam['in_flight']} in flight ({pam['waiting']} waiting their turn), "
          f"{pam['refused']} refused, {pam['malformed']} malformed, {pam['abandoned']} given "
          f"up by the client before their turn, {pam['accept_errors']} accept errors; "
          f"journald {journald}")  # fmt: skip
    return 0


# --------------------------------------------------------------------------- whois


def whois_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("proto", choices=["tcp", "udp"])
    p.add_argument("src", metavar="SRC:PORT", help="the end that opened the connection")
    p.add_argument("dst", metavar="DST:PORT", help="the end that accepted it (e.g. sshd)")
    p.add_argument("--uid", type=int, required=True, help="the user the job must belong to")
    p.add_argument("--agent", metavar="HOST[:PORT]", help="whom to ask (default: SRC's agent)")


def cmd_whois(args: argparse.Namespace, cfg: Config) -> int:
    """Ask an agent which job owns a connection (told only if it belongs to --uid).

    Exit status: 0 found, 6 not found, 2 unreachable, 3 auth_failed, 4 timeout,
    5 unknown_peer, 1 error."""
    from callerid.agent.ctl import PING_EXIT, parse_target

    src, dst = _endpoint(args.src), _endpoint(args.dst)
    host, port = parse_target(args.agent, cfg.port) if args.agent else (src.ip, cfg.port)
    query = CallerIdQuery(id=1, proto=args.proto, src=src, dst=dst, uid=args.uid)
    result = _ask(cfg, host, port, query)
    reply = result.reply
    if not isinstance(reply, CallerIdReply):
        print(f"calleridctl: whois: {result.status}: {result.detail}", file=sys.stderr)
        return PING_EXIT.get(result.status, 1)
    ms = result.elapsed_s * 1000
    if reply.status == "found":
        print(f"job {reply.job} on {reply.node} ({ms:.2f} ms)")
        return 0
    print(f"{reply.status} on {reply.node}: {reply.reason} ({ms:.2f} ms)")
    return EXIT_NOT_FOUND if reply.status == "not_found" else 1


# --------------------------------------------------------------------------- explain


def explain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("user")
    p.add_argument("--from", dest="src", metavar="IP:PORT", help="the ssh client's end")
    p.add_argument(
        "--to", dest="dst", metavar="IP:PORT", help="this node's sshd end (default: IP:22 of ours)"
    )
    p.add_argument("--proto", choices=["tcp", "udp"], default="tcp")


def cmd_explain(args: argparse.Namespace, cfg: Config) -> int:
    """Dry run: what would happen if USER logged in here now. Nothing is adopted."""
    node = node_name(cfg)
    say = print
    try:
        pw = pwd.getpwnam(args.user)
        uid: int | None = pw.pw_uid
    except KeyError:
        uid = None
    say(f"node {node}, user {args.user} (uid {uid if uid is not None else 'unknown'})")
    facts = policy.Facts(user=args.user, uid=uid)
    rng = random.Random()  # noqa: S311 - job choice, not crypto
    step = policy.decide(facts, cfg.policy, node, rng)
    if step is policy.Need.JOBS:
        backend = make_backend(cfg, Path("/proc"))
        assert uid is not None
        jobs = backend.jobs_of(uid)
        backend.close()
        listed = ", ".join(f"{j.id} (started {time.ctime(j.start_time)})" for j in jobs)
        say(f"local jobs ({cfg.backend.type} backend): {listed or 'none'}")
        facts = dataclasses.replace(facts, jobs=tuple(jobs))
        step = policy.decide(facts, cfg.policy, node, rng)
    if step is policy.Need.CALLERID:
        facts = _explain_callerid(args, cfg, facts, say)
        step = policy.decide(facts, cfg.policy, node, rng)
    assert isinstance(step, policy.Decision)
    job = f" job {step.job.id}" if step.job else ""
    say(f"decision: {step.verdict}{job} (reason {step.reason})")
    if step.user_message:
        say(f"the user would read: {step.user_message}")
    return 0


def _explain_callerid(
    args: argparse.Namespace, cfg: Config, facts: policy.Facts, say: Any
) -> policy.Facts:
    if not args.src:
        say("several jobs: the source agent would be asked; no --from given, so no answer")
        return dataclasses.replace(facts, callerid_asked=True)
    src = _endpoint(args.src)
    dst = _endpoint(args.dst) if args.dst else Endpoint(_local_ip(cfg, src), 22)
    assert facts.uid is not None
    query = CallerIdQuery(id=1, proto=args.proto, src=src, dst=dst, uid=facts.uid)
    result = _ask(cfg, src.ip, cfg.port, query)
    reply = result.reply if isinstance(result.reply, CallerIdReply) else None
    status = reply.status if reply else result.status
    job = reply.job if reply and reply.status == "found" else None
    say(f"asked the agent at {src.ip}: {status}{f' job {job}' if job else ''}")
    return dataclasses.replace(facts, callerid_asked=True, callerid_job=job, callerid_status=status)


def _local_ip(cfg: Config, src: Endpoint) -> str:
    family = socket.AF_INET6 if src.family == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((src.ip, 9))  # no packet is sent: only the route is looked up
        return str(s.getsockname()[0])


# --------------------------------------------------------------------------- audit


def audit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--decision", choices=["adopt", "allow", "deny", "error"])
    p.add_argument("--user")
    p.add_argument("--job")
    p.add_argument("--since", help="passed to journalctl --since (e.g. '1 hour ago')")
    p.add_argument("--json", action="store_true", help="one JSON record per line")


def cmd_audit(args: argparse.Namespace, cfg: Config) -> int:
    """List decision records from the journal (journalctl with CALLERID_* matches)."""
    if shutil.which("journalctl") is None:
        msg = "journalctl is not installed"
        raise InspectError(msg)
    argv = ["journalctl", "--no-pager", "-o", "json", "SYSLOG_IDENTIFIER=callerid-agent"]
    for field, value in (
        ("CALLERID_DECISION", args.decision),
        ("CALLERID_USER", args.user),
        ("CALLERID_JOB_ID", args.job),
    ):
        if value:
            argv.append(f"{field}={value}")
    if args.since:
        argv += ["--since", args.since]
    out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    if out.returncode != 0:
        raise InspectError(out.stderr.strip() or "journalctl failed")
    for line in out.stdout.splitlines():
        rec = json.loads(line)
        if "CALLERID_DECISION" not in rec:
            continue
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
        )
    return 0
