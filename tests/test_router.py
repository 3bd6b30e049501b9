"""Router scenarios with exact outcomes, driven by hand-fed events and virtual time."""

from __future__ import annotations

import dataclasses
import random

import pytest

from skylb_extproc.hashing import block_hashes, key_hash
from skylb_extproc.policy.base import POLICY_NAMES, make_policy
from skylb_extproc.router import Router, RouterSettings
from skylb_extproc.types import (
    Decision,
    Dispatch,
    Outcome,
    Reject,
    ReplicaSpec,
    Route,
    RouteRequest,
    ScrapedMetrics,
    Snapshot,
)

SPECS = [
    ReplicaSpec(f"r{i}", f"10.0.0.{i}:8000", f"http://10.0.0.{i}:8000/metrics") for i in range(3)
]
IDLE = ScrapedMetrics(waiting=0, running=0)
BUSY = ScrapedMetrics(waiting=1, running=8)
# Small blocks keep prompts short; staleness far away unless a test is about it.
SETTINGS = RouterSettings(
    block_chars=8, stale_after_s=100.0, queue_max_wait_s=5.0, confirm_on_headers=True
)


def make(
    policy: str = "skylb_paper",
    params: dict[str, object] | None = None,
    replicas: int = 3,
    scrape: ScrapedMetrics | None = IDLE,
    *,
    stale_after_s: float = SETTINGS.stale_after_s,
    queue_max_length: int = SETTINGS.queue_max_length,
) -> Router:
    """A router whose replicas were all scraped once, at t=0, with `scrape`."""
    s = dataclasses.replace(
        SETTINGS, stale_after_s=stale_after_s, queue_max_length=queue_max_length
    )
    router = Router(s, SPECS[:replicas], make_policy(policy, params or {}), random.Random(0))
    if scrape is not None:
        for spec in SPECS[:replicas]:
            assert router.on_scrape(spec.name, scrape, started_at=0.0, now=0.0) == []
    return router


def chat(rid: str, prompt: str = "", hash_key: str | None = None) -> RouteRequest:
    return RouteRequest(
        request_id=rid, path="/v1/chat/completions", model="m", prompt=prompt, hash_key=hash_key
    )


def routed(
    rid: str, replica: str, reason: str, waited: float = 0.0, matched: float = 0.0
) -> Dispatch:
    route = Route(replica=replica, address=f"10.0.0.{replica[-1]}:8000", reason=reason)
    return Dispatch(rid, route, waited_s=waited, matched_fraction=matched)


def rejected(
    rid: str, status: int, outcome: Outcome, waited: float = 0.0
) -> tuple[str, int, Outcome, float]:
    return (rid, status, outcome, waited)


def rejections(dispatches: list[Dispatch]) -> list[tuple[str, int, Outcome, float]]:
    out = []
    for d in dispatches:
        assert isinstance(d.decision, Reject), d
        out.append((d.request_id, d.decision.status, d.decision.outcome, d.waited_s))
    return out


P = "system: be brief|user: hello there|"  # 35 chars: 4 blocks of 8
Q = "system: be terse|user: what is up?|"  # shares the first 8 characters only


def test_conversation_sticks_to_its_replica() -> None:
    router = make()
    assert router.on_request(chat("a", P), 1.0) == [routed("a", "r0", "least_load")]
    router.on_started("a", 1.1)
    # r1 and r2 tie at 0 in flight; the tie rotates with the decision count (1): r2.
    assert router.on_request(chat("b", Q), 1.2) == [routed("b", "r2", "least_load")]
    router.on_started("b", 1.3)
    router.on_finished("a", 2.0)
    router.on_finished("b", 2.0)
    # Second turn: P + 25 chars = 60 chars; r0 holds 4 of its 7 blocks: 32/60 > 0.5.
    turn2 = P + "assistant: hi|user: more|"
    assert len(turn2) == 60
    assert router.on_request(chat("c", turn2), 3.0) == [
        routed("c", "r0", "prefix", matched=32 / 60)
    ]
    router.on_started("c", 3.1)
    # The conversation stays even when its replica is the busiest available one.
    assert router.on_request(chat("d", turn2 + "x" * 10), 3.2) == [
        routed("d", "r0", "prefix", matched=56 / 70)
    ]


