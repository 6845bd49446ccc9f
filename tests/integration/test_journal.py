"""callerid's journal records in a real (private) systemd-journald, read back with journalctl."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from callerid.agent.journal import DECISION_MESSAGE_IDS, EVENT_MESSAGE_IDS
from tests.support.journald import PrivateJournald, unavailable_reason
from tests.support.poll import wait_for

pytestmark = pytest.mark.root
pytest.importorskip("systemd.journal", reason="systemd-python is not installed")

CATALOG = Path(__file__).resolve().parents[2] / "packaging" / "callerid.catalog"
HOST_SOCKET = Path("/run/systemd/journal/socket")
HOST_RUN_LOG = Path("/run/log/journal")

# Runs in a child process: one Journal, the default sender (systemd-python) and socket.
WRITER = """
import json, os, sys
from callerid.agent.journal import DecisionRecord, Journal
node = sys.argv[1]
j = Journal()
j.record(DecisionRecord(
    decision="adopt", reason="callerid", user="alice", uid=1001, pid=4242, job="42",
    src="10.0.0.1:40022", dst="10.0.0.2:22", peer_status="found", latency_us=1234,
    message="alice (uid 1001) from 10.0.0.1:40022 adopted into job 42 (callerid)",
    service="sshd", node=node))
j.record(DecisionRecord(
    decision="deny", reason="no_jobs", user="bob", uid=1002, pid=4343, job=None,
    src="10.0.0.1:40023", dst="10.0.0.2:22", peer_status=None, latency_us=77,
    message="bob (uid 1002) from 10.0.0.1:40023 denied (no_jobs)", node=node))
j.event("started", "callerid-agent on " + node + " started", node=node)
print(json.dumps({"pid": os.getpid(), "sent": j.sent, "to_stream": j.to_stream}))
"""


def host_state() -> tuple[bool, list[str]]:
    """What of the host's journal a private journald must never create or change."""
    files = sorted(str(p) for p in HOST_RUN_LOG.rglob("*")) if HOST_RUN_LOG.exists() else []
    return HOST_SOCKET.exists(), files


@pytest.fixture(scope="module")
def jd() -> Iterator[PrivateJournald]:
    with PrivateJournald() as journald:
        yield journald


