"""A real sshd whose account stack is one Slurm release's own pam_slurm_adopt, beside a SlurmSite.

    with LocalSlurm(rel) as slurm, SlurmSite(slurm) as site, PsaSshd(site) as psa:
        argv = psa.ssh_argv(alice, login=bob, key=key)    # alice's client, logging in as bob
        psa.port, psa.address                             # 127.0.0.2, its own port

The module is the release's, by its full path (`psa_module`): Debian's 22.05 in
/lib/security (package libpam-slurm-adopt), the upstream trees' in
``/opt/slurm-<release>/lib/security`` (reference/slurm-builds/README.md: Slurm's own install
would overwrite Debian's, so each tree keeps its module). The PAM service is the site's stack
(tests/support/_cluster_sys.py: pam_unix, no pam_systemd) with one account line first:

    account required <module> service=<svc> [options]

``service=`` is needed because the service is sshd's argv[0] basename, not "sshd" (the module
returns PAM_IGNORE for any other service); ``options`` are pam_slurm_adopt's own (for example
``single_job_skip_rpc=0``). The module reads the release's slurm.conf (LocalSlurm writes it to
the release's sysconfdir) and talks to that release's slurmd and slurmstepd. The sshd listens
on the site's n2 address (127.0.0.2) on a port of its own, with the site's host key, so the
site's users' known_hosts and `SlurmSite.ssh_argv` options work unchanged; a client on this
machine connects from 127.0.0.1, where LocalSlurm's slurmd listens, so pam_slurm_adopt's
callerid RPC goes to the real slurmd. `close()` ends the sshd and its sessions and removes the
PAM service file.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
from pathlib import Path

from tests.support._cluster_sys import kill_tree, pam_service_text, sshd_config_text
from tests.support.harness import Harness
from tests.support.poll import wait_for
from tests.support.slurm_release import SlurmRelease
from tests.support.slurm_site import ADDRESSES, SiteUser, SlurmSite

__all__ = ["DEBIAN_MODULE", "PsaSshd", "psa_module"]

DEBIAN_MODULE = Path("/lib/security/pam_slurm_adopt.so")  # libpam-slurm-adopt (22.05)


def psa_module(release: SlurmRelease) -> Path:
    """The full path of ``release``'s own pam_slurm_adopt.so."""
    if release.tarball is None:
        return DEBIAN_MODULE
    return release.prefix / "lib" / "security" / "pam_slurm_adopt.so"


class PsaSshd(Harness):
    """One sshd with ``release``'s pam_slurm_adopt (the site's Slurm release by default)."""

    def __init__(self, site: SlurmSite, options: str = "", node: str = "n2") -> None:
        self.site = site
        self.release = site.slurm.release
        self.module = psa_module(self.release)
        self.options = options
        self.address = ADDRESSES[node]
        self.tag = secrets.token_hex(2)
        self.service = f"sshd-cidpsa{self.tag}"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._stack = contextlib.ExitStack()

    @property
    def account_line(self) -> str:
        opts = f"service={self.service} {self.options}".strip()
        return f"account required {self.module} {opts}"

    def close(self) -> None:
        self._stack.close()

    @property
    def log_path(self) -> Path:
        return self.site.dir / f"{self.service}.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _start(self) -> None:
        if not self.module.is_file():
            msg = f"{self.module} is missing (Slurm {self.release.name}'s pam_slurm_adopt)"
            raise FileNotFoundError(msg)
        pam_file = Path("/etc/pam.d") / self.service
        self._stack.callback(pam_file.unlink, missing_ok=True)
        title = f"pam_slurm_adopt of Slurm {self.release.version}"
        pam_file.write_text(pam_service_text(title, self.account_line))
        binary = self.site.dir / self.service  # argv[0]'s basename is the PAM service
        binary.symlink_to("/usr/sbin/sshd")
        host_key = self.site.dir / "ssh_host_ed25519_key"
        for _ in range(20):
            port = 20000 + secrets.randbelow(40000)
            conf = self.site.dir / f"{self.service}_config"
            pid_file = self.site.dir / f"{self.service}.pid"
            conf.write_text(sshd_config_text([self.address], host_key, pid_file, "DEBUG1", port))
            argv = [str(binary), "-D", "-f", str(conf), "-E", str(self.log_path)]
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
            self._stack.callback(kill_tree, proc)
            if self._listening(proc, port):
                self.proc, self.port = proc, port
                return
        msg = f"the pam_slurm_adopt sshd did not start: {self.log()[-2000:]}"
        raise RuntimeError(msg)

    def _listening(self, proc: subprocess.Popen[bytes], port: int) -> bool:
        want = f"{_hex_addr(self.address)}:{port:04X}"

        def settled() -> bool:
            if proc.poll() is not None:
                return True
            try:
                rows = Path(f"/proc/{proc.pid}/net/tcp").read_text().splitlines()[1:]
            except OSError:
                return False
            return any(r.split()[1] == want and r.split()[3] == "0A" for r in rows)

        wait_for(settled, timeout=10, what=f"sshd {self.service} listening on port {port}")
        return proc.poll() is None

    def ssh_argv(
        self, user: SiteUser, *, login: SiteUser | None = None, key: Path | None = None
    ) -> list[str]:
        """The site's ssh client command (run as ``user``, logging in as ``login``), pointed
        at this sshd instead of the site's n2."""
        argv = self.site.ssh_argv(user, "n2", login=login, key=key)
        at = argv.index("-p") + 1
        argv[at] = str(self.port)
        argv[-2] = self.address
        return argv


def _hex_addr(ip: str) -> str:
    """An IPv4 address as /proc/net/tcp writes it (little-endian hex)."""
    return "".join(f"{int(b):02X}" for b in reversed(ip.split(".")))