def test_waits_when_nothing_available_then_dispatches_on_scrape() -> None:
    router = make(scrape=BUSY)
    assert router.on_request(chat("a", P), 1.0) == []
    assert router.on_request(chat("b", Q), 1.5) == []
    assert router.queue_length == 2
    assert router.on_scrape("r2", BUSY, started_at=1.9, now=2.0) == []
    # One replica frees up: the head goes; the next waits behind our own dispatch there.
    assert router.on_scrape("r1", IDLE, started_at=2.4, now=2.5) == [
        routed("a", "r1", "least_load", waited=1.5)
    ]
    assert router.queue_length == 1
    assert router.on_scrape("r0", IDLE, started_at=2.9, now=3.0) == [
        routed("b", "r0", "least_load", waited=1.5)
    ]


def test_affinity_slack_routes_to_a_busy_holder_when_nothing_is_available() -> None:
    """The 'nothing available' shortcut must not skip a policy that may take a holder."""
    router = make(params={"affinity_slack": 1})
    assert router.on_request(chat("a", P), 1.0) == [routed("a", "r0", "least_load")]
    for name in ("r1", "r2"):
        router.on_scrape(name, BUSY, started_at=1.1, now=1.2)
    # r0: one dispatch of ours not yet seen by a scrape -> pending 1, not available.
    assert router.on_request(chat("b", P + "more"), 1.3) == [
        routed("b", "r0", "prefix", matched=32 / 39)
    ]
    paper = make()
    assert paper.on_request(chat("a", P), 1.0) == [routed("a", "r0", "least_load")]
    for name in ("r1", "r2"):
        paper.on_scrape(name, BUSY, started_at=1.1, now=1.2)
    assert paper.on_request(chat("b", P + "more"), 1.3) == []  # waits


def test_waiting_request_goes_when_a_dispatch_starts_or_finishes() -> None:
    router = make(replicas=1)
    assert router.on_request(chat("a", P), 1.0) == [routed("a", "r0", "least_load")]
    assert router.on_request(chat("b", Q), 1.25) == []
    assert router.on_request(chat("c", "z" * 16), 1.25) == []
    # Q shares P's first block ("system: "): 8 of 35 characters, under the 0.5 threshold.
    assert router.on_started("a", 1.5) == [
        routed("b", "r0", "least_load", waited=0.25, matched=8 / 35)
    ]
    # b is unstarted: finishing it (e.g. the client went away) frees the replica for c.
    assert router.on_finished("b", 2.0) == [routed("c", "r0", "least_load", waited=0.75)]


def test_pending_until_a_scrape_that_started_after_the_dispatch() -> None:
    router = make(replicas=1)
    assert router.on_request(chat("a", P), 1.0) == [routed("a", "r0", "least_load")]
    assert router.on_request(chat("b", "z" * 16), 1.0) == []
    # This scrape began before the dispatch: it cannot have seen "a".
    assert router.on_scrape("r0", IDLE, started_at=0.75, now=1.25) == []
    # Same instant as the dispatch: the order is unknown, so "a" still counts as pending.
    assert router.on_scrape("r0", IDLE, started_at=1.0, now=1.25) == []
    # Began after it and reports nothing waiting: "a" is running, r0 is available.
    assert router.on_scrape("r0", IDLE, started_at=1.25, now=1.5) == [
        routed("b", "r0", "least_load", waited=0.5)
    ]


def test_a_burst_is_spread_not_piled_on_one_replica() -> None:
    router = make()
    got = [router.on_request(chat(f"q{i}", f"{i}" * 20), 1.0) for i in range(5)]
    assert got[:3] == [
        [routed("q0", "r0", "least_load")],
        [routed("q1", "r2", "least_load")],  # ties r1/r2 rotate with the decision count
        [routed("q2", "r1", "least_load")],
    ]
    assert got[3:] == [[], []] and router.queue_length == 2


def test_queue_full_is_429() -> None:
    router = make(scrape=BUSY, queue_max_length=1)
    assert router.on_request(chat("a", P), 1.0) == []
    assert rejections(router.on_request(chat("b", P), 1.1)) == [
        rejected("b", 429, Outcome.QUEUE_FULL)
    ]
    assert router.queue_length == 1


def test_deadline_is_503_via_on_timer() -> None:
    router = make(scrape=BUSY)
    router.on_request(chat("a", P), 1.0)
    router.on_request(chat("b", P), 2.0)
    assert router.next_deadline() == 6.0
    assert router.on_timer(5.999) == []
    assert rejections(router.on_timer(6.0)) == [rejected("a", 503, Outcome.DEADLINE, 5.0)]
    assert router.next_deadline() == 7.0
    assert rejections(router.on_timer(9.0)) == [rejected("b", 503, Outcome.DEADLINE, 7.0)]
    assert router.next_deadline() == 100.0  # only the replicas' staleness instant is left


