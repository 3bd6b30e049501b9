"""Table-driven policy tests: every case states the exact decision expected."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from skylb_extproc.errors import ConfigError
from skylb_extproc.hashing import key_hash
from skylb_extproc.policy.base import POLICY_NAMES, RoutingPolicy, make_policy
from skylb_extproc.policy.consistent_hash import build_ring
from skylb_extproc.types import (
    Decision,
    Outcome,
    Reject,
    ReplicaView,
    Route,
    RouteRequest,
    Snapshot,
    Wait,
)

REQUEST = RouteRequest(request_id="q", path="/v1/chat/completions", model="m", prompt="x")
NO_REPLICA = Reject(503, Outcome.NO_REPLICA, "")  # compared without the message


def v(
    name: str,
    *,
    up: bool = True,
    free: bool | None = None,
    f: int = 0,
    m: int = 0,
    p: int | None = None,
) -> ReplicaView:
    """A replica view: `up` healthy, `free` available (defaults to `up`), `f` in flight,
    `m` matched blocks, `p` pending (defaults to 0 if available, else 1)."""
    available = up if free is None else free
    return ReplicaView(
        name=name,
        address=f"10.0.0.{name[-1]}:8000",
        healthy=up,
        available=available,
        in_flight=f,
        pending=(0 if available else 1) if p is None else p,
        matched_blocks=m,
    )


def snap(
    *views: ReplicaView, prompt_chars: int = 640, decisions: int = 0, key: int | None = None
) -> Snapshot:
    """Blocks of 64 characters; the default prompt is 10 blocks long."""
    return Snapshot(
        replicas=views,
        prompt_blocks=prompt_chars // 64,
        prompt_chars=prompt_chars,
        block_chars=64,
        decisions=decisions,
        key_hash=key,
    )


def r(name: str, reason: str) -> Route:
    return Route(replica=name, address=f"10.0.0.{name[-1]}:8000", reason=reason)


@dataclass(frozen=True)
class Case:
    id: str
    policy: str
    snapshot: Snapshot
    expected: Decision
    params: dict[str, object] = field(default_factory=dict)


def same(decision: Decision, expected: Decision) -> bool:
    if isinstance(decision, Reject) and isinstance(expected, Reject):
        return (decision.status, decision.outcome) == (expected.status, expected.outcome)
    return decision == expected


S, PA, LL, RR, CH = "skylb_paper", "prefix_affinity", "least_load", "round_robin", "consistent_hash"
WAIT = Wait()
R0, R1, R2 = v("r0"), v("r1"), v("r2")
THREE = (R0, R1, R2)

# fmt: off
SKYLB = [
    Case("all-pending-waits", S, snap(v("r0", free=False), v("r1", free=False)), WAIT),
    Case("none-healthy-waits", S, snap(v("r0", up=False), v("r1", up=False)), WAIT),
    Case("no-replicas-waits", S, snap(), WAIT),
    Case("match-over-half", S, snap(R0, v("r1", f=5, m=6)), r("r1", "prefix")),
    # 5 blocks * 64 / 640 = 0.5 exactly: not strictly above the threshold.
    Case("match-exactly-half", S, snap(v("r0", f=1), v("r1", f=5, m=5), v("r2", f=2)),
         r("r0", "least_load")),
    Case("best-match-unavailable", S,
         snap(v("r0", f=3), v("r1", free=False, m=10), v("r2", f=1, m=2)), r("r2", "least_load")),
    Case("second-best-still-high", S,
         snap(R0, v("r1", free=False, m=10), v("r2", f=9, m=8)), r("r2", "prefix")),
    Case("unhealthy-match-ignored", S, snap(v("r0", up=False, m=10), v("r1", f=2)),
         r("r1", "least_load")),
    Case("match-tie-fewer-in-flight", S, snap(v("r0", f=2, m=8), v("r1", f=1, m=8)),
         r("r1", "prefix")),
    Case("match-tie-config-order", S, snap(R0, v("r1", f=1, m=8), v("r2", f=1, m=8)),
         r("r1", "prefix")),
    Case("longer-match-beats-load", S, snap(v("r0", f=9, m=9), v("r1", m=8)), r("r0", "prefix")),
    Case("least-load-tie-order", S, snap(v("r0", f=1), R1, R2), r("r1", "least_load")),
    # Ties rotate with the decision count: new conversations on an idle pool spread out.
    Case("least-load-tie-rotates-1", S, snap(R0, R1, R2, decisions=1), r("r1", "least_load")),
    Case("least-load-tie-rotates-5", S, snap(v("r0", f=1), R1, R2, decisions=5),
         r("r2", "least_load")),
    Case("empty-prompt", S, snap(v("r0", f=1), R1, prompt_chars=0), r("r1", "least_load")),
    Case("threshold-zero", S, snap(R0, v("r1", f=3, m=1)), r("r1", "prefix"),
         {"cache_threshold": 0.0}),
    Case("threshold-one-never", S, snap(v("r0", f=1), v("r1", f=3, m=10)),
         r("r0", "least_load"), {"cache_threshold": 1.0}),
    # affinity_slack 1: a prefix holder with one pending request takes the prompt anyway.
    Case("slack-holder-one-pending", S,
         snap(v("r0", f=3), v("r1", free=False, m=10), v("r2", f=1, m=2)), r("r1", "prefix"),
         {"affinity_slack": 1}),
    Case("slack-holder-while-none-available", S,
         snap(v("r0", free=False), v("r1", free=False, m=10)), r("r1", "prefix"),
         {"affinity_slack": 1}),
    Case("slack-holder-two-pending", S,
         snap(v("r0", f=3), v("r1", free=False, p=2, m=10), v("r2", f=1, m=2)),
         r("r2", "least_load"), {"affinity_slack": 1}),
    Case("slack-low-match-still-waits", S, snap(v("r0", free=False, m=5)), WAIT,
         {"affinity_slack": 1}),
    Case("slack-unhealthy-holder-ignored", S, snap(v("r0", up=False, p=0, m=10), v("r1", f=2)),
         r("r1", "least_load"), {"affinity_slack": 3}),
    Case("slack-available-holder-first", S,
         snap(v("r0", free=False, m=9), v("r1", f=4, m=9)), r("r1", "prefix"),
         {"affinity_slack": 1}),
]

PREFIX_AFFINITY = [
    Case("none-healthy", PA, snap(v("r0", up=False)), NO_REPLICA),
    Case("no-replicas", PA, snap(), NO_REPLICA),
    # 100 - 10 > 64 and 100 > 1.5 * 10: imbalance beats a full match.
    Case("imbalanced", PA, snap(v("r0", f=100, m=10), v("r1", f=10)), r("r1", "balance")),
    # 200 - 135 > 64 but 200 <= 1.5 * 135: balanced, so the match wins.
    Case("abs-only-is-balanced", PA, snap(v("r0", f=200, m=10), v("r1", f=135)),
         r("r0", "prefix")),
    Case("abs-boundary", PA, snap(v("r0", f=64, m=10), R1), r("r0", "prefix")),  # 64 !> 64
    Case("abs-boundary-plus-one", PA, snap(v("r0", f=65, m=10), R1), r("r1", "balance")),
    Case("unhealthy-load-ignored", PA, snap(v("r0", up=False, f=500), v("r1", m=10), R2),
         r("r1", "prefix")),
    # 3 blocks * 64 / 640 = 0.3: not above SGLang's 0.3.
    Case("match-at-threshold", PA, snap(v("r0", f=2, m=3), v("r1", f=1)), r("r1", "least_load")),
    Case("match-above-threshold", PA, snap(v("r0", f=2, m=4), v("r1", f=1)), r("r0", "prefix")),
    Case("pushes-to-unavailable", PA, snap(v("r0", free=False, f=4, m=8), R1), r("r0", "prefix")),
    Case("least-load-tie-order", PA, snap(v("r0", f=1), R1, R2), r("r1", "least_load")),
    Case("custom-thresholds", PA, snap(v("r0", f=3, m=10), R1), r("r1", "balance"),
         {"balance_abs_threshold": 2, "balance_rel_threshold": 1.0}),
]

LEAST_LOAD = [
    Case("none-healthy", LL, snap(v("r0", up=False)), NO_REPLICA),
    Case("fewest", LL, snap(v("r0", f=3), v("r1", f=1), v("r2", f=2)), r("r1", "least_load")),
    Case("tie-config-order", LL, snap(v("r0", f=1), R1, R2), r("r1", "least_load")),
    Case("unhealthy-skipped", LL, snap(v("r0", up=False), v("r1", f=7)), r("r1", "least_load")),
    Case("ignores-match-and-pending", LL, snap(v("r0", free=False), v("r1", f=1, m=10)),
         r("r0", "least_load")),
]

ROUND_ROBIN = [
    Case("none-healthy", RR, snap(v("r0", up=False)), NO_REPLICA),
    Case("cursor-0", RR, snap(*THREE, decisions=0), r("r0", "round_robin")),
    Case("cursor-1", RR, snap(*THREE, decisions=1), r("r1", "round_robin")),
    Case("cursor-2", RR, snap(*THREE, decisions=2), r("r2", "round_robin")),
    Case("cursor-3", RR, snap(*THREE, decisions=3), r("r0", "round_robin")),
    Case("skips-unhealthy", RR, snap(R0, v("r1", up=False), R2, decisions=1),
         r("r2", "round_robin")),
    Case("ignores-load", RR, snap(v("r0", f=50), R1), r("r0", "round_robin")),
]

# Golden ring walks for replicas r0, r1, r2 with 1024 virtual nodes (342 points each): the
# clockwise order of distinct owners from each key. Frozen: a change reshuffles live sessions.
ALICE, BOB, DAVE = key_hash("alice"), key_hash("bob"), key_hash("dave")
ALICE_WALK, BOB_WALK, DAVE_WALK = ("r2", "r1", "r0"), ("r0", "r2", "r1"), ("r0", "r1", "r2")
SEL: dict[str, object] = {"selective": True}
CONSISTENT_HASH = [
    Case("alice", CH, snap(*THREE, key=ALICE), r("r2", "hash")),
    Case("bob", CH, snap(*THREE, key=BOB), r("r0", "hash")),
    Case("alice-r2-down", CH, snap(R0, R1, v("r2", up=False), key=ALICE), r("r1", "hash")),
    Case("alice-r2-r1-down", CH, snap(R0, v("r1", up=False), v("r2", up=False), key=ALICE),
         r("r0", "hash")),
    Case("bob-r0-down", CH, snap(v("r0", up=False), R1, R2, key=BOB), r("r2", "hash")),
    Case("dave-r0-down", CH, snap(v("r0", up=False), R1, R2, key=DAVE), r("r1", "hash")),
    Case("ring-point-owner", CH, snap(*THREE, key=key_hash("r17")), r("r1", "hash")),
    Case("blind-ignores-pending", CH, snap(R0, R1, v("r2", free=False), key=ALICE),
         r("r2", "hash")),
    Case("no-key-least-load", CH, snap(v("r0", f=2), v("r1", f=1), v("r2", f=1)),
         r("r1", "least_load")),
    Case("none-healthy", CH, snap(v("r0", up=False), key=ALICE), NO_REPLICA),
    Case("selective-skips-pending", CH, snap(R0, R1, v("r2", free=False), key=ALICE),
         r("r1", "hash"), SEL),
    Case("selective-waits", CH, snap(v("r0", free=False), v("r1", up=False), key=ALICE), WAIT,
         SEL),
    Case("selective-no-key", CH, snap(v("r0", free=False), v("r1", f=4), v("r2", f=5)),
         r("r1", "least_load"), SEL),
]
# fmt: on

CASES = SKYLB + PREFIX_AFFINITY + LEAST_LOAD + ROUND_ROBIN + CONSISTENT_HASH


@pytest.mark.parametrize("case", CASES, ids=[f"{c.policy}:{c.id}" for c in CASES])
def test_decision_table(case: Case) -> None:
    policy = make_policy(case.policy, case.params)
    decision = policy.decide(REQUEST, case.snapshot, random.Random(0))
    assert same(decision, case.expected), decision


def test_golden_walks_match_a_brute_force_ring() -> None:
    """The frozen walks above agree with the ring's definition, computed the slow way."""
    names = ("r0", "r1", "r2")
    points = sorted((key_hash(f"{n}{i}"), n) for n in names for i in range(342))
    for key, walk in ((ALICE, ALICE_WALK), (BOB, BOB_WALK), (DAVE, DAVE_WALK)):
        clockwise = [n for p, n in points if p >= key] + [n for _, n in points]
        assert tuple(dict.fromkeys(clockwise)) == walk


