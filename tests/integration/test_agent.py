"""Two real agents on loopback addresses answering each other over the CURVE mesh.

Node "a" (127.0.0.2) and node "b" (127.0.0.3) each have a real cgroup v2 job tree; a real
client process runs inside a job of "a" as a throwaway user and connects (TCP or UDP) to a
stand-in sshd on "b" whose per-connection monitor asks b's agent, as pam_callerid.so would.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.support.agents import ADDRESSES, USER_PYTHON, LoopbackAgents, client_argv, end_client
from tests.support.cgroups import JobTree
from tests.support.poll import wait_for
from tests.support.users import ThrowawayUser, throwaway_user

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def agents(trees: dict[str, JobTree]) -> Iterator[LoopbackAgents]:
    with LoopbackAgents(trees) as ag:
        yield ag


def connect_from_job(
    trees: dict[str, JobTree], user: ThrowawayUser, job: str | None, proto: str, port: int
) -> subprocess.Popen[bytes]:
    argv = client_argv(proto, ADDRESSES["a"], ADDRESSES["b"], port)
    kw = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE}
    if job is None:
        return trees["a"].spawn(argv, user=user, **kw)
    return trees["a"].spawn_in(job, "step_batch", argv, user=user, **kw)


@pytest.mark.parametrize("lend", [True, False], ids=["lent", "walked"])
@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("job", ["42", "43"])
def test_callerid_over_the_mesh_adopts_the_source_job(
    agents: LoopbackAgents,
    trees: dict[str, JobTree],
    user: ThrowawayUser,
    proto: str,
    job: str,
    lend: bool,
) -> None:
    """The same decision whether the monitor lends its connection with the request or the
    agent finds it by walking its fds (an older module)."""
    sshd = agents.sshd("b", proto, lend=lend)
    client = connect_from_job(trees, user, job, proto, sshd.port)
    try:
        login = sshd.login(user.name)
    finally:
        end_client(client)
    assert login["fields"]["verdict"] == "adopt"
    assert login["fields"]["reason"] == "callerid"
    assert login["fields"]["job"] == job
    monitor_cgroup = trees["b"].cgroup_of(login["monitor"])
    assert monitor_cgroup == trees["b"].cgroup_path(job, "step_extern")


@pytest.mark.parametrize("lend", [True, False], ids=["lent", "walked"])
def test_the_monitor_is_adopted_not_the_pam_helper(
    agents: LoopbackAgents, trees: dict[str, JobTree], user: ThrowawayUser, lend: bool
) -> None:
    sshd = agents.sshd("b", "tcp", helper=True, lend=lend)
    client = connect_from_job(trees, user, "43", "tcp", sshd.port)
    try:
        login = sshd.login(user.name)
    finally:
        end_client(client)
    assert login["asker"] != login["monitor"]
    assert login["fields"]["job"] == "43"
    assert trees["b"].cgroup_of(login["monitor"]) == trees["b"].cgroup_path("43", "step_extern")


def test_outside_any_job_falls_back_to_newest(
    agents: LoopbackAgents, trees: dict[str, JobTree], user: ThrowawayUser
) -> None:
    sshd = agents.sshd("b")
    client = connect_from_job(trees, user, None, "tcp", sshd.port)
    try:
        login = sshd.login(user.name)
    finally:
        end_client(client)
    assert (login["fields"]["verdict"], login["fields"]["reason"]) == ("adopt", "unknown_newest")
    assert login["fields"]["job"] in ("42", "43")


def test_a_job_is_never_told_to_another_uid(
    agents: LoopbackAgents, trees: dict[str, JobTree], user: ThrowawayUser
) -> None:
    """b asks a about a connection that is in a job of a *different* user: not found."""
    with throwaway_user() as other:
        trees["b"].add_job("77", other.uid)
        trees["b"].add_job("78", other.uid)
        sshd = agents.sshd("b")
        client = connect_from_job(trees, user, "42", "tcp", sshd.port)  # user's job on a
        try:
            login = sshd.login(other.name)  # ... but the login claims to be `other`
        finally:
            end_client(client)
            sshd.close()
        assert login["fields"]["reason"] == "unknown_newest"  # a said: not found
        assert login["fields"]["job"] in ("77", "78")


def connect_as(user: ThrowawayUser, path: Path, body: str) -> str:
    """Run `body` as `user` in a process that has just made `s`, a unix socket to `path`;
    a refused connect prints EACCES. Returns what the process printed."""
    code = (
        "import socket,sys,os; os.setgid(int(sys.argv[3])); os.setuid(int(sys.argv[2]))\n"
        "s=socket.socket(socket.AF_UNIX)\ntry:\n s.connect(sys.argv[1])\n"
        "except PermissionError:\n print('EACCES'); sys.exit()\n" + body
    )
    return subprocess.run(
        [USER_PYTHON, "-c", code, str(path), str(user.uid), str(user.gid)],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout


def test_pam_socket_is_root_only(agents: LoopbackAgents, user: ThrowawayUser) -> None:
    path = agents.socket("b")
    st = path.stat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    assert connect_as(user, path, "print('connected')").strip() == "EACCES"


def test_non_root_peer_is_refused(agents: LoopbackAgents, user: ThrowawayUser) -> None:
    path = agents.socket("b")
    os.chmod(path, 0o666)  # pretend an admin loosened the mode: SO_PEERCRED still refuses
    os.chmod(path.parent, 0o711)
    try:
        body = "s.sendall(b'CALLERID/1 op=account user=root\\n'); print(s.makefile().readline())"
        out = connect_as(user, path, body)
    finally:
        os.chmod(path, 0o600)
        os.chmod(path.parent, 0o700)
    assert out.startswith("CALLERID/1 verdict=error reason=not_root")


def ask(path: Path, payload: bytes, timeout: float = 5.0) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        return s.makefile("rb").readline()


@pytest.mark.parametrize(
    "payload",
    [
        b"garbage\n",
        b"CALLERID/1 op=account user=%zz\n",
        b"CALLERID/1 op=account user=x" + b"x" * 5000 + b"\n",
        b"CALLERID/1 op=account user=x",  # no newline, then EOF
        b"\xff\xfe\n",
    ],
)
def test_malformed_requests_get_an_error_and_the_agent_lives_on(
    agents: LoopbackAgents, payload: bytes
) -> None:
    assert ask(agents.socket("b"), payload).startswith(
        b"CALLERID/1 verdict=error reason=bad_request"
    )
    assert ask(agents.socket("b"), b"CALLERID/1 op=account user=root\n").startswith(
        b"CALLERID/1 verdict=allow reason=root"
    )


def test_unknown_user_is_denied(agents: LoopbackAgents) -> None:
    reply = ask(agents.socket("b"), b"CALLERID/1 op=account user=no-such-user-cid\n")
    assert reply.startswith(b"CALLERID/1 verdict=deny reason=unknown_user")


def test_hung_source_is_bounded_by_the_peer_timeout(
    agents: LoopbackAgents, trees: dict[str, JobTree], user: ThrowawayUser
) -> None:
    proc = agents.procs["a"]
    proc.send_signal(19)  # SIGSTOP: a's mesh accepts (kernel) but never answers
    try:
        sshd = agents.sshd("b")
        client = connect_from_job(trees, user, "42", "tcp", sshd.port)
        t0 = time.monotonic()
        try:
            login = sshd.login(user.name)
        finally:
            end_client(client)
        elapsed = time.monotonic() - t0
    finally:
        proc.send_signal(18)  # SIGCONT
    assert login["fields"]["reason"] == "unknown_newest"
    assert 0.45 < elapsed < 1.5  # peer.timeout_ms=500, far below pam_timeout_ms=1500


def test_sighup_reloads_and_bad_config_is_refused(
    agents: LoopbackAgents, trees: dict[str, JobTree], user: ThrowawayUser
) -> None:
    node = "b"
    agents.write_config(node, policy={"unknown": "deny"})
    agents.procs[node].send_signal(1)
    wait_for(lambda: agents.log(node).count("peer keys reloaded") >= 1, what="reload")
    sshd = agents.sshd("b")
    client = connect_from_job(trees, user, None, "tcp", sshd.port)
    try:
        login = sshd.login(user.name)
    finally:
        end_client(client)
    assert (login["fields"]["verdict"], login["fields"]["reason"]) == ("deny", "unknown_deny")
    agents.config(node).write_text("policy: {unknown: sometimes}\n")
    agents.procs[node].send_signal(1)
    wait_for(lambda: "reload refused" in agents.log(node), what="refused reload")
    assert "policy.unknown" in agents.log(node)
    assert agents.procs[node].poll() is None  # still serving, with the old config
    agents.write_config(node)
    agents.procs[node].send_signal(1)
    wait_for(lambda: agents.log(node).count("peer keys reloaded") >= 2, what="second reload")


def test_config_errors_name_the_key_and_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "agent.yaml"
    bad.write_text("policy:\n  no_jobs: maybe\n")
    r = subprocess.run(
        [sys.executable, "-m", "callerid.agent", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 78
    assert f"{bad}: policy.no_jobs" in r.stderr


BAD_RELOADS = {
    "latin1": b"policy:\n  deny_message: caf\xe9\n",
    "non_string_key": b"{1: a, foo: b}\n",
    "deep_nesting": b"[" * 3000,
    "authorized_removed": None,  # a good file, but keys.authorized is gone
}


@pytest.mark.parametrize("case", BAD_RELOADS)
def test_sighup_with_any_bad_file_keeps_the_old_config(
    agents: LoopbackAgents, trees: dict[str, JobTree], user: ThrowawayUser, case: str
) -> None:
    """Issue 12: whatever the file (or the keys) hold, a reload is refused and b keeps serving."""
    node = "b"
    agents.write_config(node, policy={"unknown": "deny"})  # the "old" config: recognisable
    before = agents.log(node).count("peer keys reloaded")
    agents.procs[node].send_signal(1)
    wait_for(lambda: agents.log(node).count("peer keys reloaded") > before, what="reload")
    refused = agents.log(node).count("reload refused")
    errors = agents.log(node).count("ERROR callerid.agent.daemon: reload refused")
    authorized = agents.dir / "authorized"
    content = BAD_RELOADS[case]
    try:
        if content is None:
            authorized.rename(agents.dir / "authorized.away")
        else:
            agents.config(node).write_bytes(content)
        agents.procs[node].send_signal(1)
        wait_for(lambda: agents.log(node).count("reload refused") > refused, what="refused reload")
    finally:
        if not authorized.exists():
            (agents.dir / "authorized.away").rename(authorized)
        agents.write_config(node, policy={"unknown": "deny"})
    assert agents.procs[node].poll() is None, agents.log(node)
    log = agents.log(node)
    assert "Traceback" not in log
    assert log.count("ERROR callerid.agent.daemon: reload refused") == errors + 1  # one line
    assert _listening_socket(agents.socket(node))
    sshd = agents.sshd(node)
    client = connect_from_job(trees, user, None, "tcp", sshd.port)
    try:
        login = sshd.login(user.name)  # asks a over the mesh: the old peer table is kept too
    finally:
        end_client(client)
        sshd.close()
    assert (login["fields"]["verdict"], login["fields"]["reason"]) == ("deny", "unknown_deny")
    r = ctl(agents, node, "status", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["peers"] == 2, r.stderr
    agents.write_config(node)  # back to the module's config for the other tests
    before = agents.log(node).count("peer keys reloaded")
    agents.procs[node].send_signal(1)
    wait_for(lambda: agents.log(node).count("peer keys reloaded") > before, what="reload")


def _listening_socket(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
    return True


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"node_name: a b\n", "node_name: invalid node name 'a b'"),
        (b"node_name: n1\npolicy:\n  deny_message: caf\xe9\n", "not UTF-8"),
        (b"{1: a, foo: b}\n", "1: keys must be strings"),
        (b"[" * 3000, "nested too deeply"),
        (b"peer: {connect_timeout_ms: 99999999999}\n", "peer.connect_timeout_ms"),
        (b"node_name: n1\nkeys: {dir: /nonexistent/keys}\n", "/nonexistent/keys"),
    ],
)
def test_any_config_problem_exits_78_with_one_line(
    tmp_path: Path, content: bytes, needle: str
) -> None:
    bad = tmp_path / "agent.yaml"
    bad.write_bytes(content)
    r = subprocess.run(
        [sys.executable, "-m", "callerid.agent", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 78, r.stderr
    assert r.stderr.startswith("callerid-agent: configuration error: "), r.stderr
    assert r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr


def test_sd_notify_watchdog_and_sigterm_drains_in_flight(
    trees: dict[str, JobTree], user: ThrowawayUser, tmp_path: Path
) -> None:
    notify_path = f"/tmp/cid-notify-{os.getpid()}"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(10)
    env = {"NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "200000"}
    try:
        with LoopbackAgents(trees, env=env) as ag:
            got: list[str] = []

            def seen(state: str) -> bool:
                while state not in got:
                    got.append(notify.recv(4096).decode())
                return True

            assert seen("READY=1")
            assert seen("WATCHDOG=1")  # the loop is alive: pinged at half WATCHDOG_USEC
            ag.procs["a"].send_signal(19)  # the source hangs: b's decision takes ~500 ms
            sshd = ag.sshd("b")
            client = connect_from_job(trees, user, "42", "tcp", sshd.port)
            assert sshd.proc.stdin is not None
            sshd.proc.stdin.write(user.name + "\n")
            sshd.proc.stdin.flush()
            b = psutil.Process(ag.procs["b"].pid)

            def asking_a() -> bool:  # b's query to the stopped a is in flight
                a_ip = ADDRESSES["a"]
                return any(
                    c.raddr and c.raddr[1] == ag.port and c.raddr[0] in (a_ip, "::ffff:" + a_ip)
                    for c in b.net_connections("tcp")
                )

            wait_for(asking_a, what="b asking a")
            rc = ag.stop("b")  # SIGTERM while the login is in flight
            ag.procs["a"].send_signal(18)
            assert sshd.proc.stdout is not None
            login = sshd.proc.stdout.readline()
            end_client(client)
            assert "verdict=adopt reason=unknown_newest" in login, ag.log("b")  # not dropped
            assert rc == 0
            assert seen("STOPPING=1")
            assert "journald not running" in ag.log("b")
            assert ag.log("b").count("journald not running") == 1
    finally:
        notify.close()
        os.unlink(notify_path)


def ctl(agents: LoopbackAgents, node: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "callerid.agent.ctl", "--config", str(agents.config(node))]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=30)


def test_calleridctl_whois_and_explain(
    agents: LoopbackAgents, trees: dict[str, JobTree], user: ThrowawayUser
) -> None:
    agents.write_config("b")  # the module's other tests may have changed b's policy
    with socket.socket() as server:
        server.bind((ADDRESSES["b"], 0))
        server.listen()
        sport = server.getsockname()[1]
        client = connect_from_job(trees, user, "43", "tcp", sport)
        try:
            assert client.stdout is not None
            cport = int(client.stdout.readline())
            src, dst = f"{ADDRESSES['a']}:{cport}", f"{ADDRESSES['b']}:{sport}"
            r = ctl(agents, "b", "whois", "tcp", src, dst, "--uid", str(user.uid))
            assert r.returncode == 0, r.stderr
            assert r.stdout.startswith("job 43 on a ")
            r = ctl(agents, "b", "whois", "tcp", src, dst, "--uid", str(user.uid + 1))
            assert r.returncode == 6 and "not_found on a" in r.stdout

            def extern_procs() -> dict[str, str]:
                return {
                    j: (trees["b"].job_dirs(j)[0] / "step_extern" / "cgroup.procs").read_text()
                    for j in ("42", "43")
                }

            procs = extern_procs()
            r = ctl(agents, "b", "explain", user.name, "--from", src, "--to", dst)
            assert r.returncode == 0, r.stderr
            assert "asked the agent at 127.0.0.2: found job 43" in r.stdout
            assert r.stdout.rstrip().endswith("decision: adopt job 43 (reason callerid)")
            assert extern_procs() == procs  # a dry run: nothing adopted
            r = ctl(agents, "b", "explain", user.name)
            assert "decision: adopt job" in r.stdout and "(reason unknown_newest)" in r.stdout
            r = ctl(agents, "b", "explain", "root")
            assert r.stdout.rstrip().endswith("decision: allow (reason root)")
        finally:
            end_client(client)


def test_calleridctl_doctor(agents: LoopbackAgents, tmp_path: Path) -> None:
    agents.write_config("b")
    pam = tmp_path / "sshd"
    pam.write_text("account required pam_callerid.so\nsession include common-session\n")
    (tmp_path / "common-session").write_text("session optional pam_systemd.so\n")
    r = ctl(agents, "b", "doctor", "--ping", "--pam-file", str(pam))
    assert r.returncode == 1  # pam_systemd in an included file is a failure
    out = r.stdout
    assert "ok    keypair" in out and "(mode 600, owner root)" in out
    assert "ok    2 authorized peer key(s)" in out
    assert "ok    cgroup backend readable" in out
    assert "ok    agent answers on" in out and "verdict=allow reason=root" in out
    assert "ok    ping a at 127.0.0.2: ok" in out and "ok    ping b at 127.0.0.3: ok" in out
    assert "FAIL  " in out and "pam_systemd" in out
    (tmp_path / "common-session").write_text("session required pam_unix.so\n")
    r = ctl(agents, "b", "doctor", "--pam-file", str(pam))
    assert r.returncode == 0, r.stdout
    cfg = agents.config("b")
    cfg.write_text(cfg.read_text().replace(str(agents.socket("b")), "/nonexistent/agent.sock"))
    r = ctl(agents, "b", "doctor", "--pam-file", str(pam))
    assert r.returncode == 1 and "FAIL  no agent socket at /nonexistent/agent.sock" in r.stdout
    agents.write_config("b")


def test_open_session_puts_back_a_session_moved_out_of_its_job(
    agents: LoopbackAgents, trees: dict[str, JobTree], user: ThrowawayUser
) -> None:
    """Something between account and session (a misplaced pam_systemd) moved the monitor."""
    agents.write_config("b")
    elsewhere = trees["b"].root / "elsewhere"
    elsewhere.mkdir()
    try:
        sshd = agents.sshd("b", escape=str(elsewhere / "cgroup.procs"))
        client = connect_from_job(trees, user, "42", "tcp", sshd.port)
        try:
            login = sshd.login(user.name)
        finally:
            end_client(client)
        assert login["fields"]["job"] == "42"
        assert "/elsewhere" in login["moved"]  # it had left the job ...
        assert login["session"] == "CALLERID/1 verdict=adopt reason=readopted job=42 msg="
        assert trees["b"].cgroup_of(login["monitor"]) == trees["b"].cgroup_path("42", "step_extern")
        sshd.close()
    finally:
        wait_for(lambda: _rmdir(elsewhere), what="empty cgroup removed")


def _rmdir(path: Path) -> bool:
    try:
        path.rmdir()
    except OSError:
        return False
    return True


def test_calleridctl_status(agents: LoopbackAgents) -> None:
    agents.write_config("b")
    r = ctl(agents, "b", "status", "--json")
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)
    assert body["node"] == "b" and body["backend"] == "cgroup" and body["peers"] == 2
    assert body["pid"] == agents.procs["b"].pid
    assert body["scheduling"] == "batch"
    assert body["served"]["answered"] >= 0 and "in_flight" in body["pam"]
    assert {"waiting", "abandoned", "accept_errors"} <= body["pam"].keys()
    r = ctl(agents, "b", "status")
    assert r.returncode == 0 and r.stdout.startswith("callerid-agent ")
    assert "waiting their turn" in r.stdout and "given up by the client" in r.stdout
    assert "on b, pid" in r.stdout and "2 authorized peers" in r.stdout
    assert "scheduling batch" in r.stdout
    cfg = agents.config("b")
    cfg.write_text(cfg.read_text().replace(str(agents.socket("b")), "/nonexistent/agent.sock"))
    r = ctl(agents, "b", "status")
    assert r.returncode == 1 and "no agent answers on /nonexistent/agent.sock" in r.stderr
    agents.write_config("b")


def _policies(pid: int) -> set[int]:
    return {os.sched_getscheduler(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


def test_every_thread_runs_under_the_configured_scheduling(
    agents: LoopbackAgents, trees: dict[str, JobTree]
) -> None:
    # the default: SCHED_BATCH for the loop, the workers and zmq's I/O thread alike
    assert _policies(agents.procs["a"].pid) == {os.SCHED_BATCH}
    with LoopbackAgents(trees, extra={"scheduling": "normal"}) as normal:
        assert _policies(normal.procs["a"].pid) == {os.SCHED_OTHER}
        body = json.loads(ctl(normal, "a", "status", "--json").stdout)
        assert body["scheduling"] == "normal"
