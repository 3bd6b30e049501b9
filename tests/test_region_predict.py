"""`spill.mode: predict`: the peer choice (region/predict.py) and the balancer around it.

Peers report a prefill speed of 1,000 tokens/s; prompts are 4,000 characters (1,000 tokens):
a full prefill there costs ~1.03 s plus the round trip (2 x one-way).
"""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest

from skylb_extproc.policy.base import make_policy
from skylb_extproc.policy.common import prefill_time
from skylb_extproc.region.balancer import Forwarding, RegionBalancer, Spill
from skylb_extproc.region.peers import PeerSummary, PeerTable, summary_from_json, summary_to_json
from skylb_extproc.region.predict import choose_by_prediction
from skylb_extproc.region.spill import RegionView, SpillPlanner, SpillSettings
from skylb_extproc.router import Router, RouterSettings
from skylb_extproc.state.speed import Speed
from skylb_extproc.types import ReplicaSpec, Route, RouteRequest, ScrapedMetrics

FULL = prefill_time(4000, 0, 1000.0)  # ~1.03 s


def rv(name: str, rtt: float = 0.05, **kw: object) -> RegionView:
    view = RegionView(
        name, 0, 1, (1, 1), rtt, True, healthy_replicas=2, prefill_tokens_per_s=1000.0
    )
    return replace(view, **kw)  # type: ignore[arg-type]


def choose(peers: list[RegionView], local: float | None, **kw: object) -> str | None:
    args: dict[str, object] = {
        "local_s": local,
        "matched": {},
        "prompt_chars": 4000,
        "block_chars": 64,
        "kv_tokens": 1000.0,
        "sent": {},
        "margin_s": 0.05,
        "tokens_per_s": 1000.0,
        "max_wait_s": 30.0,
        "our_queue": 0,
    }
    fwd = choose_by_prediction(peers, **{**args, **kw})  # type: ignore[arg-type]
    return None if fwd is None else fwd.region


CASES = [
    ("local is cheap: stay", [rv("eu")], 0.5, {}, None),
    ("a peer wins clearly: go", [rv("eu")], 3.0, {}, "eu"),
    ("within 20% of local: stay", [rv("eu")], 1.3, {}, None),
    ("the cheapest peer, RTT counted", [rv("eu", rtt=0.3), rv("asia", rtt=0.05)], 3.0, {}, "asia"),
    ("a stale peer takes nothing", [rv("eu", fresh=False)], 9.0, {}, None),
    (
        "a peer without a healthy replica takes nothing",
        [rv("eu", healthy_replicas=0)],
        9.0,
        {},
        None,
    ),
    ("its replicas' queue counts", [rv("eu", wait_s=2.5)], 3.0, {}, None),
    (
        "a peer holding more than we do: never",
        [rv("eu", queue_length=3)],
        9.0,
        {"our_queue": 2},
        None,
    ),
    (
        "what we forwarded there is cached there",
        [rv("eu", wait_s=0.9)],
        1.5,
        {"matched": {"eu": 60}},
        "eu",
    ),
    (
        "too big for its roomiest replica: one finish more",
        [rv("eu", kv_free_tokens=800.0, finish_interval_s=3.0)],
        3.0,
        {},
        None,
    ),
    (
        "what we sent since its summary counts",
        [rv("eu")],
        3.0,
        {"sent": {"eu": (2.0, 0.0)}},
        None,
    ),
    ("no local replica: the best peer", [rv("eu", wait_s=20.0)], None, {}, "eu"),
]


@pytest.mark.parametrize(
    ("name", "peers", "local", "kw", "expected"), CASES, ids=[c[0] for c in CASES]
)
def test_peer_choice(
    name: str,
    peers: list[RegionView],
    local: float | None,
    kw: dict[str, object],
    expected: str | None,
) -> None:
    assert choose(peers, local, **kw) == expected


