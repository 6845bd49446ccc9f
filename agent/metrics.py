"""The agent's metrics in the Prometheus text format (prometheus_client).

Two sources, both through seams that exist anyway:

- Decisions: every decision record passes through one sink (`PamServer` hands each
  `DecisionRecord` to ``journal.record``). `MetricsSink` stands in that place: it counts the
  record, then hands it on to the journal. So each journal record is counted once, with its
  verdict, reason, peer status and latency.
- Everything else is read at collection time from the agent's own counters (`Agent.status()`,
  what `calleridctl status` shows) by `StatusCollector`: queue depth, mesh connections,
  refused handshakes, journal losses. A scrape thread never touches loop-owned objects: the
  status is read on the loop's thread (`_metricsio.LoopCall`), and if the loop does not answer
  within a second, ``callerid_loop_responsive`` is 0 and those metrics are left out.

Label values come from small fixed sets (`DECISIONS`, `REASONS`, `PEER_STATUSES`; anything
else is counted as ``other``), never a user, uid, job id or address. One dedicated
`CollectorRegistry` per `Metrics` (never prometheus_client's global one).

Outputs (`config.MetricsConfig`): an HTTP endpoint (`_metricsio.HttpEndpoint`, its own
threads; a scrape costs the loop one ``status()`` call) and/or a file for node_exporter's
textfile collector, rewritten every ``interval_s`` by one writer thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from callerid.agent._metricsio import HttpEndpoint, LoopCall, remove_textfile, write_textfile
from callerid.agent.config import MetricsConfig
from callerid.agent.journal import DECISIONS, DecisionRecord

if TYPE_CHECKING:
    from callerid.agent.pamserver import RecordSink

__all__ = [
    "DECISIONS",
    "LATENCY_BUCKETS",
    "OTHER",
    "PEER_STATUSES",
    "REASONS",
    "Metrics",
    "MetricsSink",
    "StatusCollector",
]

log = logging.getLogger(__name__)

# the values of CALLERID_REASON and CALLERID_PEER_STATUS (README, "Auditing"; a test compares)
REASONS: Final = frozenset({
    "root", "exempt_user", "exempt_group", "unknown_user", "no_jobs", "single_job", "callerid",
    "unknown_newest", "unknown_oldest", "unknown_random", "unknown_deny", "unknown_allow",
    "adopt_failed", "namespace_failed", "namespace_unsupported", "backend_error", "timeout",
    "agent_error", "audit",
})  # fmt: skip
PEER_STATUSES: Final = frozenset({
    "found", "not_found", "error", "unreachable", "timeout", "auth_failed", "unknown_peer",
    "local", "local_not_found", "local_error", "no_connection", "skipped",
})  # fmt: skip
OTHER: Final = "other"  # a value outside the fixed set (a new word nobody added here)
NO_STATUS: Final = "none"  # a record without a peer status
# seconds; a decision is ~2 ms with a cross-node query, the PAM deadline 2 s by default
LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
)  # fmt: skip

Status = Mapping[str, object]

# (key in Agent.status(), "a.b" for a nested one; kind; metric name; help)
_FROM_STATUS: Final = (
    ("uptime_s", "gauge", "callerid_agent_uptime_seconds", "Seconds since the agent started."),
    ("pam.in_flight", "gauge", "callerid_pam_in_flight_requests",
     "PAM socket connections being handled: waiting for a decision slot, being decided or "
     "answered."),
    ("pam.waiting", "gauge", "callerid_pam_waiting_requests",
     "PAM requests waiting their turn for a decision slot (at most 64 are decided at once)."),
    ("pam.abandoned", "counter", "callerid_pam_abandoned",
     "Waiting PAM requests dropped undecided because their client had already given up."),
    ("pam.refused", "counter", "callerid_pam_refused",
     "PAM socket clients refused because they are not root."),
    ("pam.malformed", "counter", "callerid_pam_malformed", "Malformed PAM socket requests."),
    ("pam.accept_errors", "counter", "callerid_pam_accept_errors",
     "Failed accepts on the PAM socket (out of file descriptors or memory)."),
    ("peers", "gauge", "callerid_mesh_peers_authorized", "Authorized peer keys."),
    ("pooled", "gauge", "callerid_mesh_peers_connected",
     "Open mesh connections to source agents (the client's pool)."),
    ("served.received", "counter", "callerid_mesh_queries_received",
     "Mesh queries received from peers."),
    ("served.answered", "counter", "callerid_mesh_queries_answered",
     "Mesh queries answered."),
    ("served.refused_handshakes", "counter", "callerid_mesh_refused_handshakes",
     "CURVE handshakes refused: the client's key is not authorized."),
    ("asked.sockets_opened", "counter", "callerid_mesh_connections_opened",
     "Mesh connections opened to source agents."),
    ("asked.negative_cache_hits", "counter", "callerid_mesh_dead_host_skips",
     "Queries answered unreachable at once: no agent there a moment ago."),
    ("asked.stalled_fast_fails", "counter", "callerid_mesh_stalled_fast_fails",
     "Queries answered timeout at once: the peer had let a query time out and stayed silent."),
    ("journald", "gauge", "callerid_journald_connected",
     "1 when decision records go to journald, 0 when to stderr (no journald socket)."),
    ("journal_lost", "counter", "callerid_journal_lost",
     "Decision records journald did not get (it did not read in time, or sending failed)."),
)  # fmt: skip
# the mesh server's bad requests, one label value each
_BAD_REQUESTS: Final = (
    ("malformed", "malformed"),
    ("bad_version", "bad_version"),
    ("unauthorized", "unauthorized"),
    ("internal_errors", "internal_error"),
)


def _lookup(status: Status, key: str) -> object:
    value: object = status
    for part in key.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return float(value)
    return float(value) if isinstance(value, int | float) else None


class StatusCollector(Collector):
    """The agent's counters (`Agent.status()`) as metrics, read at each collection.

    ``read`` returns the status, or None when it could not be had in time.
    """

    def __init__(self, read: Callable[[], Status | None]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        status = self.read()
        yield GaugeMetricFamily(
            "callerid_loop_responsive",
            "1 when the agent's event loop handed this collection its counters within 1 s; "
            "0 when it did not (logins are not being decided either) and they are left out.",
            value=0 if status is None else 1,
        )
        if status is None:
            return
        info = GaugeMetricFamily(
            "callerid_agent_info", "The agent: version, backend, node name.",
            labels=("version", "backend", "node"),
        )  # fmt: skip
        info.add_metric([str(status.get(k, "")) for k in ("version", "backend", "node")], 1)
        yield info
        for key, kind, name, text in _FROM_STATUS:
            value = _number(_lookup(status, key))
            if value is None:
                continue
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(name, text, value=value)
        bad = CounterMetricFamily(
            "callerid_mesh_bad_requests", "Mesh requests from peers refused, by kind.",
            labels=("kind",),
        )  # fmt: skip
        for key, label in _BAD_REQUESTS:
            value = _number(_lookup(status, f"served.{key}"))
            if value is not None:
                bad.add_metric([label], value)
        yield bad


class MetricsSink:
    """A `pamserver.RecordSink`: counts each decision record, then hands it on."""

    def __init__(self, metrics: Metrics, sink: RecordSink) -> None:
        self.metrics = metrics
        self.sink = sink

    def record(self, rec: DecisionRecord) -> None:
        try:
            self.metrics.observe(rec)
        except Exception:  # counting must never cost a login its record
            log.exception("metrics: cannot count a decision record")
        self.sink.record(rec)


class Metrics:
    """The registry, the decision metrics, and the outputs `cfg` asks for.

    `build()` makes it; `watch()` adds the agent's counters; on the loop, `start()` binds the
    endpoint, `run()` (a task) rewrites the textfile, `stop()` ends both.
    """

    def __init__(self, cfg: MetricsConfig, registry: CollectorRegistry | None = None) -> None:
        self.cfg = cfg
        self.registry = CollectorRegistry() if registry is None else registry
        self.decisions = Counter(
            "callerid_decisions",
            "PAM account decisions (one per journal record) by verdict, reason and what the "
            "source agent said.",
            ("decision", "reason", "peer_status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "callerid_decision_latency_seconds",
            "Time from a PAM request's arrival at the agent to its decision, in seconds.",
            ("decision",),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.audit = Counter(
            "callerid_audit_would_decisions",
            "Logins let through by mode: audit, by the verdict and reason enforce mode would "
            "have given.",
            ("decision", "reason"),
            registry=self.registry,
        )
        for decision in sorted(DECISIONS):  # every verdict's series exists from the start
            self.latency.labels(decision)
        self.http: HttpEndpoint | None = None
        self._status: Callable[[], Status] | None = None
        self._collector: StatusCollector | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._failing = False

    def observe(self, rec: DecisionRecord) -> None:
        """Count one decision record (labels bounded to the fixed sets)."""
        decision = rec.decision if rec.decision in DECISIONS else OTHER
        reason = rec.reason if rec.reason in REASONS else OTHER
        status = rec.peer_status
        peer = NO_STATUS if status is None else status if status in PEER_STATUSES else OTHER
        self.decisions.labels(decision, reason, peer).inc()
        self.latency.labels(decision).observe(max(rec.latency_us, 0) / 1e6)
        if rec.would_decision is not None:
            would = rec.would_decision if rec.would_decision in DECISIONS else OTHER
            why = rec.would_reason if rec.would_reason in REASONS else OTHER
            self.audit.labels(would, why).inc()

    def sink(self, sink: RecordSink) -> MetricsSink:
        """``sink`` (the journal), with every record counted on its way."""
        return MetricsSink(self, sink)

    def watch(self, status: Callable[[], Status]) -> None:
        """Collect the agent's counters from ``status`` (called on the loop once started)."""
        self._status = status
        self._collector = StatusCollector(status)
        self.registry.register(self._collector)

    def endpoint(self) -> dict[str, str | None]:
        """Where the metrics are (for `calleridctl status`)."""
        textfile = self.cfg.textfile
        return {
            "listen": None if self.http is None else self.http.address,
            "textfile": None if textfile is None else str(textfile),
        }

    async def start(self) -> None:
        """Bind the endpoint, if any. A port that cannot be bound is logged, not fatal: the
        agent decides logins without it (Prometheus' ``up`` shows the endpoint is missing)."""
        loop = asyncio.get_running_loop()
        if self._collector is not None and self._status is not None:
            self._collector.read = LoopCall(self._status, loop)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="callerid-metrics")
        if self.cfg.port is None:
            return
        try:
            self.http = HttpEndpoint(self.registry, self.cfg.address, self.cfg.port)
        except OSError as exc:
            log.error(
                "metrics: cannot listen on %s port %d: %s; no metrics endpoint",
                self.cfg.address, self.cfg.port, exc.strerror or exc,
            )  # fmt: skip
            return
        self.http.start()
        log.info("metrics: serving http://%s/metrics", self.http.address)

    async def run(self) -> None:
        """Rewrite the textfile every ``interval_s`` until cancelled; returns at once without
        one. A failed write is logged once (and once more when writing works again)."""
        path, writer = self.cfg.textfile, self._writer
        if path is None or writer is None:
            return
        loop = asyncio.get_running_loop()
        while True:
            try:
                await loop.run_in_executor(writer, write_textfile, path, self.registry)
            except Exception as exc:  # never stop the agent for its metrics
                if not self._failing:
                    log.warning("metrics: cannot write %s: %s", path, exc)
                self._failing = True
            else:
                if self._failing:
                    log.info("metrics: %s written again", path)
                self._failing = False
            await asyncio.sleep(self.cfg.interval_s)

    async def stop(self) -> None:
        """Stop serving and remove the textfile, in the writer thread (after any write in
        progress: it is the same thread). Call after `run()` was cancelled."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        loop = asyncio.get_running_loop()
        http, self.http = self.http, None
        try:
            if http is not None:
                await loop.run_in_executor(writer, http.stop)
            if self.cfg.textfile is not None:
                await loop.run_in_executor(writer, remove_textfile, self.cfg.textfile)
        finally:
            writer.shutdown(wait=False)
