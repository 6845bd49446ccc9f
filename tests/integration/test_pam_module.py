"""pam_callerid.so against a real fake agent: exact PAM return codes, timings, wire bytes.

Two drivers run the real module through real libpam:

- ``pam/tst-retval`` (pam_start_confdir with a private service directory under tmp_path)
  prints each phase's exact return code, the PAM_ERROR_MSG lines and the PAM environment;
- ``pamtester`` with a throw-away ``/etc/pam.d/cid-test-<random>`` service (root only).

Service files put the module first with ``[success=done ignore=ignore default=die]`` and a
``pam_debug.so`` sentinel after it returning PAM_AUTHINFO_UNAVAIL, so that the module's own
PAM_SUCCESS / PAM_IGNORE / failure code is what the stack returns and each is distinct.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from callerid.agent.pamproto import PamReply, PamRequest, format_reply, parse_request
from tests.support.fake_agent import FakeAgent, Mode, pct, reply_line

REPO = Path(__file__).resolve().parents[2]
PAM_DIR = REPO / "pam"
MODULE = PAM_DIR / "pam_callerid.so"
TST_RETVAL = PAM_DIR / "tst-retval"
TST_CODEC = PAM_DIR / "tst-codec"
AGENT_DOWN = "Access denied by callerid: the callerid agent is not available"
IGNORED = "PAM_AUTHINFO_UNAVAIL"  # what the sentinel returns when our module says PAM_IGNORE
PAMTESTER_IGNORED = "Authentication service cannot retrieve authentication info"
USER = "nobody"
DONE = "account management done"  # pamtester's success line for acct_mgmt
EXPORTED = {"pam_sm_acct_mgmt", "pam_sm_open_session", "pam_sm_close_session"}
ENV_NAMES = ("CALLERID_JOB_ID", "SLURM_JOB_ID", "CALLERID_JOB_GID", "SLURM_JOB_GID")
NO_ENV = dict.fromkeys(ENV_NAMES, "-")  # tst-retval prints '-' for an unset variable


# -- fixtures and drivers ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def built() -> Path:
    """Build the module and its test binaries (idempotent; `make test` builds them too)."""
    if shutil.which("cc") is None or not Path("/usr/include/security/pam_modules.h").exists():
        pytest.skip("needs a C compiler and libpam0g-dev to build pam/")
    subprocess.run(["make", "-s", "-C", str(PAM_DIR)], check=True, capture_output=True)
    return MODULE


@pytest.fixture
def sockdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="cid-pam-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sock(sockdir: Path) -> str:
    return str(sockdir / "agent.sock")


def service_text(opts: str, *, sentinel: bool = True) -> str:
    """account + session stacks with our module first (see the module docstring)."""
    if not sentinel:
        return f"account required {MODULE} {opts}\naccount required pam_permit.so\n"
    ctl = "[success=done ignore=ignore default=die]"
    return (
        f"account {ctl} {MODULE} {opts}\n"
        "account requisite pam_debug.so acct=authinfo_unavail\n"
        f"session {ctl} {MODULE} {opts}\n"
        "session requisite pam_debug.so open_session=authinfo_unavail"
        " close_session=authinfo_unavail\n"
    )


@dataclass
class Run:
    codes: dict[str, str] = field(default_factory=dict)  # op -> PAM_NAME
    ms: dict[str, float] = field(default_factory=dict)
    conv: list[str] = field(default_factory=list)  # PAM_ERROR_MSG texts
    env: dict[str, str] = field(default_factory=dict)  # '-' when unset
    logs: list[tuple[int, str]] = field(default_factory=list)  # (syslog severity, text)
    files: dict[str, str] = field(default_factory=dict)  # -f PATH: "yes" | "no"


def parse_retval(out: str) -> Run:
    run = Run()
    for line in out.splitlines():
        if m := re.fullmatch(r"(\w+) rc=\d+ (PAM_\w+) ms=([\d.]+)", line):
            run.codes[m[1]] = m[2]
            run.ms[m[1]] = float(m[3])
        elif line.startswith("conv error "):
            run.conv.append(line.removeprefix("conv error "))
        elif m := re.fullmatch(r"env (\w+)=(.*)", line):
            run.env[m[1]] = m[2]
        elif m := re.fullmatch(r"file (.*)=(yes|no)", line):
            run.files[m[1]] = m[2]
    return run


def with_syslog(argv: list[str], logdir: Path) -> tuple[list[str], socket.socket]:
    """Wrap argv to run in a private mount namespace whose /dev/log is our datagram socket."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("capturing syslog needs root and unshare(1) for a private /dev/log")
    olddev = logdir / "olddev"
    olddev.mkdir()
    logsock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    logsock.bind(str(logdir / "log"))
    script = (
        'mount --bind /dev "$1" && mount -t tmpfs -o mode=0755,size=64k cid-dev /dev && '
        'for n in null zero full random urandom tty; do ln -s "$1/$n" /dev/$n; done && '
        'ln -s "$2" /dev/log && shift 2 && exec "$@"'
    )
    prefix = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh"]
    return [*prefix, str(olddev), str(logdir / "log"), *argv], logsock


