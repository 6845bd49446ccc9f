"""`calleridctl doctor`: check a node's set-up and say what to fix.

Each check prints one line, `ok`, `warn` or `FAIL`, with the thing checked and, when not ok,
what to do. The exit status is 1 when any check fails. Nothing is changed.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import stat
from collections.abc import Iterator
from pathlib import Path

from callerid.agent.backends import make_backend
from callerid.agent.backends.base import BackendError
from callerid.agent.config import Config
from callerid.agent.ctl._common import CtlError, agent_line, mesh_identity
from callerid.bus.peers import PeerTable, local_node_name
from callerid.bus.transport import MeshClient, load_keypair

__all__ = ["cmd_doctor", "doctor_args"]

PAM_DIRS = (
    Path("/lib/x86_64-linux-gnu/security"),
    Path("/usr/lib64/security"),
    Path("/lib/security"),
)
Check = tuple[str, str, str]  # (level, what, advice)


def doctor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ping", action="store_true", help="also ping every authorized peer")
    p.add_argument(
        "--pam-file", type=Path, default=Path("/etc/pam.d/sshd"), help="default: %(default)s"
    )


def cmd_doctor(args: argparse.Namespace, cfg: Config) -> int:
    """Check this node's callerid set-up (config, keys, backend, agent, PAM); change nothing."""
    failed = False
    for check in (_keys, _backend, _agent, _pam, _peers):
        for level, what, advice in check(args, cfg):
            failed |= level == "FAIL"
            print(f"{level:4}  {what}" + (f"\n      -> {advice}" if advice else ""))
    return 1 if failed else 0


def _keys(args: argparse.Namespace, cfg: Config) -> Iterator[Check]:
    node = local_node_name(cfg.node_name)
    yield "ok", f"config: node {node}, backend {cfg.backend.type}, mesh port {cfg.port}", ""
    secret = cfg.keys.dir / f"{node}.key_secret"
    try:
        load_keypair(cfg.keys.dir, node)
    except (OSError, ValueError) as exc:
        advice = f"calleridctl keygen --dir {cfg.keys.dir} --name {node} --address <this node's IP>"
        yield "FAIL", f"keypair {secret}: {exc}", advice
        return
    mode = stat.S_IMODE(secret.stat().st_mode)
    if mode & 0o077:
        yield "FAIL", f"secret key {secret} has mode {mode:o}", f"chmod 600 {secret}"
    else:
        yield "ok", f"keypair {secret} (mode {mode:o})", ""
    try:
        peers = PeerTable.load(cfg.keys.authorized, resolve=False)
    except OSError as exc:
        yield "FAIL", f"authorized keys {cfg.keys.authorized}: {exc}", "create it, add peers' *.key"
        return
    if len(peers) == 0:
        yield (
            "warn",
            f"no authorized peer keys in {cfg.keys.authorized}",
            "copy every node's public *.key there",
        )
    else:
        yield "ok", f"{len(peers)} authorized peer key(s) in {cfg.keys.authorized}", ""


def _backend(args: argparse.Namespace, cfg: Config) -> Iterator[Check]:
    try:
        backend = make_backend(cfg.backend)
    except (BackendError, OSError) as exc:
        yield "FAIL", f"{cfg.backend.type} backend: {exc}", "check backend.* in the config"
        return
    try:
        backend.jobs_of(0)
        yield "ok", f"{cfg.backend.type} backend readable", ""
    except BackendError as exc:
        yield "FAIL", f"{cfg.backend.type} backend: {exc}", "check backend.* in the config"
    finally:
        backend.close()


def _agent(args: argparse.Namespace, cfg: Config) -> Iterator[Check]:
    path = cfg.pam_socket
    if not path.is_socket():
        yield "FAIL", f"no agent socket at {path}", "start it: systemctl start callerid-agent"
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode != 0o600 or path.stat().st_uid != 0:
        yield (
            "warn",
            f"{path} has mode {mode:o} (owner {path.stat().st_uid})",
            "the agent makes it 0600 root",
        )
    try:
        reply = agent_line(cfg, b"CALLERID/1 op=account user=root service=calleridctl-doctor\n")
    except OSError as exc:
        yield "FAIL", f"agent at {path} does not answer: {exc}", "see journalctl -u callerid-agent"
        return
    if reply.startswith("CALLERID/1 verdict="):
        yield "ok", f"agent answers on {path}: {reply}", ""
    else:
        yield "FAIL", f"agent at {path} answered {reply!r}", "see journalctl -u callerid-agent"


def _pam(args: argparse.Namespace, cfg: Config) -> Iterator[Check]:
    modules = [d / "pam_callerid.so" for d in PAM_DIRS if (d / "pam_callerid.so").exists()]
    if modules:
        yield "ok", f"PAM module {modules[0]}", ""
    else:
        yield "warn", "pam_callerid.so is not installed", "install libpam-callerid / callerid-pam"
    try:
        text = args.pam_file.read_text()
    except OSError:
        yield "warn", f"cannot read {args.pam_file}", ""
        return
    lines = [ln.split("#")[0].split() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    if not any(ln[0] == "account" and any("pam_callerid" in w for w in ln) for ln in lines):
        yield (
            "warn",
            f"{args.pam_file} has no 'account ... pam_callerid.so' line",
            "see README: Set-up",
        )
    else:
        yield "ok", f"{args.pam_file} runs pam_callerid.so in its account stack", ""
    if any(any("pam_systemd" in w for w in ln) for ln in lines) or _includes_systemd(
        args.pam_file.parent, lines
    ):
        yield (
            "FAIL",
            f"{args.pam_file} (or a file it includes) uses pam_systemd",
            "remove pam_systemd from sshd's session stack: it moves sessions out of the job",
        )


def _includes_systemd(pam_dir: Path, lines: list[list[str]]) -> bool:
    for ln in lines:
        if ln[0].startswith("@include") and len(ln) > 1:
            target = pam_dir / ln[1]
        elif len(ln) > 2 and ln[1] in ("include", "substack"):
            target = pam_dir / ln[2]
        else:
            continue
        try:
            if re.search(r"^\s*session\s.*pam_systemd", target.read_text(), re.MULTILINE):
                return True
        except OSError:
            continue
    return False


def _peers(args: argparse.Namespace, cfg: Config) -> Iterator[Check]:
    if not args.ping:
        return
    try:
        keypair, peers = mesh_identity(cfg)
    except CtlError:
        return  # reported by _keys
    targets = sorted((name, ip) for ip, name in peers.addresses().items())

    async def ping_all() -> list[Check]:
        out: list[Check] = []
        async with MeshClient(keypair, peers, cfg.peer, port=cfg.port) as client:
            for name, ip in targets:
                r = await client.ping(ip)
                level = "ok" if r.ok else "FAIL"
                advice = "" if r.ok else _PING_ADVICE.get(r.status, "")
                out.append(
                    (level, f"ping {name} at {ip}: {r.status} {r.elapsed_s * 1e3:.1f} ms", advice)
                )
        return out

    yield from asyncio.run(ping_all())


_PING_ADVICE: dict[str, str] = {
    "unreachable": "is its agent running? is the mesh port open between the nodes?",
    "auth_failed": "the keys differ: redistribute its public key and reload (SIGHUP)",
    "timeout": "the agent accepts but does not answer: is it hung? see its journal",
}
