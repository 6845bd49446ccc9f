"""The metrics: what the sink counts, bounded labels, the status collector, the textfile
written atomically, the endpoint's bounds, and the `metrics:` config section."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from callerid.agent import _metricsio, metrics
from callerid.agent.config import ConfigError, MetricsConfig, parse
from callerid.agent.journal import DecisionRecord
from callerid.agent.metrics import OTHER, PEER_STATUSES, REASONS, Metrics, StatusCollector
from tests.fakes import FakeJournal
from tests.support.poll import async_wait_for
from tests.support.readme import documented

README = Path(__file__).resolve().parents[2] / "README.md"
ON = MetricsConfig(port=0)


def rec(
    decision: str = "adopt",
    reason: str = "callerid",
    peer: str | None = "found",
    latency_us: int = 1500,
    **kw: str,
) -> DecisionRecord:
    return DecisionRecord(
        decision, reason, "alice", 1000, 4242, "42", "10.0.0.1:40022", "10.0.0.2:22", peer,
        latency_us, "text", **kw,
    )  # fmt: skip


def value(reg: CollectorRegistry, name: str, **labels: str) -> float | None:
    return reg.get_sample_value(name, labels)


def parsed(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


# -- the sink ----------------------------------------------------------------------------------


def test_the_sink_counts_each_record_and_hands_it_on() -> None:
    m, journal = Metrics(ON), FakeJournal()
    sink = m.sink(journal)
    records = [
        rec(),
        rec(),
        rec("deny", "no_jobs", "skipped", 300),
        rec("adopt", "unknown_newest", "timeout", 501_000),
        rec("error", "timeout", None, 2_000_100),
    ]
    for r in records:
        sink.record(r)
    assert journal.records == records  # the same records, in order
    reg = m.registry
    total = "callerid_decisions_total"
    assert value(reg, total, decision="adopt", reason="callerid", peer_status="found") == 2
    assert value(reg, total, decision="deny", reason="no_jobs", peer_status="skipped") == 1
    assert value(reg, total, decision="error", reason="timeout", peer_status="none") == 1
    lat = "callerid_decision_latency_seconds"
    assert value(reg, f"{lat}_count", decision="adopt") == 3
    assert value(reg, f"{lat}_bucket", decision="adopt", le="0.002") == 2
    assert value(reg, f"{lat}_bucket", decision="adopt", le="1.0") == 3
    assert value(reg, f"{lat}_sum", decision="deny") == pytest.approx(0.0003)
    assert value(reg, f"{lat}_bucket", decision="error", le="2.0") == 0
    assert value(reg, f"{lat}_count", decision="allow") == 0  # exists before any allow


def test_audit_mode_counts_what_enforce_would_have_done() -> None:
    m = Metrics(ON)
    m.observe(rec("allow", "audit", "found", would_decision="deny", would_reason="no_jobs"))
    m.observe(rec("allow", "audit", "found", would_decision="deny", would_reason="bob's"))
    name = "callerid_audit_would_decisions_total"
    assert value(m.registry, name, decision="deny", reason="no_jobs") == 1
    assert value(m.registry, name, decision="deny", reason=OTHER) == 1


def test_a_failing_count_never_costs_the_journal_its_record() -> None:
    m, journal = Metrics(ON), FakeJournal()

    def broken(r: DecisionRecord) -> None:
        raise RuntimeError("boom")

    m.observe = broken  # type: ignore[method-assign]
    m.sink(journal).record(rec())
    assert journal.records == [rec()]


words = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(metrics.DECISIONS)), words, words | st.none())))
def test_label_values_are_bounded_whatever_the_records_say(
    rows: list[tuple[str, str, str | None]],
) -> None:
    m = Metrics(ON)
    for decision, reason, peer in rows:
        m.observe(rec(decision, reason, peer))
    samples = [s for f in m.registry.collect() if f.name == "callerid_decisions" for s in f.samples]
    seen = [s for s in samples if s.name == "callerid_decisions_total"]
    assert sum(s.value for s in seen) == len(rows)
    for s in seen:
        assert s.labels["reason"] in REASONS | {OTHER}
        assert s.labels["peer_status"] in PEER_STATUSES | {OTHER, "none"}
    assert len(seen) <= len(metrics.DECISIONS) * (len(REASONS) + 1) * (len(PEER_STATUSES) + 2)


def test_the_label_sets_are_the_readme_tables() -> None:
    assert documented("CALLERID_REASON") == REASONS
    assert documented("CALLERID_PEER_STATUS") == PEER_STATUSES


# -- the agent's counters ----------------------------------------------------------------------

STATUS: dict[str, object] = {
    "node": "n1", "version": "0.1.0", "backend": "cgroup", "uptime_s": 12.5, "peers": 3,
    "pooled": 2, "served": {"received": 9, "answered": 8, "malformed": 1, "bad_version": 0,
                            "unauthorized": 2, "internal_errors": 0, "refused_handshakes": 5},
    "asked": {"sockets_opened": 4, "negative_cache_hits": 1, "stalled_fast_fails": 0},
    "pam": {"in_flight": 70, "waiting": 6, "refused": 1, "malformed": 0, "abandoned": 2,
            "accept_errors": 0},
    "journald": True, "journal_lost": 7, "metrics": {"listen": None, "textfile": None},
}  # fmt: skip


def test_the_status_collector_reads_the_agent_counters() -> None:
    reg = CollectorRegistry()
    reg.register(StatusCollector(lambda: STATUS))
    got = parsed(generate_latest(reg).decode())
    one = {name: samples[0][1] for name, samples in got.items() if len(samples) == 1}
    assert one["callerid_loop_responsive"] == 1
    assert one["callerid_pam_waiting_requests"] == 6
    assert one["callerid_pam_in_flight_requests"] == 70
    assert one["callerid_mesh_peers_connected"] == 2
    assert one["callerid_mesh_refused_handshakes_total"] == 5
    assert one["callerid_journal_lost_total"] == 7
    assert one["callerid_journald_connected"] == 1
    assert got["callerid_agent_info"] == [
        ({"version": "0.1.0", "backend": "cgroup", "node": "n1"}, 1.0)
    ]
    bad = {labels["kind"]: v for labels, v in got["callerid_mesh_bad_requests_total"]}
    assert bad == {"malformed": 1, "bad_version": 0, "unauthorized": 2, "internal_error": 0}


def test_without_the_counters_only_the_loop_gauge_is_there() -> None:
    reg = CollectorRegistry()
    reg.register(StatusCollector(lambda: None))
    assert parsed(generate_latest(reg).decode()) == {"callerid_loop_responsive": [({}, 0.0)]}
    reg = CollectorRegistry()
    reg.register(StatusCollector(lambda: {"pam": {"waiting": "x"}}))  # a shape it does not know
    assert "callerid_pam_waiting_requests" not in parsed(generate_latest(reg).decode())


def test_the_status_is_read_on_the_loop_thread_and_not_waited_for_forever() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        threads: list[int] = []
        call = _metricsio.LoopCall(lambda: threads.append(threading.get_ident()) or 1, loop, 0.2)
        assert call() == 1  # on the loop's own thread: called directly
        assert await asyncio.to_thread(call) == 1  # from another: run on the loop
        assert threads == [threading.get_ident()] * 2
        result: list[object] = []
        waiter = threading.Thread(target=lambda: result.append(call()))
        waiter.start()
        time.sleep(0.4)  # the loop is stuck (this test blocks it on purpose)
        waiter.join()
        assert result == [None]

    asyncio.run(main())


# -- the textfile ------------------------------------------------------------------------------


def test_the_textfile_is_replaced_atomically(tmp_path: Path) -> None:
    """A reader never sees a partial file, nor a mix of two writes: every read parses and
    has all the series, all with one generation's value."""
    reg = CollectorRegistry()
    gauge = Gauge("gen", "generation", ("i",), registry=reg)
    series = 2000  # ~60 KB: many write() calls' worth
    path = tmp_path / "callerid.prom"

    def write(gen: int) -> None:
        for i in range(series):
            gauge.labels(str(i)).set(gen)
        _metricsio.write_textfile(path, reg)

    write(0)
    stop = threading.Event()

    def writer() -> None:
        gen = 1
        while not stop.is_set():
            write(gen)
            gen += 1

    thread = threading.Thread(target=writer)
    thread.start()
    reads = 0
    try:
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            samples = parsed(path.read_text())["gen"]
            assert len(samples) == series
            assert len({v for _, v in samples}) == 1
            reads += 1
    finally:
        stop.set()
        thread.join()
    assert reads > 10
    assert [p.name for p in tmp_path.iterdir()] == ["callerid.prom"]  # no temporary left


