"""server/driver.py + server/peering.py, cross-region part, with a scripted core (no sockets)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from skylb_extproc.region.balancer import Action, Forwarding
from skylb_extproc.region.marker import MarkerVerifier, Verified, sign, state_auth
from skylb_extproc.region.peers import PeerSummary
from skylb_extproc.region.spill import Forward
from skylb_extproc.server.driver import Driver
from skylb_extproc.server.metrics import ServerMetrics
from skylb_extproc.server.peering import Peering
from skylb_extproc.types import PeerForward, RouteRequest

SECRET = b"k"
NOW = 1_718_000_000.0


@dataclass
class Core:
    """Records what the driver hands the core; answers on_request from a script."""

    answer: list[Action] = field(default_factory=list)
    requests: list[RouteRequest] = field(default_factory=list)
    summaries: list[tuple[PeerSummary, float | None, float | None]] = field(default_factory=list)

    def on_request(self, request: RouteRequest, now: float) -> list[Action]:
        self.requests.append(request)
        return self.answer

    def on_peer_summary(
        self, summary: PeerSummary, now: float, *, started_at: float | None, rtt_s: float | None
    ) -> list[Action]:
        self.summaries.append((summary, started_at, rtt_s))
        return []

    def summary(self, now: float, *, timestamp: float) -> PeerSummary:
        return PeerSummary("us", 2, 1, (3,), 1, 0.5, timestamp)

    def next_deadline(self) -> float | None:
        return None

    def state(self, now: float) -> dict[str, object]:
        return {"replicas": [], "queue_length": 0}


def make(core: Core) -> tuple[Driver, ServerMetrics]:
    metrics = ServerMetrics(policy="p")
    peering = Peering(
        "us", SECRET, {"eu": "peer-eu"}, max_skew_s=5.0, wall_clock=lambda: NOW, boot="b00t"
    )
    driver = Driver(cast(Any, core), region="us", metrics=metrics, peering=peering)
    return driver, metrics


def value(metrics: ServerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def marker(origin: str, dest: str = "us", marker_id: str = "m1") -> tuple[tuple[str, str], ...]:
    return sign(SECRET, origin=origin, destination=dest, marker_id=marker_id, now=NOW)


async def test_forwarding_resolves_to_a_signed_peer_forward() -> None:
    core = Core()
    driver, metrics = make(core)
    rid = driver.new_request_id()
    core.answer = [Forwarding(rid, Forward("eu", "prefix", 3), waited_s=0.2)]
    future = driver.submit(RouteRequest(rid, "/v1/completions", prompt="x"))
    decision = future.result()
    assert isinstance(decision, PeerForward)
    assert (decision.region, decision.cluster) == ("eu", "peer-eu")
    headers = dict(decision.headers)
    assert headers["x-skylb-id"] == f"{rid}.b00t"
    verified = MarkerVerifier(SECRET, "eu", max_skew_s=5.0).verify(headers, NOW)
    assert verified == Verified("us", f"{rid}.b00t")
    assert value(metrics, "skylb_spills_total", origin="us", destination="eu", reason="prefix")
    assert value(metrics, "skylb_decisions_total", policy="p", outcome="forwarded") == 1.0
    assert value(metrics, "skylb_queue_wait_seconds_count") == 1.0


async def test_rescue_forwards_are_labelled_rescue() -> None:
    core = Core()
    driver, metrics = make(core)
    core.answer = [Forwarding("us-1", Forward("eu", "least_load"), rescue=True)]
    driver.submit(RouteRequest(driver.new_request_id(), "/v1/completions"))
    labels = {"origin": "us", "destination": "eu", "reason": "rescue"}
    assert value(metrics, "skylb_spills_total", **labels) == 1.0


@pytest.mark.parametrize(
    ("headers", "origin", "counted"),
    [
        ((), None, None),  # no x-skylb-* header: nothing to verify, nothing counted
        (marker("eu"), "eu", None),
        (marker("eu", dest="asia"), None, "bad_signature"),
        (marker("us"), "us", "loop"),  # our own marker came back: served here, never again out
        ((("x-skylb-replica", "r9"),), None, "missing"),
    ],
)
async def test_markers_decide_the_origin(
    headers: tuple[tuple[str, str], ...], origin: str | None, counted: str | None
) -> None:
    core = Core()
    driver, metrics = make(core)
    request = RouteRequest(driver.new_request_id(), "/v1/completions")
    driver.submit(request, headers)
    assert core.requests == [dataclasses.replace(request, origin=origin)]
    rejected = {
        r: value(metrics, "skylb_markers_rejected_total", reason=r)
        for r in ("missing", "bad_signature", "skew", "replay", "loop")
    }
    assert rejected == {r: 1.0 if r == counted else 0.0 for r in rejected}
    received = value(metrics, "skylb_forwarded_received_total", origin="eu")
    assert received == (1.0 if origin == "eu" else None)


def test_peer_summaries_smooth_the_rtt_and_failures_are_counted() -> None:
    core = Core()
    driver, metrics = make(core)
    summary = PeerSummary("eu", 0, 1, (0,))
    driver.on_peer_summary("eu", summary, 1.0, 0.1)
    driver.on_peer_summary("eu", summary, 2.0, 0.2)
    assert [(s[1], s[2]) for s in core.summaries] == [
        (1.0, pytest.approx(0.05)),
        (2.0, pytest.approx((0.1 + 0.3 * 0.1) / 2)),
    ]
    driver.on_peer_summary("eu", None, 3.0, 0.5)
    assert len(core.summaries) == 2
    assert value(metrics, "skylb_peer_poll_errors_total", peer="eu") == 1.0


def test_peer_state_only_with_valid_auth() -> None:
    driver, _ = make(Core())
    assert driver.peer_state(None) is None
    assert driver.peer_state(state_auth(SECRET, "eu", NOW)) is None  # made for eu, not us
    state = driver.peer_state(state_auth(SECRET, "us", NOW))
    assert state == {
        "region": "us",
        "queue_length": 2,
        "available_replicas": 1,
        "healthy_replicas": 1,
        "in_flight": [3],
        "dispatch_rate": 0.5,
        "timestamp": NOW,
        "wait_s": 0.0,
        "prefill_tokens_per_s": None,
        "kv_free_tokens": None,
        "finish_interval_s": 0.0,
    }