def write_records(prefix: list[str], node: str) -> dict[str, int]:
    r = subprocess.run(
        [*prefix, sys.executable, "-c", WRITER, node], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", "no stderr fallback and no warning when journald runs"
    return dict(json.loads(r.stdout))


def test_records_carry_every_design_field(jd: PrivateJournald) -> None:
    node = f"n-{secrets.token_hex(4)}"
    out = write_records(jd.prefix, node)
    assert (out["sent"], out["to_stream"]) == (3, 0)

    (adopt,) = jd.wait_for_entries(1, CALLERID_NODE=node, CALLERID_DECISION="adopt")
    expected = {
        "MESSAGE": "alice (uid 1001) from 10.0.0.1:40022 adopted into job 42 (callerid)",
        "PRIORITY": "6",
        "SYSLOG_IDENTIFIER": "callerid-agent",
        "MESSAGE_ID": DECISION_MESSAGE_IDS["adopt"],
        "CALLERID_DECISION": "adopt",
        "CALLERID_REASON": "callerid",
        "CALLERID_USER": "alice",
        "CALLERID_UID": "1001",
        "CALLERID_PID": "4242",
        "CALLERID_JOB_ID": "42",
        "CALLERID_SRC": "10.0.0.1:40022",
        "CALLERID_DST": "10.0.0.2:22",
        "CALLERID_PEER_STATUS": "found",
        "CALLERID_LATENCY_US": "1234",
        "CALLERID_SERVICE": "sshd",
        "CALLERID_NODE": node,
        "_TRANSPORT": "journal",
        "_PID": str(out["pid"]),
    }
    assert {k: adopt.get(k) for k in expected} == expected

    (deny,) = jd.read(CALLERID_NODE=node, CALLERID_DECISION="deny")
    assert (deny["PRIORITY"], deny["MESSAGE_ID"]) == ("5", DECISION_MESSAGE_IDS["deny"])
    assert (deny["CALLERID_USER"], deny["CALLERID_REASON"]) == ("bob", "no_jobs")
    assert "CALLERID_JOB_ID" not in deny
    assert "CALLERID_PEER_STATUS" not in deny
    assert "CALLERID_SERVICE" not in deny

    (started,) = jd.read(CALLERID_NODE=node, CALLERID_EVENT="started")
    assert started["MESSAGE_ID"] == EVENT_MESSAGE_IDS["started"]
    assert started["MESSAGE"] == f"callerid-agent on {node} started"


def test_auditor_query_finds_only_denials(jd: PrivateJournald) -> None:
    node = f"n-{secrets.token_hex(4)}"
    write_records(jd.prefix, node)
    jd.wait_for_entries(3, CALLERID_NODE=node)
    r = jd.run(
        ["journalctl", "--no-pager", "-o", "cat", "CALLERID_DECISION=deny", f"CALLERID_NODE={node}"]
    )
    assert r.stdout.splitlines() == ["bob (uid 1002) from 10.0.0.1:40023 denied (no_jobs)"]


def test_ip_netns_exec_inside_the_prefix_reaches_the_private_journal(jd: PrivateJournald) -> None:
    # The namespace is made after journald started: it must still show up in /run/netns inside.
    ns = f"cid-jt-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
    try:
        tag = secrets.token_hex(8)
        code = (
            "import os; from systemd import journal; "
            f"journal.send('from a netns', TESTTAG='{tag}', NET=os.readlink('/proc/self/ns/net'))"
        )
        argv = [*jd.prefix, "ip", "netns", "exec", ns, sys.executable, "-c", code]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        (entry,) = jd.wait_for_entries(1, TESTTAG=tag)
        assert entry["NET"] == f"net:[{os.stat(f'/run/netns/{ns}').st_ino}]"
        assert entry["NET"] != os.readlink("/proc/self/ns/net")
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True, capture_output=True)


def test_catalog_texts_show_with_journalctl_x(jd: PrivateJournald) -> None:
    db = Path("/var/lib/systemd/catalog/database")
    before = db.stat().st_mtime_ns if db.exists() else None
    jd.install_catalog(CATALOG)
    node = f"n-{secrets.token_hex(4)}"
    write_records(jd.prefix, node)
    jd.wait_for_entries(3, CALLERID_NODE=node)
    r = jd.run(["journalctl", "--no-pager", "-x", f"CALLERID_NODE={node}"])
    assert r.returncode == 0, r.stderr
    assert "Subject: Login of alice adopted into job 42 (callerid)" in r.stdout
    assert "Subject: Login of bob denied (no_jobs)" in r.stdout
    assert "Subject: Agent started" in r.stdout
    assert "journalctl CALLERID_DECISION=deny" in r.stdout
    assert (db.stat().st_mtime_ns if db.exists() else None) == before, "host catalog changed"


