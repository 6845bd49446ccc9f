"""`calleridctl doctor`: check a node's set-up and say what to fix.

Each check prints one line, `ok`, `warn` or `FAIL`, with the thing checked and, when not ok,
`-> what to do`. The exit status is 1 when any check fails. Nothing is changed: doctor only
reads files, runs `sshd -T`, asks the agent about root and, with `--ping`, pings the peers.
The checks are the table `CHECKS`; the PAM stacks, sshd and the kernel have their own
modules (`_doctor_pam`, `_doctor_sshd`, `_doctor_kernel`), each check there a function of
plain inputs so that tests give it files and text.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from callerid.agent.backends import make_backend
from callerid.agent.backends.base import BackendError
from callerid.agent.config import Config
from callerid.agent.ctl._common import CtlError, agent_line, mesh_identity
from callerid.agent.ctl._doctor_kernel import cgroup_migration_checks
from callerid.agent.ctl._doctor_pam import account_checks, session_checks
from callerid.agent.ctl._doctor_sshd import sshd_checks
from callerid.bus.peers import PeerTable, local_node_name
from callerid.bus.transport import MeshClient, load_keypair

__all__ = ["CHECKS", "cmd_doctor", "doctor_args"]

PAM_DIRS = (
    Path("/lib/x86_64-linux-gnu/security"),
    Path("/usr/lib64/security"),
    Path("/lib/security"),
    Path("/lib/aarch64-linux-gnu/security"),
)
Check = tuple[str, str, str]  # (level, what, advice)
CheckFn = Callable[[argparse.Namespace, Config], Iterator[Check]]


def doctor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ping", action="store_true", help="also ping every authorized peer")
    p.add_argument(
        "--pam-file",
        type=Path,
        default=Path("/etc/pam.d/sshd"),
        help="sshd's PAM service file (default: %(default)s)",
    )
    p.add_argument(
        "--sshd",
        type=Path,
        default=Path("/usr/sbin/sshd"),
        help="the sshd binary run as `sshd -T` (default: %(default)s)",
    )
    p.add_argument("--sshd-config", type=Path, help="sshd_config to check (default: sshd's own)")


def cmd_doctor(args: argparse.Namespace, cfg: Config) -> int:
    """Check this node's callerid set-up and say what to fix; change nothing.

    Config and keys (modes, owners), the backend, the agent and its socket, sshd (UsePAM,
    keyboard-interactive, AuthenticationMethods), sshd's PAM account and session stacks,
    the kernel's cgroup migration cost (favordynmods) and, with --ping, every peer.
    Exit status 1 when any check FAILs."""
    failed = False
    for _name, check in CHECKS:
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
    yield from key_mode_checks(secret, cfg.keys.dir, cfg.keys.authorized)
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


def key_mode_checks(secret: Path, keys_dir: Path, authorized: Path) -> Iterator[Check]:
    """The secret key: root's, 0600. The key directories and authorized keys: root's, and
    writable by nobody else (whoever can add a file to authorized/ joins the mesh)."""
    st = secret.stat()
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077 or st.st_uid != 0:
        yield (
            "FAIL",
            f"secret key {secret} has mode {mode:o}, owner uid {st.st_uid}",
            f"chown root {secret} && chmod 600 {secret}",
        )
    else:
        yield "ok", f"keypair {secret} (mode {mode:o}, owner root)", ""
    paths = [keys_dir, authorized]
    with contextlib.suppress(OSError):  # an unreadable directory is reported with the peers
        paths += sorted(authorized.glob("*.key"))
    bad = []
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            continue
        if st.st_mode & 0o022 or st.st_uid != 0:
            bad.append(f"{path} ({stat.S_IMODE(st.st_mode):o}, uid {st.st_uid})")
    if bad:
        yield (
            "FAIL",
            f"writable by others than root: {', '.join(bad[:3])}",
            "chown root and chmod go-w them: whoever can write there can replace the keys",
        )
    else:
        yield "ok", f"{keys_dir} and {authorized} are root's and not writable by others", ""


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


def _sshd(args: argparse.Namespace, cfg: Config) -> Iterator[Check]:
    return sshd_checks(args.sshd, args.sshd_config)


def _pam(args: argparse.Namespace, cfg: Config) -> Iterator[Check]:
    found = [d / "pam_callerid.so" for d in PAM_DIRS if (d / "pam_callerid.so").exists()]
    if found:
        yield "ok", f"PAM module {found[0]}", ""
    else:
        yield "warn", "pam_callerid.so is not installed", "install libpam-callerid / callerid-pam"
    yield from account_checks(args.pam_file)
    yield from session_checks(args.pam_file)


def _kernel(args: argparse.Namespace, cfg: Config) -> Iterator[Check]:
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    except OSError as exc:
        yield "warn", f"cannot read /proc/self/mountinfo: {exc}", ""
        return
    try:
        features: str | None = Path("/sys/kernel/cgroup/features").read_text()
    except OSError:
        features = None
    yield from cgroup_migration_checks(mountinfo, os.uname().release, features)


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
    "unknown_peer": "no authorized key matches that address: check the addresses in its key",
}


CHECKS: tuple[tuple[str, CheckFn], ...] = (
    ("keys", _keys),
    ("backend", _backend),
    ("agent", _agent),
    ("sshd", _sshd),
    ("pam", _pam),
    ("kernel", _kernel),
    ("peers", _peers),
)