def test_overdue_requests_are_expired_by_any_event_freeing_room() -> None:
    router = make(scrape=BUSY, queue_max_length=1)
    router.on_request(chat("a", P), 1.0)
    # A late timer must not turn "b" away: "a" is past its deadline and goes first.
    assert rejections(router.on_request(chat("b", P), 7.0)) == [
        rejected("a", 503, Outcome.DEADLINE, 6.0)
    ]
    assert router.queue_length == 1


def test_cancel_while_queued() -> None:
    router = make(scrape=BUSY)
    router.on_request(chat("a", P), 1.0)
    router.on_request(chat("b", Q), 1.0)
    assert router.on_finished("a", 1.5) == []
    assert router.queue_length == 1
    assert router.on_scrape("r0", IDLE, started_at=2.0, now=2.0) == [
        routed("b", "r0", "least_load", waited=1.0)
    ]
    assert router.on_finished("a", 3.0) == []  # again: nothing known, nothing happens


def test_unhealthy_replicas_get_nothing() -> None:
    for policy in POLICY_NAMES:
        router = make(policy, stale_after_s=1.0, scrape=None)
        router.on_scrape("r0", None, started_at=5.0, now=5.0)  # failed scrape
        router.on_scrape("r1", IDLE, started_at=3.9, now=4.0)  # stale at 5.0
        router.on_scrape("r2", IDLE, started_at=4.9, now=5.0)
        for i in range(4):
            rid = f"{policy}{i}"
            [d] = router.on_request(chat(rid, f"{i}" * 9, hash_key=str(i)), 5.0)
            assert isinstance(d.decision, Route) and d.decision.replica == "r2", (policy, d)
            router.on_started(rid, 5.0)


def test_no_healthy_replica_pushing_policy_rejects_waiting_policy_waits() -> None:
    pushing = make("least_load", scrape=None)
    assert rejections(pushing.on_request(chat("a", P), 1.0)) == [
        rejected("a", 503, Outcome.NO_REPLICA)
    ]
    assert pushing.queue_length == 0
    waiting = make("skylb_paper", scrape=None)
    assert waiting.on_request(chat("a", P), 1.0) == []
    assert waiting.queue_length == 1


def test_passthrough_is_never_queued_nor_pending() -> None:
    router = make(scrape=BUSY)
    models = RouteRequest(request_id="m1", path="/v1/models", method="GET", inference=False)
    route = Route(replica="r0", address="10.0.0.0:8000", reason="passthrough")
    assert router.on_request(models, 1.0) == [Dispatch("m1", route)]
    assert router.queue_length == 0
    # It counts as in flight (r0 is no longer least loaded) ...
    models2 = RouteRequest(request_id="m2", path="/v1/models", method="GET", inference=False)
    assert router.on_request(models2, 1.1)[0].decision == Route(
        "r1", "10.0.0.1:8000", "passthrough"
    )
    # ... but not as pending: r0 takes an inference request as soon as it is available.
    router.on_scrape("r0", IDLE, started_at=1.2, now=1.2)
    assert router.on_request(chat("a", P), 1.3) == [routed("a", "r0", "least_load")]
    gone = make(scrape=None)
    assert rejections(gone.on_request(models, 1.0)) == [rejected("m1", 503, Outcome.NO_REPLICA)]


def test_shutdown_rejects_queued_and_later_requests() -> None:
    router = make(scrape=BUSY)
    router.on_request(chat("a", P), 1.0)
    assert rejections(router.shutdown(3.0)) == [rejected("a", 503, Outcome.SHUTDOWN, 2.0)]
    assert rejections(router.on_request(chat("b", P), 4.0)) == [
        rejected("b", 503, Outcome.SHUTDOWN)
    ]
    assert router.queue_length == 0


def test_round_robin_cursor_counts_routes_only() -> None:
    router = make("round_robin")
    models = RouteRequest(request_id="m", path="/v1/models", method="GET", inference=False)
    got = []
    for i in range(4):
        got += router.on_request(chat(f"q{i}", "x"), 1.0)
        if i == 1:
            router.on_request(models, 1.0)  # does not advance the rotation
    assert [d.decision.replica for d in got if isinstance(d.decision, Route)] == [
        "r0",
        "r1",
        "r2",
        "r0",
    ]


