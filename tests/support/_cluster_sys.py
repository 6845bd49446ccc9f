"""System helpers of the virtual cluster: commands, config texts, ending our processes.

Nothing here knows about the cluster's shape; tests/support/cluster.py and _cluster_node.py
compose these. `kill_tree` ends exactly a process we started and its descendants.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from tests.support.poll import wait_for

__all__ = [
    "delete_netns",
    "kill_tree",
    "kill_user_processes",
    "pam_service_text",
    "rmdir_if_empty",
    "sh",
    "sshd_config_text",
    "umount",
    "unix_listening",
    "unlink",
    "user_exists",
    "wait_gone",
]

_UNIX_LISTENING = 0x10000  # __SO_ACCEPTCON in /proc/net/unix's Flags column


def sh(argv: Sequence[str], *, input: str | None = None) -> str:
    """Run a set-up command; raise with its stderr when it fails."""
    proc = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=60)
    if proc.returncode:
        msg = f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}"
        raise RuntimeError(msg)
    return proc.stdout


def pam_service_text(title: str, account: str | None) -> str:
    """A PAM service: pam_unix everywhere, `account` (one or more lines) first in account."""
    return "\n".join(
        [
            f"# {title}: callerid test harness. Generated; removed at teardown.",
            "auth     required pam_unix.so",
            account or "# (no extra account line)",
            "account  required pam_unix.so",
            "# No pam_systemd (nor pam_loginuid): pam_systemd would move the session into",
            "# a logind scope, out of the job cgroup that callerid adopted it into.",
            "session  required pam_unix.so",
            "password required pam_unix.so",
            "",
        ]
    )


def sshd_config_text(
    listen: Sequence[str], host_key: Path, pid_file: Path, log_level: str, port: int
) -> str:
    """An sshd_config for one node: keys, keyboard-interactive and passwords, all via PAM."""
    addresses = [
        f"ListenAddress [{a}]:{port}" if ":" in a else f"ListenAddress {a}:{port}" for a in listen
    ]
    return "\n".join(
        [
            *addresses,
            f"HostKey {host_key}",
            f"PidFile {pid_file}",
            "UsePAM yes",
            "PubkeyAuthentication yes",
            "KbdInteractiveAuthentication yes",
            "PasswordAuthentication yes",
            "AuthorizedKeysFile .ssh/authorized_keys",
            "PrintMotd no",
            "PrintLastLog no",
            "UseDNS no",
            "MaxStartups 100:30:200",
            "MaxSessions 50",
            f"LogLevel {log_level}",
            "",
        ]
    )


def unix_listening(pid: int, path: Path) -> bool:
    """Whether a unix stream socket bound to `path` listens, in the network namespace of `pid`
    (/proc/net/unix is per namespace; a stale socket file left by a dead agent does not count).
    """
    try:
        lines = Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]
    except (FileNotFoundError, ProcessLookupError):
        return False
    for line in lines:
        fields = line.split()
        if len(fields) >= 8 and fields[7] == str(path) and int(fields[3], 16) & _UNIX_LISTENING:
            return True
    return False


def _gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(procs: Sequence[psutil.Process], *, timeout: float) -> bool:
    """Wait until every process has exited (a zombie counts: PID 1 here reaps lazily)."""
    try:
        wait_for(lambda: all(_gone(p) for p in procs), timeout=timeout, what="processes to exit")
    except AssertionError:
        return False
    return True


def kill_tree(proc: subprocess.Popen[Any], *, timeout: float = 10.0) -> None:
    """End a process we started, its process group and its descendants: SIGTERM, then SIGKILL.

    Idempotent. Stopped processes get a SIGCONT so that they see the SIGTERM. Closes the
    Popen's pipes.
    """
    try:
        _kill_tree(proc, timeout)
    finally:
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


def _kill_tree(proc: subprocess.Popen[Any], timeout: float) -> None:
    if proc.poll() is not None:
        return
    try:
        root = psutil.Process(proc.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for sig in (signal.SIGTERM, signal.SIGCONT):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)  # pgid == pid: we start them with start_new_session
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)
    if not wait_gone(procs, timeout=timeout):
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.kill()
        wait_gone(procs, timeout=timeout)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)


def kill_user_processes(uid: int) -> None:
    """SIGKILL every process of a throwaway user (only our own test users reach here)."""
    procs = [p for p in psutil.process_iter(["uids"]) if p.info["uids"].real == uid]
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    wait_gone(procs, timeout=10.0)


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def umount(path: Path) -> None:
    """Undo a persistent-namespace bind mount (unshare --mount=/--uts=) and remove its file."""
    subprocess.run(["umount", str(path)], capture_output=True)
    path.unlink(missing_ok=True)


def rmdir_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


def unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


def delete_netns(name: str) -> None:
    if Path("/run/netns", name).exists():
        sh(["ip", "netns", "del", name])
