"""pam_callerid.so enters the job's namespaces the agent hands over, or denies: real module,
real libpam (pam/tst-retval), a real mount namespace.

A stand-in agent (tests/support/fake_agent.py) answers an adopt reply naming ``ns=mnt`` with
the fd of ``/proc/<pid>/ns/mnt`` of a process kept asleep in a private mount namespace whose
``/tmp`` is a tmpfs holding a marker file. tst-retval runs the account phase and then looks
for the marker (``-f``): it sees it only if the module entered that namespace in its own
process, as sshd's monitor would before it forks the session. The failure cases assert that
the module fails closed (PAM_PERM_DENIED) whatever ``on_error`` says.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.test_pam_module import built, retval, sock, sockdir  # noqa: F401
from tests.support.fake_agent import FakeAgent, reply_line

NS_DENIED = "Access denied by callerid: cannot enter the job's namespaces"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare(1) to make a mount namespace",
)


@dataclass
class PrivateTmp:
    pid: int
    marker: str  # /tmp/<marker> exists only inside the namespace

    def mnt_fd(self) -> int:
        return os.open(f"/proc/{self.pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)


@pytest.fixture
def private_tmp() -> Iterator[PrivateTmp]:
    """A process asleep in its own mount namespace with a tmpfs on /tmp and a marker file."""
    marker = f"cid-ns-marker-{secrets.token_hex(4)}"
    script = f"mount -t tmpfs cid-tmp /tmp && touch /tmp/{marker} && echo ready && exec sleep 600"
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        assert not Path(f"/tmp/{marker}").exists()  # not in ours
        yield PrivateTmp(proc.pid, marker)
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def run_with_fds(
    tmp_path: Path, path: str, reply: bytes, fds: list[int], opts: str = "", probe: str = ""
) -> tuple[dict[str, str], dict[str, str], list[str], list[bytes]]:
    try:
        with FakeAgent(path, reply=reply, fds=fds) as agent:
            flags = ("-f", probe) if probe else ()
            run = retval(tmp_path, f"socket={path} {opts}".strip(), flags=flags)
    finally:
        for fd in fds:
            os.close(fd)
    return run.codes, run.files, run.conv, [s.line for s in agent.seen]


def test_the_module_enters_the_jobs_mount_namespace(
    built: Path,  # noqa: F811
    tmp_path: Path,
    sock: str,  # noqa: F811
    private_tmp: PrivateTmp,
) -> None:
    reply = reply_line("adopt", reason="callerid", job="42", ns="mnt", msg="")
    probe = f"/tmp/{private_tmp.marker}"
    codes, files, conv, lines = run_with_fds(
        tmp_path, sock, reply, [private_tmp.mnt_fd()], probe=probe
    )
    assert codes == {"acct_mgmt": "PAM_SUCCESS"}
    assert files == {probe: "yes"}
    assert conv == []
    assert lines and lines[0].rstrip(b"\n").endswith(b" ns=1")


def test_join_container_0_adopts_without_entering(
    built: Path,  # noqa: F811
    tmp_path: Path,
    sock: str,  # noqa: F811
    private_tmp: PrivateTmp,
) -> None:
    reply = reply_line("adopt", reason="callerid", job="42", ns="mnt", msg="")
    probe = f"/tmp/{private_tmp.marker}"
    codes, files, _conv, lines = run_with_fds(
        tmp_path, sock, reply, [private_tmp.mnt_fd()], "join_container=0", probe
    )
    assert codes == {"acct_mgmt": "PAM_SUCCESS"}
    assert files == {probe: "no"}
    assert lines[0].rstrip(b"\n").endswith(b" ns=0")


def test_no_namespaces_named_nothing_entered(
    built: Path,  # noqa: F811
    tmp_path: Path,
    sock: str,  # noqa: F811
) -> None:
    reply = reply_line("adopt", reason="callerid", job="42", msg="")
    codes, _files, _conv, _lines = run_with_fds(tmp_path, sock, reply, [])
    assert codes == {"acct_mgmt": "PAM_SUCCESS"}


@pytest.mark.parametrize("on_error", ["allow", "ignore", "deny"])
@pytest.mark.parametrize(
    ("ns", "what"),
    [
        ("mnt", "not a namespace"),  # setns refuses /dev/null
        ("pid", "a namespace of another kind"),  # setns(mnt fd, CLONE_NEWPID) is refused
        ("mnt,pid", "fewer fds than named"),
        (None, "fds without ns="),
        ("time", "a malformed reply with fds"),
    ],
)
def test_fails_closed_whatever_on_error_says(
    built: Path,  # noqa: F811
    tmp_path: Path,
    sock: str,  # noqa: F811
    private_tmp: PrivateTmp,
    on_error: str,
    ns: str | None,
    what: str,
) -> None:
    fields = {"reason": "callerid", "job": "42"} | ({"ns": ns} if ns else {}) | {"msg": ""}
    fd = os.open("/dev/null", os.O_RDONLY) if what == "not a namespace" else private_tmp.mnt_fd()
    probe = f"/tmp/{private_tmp.marker}"
    codes, files, conv, _ = run_with_fds(
        tmp_path, sock, reply_line("adopt", **fields), [fd], f"on_error={on_error}", probe
    )
    assert codes == {"acct_mgmt": "PAM_PERM_DENIED"}, what
    assert conv == [NS_DENIED], what
    assert files == {probe: "no"}, what