def test_catalog_parses_with_journalctl_root(tmp_path: Path) -> None:
    if unavailable_reason() is not None:  # only journalctl is needed, but keep one skip rule
        pytest.skip(str(unavailable_reason()))
    catalog_dir = tmp_path / "usr/lib/systemd/catalog"
    catalog_dir.mkdir(parents=True)
    (catalog_dir / CATALOG.name).write_bytes(CATALOG.read_bytes())
    subprocess.run(["journalctl", f"--root={tmp_path}", "--update-catalog"], check=True)
    r = subprocess.run(
        ["journalctl", f"--root={tmp_path}", "--list-catalog"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    listed = {line.split()[0]: line for line in r.stdout.splitlines()}
    assert set(listed) == {*DECISION_MESSAGE_IDS.values(), *EVENT_MESSAGE_IDS.values()}
    assert "callerid: Login of @CALLERID_USER@ denied" in listed[DECISION_MESSAGE_IDS["deny"]]


def test_private_journald_leaves_the_host_alone() -> None:
    before = host_state()
    with PrivateJournald() as jd:
        assert jd.root_path("run/systemd/journal/socket").is_socket()
        write_records(jd.prefix, "host-check")
        jd.wait_for_entries(3, CALLERID_NODE="host-check")
        assert host_state() == before
        journal_files = list(jd.root_path("run/log/journal").rglob("*.journal"))
        assert journal_files, "the private journal is on its own tmpfs"
        ns = jd.mnt_ns
        assert ns != os.readlink("/proc/self/ns/mnt")
    assert host_state() == before
    assert jd.proc is None
    assert ns not in mount_namespaces_in_use(), "the private mount namespace outlived journald"


def mount_namespaces_in_use() -> set[str]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found.add(os.readlink(entry / "ns" / "mnt"))
            except OSError:
                continue
    return found


def test_teardown_reports_processes_left_in_the_namespace() -> None:
    jd = PrivateJournald()
    jd.__enter__()
    jd.leftover_timeout = 0.2
    straggler = subprocess.Popen([*jd.prefix, "sleep", "60"])
    try:
        wait_for(
            lambda: any(p.startswith(f"{straggler.pid} ") for p in jd.processes_in_namespace()),
            what="sleep inside the namespace",
        )
        with pytest.raises(AssertionError, match="sleep 60"):
            jd.close()
    finally:
        straggler.kill()
        straggler.wait()


def test_without_journald_records_go_to_stderr() -> None:
    """No journald socket (a fresh tmpfs over /run/systemd): the real fallback path."""
    if unavailable_reason() is not None:
        pytest.skip(str(unavailable_reason()))
    script = 'mount -t tmpfs callerid-t /run/systemd && exec "$@"'
    argv = ["unshare", "--mount", "--propagation", "slave", "--", "sh", "-c", script, "sh"]
    r = subprocess.run(
        [*argv, sys.executable, "-c", WRITER, "no-journald"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["to_stream"] == 3
    lines = r.stderr.splitlines()
    warning = "journald not running (no /run/systemd/journal/socket): decision records go to stderr"
    assert [line for line in lines if "journald not running" in line] == [warning]
    records = [line for line in lines if line.startswith("callerid-agent: ")]
    assert len(records) == 3
    assert records[1].startswith(
        "callerid-agent: bob (uid 1002) from 10.0.0.1:40023 denied (no_jobs) "
        "[CALLERID_DECISION=deny CALLERID_REASON=no_jobs CALLERID_USER=bob"
    )


def test_parent_mount_namespace_is_copied(tmp_path: Path) -> None:
    """`parent_mount_ns`: journald's namespace starts as a copy of another one (a cluster's)."""
    if unavailable_reason() is not None:
        pytest.skip(str(unavailable_reason()))
    hosts = tmp_path / "hosts"
    hosts.write_text("10.9.9.9 cid-jt-node\n")
    pin = Path(tempfile.mkdtemp(prefix="cid-jt-", dir="/tmp")) / "mnt.ns"
    pin.touch()
    subprocess.run(
        ["unshare", f"--mount={pin}", "--propagation", "slave",
         "mount", "--bind", str(hosts), "/etc/hosts"],
        check=True, capture_output=True,
    )  # fmt: skip
    try:
        with PrivateJournald(parent_mount_ns=pin) as jd:
            assert jd.run(["cat", "/etc/hosts"]).stdout == "10.9.9.9 cid-jt-node\n"
            assert jd.run(["test", "-S", "/run/systemd/journal/socket"]).returncode == 0
        assert Path("/etc/hosts").read_text() != "10.9.9.9 cid-jt-node\n"
    finally:
        subprocess.run(["umount", str(pin)], check=True)
        shutil.rmtree(pin.parent)