@pytest.mark.parametrize(("key_blocks", "same"), [(1, True), (16, False)])
def test_consistent_hash_key_from_header_or_leading_blocks(key_blocks: int, same: bool) -> None:
    router = make("consistent_hash", {"key_blocks": key_blocks})
    # Golden (see test_policies): key "alice" lands on r2, "bob" on r0.
    assert router.on_request(chat("a", P, hash_key="alice"), 1.0) == [routed("a", "r2", "hash")]
    assert router.on_request(chat("b", Q, hash_key="bob"), 1.0) == [routed("b", "r0", "hash")]
    # No header: the leading `key_blocks` blocks decide. P and Q share only their first block
    # ("system: "): keyed on it they land together; keyed on more they are told apart.
    [first] = router.on_request(chat("c", P), 1.0)
    [second] = router.on_request(chat("d", Q), 1.0)
    assert (first.decision == second.decision) is same
    # Shorter than one block and no header: least load.
    assert router.on_request(chat("e", "hi"), 1.0)[0].decision == Route(
        "r1", "10.0.0.1:8000", "least_load"
    )


class Spy:
    """A policy that records its snapshots and always routes to r0."""

    name = "spy"
    waits = False
    lookahead = 0

    def __init__(self) -> None:
        self.snapshots: list[Snapshot] = []

    def decide(self, request: RouteRequest, snapshot: Snapshot, rng: random.Random) -> Decision:
        self.snapshots.append(snapshot)
        return Route("r0", "10.0.0.0:8000", "spy")


def test_snapshot_contents() -> None:
    spy = Spy()
    router = Router(SETTINGS, SPECS, spy, random.Random(0))
    for spec in SPECS:
        router.on_scrape(spec.name, IDLE, started_at=0.0, now=0.0)
    router.on_request(chat("a", P), 1.0)
    router.on_request(chat("b", P + "tail!", hash_key="k"), 2.0)  # 40 chars
    first, second = spy.snapshots
    hashes = block_hashes(P, model="m", block_chars=8, max_blocks=4096)
    assert (first.prompt_blocks, first.prompt_chars, first.block_chars) == (4, 35, 8)
    assert (first.decisions, first.key_hash) == (0, hashes[-1])  # under 16 blocks: all of them
    assert [v.matched_blocks for v in first.replicas] == [0, 0, 0]
    assert (second.decisions, second.key_hash, second.prompt_blocks) == (1, key_hash("k"), 5)
    assert [(v.name, v.matched_blocks, v.in_flight) for v in second.replicas] == [
        ("r0", 4, 1),
        ("r1", 0, 0),
        ("r2", 0, 0),
    ]


def test_next_deadline_includes_staleness_and_state() -> None:
    router = make(stale_after_s=1.0, scrape=None)
    assert router.next_deadline() is None
    router.on_scrape("r1", IDLE, started_at=0.4, now=0.5)
    assert router.next_deadline() == 1.5
    assert router.on_timer(1.5) == []
    assert router.next_deadline() is None  # r1 is stale now: nothing more to wake up for
    state = router.state(1.5)
    assert state["queue_length"] == 0 and state["policy"] == "skylb_paper"
    replicas = state["replicas"]
    assert isinstance(replicas, list) and [r["name"] for r in replicas] == ["r0", "r1", "r2"]


def test_needs_replicas() -> None:
    with pytest.raises(ValueError):
        Router(SETTINGS, [], make_policy("skylb_paper", {}), random.Random(0))


def test_response_headers_do_not_confirm_by_default() -> None:
    """vLLM sends headers on accept: by default only a later scrape clears our dispatch."""
    settings = dataclasses.replace(SETTINGS, confirm_on_headers=False)
    router = Router(settings, SPECS[:1], make_policy("skylb_paper", {}), random.Random(0))
    assert router.on_scrape("r0", IDLE, started_at=0.0, now=0.0) == []
    assert router.on_request(chat("a", P), 1.0) == [routed("a", "r0", "least_load")]
    assert router.on_request(chat("b", Q), 1.25) == []
    assert router.on_started("a", 1.375) == []
    assert router.on_scrape("r0", IDLE, started_at=1.4375, now=1.5) == [
        routed("b", "r0", "least_load", waited=0.25, matched=8 / 35)
    ]
