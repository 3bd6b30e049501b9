"""region/cost.py: the expected-TTFT spill model, its numbers and its hysteresis, exactly.

Settings: margin 0.05 s, 4700 prefill tokens/s at 4 chars/token (18,800 chars/s), waits capped at
5 s. eu is 40 ms away one way (80 ms round trip), asia 100 ms (200 ms).
"""

from __future__ import annotations

import random

import pytest

from skylb_extproc.policy.base import make_policy
from skylb_extproc.region.balancer import Forwarding, RegionBalancer, Spill
from skylb_extproc.region.cost import CostModel, CostSettings, wait_estimate
from skylb_extproc.region.peers import PeerSummary, PeerTable
from skylb_extproc.region.spill import Forward, RegionView, SpillPlanner, SpillSettings
from skylb_extproc.router import Router, RouterSettings
from skylb_extproc.types import ReplicaSpec, RouteRequest, ScrapedMetrics

SETTINGS = CostSettings(margin_s=0.05, max_wait_s=5.0)
CHARS_PER_S = 18_800


def view(
    name: str, *, rtt: float, queue: int = 0, rate: float = 0.0, fresh: bool = True
) -> RegionView:
    return RegionView(name, queue, 1, (1, 1), rtt, fresh, healthy_replicas=2, dispatch_rate=rate)


EU = view("eu", rtt=0.04)
ASIA = view("asia", rtt=0.1)


@pytest.mark.parametrize(
    ("ahead", "rate", "expected"),
    [(0, 0.0, 0.0), (0, 5.0, 0.0), (3, 0.0, 5.0), (3, 10.0, 0.3), (1000, 10.0, 5.0)],
)
def test_wait_estimate(ahead: int, rate: float, expected: float) -> None:
    assert wait_estimate(ahead, rate, 5.0) == pytest.approx(expected)


def test_costs_add_wait_prefill_and_round_trip() -> None:
    m = CostModel(SETTINGS)
    assert m.local_cost(
        queue_length=4, rate=20.0, prompt_chars=CHARS_PER_S, matched_chars=CHARS_PER_S // 2
    ) == pytest.approx(0.2 + 0.5)
    busy_eu = view("eu", rtt=0.04, queue=2, rate=10.0)
    assert m.peer_cost(busy_eu, prompt_chars=CHARS_PER_S, matched_chars=0) == pytest.approx(
        0.08 + 0.2 + 1.0
    )


# (local cost, candidates, matched blocks per region, prompt chars, expected choice)
CHOICES = [
    (0.05, [EU, ASIA], {}, 0, None),  # 80 ms away is worse than 50 ms at home
    (0.2, [EU, ASIA], {}, 0, Forward("eu", "cost")),  # eu 0.08 + margin < 0.2; asia 0.2 not
    (0.26, [EU, ASIA], {}, 0, Forward("eu", "cost")),  # both on: the cheaper one
    (5.0, [ASIA], {}, 0, Forward("asia", "cost")),  # nothing drains at home
    (0.2, [], {}, 0, None),  # no candidate
    # a long prompt whose prefix we sent to asia: asia's prefill is 0.5 s cheaper than eu's
    (2.0, [EU, ASIA], {"asia": 2350}, CHARS_PER_S, Forward("asia", "cost", 2350)),
]


@pytest.mark.parametrize(("local", "cands", "matched", "prompt", "expected"), CHOICES)
def test_choice(
    local: float,
    cands: list[RegionView],
    matched: dict[str, int],
    prompt: int,
    expected: Forward | None,
) -> None:
    m = CostModel(SETTINGS)
    got = m.choose(
        [EU, ASIA], cands, local_s=local, matched=matched, prompt_chars=prompt, block_chars=4
    )
    assert got == expected


def test_hysteresis_needs_the_margin_both_ways() -> None:
    m = CostModel(SETTINGS)
    # eu costs 0.08: on below local 0.13 exclusive, off when local drops below 0.03
    steps = [
        (0.12, False),  # 0.08 + 0.05 = 0.13 is not < 0.12: stays off
        (0.14, True),  # beats local by more than the margin: on
        (0.05, True),  # worse than local, but by less than the margin: stays on
        (0.02, False),  # 0.08 > 0.02 + 0.05: off
        (0.1, False),  # better than local, not by the margin: stays off
    ]
    for local, on in steps:
        got = m.choose([EU], [EU], local_s=local, matched={}, prompt_chars=0, block_chars=4)
        assert (got is not None, m.is_on("eu")) == (on, on), local


def test_stale_peer_turns_off() -> None:
    m = CostModel(SETTINGS)
    assert m.choose([EU], [EU], local_s=1.0, matched={}, prompt_chars=0, block_chars=4)
    stale = view("eu", rtt=0.04, fresh=False)
    assert m.choose([stale], [], local_s=1.0, matched={}, prompt_chars=0, block_chars=4) is None
    assert not m.is_on("eu")


def test_balancer_cost_mode_uses_queue_and_dispatch_rate() -> None:
    """us dispatched 10 requests in the last 10 s (1/s); eu is 80 ms away."""
    specs = [ReplicaSpec("r0", "10.0.0.1:80", "")]
    router = Router(
        RouterSettings(block_chars=4, stale_after_s=100.0),
        specs,
        make_policy("skylb_paper", {}),
        random.Random(0),
    )
    spill = Spill(
        PeerTable({"eu": 0.04}, stale_after_s=0.5),
        SpillPlanner("us", ["us", "eu"], SpillSettings(mode="cost")),
        CostModel(SETTINGS),
    )
    b = RegionBalancer("us", router, spill=spill, rate_window_s=10.0)
    for i in range(10):  # each scrape frees r0, each request takes it
        b.on_scrape("r0", ScrapedMetrics(0, 0), started_at=float(i), now=float(i))
        b.on_request(RouteRequest(f"w{i}", "/v1/completions", prompt="x"), float(i) + 0.1)
    assert b.dispatch_rate(9.5) == pytest.approx(1.0)
    b.on_scrape("r0", ScrapedMetrics(1, 1), started_at=9.5, now=9.5)  # busy now
    b.on_peer_summary(PeerSummary("eu", 0, 1, (0,), 1, 0.0), 9.6, started_at=9.6)
    # home: 1 queued at 1/s = 1 s; eu: 0.08 s -> forward
    [action] = b.on_request(RouteRequest("a", "/v1/completions", prompt="x"), 9.7)
    assert isinstance(action, Forwarding) and action.forward == Forward("eu", "cost")