def test_the_forward_carries_what_it_will_cost_the_peer() -> None:
    fwd = choose_by_prediction(
        [rv("eu")], local_s=9.0, matched={}, prompt_chars=4000, block_chars=64, kv_tokens=1200.0,
        sent={}, margin_s=0.05, tokens_per_s=1000.0, max_wait_s=30.0, our_queue=0,
    )  # fmt: skip
    assert fwd is not None
    assert (fwd.region, fwd.reason, fwd.prefill_s, fwd.kv_tokens) == ("eu", "predict", FULL, 1200.0)


# --- the balancer -----------------------------------------------------------------------------

SPECS = [ReplicaSpec(f"r{i}", f"10.0.0.{i}:8000", "") for i in range(2)]
# Room for everything: our unseen dispatches are admitted at once (no engine queue).
IDLE = ScrapedMetrics(waiting=0, running=0, kv_usage=0.0, block_size=16, num_gpu_blocks=10_000)


def balancer() -> RegionBalancer:
    settings = RouterSettings(block_chars=64, stale_after_s=100.0, speed_prior=Speed(1000.0, 0.05))
    router = Router(settings, SPECS, make_policy("skylb", {}), random.Random(0))
    planner = SpillPlanner("us", ["us", "eu"], SpillSettings(mode="predict"))
    b = RegionBalancer("us", router, spill=Spill(PeerTable({"eu": 0.05}), planner))
    for spec in SPECS:
        b.on_scrape(spec.name, IDLE, started_at=0.0, now=0.0)
    return b


def eu(wait_s: float = 0.0) -> PeerSummary:
    return PeerSummary("eu", 0, 2, (0, 0), 2, 0.0, 0.0, wait_s=wait_s, prefill_tokens_per_s=1000.0)


def ask(b: RegionBalancer, rid: str, prompt: str, now: float) -> str:
    [action] = b.on_request(RouteRequest(rid, "/v1/completions", model="m", prompt=prompt), now)
    if isinstance(action, Forwarding):
        return f"region:{action.forward.region}"
    assert isinstance(action.decision, Route)
    return f"local:{action.decision.replica}"


def test_spills_at_arrival_only_when_the_peer_wins_and_the_conversation_follows() -> None:
    b = balancer()
    b.on_peer_summary(eu(), 0.0, started_at=0.0)
    # Idle at home: local, whatever the peer offers.
    assert ask(b, "a", "a" * 4000, 0.1) == "local:r0"
    assert ask(b, "b", "b" * 4000, 0.1) == "local:r1"
    # Both replicas have 1.03 s of prefill queued: 2.06 s here, 1.13 s in eu (round trip 0.1 s).
    assert ask(b, "c", "c" * 4000, 0.1) == "region:eu"
    b.on_peer_summary(eu(), 0.2, started_at=0.2)
    for rid in "ab":
        b.on_finished(rid, 1.0)
    b.on_peer_summary(eu(), 1.0, started_at=1.0)
    # Home is idle again, but c's next turn finds its prefix in eu (0.1 s + a few tokens).
    assert ask(b, "c2", "c" * 4000 + " and the answer", 1.0) == "region:eu"
    assert ask(b, "f", "f" * 4000, 1.0) == "local:r0"


def test_summary_fields_round_trip_and_bad_ones_are_refused() -> None:
    s = replace(eu(0.5), kv_free_tokens=1024.0, finish_interval_s=0.7)
    assert summary_from_json(json.loads(json.dumps(summary_to_json(s)))) == s
    body = summary_to_json(s) | {"prefill_tokens_per_s": 0}
    with pytest.raises(ValueError, match="prefill_tokens_per_s"):
        summary_from_json(body)
    old = {k: v for k, v in summary_to_json(s).items() if k in ("region", "queue_length",
           "available_replicas", "in_flight")}  # fmt: skip
    assert summary_from_json(old).wait_s == 0.0  # an older publisher: nothing is assumed