def drain_syslog(logsock: socket.socket) -> list[tuple[int, str]]:
    logsock.setblocking(False)
    records = []
    try:
        while True:
            m = re.match(rb"<(\d+)>(.*)", logsock.recv(65536), re.S)
            assert m is not None
            records.append((int(m[1]) & 7, m[2].decode(errors="replace")))
    except BlockingIOError:
        pass
    logsock.close()
    return records


def retval(
    tmp_path: Path,
    opts: str,
    *ops: str,
    user: str = USER,
    flags: tuple[str, ...] = (),
    syslog: bool = False,
    pass_fds: tuple[int, ...] = (),
) -> Run:
    """Run tst-retval on a private service built from `opts`; ops default to acct_mgmt."""
    confdir = tmp_path / "pam.d"
    confdir.mkdir(exist_ok=True)
    (confdir / "cid").write_text(service_text(opts))
    argv = [str(TST_RETVAL), *flags, str(confdir), "cid", user, *(ops or ("acct_mgmt",))]
    logsock = None
    if syslog:
        logdir = Path(tempfile.mkdtemp(prefix="cid-log-", dir="/tmp"))
        argv, logsock = with_syslog(argv, logdir)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, pass_fds=pass_fds)
        assert proc.returncode == 0, proc.stderr
        run = parse_retval(proc.stdout)
        if logsock is not None:
            run.logs = drain_syslog(logsock)
    finally:
        if logsock is not None:
            shutil.rmtree(logdir, ignore_errors=True)
    return run


@pytest.fixture
def pam_service(built: Path) -> Iterator[Callable[[str], str]]:
    """Factory writing /etc/pam.d/cid-test-<random>; every file is removed at teardown."""
    if shutil.which("pamtester") is None:
        pytest.skip("pamtester is not installed (apt-get install pamtester)")
    if os.geteuid() != 0:
        pytest.skip("writing /etc/pam.d needs root")
    made: list[Path] = []

    def make(text: str) -> str:
        name = f"cid-test-{secrets.token_hex(4)}"
        path = Path("/etc/pam.d") / name
        path.write_text(text)
        made.append(path)
        return name

    yield make
    for path in made:
        path.unlink(missing_ok=True)


@dataclass
class PamtesterRun:
    rc: int
    out: str  # stdout + stderr
    pid: int
    elapsed: float


def pamtester(service: str, user: str, *ops: str, items: tuple[str, ...] = ()) -> PamtesterRun:
    argv = ["pamtester", "-v"]
    for item in items:
        argv += ["-I", item]
    argv += [service, user, *(ops or ("acct_mgmt",))]
    start = time.monotonic()
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        out, _ = proc.communicate(timeout=60)
    return PamtesterRun(proc.returncode, out, proc.pid, time.monotonic() - start)


# -- the module binary -----------------------------------------------------------------------


def test_dlopen_now_and_only_pam_sm_exported(built: Path) -> None:
    check = subprocess.run(["make", "-s", "-C", str(PAM_DIR), "check"], capture_output=True)
    assert check.returncode == 0, check.stderr
    assert b"ok" in check.stdout
    nm = subprocess.run(["nm", "-D", "--defined-only", str(built)], capture_output=True, text=True)
    symbols = {line.split()[-1] for line in nm.stdout.splitlines() if line.strip()}
    assert symbols == EXPORTED
    dyn = subprocess.run(["readelf", "-d", "-l", str(built)], capture_output=True, text=True)
    assert "BIND_NOW" in dyn.stdout
    assert "GNU_RELRO" in dyn.stdout


