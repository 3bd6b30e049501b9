"""Prometheus metrics of one skylb server, in its own CollectorRegistry (never the global one).

Event metrics (decisions, waits, latencies, prefix matches, scrape errors, spills, markers) are
updated by the driver as things happen. State gauges (queue length, per-replica in-flight /
available / healthy, per-peer staleness and RTT) are read from the core's state at collection
time by a custom collector, so the hot path does no per-replica bookkeeping and /metrics can
never disagree with /state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from skylb_extproc.region.marker import RejectReason
from skylb_extproc.types import Outcome

# Sub-millisecond resolution at the low end: the routing decision itself takes ~10 µs.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
FRACTION_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99, 1.0)

StateSource = Callable[[], Mapping[str, object]]


class _StateCollector(Collector):
    """Gauges derived from the router's state, evaluated when /metrics is scraped."""

    def __init__(self, source: StateSource) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        state = self._source()
        queue = GaugeMetricFamily("skylb_queue_length", "Requests waiting at the balancer")
        queue.add_metric([], _number(state.get("queue_length")))
        yield queue
        families = {
            "in_flight": GaugeMetricFamily(
                "skylb_replica_in_flight",
                "Requests sent to the replica, not finished",
                labels=["replica"],
            ),
            "available": GaugeMetricFamily(
                "skylb_replica_available",
                "1 when the replica may take a request now",
                labels=["replica"],
            ),
            "healthy": GaugeMetricFamily(
                "skylb_replica_healthy",
                "1 when the replica's last scrape is fresh",
                labels=["replica"],
            ),
        }
        for replica in _rows(state, "replicas"):
            name = str(replica.get("name", "?"))
            for key, family in families.items():
                family.add_metric([name], _number(replica.get(key)))
        yield from families.values()
        yield from _peer_families(state)


def _peer_families(state: Mapping[str, object]) -> Iterator[Metric]:
    staleness = GaugeMetricFamily(
        "skylb_peer_staleness_seconds",
        "Age of the peer's last state summary (+Inf: none yet)",
        labels=["peer"],
    )
    rtt = GaugeMetricFamily(
        "skylb_peer_rtt_seconds", "Smoothed round trip of the peer's state poll", labels=["peer"]
    )
    for peer in _rows(state, "peers"):
        name = str(peer.get("name", "?"))
        age = peer.get("age_s")
        staleness.add_metric([name], float("inf") if age is None else _number(age))
        rtt.add_metric([name], _number(peer.get("rtt_s")))
    yield staleness
    yield rtt


def _rows(state: Mapping[str, object], key: str) -> list[Mapping[str, object]]:
    rows = state.get(key)
    if not isinstance(rows, list):
        return []
    return [row for row in rows if isinstance(row, Mapping)]


def _number(value: object) -> float:
    if isinstance(value, bool | int | float):
        return float(value)
    return 0.0


class ServerMetrics:
    """The metrics of one server; `state_source` feeds the state gauges (None: not exported)."""

    def __init__(self, *, policy: str, state_source: StateSource | None = None) -> None:
        self.policy = policy
        # auto_describe off: it would call the state source at registration, before it is ready.
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.decisions = Counter(
            "skylb_decisions_total", "Requests by how they ended", ["policy", "outcome"], registry=r
        )
        self._add_histograms(r)
        self.prefix_hit_ratio = Gauge(
            "skylb_prefix_hit_ratio",
            "Routed prompt chars matched / routed prompt chars",
            registry=r,
        )
        self.scrape_errors = Counter(
            "skylb_scrape_errors_total",
            "Failed scrapes of a replica's /metrics",
            ["replica"],
            registry=r,
        )
        self.streams_active = Gauge("skylb_streams_active", "Open ext_proc streams", registry=r)
        self._add_region_counters(r)
        self._matched_chars = 0.0
        self._routed_chars = 0
        # Pre-create every outcome so rates start at 0 instead of appearing on the first event.
        for outcome in Outcome:
            self.decisions.labels(policy, outcome.value)
        if state_source is not None:
            self.attach_state(state_source)

    def _add_histograms(self, r: CollectorRegistry) -> None:
        self.queue_wait = Histogram(
            "skylb_queue_wait_seconds",
            "Time spent in the balancer's queue",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.decision_latency = Histogram(
            "skylb_decision_latency_seconds",
            "From the request being known (headers/body complete) to its decision",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prefix_matched = Histogram(
            "skylb_prefix_matched_fraction",
            "Share of a routed prompt the chosen replica already held",
            buckets=FRACTION_BUCKETS,
            registry=r,
        )

    def _add_region_counters(self, r: CollectorRegistry) -> None:
        self.spills = Counter(
            "skylb_spills_total",
            "Requests forwarded to a peer region",
            ["origin", "destination", "reason"],
            registry=r,
        )
        self.forwarded_received_total = Counter(
            "skylb_forwarded_received_total",
            "Forwarded requests received with a valid marker",
            ["origin"],
            registry=r,
        )
        self.markers_rejected = Counter(
            "skylb_markers_rejected_total",
            "Requests whose x-skylb-* headers did not verify (stripped, served as local)",
            ["reason"],
            registry=r,
        )
        self.peer_poll_errors = Counter(
            "skylb_peer_poll_errors_total", "Failed polls of a peer's state", ["peer"], registry=r
        )
        for reason in RejectReason:
            self.markers_rejected.labels(reason.value)

    def attach_state(self, source: StateSource) -> None:
        """Export the state gauges from `source` (called once, when the router exists)."""
        self.registry.register(_StateCollector(source))

    def decided(self, outcome: Outcome, *, latency_s: float | None = None) -> None:
        """Count a final outcome; `latency_s` (request known -> decision) when one was made."""
        self.decisions.labels(self.policy, outcome.value).inc()
        if latency_s is not None:
            self.decision_latency.observe(latency_s)

    def dequeued(self, waited_s: float) -> None:
        self.queue_wait.observe(waited_s)

    def matched(self, matched_fraction: float, prompt_chars: int) -> None:
        """Record a routed inference request's prefix match (weighted by its prompt length)."""
        if prompt_chars > 0:
            self.prefix_matched.observe(matched_fraction)
            self._matched_chars += matched_fraction * prompt_chars
            self._routed_chars += prompt_chars
            self.prefix_hit_ratio.set(self._matched_chars / self._routed_chars)

    def scrape_failed(self, replica: str) -> None:
        self.scrape_errors.labels(replica).inc()

    def spilled(self, origin: str, destination: str, reason: str) -> None:
        self.spills.labels(origin, destination, reason).inc()

    def forwarded_received(self, origin: str) -> None:
        self.forwarded_received_total.labels(origin).inc()

    def marker_rejected(self, reason: str) -> None:
        self.markers_rejected.labels(reason).inc()

    def peer_poll_failed(self, peer: str) -> None:
        self.peer_poll_errors.labels(peer).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
