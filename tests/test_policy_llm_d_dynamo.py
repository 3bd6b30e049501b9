"""llm_d and dynamo policies, the bookkeeping they read, and the consistent-hashing key rule.

Every case states the exact decision expected. Snapshots use 64-character blocks; the default
prompt is 640 characters, 10 blocks.
"""

from __future__ import annotations

import random

import pytest
from test_policies import Case, r, same

from skylb_extproc.errors import ConfigError
from skylb_extproc.hashing import affinity_key, block_hashes, key_hash
from skylb_extproc.policy.base import make_policy
from skylb_extproc.policy.dynamo import _sample, cost
from skylb_extproc.policy.llm_d import scores
from skylb_extproc.region.balancer import RegionBalancer, Spill
from skylb_extproc.region.peers import PeerSummary, PeerTable
from skylb_extproc.region.spill import Forward, SpillPlanner, SpillSettings
from skylb_extproc.router import Router, RouterSettings
from skylb_extproc.state.load import LoadTracker
from skylb_extproc.types import (
    Outcome,
    Reject,
    ReplicaSpec,
    ReplicaView,
    RouteRequest,
    ScrapedMetrics,
    Snapshot,
)

REQUEST = RouteRequest(request_id="q", path="/v1/completions", model="m", prompt="x")
NO_REPLICA = Reject(503, Outcome.NO_REPLICA, "")


class FixedRng(random.Random):
    """An rng whose tie draws and samples are given: randrange -> `index`, random -> `draw`."""

    def __init__(self, index: int = 0, draw: float = 0.0) -> None:
        super().__init__(0)
        self.index, self.draw, self.calls = index, draw, 0

    def randrange(self, *args: object, **kwargs: object) -> int:  # type: ignore[override]
        self.calls += 1
        return self.index

    def random(self) -> float:
        self.calls += 1
        return self.draw


def v(
    name: str,
    *,
    up: bool = True,
    m: int = 0,
    w: float = 0.0,
    kv: float = 0.0,
    act: int = 0,
    ov: int = 0,
    pre: float = 0.0,
) -> ReplicaView:
    """`m` matched blocks, `w` scraped waiting, `kv` KV usage, `act` active blocks, `ov` of this
    request among them, `pre` unprefilled blocks of ours there."""
    return ReplicaView(
        name=name, address=f"10.0.0.{name[-1]}:8000", healthy=up, available=up, in_flight=0,
        pending=0, matched_blocks=m, waiting=w, kv_usage=kv, active_blocks=act,
        active_overlap_blocks=ov, prefill_blocks=pre,
    )  # fmt: skip


