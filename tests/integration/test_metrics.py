"""Real agents with metrics on: logins through the real PAM socket and mesh, then the
metrics scraped over HTTP (a loopback port the agent picked) and read from the node_exporter
textfile, both parsed with prometheus_client's own text parser.

Node "a" (127.0.0.2) and node "b" (127.0.0.3), as in test_agent.py: a real client in job 42
of "a" connects to a stand-in sshd on "b", whose monitor asks b's agent, which asks a's.
"""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.agents import ADDRESSES, LoopbackAgents, client_argv, end_client
from tests.support.cgroups import JobTree
from tests.support.poll import wait_for
from tests.support.users import ThrowawayUser

pytestmark = pytest.mark.root

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class MetricsAgents(LoopbackAgents):
    """LoopbackAgents whose agents serve metrics on a free loopback port and write their own
    textfile (rewritten every second)."""

    def textfile(self, node: str) -> Path:
        return self.dir / f"{node}-metrics" / "callerid.prom"

    def write_config(self, node: str, **override: Any) -> Path:
        self.textfile(node).parent.mkdir(exist_ok=True)
        section = {"port": 0, "textfile": str(self.textfile(node)), "interval_s": 1}
        return super().write_config(node, metrics=section, **override)


@pytest.fixture(scope="module")
def agents(trees: dict[str, JobTree]) -> Iterator[MetricsAgents]:
    with MetricsAgents(trees) as ag:
        yield ag


@pytest.fixture(scope="module")
def logins(
    agents: MetricsAgents, trees: dict[str, JobTree], user: ThrowawayUser
) -> list[tuple[str, str]]:
    """Four logins on b: two adopted by callerid over the mesh, root, an unknown user."""
    done = []
    for _ in range(2):
        sshd = agents.sshd("b")
        argv = client_argv("tcp", ADDRESSES["a"], ADDRESSES["b"], sshd.port)
        client = trees["a"].spawn_in(
            "42", "step_batch", argv, user=user, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        try:
            login = sshd.login(user.name)
        finally:
            end_client(client)
            sshd.close()
        done.append((login["fields"]["verdict"], login["fields"]["reason"]))
    for name in ("root", "no-such-user-cid"):
        fields = line_fields(ask(agents.socket("b"), f"CALLERID/1 op=account user={name}\n"))
        done.append((fields["verdict"], fields["reason"]))
    assert done == [
        ("adopt", "callerid"),
        ("adopt", "callerid"),
        ("allow", "root"),
        ("deny", "unknown_user"),
    ]
    return done


def ask(path: Path, line: str) -> str:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(line.encode())
        return s.makefile("r").readline()


def line_fields(line: str) -> dict[str, str]:
    return dict(f.split("=", 1) for f in line.strip().split(" ")[1:])


def status(agents: LoopbackAgents, node: str) -> dict[str, Any]:
    line = ask(agents.socket(node), "CALLERID/1 op=status user=root service=test\n")
    body: dict[str, Any] = json.loads(unquote(line_fields(line)["msg"]))
    return body


def scrape(agents: LoopbackAgents, node: str) -> tuple[str, str]:
    """(the endpoint, the text it serves)."""
    listen = status(agents, node)["metrics"]["listen"]
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=5) as r:
        return listen, r.read().decode()


def samples(text: str) -> tuple[Samples, dict[str, str]]:
    """Every sample by (name, sorted labels), and every family's HELP text."""
    out: Samples = {}
    helps = {}
    for family in text_string_to_metric_families(text):
        helps[family.name] = family.documentation
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out, helps


def total(got: Samples, name: str, **labels: str) -> float:
    """The sum over the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in got.items() if n == name and want <= set(lab))


def test_an_agent_serves_its_decisions_and_counters_over_http(
    agents: MetricsAgents, logins: list[tuple[str, str]]
) -> None:
    listen, text = scrape(agents, "b")
    assert listen.startswith("127.0.0.1:")  # metrics.address defaults to loopback
    got, helps = samples(text)
    decisions = "callerid_decisions_total"
    assert total(got, decisions, decision="adopt", reason="callerid", peer_status="found") == 2
    assert total(got, decisions, decision="allow", reason="root") == 1
    assert total(got, decisions, decision="deny", reason="unknown_user") == 1
    assert total(got, decisions) == len(logins)
    assert total(got, "callerid_decision_latency_seconds_count") == len(logins)
    assert total(got, "callerid_decision_latency_seconds_bucket", le="+Inf") == len(logins)
    assert 0 < total(got, "callerid_decision_latency_seconds_sum") < len(logins) * 1.5
    assert total(got, "callerid_loop_responsive") == 1
    assert total(got, "callerid_mesh_peers_connected") == 1  # b keeps its connection to a
    assert total(got, "callerid_mesh_peers_authorized") == 2
    assert total(got, "callerid_pam_waiting_requests") == 0
    assert total(got, "callerid_pam_in_flight_requests") == 0
    assert total(got, "callerid_journal_lost_total") >= 0
    assert total(got, "callerid_agent_info", node="b", backend="cgroup") == 1
    for name, text_of in helps.items():
        assert not name.startswith("callerid_") or text_of, f"{name} has no HELP"
    for (name, labels), _ in got.items():
        for key, val in labels:  # no user, uid, job id or address ever becomes a label
            assert key in {"decision", "reason", "peer_status", "le", "kind", "version",
                           "backend", "node"}, (name, key, val)  # fmt: skip


def test_the_source_counts_the_queries_it_answered(
    agents: MetricsAgents, logins: list[tuple[str, str]]
) -> None:
    got, _ = samples(scrape(agents, "a")[1])
    assert total(got, "callerid_mesh_queries_answered_total") == 2
    assert total(got, "callerid_mesh_refused_handshakes_total") == 0
    assert total(got, "callerid_decisions_total") == 0  # a decided no login


def test_the_textfile_has_the_same_numbers_and_goes_when_the_agent_stops(
    agents: MetricsAgents, logins: list[tuple[str, str]]
) -> None:
    path = agents.textfile("b")
    assert status(agents, "b")["metrics"]["textfile"] == str(path)

    def complete() -> Samples | None:
        got, _ = samples(path.read_text()) if path.exists() else ({}, {})
        return got if total(got, "callerid_decisions_total") == len(logins) else None

    got = wait_for(complete, timeout=10, what="b's textfile with every login")
    assert total(got, "callerid_decisions_total", decision="deny") == 1
    assert total(got, "callerid_loop_responsive") == 1
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    assert agents.stop("b") == 0
    assert not path.exists()
