"""region/balancer.py: table-driven spill decisions with exact results, in virtual time.

Region "us" with replicas r0, r1 (policy skylb) and peers "eu", "asia". Unless a test says
otherwise both local replicas are busy (scraped waiting > 0), so every request queues and the
spill rules decide.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import pytest

from skylb_extproc.policy.base import make_policy
from skylb_extproc.region.balancer import (
    Action,
    Forwarding,
    RegionBalancer,
    Residency,
    Spill,
)
from skylb_extproc.region.cost import CostModel, CostSettings
from skylb_extproc.region.peers import PeerSummary, PeerTable, summary_from_json, summary_to_json
from skylb_extproc.region.spill import Forward, SpillPlanner, SpillSettings
from skylb_extproc.router import Router, RouterSettings
from skylb_extproc.types import (
    Dispatch,
    Outcome,
    Reject,
    ReplicaSpec,
    Route,
    RouteRequest,
    ScrapedMetrics,
)

SPECS = [ReplicaSpec(f"r{i}", f"10.0.0.{i}:8000", "") for i in range(2)]
IDLE = ScrapedMetrics(waiting=0, running=0)
BUSY = ScrapedMetrics(waiting=1, running=8)
SETTINGS = RouterSettings(block_chars=4, stale_after_s=100.0, queue_max_wait_s=5.0)
ONE_WAY = {"eu": 0.04, "asia": 0.1}


def make(
    mode: str = "prefix",
    *,
    local: ScrapedMetrics | None = BUSY,
    residency: Residency | None = None,
    margin_s: float = 0.05,
) -> RegionBalancer:
    router = Router(SETTINGS, SPECS, make_policy("skylb_paper", {}), random.Random(0))
    table = PeerTable(ONE_WAY, stale_after_s=0.5)
    planner = SpillPlanner("us", ["us", *ONE_WAY], SpillSettings(mode=mode))  # type: ignore[arg-type]
    cost = CostModel(CostSettings(margin_s=margin_s, max_wait_s=5.0)) if mode == "cost" else None
    balancer = RegionBalancer("us", router, spill=Spill(table, planner, cost), residency=residency)
    if local is not None:
        for spec in SPECS:
            balancer.on_scrape(spec.name, local, started_at=0.0, now=0.0)
    return balancer


def peer(
    region: str,
    queue: int = 0,
    avail: int = 1,
    in_flight: tuple[int, ...] = (1, 1),
    healthy: int | None = 2,
    rate: float = 0.0,
) -> PeerSummary:
    return PeerSummary(region, queue, avail, in_flight, healthy, rate)


def req(rid: str, prompt: str = "hello world!", **kw: object) -> RouteRequest:
    return RouteRequest(rid, "/v1/chat/completions", model="m", prompt=prompt, **kw)  # type: ignore[arg-type]


def where(actions: list[Action]) -> list[tuple[str, str]]:
    """(request id, "region:<peer>" | "local:<replica>" | "reject:<status>") per action."""
    out = []
    for a in actions:
        if isinstance(a, Forwarding):
            out.append((a.request_id, f"region:{a.forward.region}"))
        elif isinstance(a.decision, Route):
            out.append((a.request_id, f"local:{a.decision.replica}"))
        else:
            out.append((a.request_id, f"reject:{a.decision.status}"))
    return out


def feed(b: RegionBalancer, *summaries: PeerSummary, now: float = 1.0) -> list[Action]:
    out: list[Action] = []
    for s in summaries:
        out += b.on_peer_summary(s, now, started_at=now)
    return out


# --- the paper rule --------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    summaries: tuple[PeerSummary, ...]
    expected: str | None  # the region the request goes to; None = it waits at home
    reason: str = "least_load"


PAPER = {
    "least loaded of two": Case((peer("eu", in_flight=(3, 3)), peer("asia")), "asia"),
    "load tie -> lower rtt": Case((peer("asia"), peer("eu")), "eu"),
    "no available replica": Case((peer("eu", avail=0), peer("asia", in_flight=(9,))), "asia"),
    "queue over tau": Case((peer("eu", queue=11), peer("asia", avail=0)), None),
    "queue longer than ours (1)": Case((peer("eu", queue=2),), None),
    "queue equal to ours": Case((peer("eu", queue=1),), "eu"),
    "never heard of": Case((), None),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_rule(name: str) -> None:
    case = PAPER[name]
    b = make()
    feed(b, *case.summaries)
    actions = b.on_request(req("a"), 1.1)
    if case.expected is None:
        assert actions == [] and b.queue_length == 1
        return
    assert actions == [Forwarding("a", Forward(case.expected, case.reason), 0.0)]
    assert b.queue_length == 0


def test_local_replica_first() -> None:
    b = make(local=IDLE)
    feed(b, peer("eu"))
    assert where(b.on_request(req("a"), 1.0)) == [("a", "local:r0")]


def test_stale_peer_takes_nothing_until_fresh_again() -> None:
    b = make()
    feed(b, peer("eu"), now=1.0)
    assert b.on_request(req("a"), 1.6) == []  # 0.6 s > stale_after_s 0.5
    assert where(feed(b, peer("eu"), now=1.7)) == [("a", "region:eu")]


def test_conversation_follows_its_prefix_to_the_same_region() -> None:
    b = make()
    feed(b, peer("eu"), peer("asia", in_flight=(2, 2)))
    first = "user: tell me a long story about regions"
    assert where(b.on_request(req("t1", first), 1.1)) == [("t1", "region:eu")]
    # eu is now the busier one, but holds the conversation (match > 50%): it goes there again
    feed(b, peer("eu", in_flight=(5, 5)), peer("asia", in_flight=(2, 2)), now=1.2)
    actions = b.on_request(req("t2", first + " assistant: once upon"), 1.3)
    assert len(actions) == 1 and isinstance(actions[0], Forwarding)
    assert (actions[0].forward.region, actions[0].forward.reason) == ("eu", "prefix")
    assert where(b.on_request(req("other", "something else entirely"), 1.4)) == [
        ("other", "region:asia")
    ]


def test_forwards_between_summaries_use_up_the_peer() -> None:
    b = make()
    feed(b, peer("eu", avail=1), now=1.0)
    assert where(b.on_request(req("a"), 1.1)) == [("a", "region:eu")]
    assert b.on_request(req("b"), 1.2) == []  # eu's one free replica is taken by "a"
    # a summary polled before "a" was sent does not count it: still taken
    assert b.on_peer_summary(peer("eu", avail=1), 1.25, started_at=1.05) == []
    # one polled after does: eu has a free replica again
    assert where(b.on_peer_summary(peer("eu", avail=1), 1.3, started_at=1.15)) == [
        ("b", "region:eu")
    ]


def test_forwarded_request_is_never_forwarded_again_and_does_not_block() -> None:
    b = make()
    assert b.on_request(req("in", origin="asia"), 0.5) == []
    assert b.on_request(req("mine"), 0.6) == []
    # a peer becomes available: only our own client's request leaves
    assert where(feed(b, peer("eu", avail=3))) == [("mine", "region:eu")]
    assert b.queue_length == 1
    # the forwarded one is served here when a replica frees up
    actions = b.on_scrape("r1", IDLE, started_at=1.2, now=1.2)
    assert where(actions) == [("in", "local:r1")]


def test_without_peers_it_is_the_router() -> None:
    router = Router(SETTINGS, SPECS, make_policy("skylb_paper", {}), random.Random(0))
    b = RegionBalancer("us", router)
    for spec in SPECS:
        b.on_scrape(spec.name, BUSY, started_at=0.0, now=0.0)
    assert b.on_request(req("a"), 1.0) == []
    assert b.on_peer_summary(peer("eu"), 1.0) == []
    assert where(b.on_timer(6.0)) == [("a", "reject:503")]
    assert "peers" not in b.state(6.0)


def test_hash_mode_uses_the_ring_over_candidates() -> None:
    b = make("hash")
    feed(b, peer("eu"), peer("asia"))
    actions = b.on_request(req("a", hash_key="user-7"), 1.1)
    assert len(actions) == 1 and isinstance(actions[0], Forwarding)
    assert actions[0].forward.reason == "hash"


# --- residency ---------------------------------------------------------------------------------

RESIDENCY = Residency(
    allowed=frozenset({"us", "eu"}),
    tenants={"acme": frozenset({"us"}), "globex": frozenset({"eu"})},
)


@pytest.mark.parametrize(
    ("tenant", "summaries", "expected"),
    [
        (None, (peer("asia"), peer("eu", in_flight=(5, 5))), "eu"),  # asia is not allowed
        (None, (peer("asia"),), None),
        ("acme", (peer("eu"), peer("asia")), None),  # acme's data stays in us: waits
        ("unknown", (peer("eu"),), "eu"),  # unknown tenants get allowed_regions
    ],
)
def test_residency_always_wins(
    tenant: str | None, summaries: tuple[PeerSummary, ...], expected: str | None
) -> None:
    b = make(residency=RESIDENCY)
    feed(b, *summaries)
    actions = b.on_request(req("a", tenant=tenant), 1.1)
    assert where(actions) == ([] if expected is None else [("a", f"region:{expected}")])


def test_request_that_may_not_leave_waits_then_gets_the_local_deadline() -> None:
    b = make(residency=Residency(allowed=frozenset({"us"})))
    feed(b, peer("eu", avail=5))
    assert b.on_request(req("a"), 1.0) == []
    assert where(b.on_timer(6.0)) == [("a", "reject:503")]


def test_restricted_head_does_not_block_spillable_requests_behind() -> None:
    b = make(residency=RESIDENCY)
    assert b.on_request(req("stay", tenant="acme"), 0.5) == []
    assert b.on_request(req("go"), 0.6) == []
    assert where(feed(b, peer("eu"))) == [("go", "region:eu")]


def test_request_not_allowed_here_goes_to_its_region_at_once() -> None:
    b = make(local=IDLE, residency=RESIDENCY)
    feed(b, peer("eu", avail=0, queue=20))  # busy, but the only place it may be served
    actions = b.on_request(req("a", tenant="globex"), 1.1)
    assert actions == [Forwarding("a", Forward("eu", "least_load"), 0.0, rescue=True)]


def test_request_not_allowed_here_without_a_reachable_region_is_503() -> None:
    b = make(local=IDLE, residency=RESIDENCY)
    [action] = b.on_request(req("a", tenant="globex"), 1.1)
    assert isinstance(action, Dispatch) and isinstance(action.decision, Reject)
    assert (action.decision.status, action.decision.outcome) == (503, Outcome.NO_REPLICA)


# --- no healthy local replica: spill everything allowed ----------------------------------------


def test_no_healthy_replica_spills_at_arrival_to_the_shortest_queue() -> None:
    b = make(local=None)  # never scraped: unhealthy
    feed(b, peer("eu", queue=30, avail=0), peer("asia", queue=12, avail=0))  # over tau, busy
    assert where(b.on_request(req("a"), 1.1)) == [("a", "region:asia")]
    models = RouteRequest("m", "/v1/models", method="GET", inference=False)
    assert where(b.on_request(models, 1.1)) == [("m", "region:asia")]


def test_no_healthy_replica_and_no_peer_waits_then_spills_when_one_appears() -> None:
    b = make(local=None)
    feed(b, peer("eu", healthy=0, avail=0))  # eu has no healthy replica either
    assert b.on_request(req("a"), 1.1) == []
    assert where(feed(b, peer("eu", healthy=1, avail=0), now=1.2)) == [("a", "region:eu")]


def test_forwarded_request_is_not_rescued() -> None:
    b = make(local=None)
    feed(b, peer("eu"))
    assert b.on_request(req("in", origin="asia"), 1.1) == []


# --- what a region publishes ---------------------------------------------------------------------


def test_summary_round_trips_through_json() -> None:
    b = make(local=IDLE)
    b.on_request(req("a"), 1.0)  # routed to r0: r0 in flight and pending, r1 available
    b.on_scrape("r1", BUSY, started_at=1.0, now=1.0)
    b.on_request(req("b"), 1.0)  # queued
    s = b.summary(1.0, timestamp=1_718_000_000.5)
    # r0 has our unseen dispatch pending, r1 a waiting request: each waits one finish, 2 s
    # before any finish was seen; the replicas report no KV numbers (no free KV known).
    assert s == PeerSummary(
        "us", 1, 0, (1, 0), 2, 0.1, 1_718_000_000.5,
        wait_s=2.0, prefill_tokens_per_s=4700.0, kv_free_tokens=None, finish_interval_s=2.0,
    )  # fmt: skip
    assert summary_from_json(json.loads(json.dumps(summary_to_json(s)))) == s


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"region": 1},
        {"region": "eu", "queue_length": -1, "available_replicas": 0, "in_flight": []},
        {"region": "eu", "queue_length": True, "available_replicas": 0, "in_flight": []},
        {"region": "eu", "queue_length": 0, "available_replicas": 0, "in_flight": "x"},
        {"region": "eu", "queue_length": 0, "available_replicas": 0, "in_flight": [1.5]},
        {
            "region": "eu",
            "queue_length": 0,
            "available_replicas": 0,
            "in_flight": [],
            "timestamp": "x",
        },
    ],
)
def test_bad_summaries_are_refused(body: object) -> None:
    with pytest.raises(ValueError):
        summary_from_json(body)


def test_state_shows_peers() -> None:
    b = make()
    feed(b, peer("eu"), now=1.0)
    b.on_request(req("a"), 1.1)
    peers = b.state(1.2)["peers"]
    assert isinstance(peers, list)
    eu, asia = peers
    assert eu["name"] == "eu" and eu["fresh"] and eu["forwarded_in_flight"] == 1
    assert eu["rtt_s"] == pytest.approx(0.08) and eu["age_s"] == pytest.approx(0.2)
    assert asia["fresh"] is False and asia["age_s"] is None
    b.on_finished("a", 1.3)
    assert b.state(1.3)["peers"][0]["forwarded_in_flight"] == 0  # type: ignore[index]