@given(
    key=st.integers(min_value=0, max_value=2**64 - 1),
    up=st.lists(st.booleans(), min_size=1, max_size=5),
    nodes=st.integers(min_value=1, max_value=64),
)
def test_ring_walk_is_first_eligible_point_clockwise(key: int, up: list[bool], nodes: int) -> None:
    names = [f"s{i}" for i in range(len(up))]
    views = tuple(
        ReplicaView(n, n, healthy=ok, available=ok, in_flight=0, pending=0)
        for n, ok in zip(names, up, strict=True)
    )
    policy = make_policy("consistent_hash", {"virtual_nodes": nodes})
    decision = policy.decide(REQUEST, snap(*views, key=key), random.Random(0))
    per = -(-nodes // len(names))
    points = sorted((key_hash(f"{n}{i}"), j) for j, n in enumerate(names) for i in range(per))
    clockwise = [j for p, j in points if p >= key] + [j for _, j in points]
    eligible = [j for j in clockwise if up[j]]
    if not eligible:
        assert same(decision, NO_REPLICA)
    else:
        assert decision == Route(names[eligible[0]], names[eligible[0]], "hash")


def test_ring_is_balanced_and_memoised() -> None:
    points, owners = build_ring(("a", "b", "c"), 1024)
    assert len(points) == 1026 and list(points) == sorted(points)
    assert [owners.count(i) for i in range(3)] == [342, 342, 342]
    assert build_ring(("a", "b", "c"), 1024) is build_ring(("a", "b", "c"), 1024)


@pytest.mark.parametrize(
    ("name", "waits"),
    [
        ("skylb", True),
        ("skylb_paper", True),
        ("prefix_affinity", False),
        ("least_load", False),
        ("round_robin", False),
        ("consistent_hash", False),
    ],
)
def test_registry_names_and_waits(name: str, waits: bool) -> None:
    policy: RoutingPolicy = make_policy(name, {})
    assert (policy.name, policy.waits) == (name, waits)


def test_selective_consistent_hash_waits() -> None:
    assert make_policy("consistent_hash", {"selective": True}).waits is True
    assert set(POLICY_NAMES) == {
        "skylb",
        "skylb_paper",
        "prefix_affinity",
        "least_load",
        "round_robin",
        "consistent_hash",
        "llm_d",
        "dynamo",
    }


def test_defaults() -> None:
    paper = make_policy("skylb_paper", {})
    assert vars(paper) == {"cache_threshold": 0.5, "pending_slack": 0}
    assert vars(make_policy("skylb", {})) == {
        "hold_s": 1.0,
        "lookahead": 8,
        "saturated_queue": 4.0,
        "saturated_hold_s": 5.0,
        "eviction_weight": 0.5,
    }
    sglang = make_policy("prefix_affinity", {})
    assert vars(sglang) == {
        "cache_threshold": 0.3,
        "balance_abs_threshold": 64,
        "balance_rel_threshold": 1.5,
    }
    ch = make_policy("consistent_hash", {})
    assert vars(ch) == {
        "virtual_nodes": 1024,
        "selective": False,
        "key_blocks": 16,
        "waits": False,
    }


@pytest.mark.parametrize(
    ("name", "params", "path"),
    [
        ("nope", {}, "policy.name"),
        ("skylb_paper", {"cache_treshold": 0.4}, "policy.params.cache_treshold"),
        ("skylb_paper", {"cache_threshold": "high"}, "policy.params.cache_threshold"),
        ("skylb_paper", {"cache_threshold": True}, "policy.params.cache_threshold"),
        ("skylb_paper", {"cache_threshold": 1.5}, "policy.params.cache_threshold"),
        ("skylb_paper", {"affinity_slack": -1}, "policy.params.affinity_slack"),
        ("skylb_paper", {"affinity_slack": 0.5}, "policy.params.affinity_slack"),
        ("prefix_affinity", {"balance_abs_threshold": 1.5}, "policy.params.balance_abs_threshold"),
        ("prefix_affinity", {"balance_abs_threshold": -1}, "policy.params.balance_abs_threshold"),
        ("prefix_affinity", {"balance_rel_threshold": -0.1}, "policy.params.balance_rel_threshold"),
        ("least_load", {"x": 1}, "policy.params.x"),
        ("round_robin", {"cache_threshold": 0.5}, "policy.params.cache_threshold"),
        ("consistent_hash", {"virtual_nodes": 0}, "policy.params.virtual_nodes"),
        ("consistent_hash", {"selective": "yes"}, "policy.params.selective"),
    ],
)
def test_bad_params_name_the_key(name: str, params: dict[str, object], path: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_policy(name, params)
    assert info.value.path == path


def test_int_accepted_for_float_params() -> None:
    policy = make_policy("skylb_paper", {"cache_threshold": 1})
    assert vars(policy) == {"cache_threshold": 1.0, "pending_slack": 0}