def snap(*views: ReplicaView, prompt_chars: int = 640) -> Snapshot:
    return Snapshot(views, prompt_chars // 64, prompt_chars, 64, decisions=0)


CASES = [
    # --- llm_d: 2 x queue (min-max) + 2 x (1 - kv) + 3 x matched / prompt blocks -------------
    Case("llmd-none-healthy", "llm_d", snap(v("r0", up=False)), NO_REPLICA),
    Case("llmd-shortest-queue", "llm_d", snap(v("r0", w=4), v("r1", w=0), v("r2", w=2)),
         r("r1", "score")),
    # r0: 2 + 2 + 0 = 4; r1: 0 + 2 + 3 = 5 -> the full prefix outweighs the longest queue.
    Case("llmd-prefix-beats-queue", "llm_d", snap(v("r0", w=0), v("r1", w=4, m=10)),
         r("r1", "score")),
    Case("llmd-prefix-weight-0", "llm_d", snap(v("r0", w=0), v("r1", w=4, m=10)),
         r("r0", "score"), {"prefix_weight": 0}),
    Case("llmd-kv-usage", "llm_d", snap(v("r0", kv=0.9), v("r1", kv=0.1)), r("r1", "score")),
    Case("llmd-unhealthy-skipped", "llm_d", snap(v("r0", up=False, m=10), v("r1", w=3)),
         r("r1", "score")),
    # Queue scores 1, .5, 0. Default: r0 2+2+3x.4 = 5.2, r1 1+2+3 = 6. Capped at 4 blocks, r0
    # holds all of the matched prefix: 2+2+3 = 7.
    Case("llmd-uncapped", "llm_d", snap(v("r0", m=4), v("r1", w=1, m=10), v("r2", w=2)),
         r("r1", "score")),
    Case("llmd-capped", "llm_d", snap(v("r0", m=4), v("r1", w=1, m=10), v("r2", w=2)),
         r("r0", "score"), {"max_prefix_blocks": 4}),
    # --- dynamo: weight x (unprefilled + uncached prompt blocks) + active + new blocks ---------
    Case("dyn-none-healthy", "dynamo", snap(v("r0", up=False)), NO_REPLICA),
    # r0: 1 x (10 - 6) + (20 + 10 - 6) = 28; r1: 10 + 10 = 20.
    Case("dyn-idle-beats-busy-cache", "dynamo", snap(v("r0", m=6, act=20, ov=6), v("r1")),
         r("r1", "cost")),
    # r1 has 9 blocks of prefill queued: 29 > 28.
    Case("dyn-prefill-backlog", "dynamo", snap(v("r0", m=6, act=20, ov=6), v("r1", pre=9)),
         r("r0", "cost")),
    # r0: 0 + 12 (its active blocks are this prompt) = 12; r1: 20.
    Case("dyn-cache-hit", "dynamo", snap(v("r0", m=10, act=12, ov=10), v("r1")),
         r("r0", "cost")),
    # Weight 0: decode blocks only, 12 > 10.
    Case("dyn-weight-0", "dynamo", snap(v("r0", m=10, act=12, ov=10), v("r1")), r("r1", "cost"),
         {"overlap_score_weight": 0}),
    # 650 characters: r0 10/64 + 10 = 10.16; r1 (0.5 + 10.16) + 20 = 30.66.
    Case("dyn-partial-block", "dynamo",
         snap(v("r0", m=10, ov=10, act=10), v("r1", pre=0.5, act=10), prompt_chars=650),
         r("r0", "cost")),
    Case("dyn-unhealthy-skipped", "dynamo", snap(v("r0", up=False, m=10), v("r1", act=500)),
         r("r1", "cost")),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_decision(case: Case) -> None:
    rng = FixedRng()
    got = make_policy(case.policy, case.params).decide(REQUEST, case.snapshot, rng)
    assert same(got, case.expected), got
    assert rng.calls == 0  # a single best replica: no draw


@pytest.mark.parametrize(("policy", "reason"), [("llm_d", "score"), ("dynamo", "cost")])
@pytest.mark.parametrize("index", [0, 1, 2])
def test_ties_are_drawn_from_rng(policy: str, reason: str, index: int) -> None:
    s = snap(v("r0"), v("r1"), v("r2"), v("r3", w=1, act=1))
    rng = FixedRng(index=index)
    assert make_policy(policy, {}).decide(REQUEST, s, rng) == r(f"r{index}", reason)
    assert rng.calls == 1


def test_llm_d_scores() -> None:
    views = [v("r0", w=0, kv=0.25, m=5), v("r1", w=4, kv=1.5, m=20), v("r2", w=1)]
    # queue 1, 0, .75; kv .75, 0 (clamped), 1; prefix .5, 1 (capped at the prompt), 0.
    assert scores(views, 10, (2.0, 2.0, 3.0), 256) == [5.0, 3.0, 3.5]
    assert scores(views, 0, (2.0, 2.0, 3.0), 256) == [3.5, 0.0, 3.5]  # no blocks: no prefix


@pytest.mark.parametrize(("draw", "row"), [(0.0, 0), (0.73, 0), (0.74, 1), (0.99, 1), (1.0, 1)])
def test_dynamo_softmax_sample(draw: float, row: int) -> None:
    # costs 0 and 10, temperature 1: p0 = 1 / (1 + e^-1) = 0.7311.
    assert _sample([0.0, 10.0], 1.0, draw) == row


@pytest.mark.parametrize(
    ("view", "chars", "weight", "expected"),
    [
        (v("r0", m=10, ov=10, act=10), 650, 1.0, 10 + 10 / 64),  # only the partial block
        (v("r0", m=4, ov=2, act=30, pre=3), 640, 1.0, (3 + 6) + (30 + 10 - 2)),
        (v("r0", m=4, ov=2, act=30, pre=3), 640, 2.5, 2.5 * (3 + 6) + (30 + 10 - 2)),
        (v("r0", m=12), 640, 1.0, 0 + 10),  # matched beyond the prompt: no negative prefill
    ],
)
def test_dynamo_cost(view: ReplicaView, chars: int, weight: float, expected: float) -> None:
    assert cost(view, snap(view, prompt_chars=chars), weight) == expected


def test_dynamo_temperature_samples_with_rng() -> None:
    policy = make_policy("dynamo", {"router_temperature": 1.0})
    s = snap(v("r0"), v("r1", act=10))  # costs 20 and 30
    assert policy.decide(REQUEST, s, FixedRng(draw=0.5)) == r("r0", "cost")
    assert policy.decide(REQUEST, s, FixedRng(draw=0.9)) == r("r1", "cost")
    assert _sample([5.0, 5.0, 5.0], 0.5, 0.5) == 1  # all equal: uniform


def test_defaults_and_flags() -> None:
    llmd = make_policy("llm_d", {})
    assert vars(llmd) == {"weights": (2.0, 2.0, 3.0), "max_prefix_blocks": 256}
    dyn = make_policy("dynamo", {})
    assert vars(dyn) == {"overlap_score_weight": 1.0, "router_temperature": 0.0}
    for policy in (llmd, dyn):
        assert (policy.waits, policy.pending_slack) == (False, 0)


@pytest.mark.parametrize(
    ("name", "params", "path"),
    [
        ("llm_d", {"weight": 1}, "policy.params.weight"),
        ("llm_d", {"queue_weight": -1}, "policy.params.queue_weight"),
        ("llm_d", {"kv_weight": "2"}, "policy.params.kv_weight"),
        ("llm_d", {"max_prefix_blocks": 0}, "policy.params.max_prefix_blocks"),
        ("llm_d", {"max_prefix_blocks": 2.5}, "policy.params.max_prefix_blocks"),
        ("dynamo", {"temperature": 0}, "policy.params.temperature"),
        ("dynamo", {"overlap_score_weight": True}, "policy.params.overlap_score_weight"),
        ("dynamo", {"router_temperature": -0.1}, "policy.params.router_temperature"),
        ("consistent_hash", {"key_blocks": 0}, "policy.params.key_blocks"),
        ("consistent_hash", {"key_block": 4}, "policy.params.key_block"),
    ],
)
def test_bad_params(name: str, params: dict[str, object], path: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_policy(name, params)
    assert err.value.path == path


# --- the consistent-hashing key -------------------------------------------------------------

H = (11, 12, 13, 14, 15)


@pytest.mark.parametrize(
    ("header", "hashes", "blocks", "expected"),
    [
        ("user-7", H, 2, key_hash("user-7")),  # the session header wins
        (None, H, 2, 12),  # chained hash of the first 2 blocks
        (None, H, 16, 15),  # shorter prompt: all its full blocks
        ("", H, 1, 11),  # an empty header is no header
        (None, (), 16, None),  # no full block: no key
    ],
)
def test_affinity_key(
    header: str | None, hashes: tuple[int, ...], blocks: int, expected: int | None
) -> None:
    assert affinity_key(header, hashes, blocks) == expected


def test_shared_system_prompt_no_longer_shares_a_key() -> None:
    system = "You are a helpful assistant. " * 3  # 87 characters: more than one block
    a, b = (block_hashes(system + user * 40, model="m", block_chars=64, max_blocks=64)
            for user in ("tell me about cats. ", "write a sonnet now. "))  # fmt: skip
    assert a[0] == b[0]  # the old key: one replica for both
    assert affinity_key(None, a, 16) != affinity_key(None, b, 16)


# --- what the core tracks for dynamo --------------------------------------------------------

SPECS = [ReplicaSpec(f"r{i}", f"10.0.0.{i}:8000", "") for i in range(2)]


def test_tracker_counts_active_blocks_and_prefill() -> None:
    t = LoadTracker(SPECS, stale_after_s=10.0, max_pending=0)
    for spec in SPECS:
        t.on_scrape(spec.name, ScrapedMetrics(waiting=2, running=1, kv_usage=0.4),
                    started_at=0.0, now=0.0)  # fmt: skip
    t.on_dispatch("r0", "a", 1.0, blocks=(1, 2, 3), prefill_blocks=3.5)
    t.on_dispatch("r0", "b", 1.0, blocks=(1, 2, 9), prefill_blocks=1.0)
    t.on_dispatch("r1", "c", 1.0, blocks=(7,))

    def state(hashes: tuple[int, ...]) -> list[tuple[int, int, float, float, float]]:
        return [(x.active_blocks, x.active_overlap_blocks, x.prefill_blocks, x.waiting,
                 x.kv_usage) for x in t.views(2.0, hashes=hashes)]  # fmt: skip

    assert state((1, 2, 3, 4)) == [(4, 3, 4.5, 2, 0.4), (1, 0, 0.0, 2, 0.4)]
    t.on_prefilled("a", 2.0)
    assert state((1, 2, 5)) == [(4, 2, 1.0, 2, 0.4), (1, 0, 0.0, 2, 0.4)]
    t.on_finished("b", 3.0)  # blocks 1 and 2 are still a's
    assert state((1, 2, 9)) == [(3, 2, 0.0, 2, 0.4), (1, 0, 0.0, 2, 0.4)]
    t.on_finished("a", 3.0)
    t.on_prefilled("c", 3.0)
    assert state((7,)) == [(0, 0, 0.0, 2, 0.4), (1, 1, 0.0, 2, 0.4)]


def test_router_feeds_dynamo_its_bookkeeping() -> None:
    settings = RouterSettings(block_chars=8, stale_after_s=100.0)
    router = Router(settings, SPECS, make_policy("dynamo", {}), random.Random(0))
    for spec in SPECS:
        router.on_scrape(spec.name, ScrapedMetrics(waiting=0, running=0), started_at=0, now=0)
    prompt = "0123456789abcdefghijklmnopqrstuvwxyz"  # 36 chars: 4 blocks + 4 characters
    first = router.on_request(RouteRequest("a", "/v1/completions", model="m", prompt=prompt), 1.0)
    # Both idle, costs equal (4.5 + 4): drawn with the router's rng.
    assert [d.decision.reason for d in first] == ["cost"]
    home = first[0].decision.replica  # type: ignore[union-attr]
    views = {x.name: x for x in router.views(1.0)}
    assert (views[home].active_blocks, views[home].prefill_blocks) == (4, 4.5)
    # The same prompt again: home costs 0.5 + 4.5 prefill + 4 decode = 9; the other 4.5 + 4.
    second = router.on_request(RouteRequest("b", "/v1/completions", model="m", prompt=prompt), 1.0)
    assert second[0].decision.replica != home  # type: ignore[union-attr]
    router.on_started("a", 2.0)  # first token: a's prefill is done, its blocks stay
    views = {x.name: x for x in router.views(2.0)}
    assert (views[home].active_blocks, views[home].prefill_blocks) == (4, 0.0)
    third = router.on_request(RouteRequest("c", "/v1/completions", model="m", prompt=prompt), 2.0)
    assert third[0].decision.replica == home  # type: ignore[union-attr]  # 0.5 + 4 < 4.5 + 4.5 + 4


@pytest.mark.parametrize(("params", "blocks"), [({}, 16), ({"key_blocks": 2}, 2)])
# Selective SkyLB-CH over busy replicas: the request queues and the region ring decides.
def test_router_and_spill_key_on_the_same_rule(params: dict[str, object], blocks: int) -> None:
    settings = RouterSettings(block_chars=4, stale_after_s=100.0)
    policy = make_policy("consistent_hash", {"selective": True, **params})
    router = Router(settings, SPECS, policy, random.Random(0))
    seen: list[int | None] = []

    class Planner(SpillPlanner):
        def decide(self, *args: object, **kwargs: object) -> Forward | None:  # type: ignore[override]
            seen.append(kwargs["key_hash"])  # type: ignore[arg-type]
            return super().decide(*args, **kwargs)  # type: ignore[arg-type]

    planner = Planner("us", ["us", "eu"], SpillSettings(mode="hash"))
    balancer = RegionBalancer("us", router, spill=Spill(PeerTable({"eu": 0.04}), planner, None))
    busy = ScrapedMetrics(waiting=1, running=8)
    for spec in SPECS:
        balancer.on_scrape(spec.name, busy, started_at=0.0, now=0.0)
    balancer.on_peer_summary(PeerSummary("eu", 0, 1, (1, 1), 2, 0.0), 1.0, started_at=1.0)
    request = RouteRequest("a", "/v1/completions", model="m", prompt="x" * 100)  # 25 blocks
    hashes = router.hashes(request)
    balancer.on_request(request, 1.0)
    assert router.affinity_key(request, hashes) == hashes[blocks - 1]
    assert seen and set(seen) == {hashes[blocks - 1]}