def test_the_textfile_is_readable_by_node_exporter_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)  # the unit's UMask
    try:
        _metricsio.write_textfile(tmp_path / "c.prom", Metrics(ON).registry)
    finally:
        os.umask(old)
    assert (tmp_path / "c.prom").stat().st_mode & 0o777 == 0o644


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        _metricsio.write_textfile(tmp_path / "missing" / "c.prom", CollectorRegistry())

    class Boom(CollectorRegistry):
        def collect(self) -> Iterator[object]:  # type: ignore[override]
            raise RuntimeError("collect failed")

    with pytest.raises(RuntimeError):
        _metricsio.write_textfile(tmp_path / "c.prom", Boom())
    assert list(tmp_path.iterdir()) == []


def test_the_textfile_is_rewritten_on_its_timer_and_removed_at_stop(tmp_path: Path) -> None:
    path = tmp_path / "callerid.prom"
    m = Metrics(MetricsConfig(textfile=path, interval_s=1))
    m.watch(lambda: STATUS)

    async def main() -> None:
        await m.start()
        task = asyncio.create_task(m.run())
        while not path.exists():
            await asyncio.sleep(0.01)
        m.observe(rec())
        first = path.stat().st_mtime_ns
        while path.stat().st_mtime_ns == first:
            await asyncio.sleep(0.05)
        got = parsed(path.read_text())
        assert got["callerid_decisions_total"][0][1] == 1
        assert got["callerid_pam_waiting_requests"] == [({}, 6.0)]
        task.cancel()
        await m.stop()

    asyncio.run(asyncio.wait_for(main(), 10))
    assert not path.exists()


