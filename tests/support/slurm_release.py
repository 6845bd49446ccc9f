"""The Slurm releases the tests run: Debian's 22.05 and upstream trees of 24.11 and 26.05.

    rel = RELEASES["26.05"]
    prepare(rel)            # the tree is in /opt/slurm-26.05 (unpacked once); or SlurmUnavailable
    rel.sbin / "slurmd"     # /opt/slurm-26.05/sbin/slurmd
    rel.etc / "slurm.conf"  # where that release's tools look for their config

22.05 is Debian 12's packages (``slurmd slurmctld slurm-client munge``, /usr). 24.11 and 26.05
are installed trees built for this machine kind (team tree: ``shared/reference/slurm-builds``,
whose README says how): each tarball holds ``slurm-<MM>/`` for prefix ``/opt/slurm-<MM>``
(compiled in: PluginDir, RUNPATH, sysconfdir ``/opt/slurm-<MM>/etc``), so they are unpacked as
they are under /opt, no LD_LIBRARY_PATH needed. `unpack` is idempotent: a tree whose stamp
file names the tarball's sha256 is left alone; otherwise the tarball is unpacked beside it and
swapped in. The tarballs are looked for in ``$CALLERID_SLURM_BUILDS``, then in
``shared/reference/slurm-builds`` beside the checkout (``<checkout>/../shared``), then in
``/work/shared/reference/slurm-builds``. ``make slurm-trees`` runs this module
(``python -m tests.support.slurm_release``); a missing tarball is an error, not a skip.

Which releases the tests run: all of `RELEASES`, or the names in ``$CALLERID_SLURM_RELEASES``
(e.g. ``CALLERID_SLURM_RELEASES=26.05`` while working on one).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from callerid.agent.backends import stepd

__all__ = [
    "RELEASES",
    "SlurmRelease",
    "SlurmUnavailable",
    "builds_dir",
    "prepare",
    "release_names",
    "unpack",
]

TOP = Path(__file__).resolve().parents[2]
BUILDS_ENV = "CALLERID_SLURM_BUILDS"
RELEASES_ENV = "CALLERID_SLURM_RELEASES"
_BUILDS_CANDIDATES = (
    TOP.parent / "shared" / "reference" / "slurm-builds",
    Path("/work/shared/reference/slurm-builds"),
)
_STAMP = ".callerid-tree"
_UNPACK_LOCK = Path("/opt/.callerid-slurm-unpack.lock")
DEBIAN_PACKAGES = ("slurmd", "slurmctld", "slurm-client", "munge")
# What the upstream trees need from Debian at run time (reference/slurm-builds/README.md).
TREE_RUNTIME_PACKAGES = ("munge", "libjson-c5", "libdbus-1-3", "libhwloc15")


class SlurmUnavailable(RuntimeError):
    """A release cannot be made ready here (no tarball, no package); the message says why."""


class TreesNotVisible(SlurmUnavailable):
    """No directory with the release tarballs can be seen from here (and no tree was unpacked
    before): the checkout has no team tree beside it. The tests of those releases skip with
    this reason; a tarball that is there but broken still fails them."""


@dataclass(frozen=True)
class SlurmRelease:
    """One Slurm release: where its programs are and what differs in its configuration."""

    name: str  # "22.05"
    version: str  # "22.05.8": the last word of `slurmd -V`
    prefix: Path  # /usr, or /opt/slurm-24.11
    etc: Path  # its compiled-in sysconfdir: where slurm.conf and cgroup.conf go
    protocol_version: int  # what its stepd answers to the handshake
    min_protocol_version: int  # the lowest its stepd accepts (SLURM_MIN_PROTOCOL_VERSION)
    tarball: str | None = None  # the installed tree's file name in builds_dir(); None: Debian's
    none_plugins: bool = True  # knows "jobacct_gather/none" & co. (removed in 23.11)
    # Built with --enable-multiple-slurmd (Debian's is): cgroups under /slurm_<NodeName>, so
    # several slurmds on one kernel keep their jobs apart; else all under /slurm, shared.
    multiple_slurmd: bool = True
    # The job namespace plugins (`LocalSlurm(namespaces=...)`): the slurm.conf key and the
    # plugin per kind. job_container/tmpfs up to 25.05; NamespaceType from 25.11 on, with
    # namespace/tmpfs (job_container.conf) and namespace/linux (namespace.yaml, cgroup/v2 only).
    namespace_key: str = "JobContainerType"
    namespace_plugins: tuple[tuple[str, str], ...] = (("tmpfs", "job_container/tmpfs"),)

    @property
    def sbin(self) -> Path:
        return self.prefix / "sbin"

    @property
    def bin(self) -> Path:
        return self.prefix / "bin"

    @property
    def packages(self) -> tuple[str, ...]:
        """The Debian packages this release needs."""
        return DEBIAN_PACKAGES if self.tarball is None else TREE_RUNTIME_PACKAGES

    def tool(self, name: str) -> str:
        """The full path of a client command (sbatch, scontrol ...) of this release."""
        return str(self.bin / name)

    @property
    def daemons(self) -> tuple[str, str]:
        return (str(self.sbin / "slurmctld"), str(self.sbin / "slurmd"))


RELEASES = {
    r.name: r
    for r in (
        SlurmRelease(
            "22.05", "22.05.8", Path("/usr"), Path("/etc/slurm"), stepd.PROTOCOL_22_05, 36 << 8
        ),
        SlurmRelease(
            "24.11",
            "24.11.7",
            Path("/opt/slurm-24.11"),
            Path("/opt/slurm-24.11/etc"),
            42 << 8,
            39 << 8,
            "slurm-24.11.7-bookworm-amd64.tar.xz",
            none_plugins=False,
            multiple_slurmd=False,
        ),
        SlurmRelease(
            "26.05",
            "26.05.3",
            Path("/opt/slurm-26.05"),
            Path("/opt/slurm-26.05/etc"),
            stepd.PROTOCOL_26_05,
            42 << 8,
            "slurm-26.05.3-bookworm-amd64.tar.xz",
            none_plugins=False,
            multiple_slurmd=False,
            namespace_key="NamespaceType",
            namespace_plugins=(("tmpfs", "namespace/tmpfs"), ("linux", "namespace/linux")),
        ),
    )
}


def release_names() -> list[str]:
    """The releases to test: ``$CALLERID_SLURM_RELEASES`` (comma or space separated), or all."""
    wanted = os.environ.get(RELEASES_ENV, "").replace(",", " ").split()
    unknown = [n for n in wanted if n not in RELEASES]
    if unknown:
        msg = f"{RELEASES_ENV}: unknown release(s) {unknown}; known: {list(RELEASES)}"
        raise SlurmUnavailable(msg)
    return wanted or list(RELEASES)


def builds_dir() -> Path:
    """The directory holding the release tarballs (see the module docstring)."""
    env = os.environ.get(BUILDS_ENV)
    candidates = [Path(env)] if env else list(_BUILDS_CANDIDATES)
    for path in candidates:
        if path.is_dir():
            return path
    msg = (
        f"no Slurm release tarballs: none of {', '.join(map(str, candidates))} exists. They "
        f"are the team tree's shared/reference/slurm-builds (checked out beside this one, as "
        f"../shared); or set {BUILDS_ENV} to a directory holding "
        + ", ".join(r.tarball for r in RELEASES.values() if r.tarball)
    )
    raise TreesNotVisible(msg)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def unpack(release: SlurmRelease) -> bool:
    """Make ``release.prefix`` the tree of its tarball; False when it already was."""
    if release.tarball is None:
        return False
    stamp = release.prefix / _STAMP
    try:
        tarball = builds_dir() / release.tarball
    except SlurmUnavailable:
        if _read(stamp):  # unpacked before, from a tarball we cannot see now: use it
            return False
        raise
    if not tarball.is_file():
        msg = f"{tarball} is missing (Slurm {release.name}'s installed tree)"
        raise SlurmUnavailable(msg)
    want = _sha256(tarball)
    if _read(stamp) == want:
        return False
    release.prefix.parent.mkdir(parents=True, exist_ok=True)
    with _locked(_UNPACK_LOCK):
        if _read(stamp) == want:  # another process did it meanwhile
            return False
        work = Path(tempfile.mkdtemp(prefix=".callerid-unpack-", dir=release.prefix.parent))
        try:
            subprocess.run(["tar", "-C", str(work), "-xJf", str(tarball)], check=True)
            tree = work / release.prefix.name
            if not (tree / "sbin" / "slurmd").is_file():
                msg = f"{tarball} holds no {release.prefix.name}/sbin/slurmd"
                raise SlurmUnavailable(msg)
            (tree / _STAMP).write_text(want + "\n")
            if release.prefix.exists():
                shutil.rmtree(release.prefix)
            tree.rename(release.prefix)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return True


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def missing_packages(release: SlurmRelease) -> list[str]:
    """The Debian packages ``release`` needs that are not installed."""
    missing = []
    for pkg in release.packages:
        proc = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True
        )
        if "install ok installed" not in proc.stdout:
            missing.append(pkg)
    return missing


def prepare(release: SlurmRelease) -> None:
    """Unpack the release's tree if needed and check that its slurmd runs and is that
    release; raises `SlurmUnavailable` otherwise."""
    unpack(release)
    slurmd = release.sbin / "slurmd"
    try:
        out = subprocess.run(
            [str(slurmd), "-V"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except OSError as exc:
        msg = f"cannot run {slurmd}: {exc}"
        raise SlurmUnavailable(msg) from exc
    if out.split()[-1:] != [release.version]:
        msg = f"{slurmd} -V says {out!r}, not Slurm {release.version}"
        raise SlurmUnavailable(msg)


def main(argv: list[str]) -> int:
    """``python -m tests.support.slurm_release [NAME ...]``: unpack the trees (all by default)."""
    names = argv or [n for n, r in RELEASES.items() if r.tarball]
    try:
        for name in names:
            release = RELEASES[name]
            done = unpack(release)
            print(f"slurm {name}: {'unpacked into' if done else 'up to date in'} {release.prefix}")
    except TreesNotVisible as exc:  # the tests of these releases skip, saying why
        print(f"slurm trees: WARNING: {exc}", file=sys.stderr)
    except (SlurmUnavailable, KeyError) as exc:
        print(f"slurm trees: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