def test_codec_sanitize_table(built: Path) -> None:
    """pam/tst-codec: cid_sanitize's cases (controls, bad UTF-8, cuts) straight on codec.o."""
    run = subprocess.run([str(TST_CODEC)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout
    assert re.fullmatch(r"ok \d+\n", run.stdout), run.stdout


# -- pamtester: outcomes ---------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.parametrize(
    ("reply", "rc", "expect"),
    [
        (reply_line("adopt", job="42", reason="callerid"), 0, DONE),
        (reply_line("allow", reason="exempt"), 0, DONE),
        (
            reply_line("deny", reason="no_jobs", msg="no active job on node1"),
            1,
            "Permission denied",
        ),
    ],
    ids=["adopt", "allow", "deny"],
)
def test_pamtester_verdicts(
    pam_service: Callable[[str], str], sock: str, reply: bytes, rc: int, expect: str
) -> None:
    service = pam_service(service_text(f"socket={sock}"))
    with FakeAgent(sock, reply=reply) as agent:
        result = pamtester(service, USER)
    assert result.rc == rc, result.out
    assert expect in result.out
    assert ("no active job on node1" in result.out) == (rc == 1)
    assert len(agent.seen) == 1


@pytest.mark.root
@pytest.mark.parametrize(
    ("on_error", "rc", "expect"),
    [
        ("deny", 1, AGENT_DOWN),
        ("allow", 0, DONE),
        ("ignore", 1, PAMTESTER_IGNORED),
    ],
)
def test_pamtester_agent_absent(
    pam_service: Callable[[str], str], sock: str, on_error: str, rc: int, expect: str
) -> None:
    service = pam_service(service_text(f"socket={sock} on_error={on_error}"))
    result = pamtester(service, USER)
    assert result.rc == rc, result.out
    assert expect in result.out
    assert result.elapsed < 1.0  # a missing agent fails fast, it does not wait for timeout=


@pytest.mark.root
def test_pamtester_hung_agent_bounded_by_timeout(
    pam_service: Callable[[str], str], sock: str
) -> None:
    service = pam_service(service_text(f"socket={sock} timeout=400"))
    with FakeAgent(sock, mode=Mode.HANG) as agent:
        result = pamtester(service, USER)
    assert result.rc == 1, result.out
    assert AGENT_DOWN in result.out
    assert 0.4 <= result.elapsed < 0.9
    assert len(agent.seen) == 1


@pytest.mark.root
@pytest.mark.parametrize(
    "reply",
    [
        b"HELLO verdict=allow\n",
        b"CALLERID/1 verdict=maybe\n",
        b"CALLERID/1 verdict=allow reason=" + b"x" * 5000,
        b"CALLERID/1 verdict=allow msg=%G1\n",
    ],
    ids=["no-prefix", "unknown-verdict", "overlong", "bad-escape"],
)
@pytest.mark.parametrize("on_error", ["deny", "allow", "ignore"])
def test_pamtester_garbage_follows_on_error(
    pam_service: Callable[[str], str], sock: str, reply: bytes, on_error: str
) -> None:
    service = pam_service(service_text(f"socket={sock} on_error={on_error}"))
    with FakeAgent(sock, reply=reply) as agent:
        result = pamtester(service, USER)
    expected = {"deny": (1, AGENT_DOWN), "allow": (0, DONE)}
    rc, text = expected.get(on_error, (1, PAMTESTER_IGNORED))
    assert result.rc == rc, result.out
    assert text in result.out
    assert len(agent.seen) == 1


@pytest.mark.root
@pytest.mark.parametrize("opt", ["", "skip_root", "skip_root=1"], ids=["default", "bare", "1"])
def test_pamtester_root_skipped_without_io(
    pam_service: Callable[[str], str], sock: str, opt: str
) -> None:
    probe = pam_service(service_text(f"socket={sock} {opt}"))
    real = pam_service(service_text(f"socket={sock} {opt}", sentinel=False))
    with FakeAgent(sock, reply=reply_line("deny", msg="no")) as agent:
        ignored = pamtester(probe, "root")
        admitted = pamtester(real, "root")
    assert ignored.rc == 1, ignored.out
    assert PAMTESTER_IGNORED in ignored.out  # our module said PAM_IGNORE
    assert admitted.rc == 0, admitted.out
    assert agent.seen == []


@pytest.mark.root
def test_pamtester_root_asked_with_skip_root_0(
    pam_service: Callable[[str], str], sock: str
) -> None:
    service = pam_service(service_text(f"socket={sock} skip_root=0"))
    with FakeAgent(sock, reply=reply_line("deny", msg="root needs a job")) as agent:
        result = pamtester(service, "root")
    assert result.rc == 1, result.out
    assert "root needs a job" in result.out
    assert [s.line.split(b" ")[2] for s in agent.seen] == [b"user=root"]


@pytest.mark.root
def test_pamtester_request_bytes_and_peer_pid(pam_service: Callable[[str], str], sock: str) -> None:
    service = pam_service(service_text(f"socket={sock}"))
    tty = "pts/ü x=%"
    rhost = "10.1.2.3"
    ops = ("acct_mgmt", "open_session", "close_session")
    with FakeAgent(sock, reply=reply_line("allow")) as agent:
        result = pamtester(service, USER, *ops, items=(f"rhost={rhost}", f"tty={tty}"))
    assert result.rc == 0, result.out
    tail = f"user={USER} service={service} rhost={rhost} tty={pct(tty)}\n"
    assert pct(tty) == "pts/%C3%BC%20x%3D%25"
    assert [s.line.decode() for s in agent.seen] == [
        f"CALLERID/1 op=account {tail.rstrip()} ns=1\n",  # it enters the job's namespaces
        *(f"CALLERID/1 op={op} {tail}" for op in ("open_session", "close_session")),
    ]
    assert {(s.pid, s.uid) for s in agent.seen} == {(result.pid, 0)}


# -- tst-retval: exact codes, environment, sessions, options, logs ---------------------------


def test_adopt_exports_job_id(built: Path, tmp_path: Path, sock: str) -> None:
    with FakeAgent(sock, reply=reply_line("adopt", job="42", reason="callerid")):
        run = retval(tmp_path, f"socket={sock}")
    assert run.codes == {"acct_mgmt": "PAM_SUCCESS"}
    assert run.env == {**NO_ENV, "CALLERID_JOB_ID": "42", "SLURM_JOB_ID": "42"}
    assert run.conv == []


def test_allow_exports_nothing(built: Path, tmp_path: Path, sock: str) -> None:
    with FakeAgent(sock, reply=reply_line("allow", job="42")):
        run = retval(tmp_path, f"socket={sock}")
    assert run.codes == {"acct_mgmt": "PAM_SUCCESS"}
    assert run.env == NO_ENV


def test_adopt_with_gid_exports_the_jobs_group(built: Path, tmp_path: Path, sock: str) -> None:
    with FakeAgent(sock, reply=reply_line("adopt", job="42", gid="1003", reason="callerid")):
        run = retval(tmp_path, f"socket={sock}", "acct_mgmt", "open_session")
    assert run.codes == {"acct_mgmt": "PAM_SUCCESS", "open_session": "PAM_SUCCESS"}
    assert run.env == {
        "CALLERID_JOB_ID": "42", "SLURM_JOB_ID": "42",
        "CALLERID_JOB_GID": "1003", "SLURM_JOB_GID": "1003",
    }  # fmt: skip


@pytest.mark.parametrize("verdict", ["allow", "deny"])
def test_gid_without_adoption_exports_nothing(
    built: Path, tmp_path: Path, sock: str, verdict: str
) -> None:
    with FakeAgent(sock, reply=reply_line(verdict, job="42", gid="1003")):
        run = retval(tmp_path, f"socket={sock}")
    assert run.env == NO_ENV


def test_adopt_without_gid_leaves_the_group_unset(built: Path, tmp_path: Path, sock: str) -> None:
    """An agent that does not send gid= (older, or the group is unknown): only the job."""
    with FakeAgent(sock, reply=reply_line("adopt", job="42", reason="callerid")):
        run = retval(tmp_path, f"socket={sock}")
    assert run.env == {**NO_ENV, "CALLERID_JOB_ID": "42", "SLURM_JOB_ID": "42"}


def test_adopt_replaces_a_group_set_before(built: Path, tmp_path: Path, sock: str) -> None:
    """A SLURM_JOB_GID already in the PAM environment (here from pam_env) is replaced: the
    variables describe the job the session was adopted into."""
    envfile = tmp_path / "env"
    envfile.write_text("SLURM_JOB_GID=1\nCALLERID_JOB_GID=1\n")
    (tmp_path / "empty.conf").write_text("")
    confdir = tmp_path / "pam.d"
    confdir.mkdir()
    pam_env = f"pam_env.so conffile={tmp_path / 'empty.conf'} envfile={envfile} readenv=1"
    (confdir / "cid").write_text(
        f"session required {pam_env}\nsession required {MODULE} socket={sock}\n"
    )
    argv = [str(TST_RETVAL), str(confdir), "cid", USER, "open_session"]
    for reply, want in ((reply_line("allow"), "1"), (reply_line("adopt", gid="1003"), "1003")):
        with FakeAgent(sock, reply=reply):
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
        run = parse_retval(proc.stdout)
        assert run.codes == {"open_session": "PAM_SUCCESS"}
        assert (run.env["SLURM_JOB_GID"], run.env["CALLERID_JOB_GID"]) == (want, want)


def test_deny_shows_decoded_message(built: Path, tmp_path: Path, sock: str) -> None:
    msg = "Access denied: no job on nöde1 (100% sure) \x1b[31m"
    with FakeAgent(sock, reply=reply_line("deny", reason="no_jobs", msg=msg)):
        run = retval(tmp_path, f"socket={sock}")
    assert run.codes == {"acct_mgmt": "PAM_PERM_DENIED"}
    assert run.conv == ["Access denied: no job on nöde1 (100% sure) ?[31m"]  # ESC neutralised


@pytest.mark.parametrize(
    ("flags", "conv"), [(("-s",), []), (("-n",), [])], ids=["PAM_SILENT", "no-conv-function"]
)
def test_deny_without_conversation(
    built: Path, tmp_path: Path, sock: str, flags: tuple[str, ...], conv: list[str]
) -> None:
    with FakeAgent(sock, reply=reply_line("deny", msg="go away")):
        run = retval(tmp_path, f"socket={sock}", flags=flags)
    assert run.codes == {"acct_mgmt": "PAM_PERM_DENIED"}
    assert run.conv == conv


PAD = b"CALLERID/1 verdict=allow reason="
GARBAGE = {
    "no-prefix": b"HELLO verdict=allow\n",
    "version-2": b"CALLERID/2 verdict=allow\n",
    "prefix-only": b"CALLERID/1\n",
    "missing-verdict": b"CALLERID/1 reason=x\n",
    "unknown-verdict": b"CALLERID/1 verdict=maybe\n",
    "duplicate-verdict": b"CALLERID/1 verdict=allow verdict=deny\n",
    "double-space": b"CALLERID/1  verdict=allow\n",
    "trailing-space": b"CALLERID/1 verdict=allow \n",
    "crlf": b"CALLERID/1 verdict=allow\r\n",
    "field-without-eq": b"CALLERID/1 verdict=allow oops\n",
    "bad-key": b"CALLERID/1 verdict=allow Bad=1\n",
    "bad-escape": b"CALLERID/1 verdict=allow msg=%G1\n",
    "short-escape": b"CALLERID/1 verdict=allow msg=%4\n",
    "encoded-nul": b"CALLERID/1 verdict=allow msg=a%00b\n",
    "raw-utf8": b"CALLERID/1 verdict=allow msg=\xc3\xa9\n",
    "raw-equals": b"CALLERID/1 verdict=allow msg=a=b\n",
    "bad-job": b"CALLERID/1 verdict=adopt job=..%2Fetc\n",
    "long-job": b"CALLERID/1 verdict=adopt job=" + b"1" * 65 + b"\n",
    "gid-empty": b"CALLERID/1 verdict=adopt job=1 gid=\n",
    "gid-sign": b"CALLERID/1 verdict=adopt job=1 gid=-5\n",
    "gid-plus": b"CALLERID/1 verdict=adopt job=1 gid=+5\n",
    "gid-leading-zero": b"CALLERID/1 verdict=adopt job=1 gid=01003\n",
    "gid-not-digits": b"CALLERID/1 verdict=adopt job=1 gid=10a3\n",
    "gid-no-group": b"CALLERID/1 verdict=adopt job=1 gid=4294967295\n",
    "gid-11-digits": b"CALLERID/1 verdict=adopt job=1 gid=10000000000\n",
    "gid-name": b"CALLERID/1 verdict=adopt job=1 gid=users\n",
    "gid-twice": b"CALLERID/1 verdict=adopt job=1 gid=5 gid=5\n",
    "overlong": b"CALLERID/1 verdict=allow reason=" + b"x" * 5000,
    "4097-bytes": PAD + b"x" * (4097 - len(PAD) - 1) + b"\n",
    "no-newline": b"CALLERID/1 verdict=allow",
    "empty": b"",
    "verdict-error": reply_line("error", reason="backend"),
}


@pytest.mark.parametrize("reply", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_is_an_agent_error(built: Path, tmp_path: Path, sock: str, reply: bytes) -> None:
    with FakeAgent(sock, reply=reply) as agent:
        denied = retval(tmp_path, f"socket={sock}")
        ignored = retval(tmp_path, f"socket={sock} on_error=ignore")
    assert denied.codes == {"acct_mgmt": "PAM_PERM_DENIED"}
    assert denied.conv == [AGENT_DOWN]
    assert denied.env == NO_ENV
    assert ignored.codes == {"acct_mgmt": IGNORED}
    assert len(agent.seen) == 2


OK, NO = "PAM_SUCCESS", "PAM_PERM_DENIED"
VALID = {  # reply -> (code, PAM_ERROR_MSG lines)
    "exactly-4096": (PAD + b"x" * (4096 - len(PAD) - 1) + b"\n", OK, []),
    "unknown-keys": (b"CALLERID/1 verdict=allow future=a%20b x_2= reason=r\n", OK, []),
    "lower-hex": (b"CALLERID/1 verdict=deny msg=%c3%a9t%c3%a9\n", NO, ["été"]),
    "64-char-job": (b"CALLERID/1 job=" + b"a" * 64 + b" verdict=adopt\n", OK, []),
    "gid-0": (b"CALLERID/1 verdict=adopt job=1 gid=0\n", OK, []),
    "gid-max": (b"CALLERID/1 verdict=adopt job=1 gid=4294967294\n", OK, []),
    "gid-with-deny": (b"CALLERID/1 verdict=deny gid=7 msg=no\n", NO, ["no"]),
    "no-msg": (b"CALLERID/1 verdict=deny\n", NO, ["Access denied by callerid"]),
    # a deny stays a deny when its message is not UTF-8 (e.g. cut mid-character): cleaned
    "bad-utf8-msg": (b"CALLERID/1 verdict=deny msg=%C3%28%C2%9B%F0%9F%98\n", NO, ["?(?????"]),
}


@pytest.mark.parametrize(("reply", "code", "conv"), VALID.values(), ids=VALID.keys())
def test_strict_but_valid_replies(
    built: Path, tmp_path: Path, sock: str, reply: bytes, code: str, conv: list[str]
) -> None:
    assert len(VALID["exactly-4096"][0]) == 4096
    with FakeAgent(sock, reply=reply):
        run = retval(tmp_path, f"socket={sock}")
    assert run.codes == {"acct_mgmt": code}
    assert run.conv == conv


@pytest.mark.parametrize(
    ("reply", "code", "conv", "job"),
    [
        (PamReply("adopt", "callerid", job="42"), OK, [], "42"),
        (PamReply("adopt", "callerid", job="42", gid=4294967294), OK, [], "42"),
        (PamReply("deny", "no_jobs", msg="Ünïcode = 100% sûr"), NO, ["Ünïcode = 100% sûr"], "-"),
        (PamReply("deny", "no_jobs", msg="é" * 3000), NO, None, "-"),  # cut to fit 4096 bytes
    ],
    ids=["adopt", "adopt-gid", "deny-unicode", "deny-truncated"],
)
def test_contract_with_agent_pamproto(
    built: Path,
    tmp_path: Path,
    sock: str,
    reply: PamReply,
    code: str,
    conv: list[str] | None,
    job: str,
) -> None:
    """The agent's own encoder/decoder (callerid.agent.pamproto) and the module agree."""
    tty = "pts/ü x=%"
    with FakeAgent(sock, reply=format_reply(reply)) as agent:
        run = retval(tmp_path, f"socket={sock}", flags=("-r", "10.0.0.1", "-t", tty))
    assert run.codes == {"acct_mgmt": code}
    assert run.env["CALLERID_JOB_ID"] == job
    gid = "-" if reply.gid is None else str(reply.gid)
    assert (run.env["CALLERID_JOB_GID"], run.env["SLURM_JOB_GID"]) == (gid, gid)
    if conv is not None:
        assert run.conv == conv
    else:  # shown, and as much of it as fits in one line
        assert len(run.conv) == 1
        assert set(run.conv[0]) <= {"é", "?"}
        assert len(run.conv[0]) > 600
    request = parse_request(agent.seen[0].line)
    assert request == PamRequest(
        "account", USER, service="cid", rhost="10.0.0.1", tty=tty, join=True
    )


def test_reply_in_pieces_within_timeout(built: Path, tmp_path: Path, sock: str) -> None:
    reply = reply_line("adopt", job="7", reason="single_job")
    with FakeAgent(sock, reply=reply, split_delay=0.15):
        run = retval(tmp_path, f"socket={sock} timeout=2000")
    assert run.codes == {"acct_mgmt": "PAM_SUCCESS"}
    assert run.env["CALLERID_JOB_ID"] == "7"
    assert run.ms["acct_mgmt"] >= 150


@pytest.mark.parametrize(("mode", "stage"), [(Mode.HANG, "recv"), (Mode.NO_ACCEPT, "connect")])
def test_stuck_agent_bounded_by_timeout(
    built: Path, tmp_path: Path, sock: str, mode: Mode, stage: str
) -> None:
    with FakeAgent(sock, mode=mode), socket.socket(socket.AF_UNIX) as filler:
        if mode is Mode.NO_ACCEPT:
            filler.connect(sock)  # fills the backlog of 0: the module's connect gets EAGAIN
        run = retval(tmp_path, f"socket={sock} timeout=300 on_error=allow", syslog=True)
    assert run.codes == {"acct_mgmt": "PAM_SUCCESS"}
    assert 300 <= run.ms["acct_mgmt"] < 800
    errors = [text for sev, text in run.logs if sev == 3]
    assert any(f"timed out at {stage}" in text for text in errors), run.logs


def test_close_without_reply(built: Path, tmp_path: Path, sock: str) -> None:
    with FakeAgent(sock, mode=Mode.CLOSE) as agent:
        run = retval(tmp_path, f"socket={sock} on_error=allow")
    assert run.codes == {"acct_mgmt": "PAM_SUCCESS"}
    assert len(agent.seen) == 1


@pytest.mark.parametrize(
    ("reply", "on_error", "codes"),
    [
        (reply_line("adopt", job="9"), "deny", ("PAM_SUCCESS", "PAM_SUCCESS")),
        (reply_line("deny", msg="no"), "deny", ("PAM_SESSION_ERR", "PAM_SESSION_ERR")),
        (reply_line("error"), "deny", ("PAM_SESSION_ERR", "PAM_SESSION_ERR")),
        (reply_line("error"), "allow", ("PAM_SUCCESS", "PAM_SUCCESS")),
        (reply_line("error"), "ignore", (IGNORED, IGNORED)),
    ],
    ids=["adopt", "deny", "error-deny", "error-allow", "error-ignore"],
)
def test_session_phases(
    built: Path, tmp_path: Path, sock: str, reply: bytes, on_error: str, codes: tuple[str, str]
) -> None:
    with FakeAgent(sock, reply=reply) as agent:
        run = retval(
            tmp_path, f"socket={sock} on_error={on_error}", "open_session", "close_session"
        )
    assert (run.codes["open_session"], run.codes["close_session"]) == codes
    assert [s.line.split(b" ")[1] for s in agent.seen] == [b"op=open_session", b"op=close_session"]
    if codes[0] == "PAM_SESSION_ERR":  # a message on open only, never on close
        assert len(run.conv) == 1


def test_unknown_user_is_user_unknown_without_io(built: Path, tmp_path: Path, sock: str) -> None:
    with FakeAgent(sock, reply=reply_line("allow")) as agent:
        run = retval(tmp_path, f"socket={sock}", user=f"cid-nouser-{secrets.token_hex(4)}")
    assert run.codes == {"acct_mgmt": "PAM_USER_UNKNOWN"}
    assert agent.seen == []


def test_request_too_long_denies_whatever_on_error(built: Path, tmp_path: Path, sock: str) -> None:
    with FakeAgent(sock, reply=reply_line("allow")) as agent:
        run = retval(tmp_path, f"socket={sock} on_error=allow", flags=("-r", "h" * 4100))
    assert run.codes == {"acct_mgmt": "PAM_PERM_DENIED"}
    assert agent.seen == []


def test_unknown_option_logged_and_ignored(built: Path, tmp_path: Path, sock: str) -> None:
    with FakeAgent(sock, reply=reply_line("allow")) as agent:
        run = retval(tmp_path, f"socket={sock} tmeout=5", syslog=True)
    assert run.codes == {"acct_mgmt": "PAM_SUCCESS"}
    assert len(agent.seen) == 1
    errors = [text for sev, text in run.logs if sev == 3]  # LOG_ERR
    assert any('unknown option "tmeout=5"' in text for text in errors), run.logs


@pytest.mark.parametrize("opt", ["on_err=allow", "on_error=yes", "skip_root=2", "socket=rel"])
def test_bad_or_prefixed_option_keeps_fail_closed(
    built: Path, tmp_path: Path, sock: str, opt: str
) -> None:
    run = retval(tmp_path, f"socket={sock} {opt}", syslog=True)  # no agent listening
    assert run.codes == {"acct_mgmt": "PAM_PERM_DENIED"}
    assert any(sev == 3 and opt in text for sev, text in run.logs), run.logs


def test_bad_timeout_keeps_default(built: Path, tmp_path: Path, sock: str) -> None:
    with FakeAgent(sock, mode=Mode.HANG):
        run = retval(tmp_path, f"socket={sock} timeout=-5 on_error=allow")
    assert run.codes == {"acct_mgmt": "PAM_SUCCESS"}
    assert 2500 <= run.ms["acct_mgmt"] < 3000  # the default timeout, 2500 ms


def test_debug_logs_steps_with_timings(built: Path, tmp_path: Path, sock: str) -> None:
    with FakeAgent(sock, reply=reply_line("allow")):
        run = retval(tmp_path, f"socket={sock} debug", syslog=True)
    assert run.codes == {"acct_mgmt": "PAM_SUCCESS"}
    debug = [text for sev, text in run.logs if sev == 7]
    assert any(
        re.search(r"connect \d+ us, send \d+ us \(0 lent\), recv \d+ us, total \d+ us", t)
        for t in debug
    )
    assert any("returning 0" in t and f"options: socket={sock} timeout=" in t for t in debug)


def ssh_connection(sock: socket.socket, *, v4: bool = False) -> str:
    """SSH_CONNECTION as sshd writes it for the connection ``sock`` (its server end): remote
    ip and port, local ip and port; ``v4``: an IPv4-mapped address as plain IPv4."""
    (lip, lport), (rip, rport) = sock.getsockname()[:2], sock.getpeername()[:2]
    if v4:
        lip, rip = lip.removeprefix("::ffff:"), rip.removeprefix("::ffff:")
    return f"SSH_CONNECTION={rip} {rport} {lip} {lport}"


@pytest.mark.parametrize("family", ["ipv4", "ipv6", "mapped"])
def test_account_lends_the_socket_sshd_names(
    built: Path, tmp_path: Path, sock: str, family: str
) -> None:
    """sshd's SSH_CONNECTION (PAM environment) names the session's socket: an account request
    lends exactly that one (SCM_RIGHTS), not the process's other inet sockets; open_session
    lends none."""
    host = {"ipv4": "127.0.0.1", "ipv6": "::1", "mapped": "::"}[family]
    fam = socket.AF_INET if family == "ipv4" else socket.AF_INET6
    with contextlib.ExitStack() as stack:
        lst = stack.enter_context(socket.socket(fam))
        if family == "mapped":
            lst.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        lst.bind((host, 0))
        lst.listen()
        port = lst.getsockname()[1]
        client = stack.enter_context(
            socket.create_connection(
                ("127.0.0.1" if fam == socket.AF_INET or family == "mapped" else "::1", port)
            )
        )
        server = stack.enter_context(lst.accept()[0])
        other = stack.enter_context(
            socket.create_connection(("127.0.0.1" if family != "ipv6" else "::1", port))
        )
        stack.enter_context(lst.accept()[0])
        agent = stack.enter_context(FakeAgent(sock, reply=reply_line("allow")))
        env = ssh_connection(server, v4=family == "mapped")
        fds = (lst.fileno(), other.fileno(), server.fileno(), client.fileno())
        run = retval(
            tmp_path, f"socket={sock}", "acct_mgmt", "open_session", flags=("-e", env),
            pass_fds=fds,
        )  # fmt: skip
        want = (int(server.family), server.getsockname(), server.getpeername())
    assert run.codes["acct_mgmt"] == "PAM_SUCCESS"
    account, session = agent.seen
    assert b"op=account" in account.line and account.lent == (want,)
    assert b"op=open_session" in session.line and session.lent == ()


@pytest.mark.parametrize("env", [None, "SSH_CONNECTION=10.9.9.9 5 10.9.9.8 22", "SSH_CONNECTION=x"])
def test_no_socket_is_lent_unless_the_named_one_is_held(
    built: Path, tmp_path: Path, sock: str, env: str | None
) -> None:
    """No SSH_CONNECTION, one naming a socket this process does not hold, or a malformed one:
    nothing is lent (the agent walks the caller's fds)."""
    with contextlib.ExitStack() as stack:
        lst = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
        held = stack.enter_context(socket.create_connection(lst.getsockname()[:2]))
        agent = stack.enter_context(FakeAgent(sock, reply=reply_line("allow")))
        flags = ("-e", env) if env else ()
        run = retval(tmp_path, f"socket={sock}", flags=flags, pass_fds=(held.fileno(),))
    assert run.codes == {"acct_mgmt": "PAM_SUCCESS"}
    assert [s.lent for s in agent.seen] == [()]