# -- the endpoint ------------------------------------------------------------------------------


def test_the_endpoint_serves_and_bounds_its_scrapers() -> None:
    """Idle connections hold at most MAX_SCRAPES threads; one more is closed at once; the
    loop never waits for them, and the stop does not either."""
    m = Metrics(ON)
    m.watch(lambda: STATUS)

    async def main() -> None:
        await m.start()
        listen = m.endpoint()["listen"]
        assert listen is not None and listen.startswith("127.0.0.1:")
        host, port = listen.rsplit(":", 1)
        url = f"http://{listen}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
        assert parsed(text.decode())["callerid_loop_responsive"] == [({}, 1.0)]
        idle = [socket.create_connection((host, int(port))) for _ in range(_metricsio.MAX_SCRAPES)]
        await async_wait_for(
            lambda: _scrape_threads() >= _metricsio.MAX_SCRAPES,
            what="a thread per idle connection, each waiting for a request line",
        )
        extra = socket.create_connection((host, int(port)))
        extra.settimeout(5)
        assert await asyncio.to_thread(extra.recv, 100) == b""  # closed at once
        extra.close()
        began = time.monotonic()
        await asyncio.sleep(0.01)
        assert time.monotonic() - began < 0.5
        await asyncio.wait_for(m.stop(), 3)
        for s in idle:
            s.close()
        with pytest.raises(OSError):
            socket.create_connection((host, int(port)), timeout=1).close()

    asyncio.run(asyncio.wait_for(main(), 20))


def test_a_port_that_cannot_be_bound_is_not_fatal() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        m = Metrics(MetricsConfig(port=taken.getsockname()[1]))

        async def main() -> None:
            await m.start()
            assert m.endpoint()["listen"] is None
            await m.stop()

        asyncio.run(main())


# -- config ------------------------------------------------------------------------------------


def test_metrics_are_off_by_default_and_loopback_when_on() -> None:
    assert not parse({}).metrics.enabled
    cfg = parse({"metrics": {"port": 9817}}).metrics
    assert cfg.enabled and cfg.address == "127.0.0.1"
    assert parse({"metrics": {"port": 9817, "address": "::1"}}).metrics.address == "::1"
    remote = {"port": 9817, "address": "10.0.0.7", "allow_remote": True}
    assert parse({"metrics": remote}).metrics.address == "10.0.0.7"
    assert parse({"metrics": {"textfile": "/var/lib/n/callerid.prom"}}).metrics.enabled


@pytest.mark.parametrize(
    ("section", "needle"),
    [
        ({"port": 9817, "address": "0.0.0.0"}, "metrics.address: 0.0.0.0 is not a loopback"),
        ({"port": 9817, "address": "10.0.0.7"}, "allow_remote"),
        ({"port": 9817, "address": "localhost"}, "not an IP address literal"),
        ({"port": 65536}, "metrics.port: 65536 is out of range"),
        ({"port": "9817"}, "metrics.port: expected int"),
        ({"textfile": "callerid.prom"}, "metrics.textfile: must be an absolute path"),
        ({"textfile": "/var/lib/n/callerid.txt"}, "must end in .prom"),
        ({"interval_s": 0.5}, "metrics.interval_s: 0.5 is out of range [1, 3600]"),
        ({"listen": "127.0.0.1:9817"}, "unknown key metrics.listen"),
    ],
)
def test_bad_metrics_settings_name_the_key(section: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        parse({"metrics": section})


def _scrape_threads() -> int:
    """The endpoint's threads serving a connection (socketserver names them so)."""
    return sum("process_request_thread" in t.name for t in threading.enumerate())
