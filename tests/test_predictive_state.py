"""What the predictive policy reads: prefill backlog, engine admission, free KV (LoadTracker),
the router's lookahead window and the prefix index bounded by each replica's KV cache."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from skylb_extproc.policy.base import make_policy
from skylb_extproc.router import Router, RouterSettings
from skylb_extproc.state.load import FINISH_WINDOW_S, NO_FINISH_INTERVAL_S, LoadTracker
from skylb_extproc.state.prefix_index import PrefixIndex
from skylb_extproc.state.speed import Speed
from skylb_extproc.types import ReplicaSpec, ReplicaView, Route, RouteRequest, ScrapedMetrics

SPECS = [
    ReplicaSpec(f"r{i}", f"10.0.0.{i}:8000", f"http://10.0.0.{i}:8000/metrics") for i in range(2)
]
IDLE = ScrapedMetrics(waiting=0, running=0)
# 100 blocks of 16 tokens, a quarter in use: 1,200 tokens free below the 10% headroom... see below.
KV = ScrapedMetrics(waiting=0, running=1, kv_usage=0.25, block_size=16, num_gpu_blocks=100)


def tracker() -> LoadTracker:
    t = LoadTracker(SPECS, stale_after_s=100.0, max_pending=0, kv_headroom=0.1)
    for spec in SPECS:
        t.on_scrape(spec.name, IDLE, started_at=0.0, now=0.0)
    return t


def r0(t: LoadTracker, now: float) -> ReplicaView:
    return t.views(now)[0]


def test_backlog_is_a_fifo_of_prefill_seconds() -> None:
    t = tracker()
    t.on_dispatch("r0", "a", 1.0, prefill_s=2.0)
    t.on_dispatch("r0", "b", 1.5, prefill_s=1.0)  # queued behind a: ends at 4.0
    assert r0(t, 1.5).backlog_s == pytest.approx(2.5)
    assert r0(t, 3.0).backlog_s == pytest.approx(1.0)  # time works it off
    assert r0(t, 5.0).backlog_s == 0.0
    t.on_dispatch("r0", "c", 6.0, prefill_s=1.0)  # an idle server starts now, not at 4.0
    assert r0(t, 6.0).backlog_s == pytest.approx(1.0)


def test_a_finish_caps_the_backlog_at_what_is_unfinished() -> None:
    t = tracker()
    t.on_dispatch("r0", "a", 0.0, prefill_s=5.0)  # predicted far too slow
    t.on_dispatch("r0", "b", 0.0, prefill_s=1.0)
    t.on_finished("a", 1.0)  # a is done after 1 s: at most b's prefill is left
    assert r0(t, 1.0).backlog_s == pytest.approx(1.0)
    t.on_finished("b", 1.5)
    assert r0(t, 1.5).backlog_s == 0.0


def test_admission_wait_is_pending_times_seconds_between_finishes() -> None:
    t = tracker()
    t.on_scrape("r0", ScrapedMetrics(waiting=2, running=4), started_at=1.0, now=1.0)
    assert r0(t, 1.0).admit_wait_s == pytest.approx(2 * NO_FINISH_INTERVAL_S)
    for i in range(5):  # five finishes within the window: one every FINISH_WINDOW_S / 5
        t.on_dispatch("r0", f"x{i}", 1.0, prefill_s=0.1)
        t.on_finished(f"x{i}", 2.0 + i)
    view = r0(t, 6.0)
    assert view.finish_interval_s == pytest.approx(FINISH_WINDOW_S / 5)
    assert view.admit_wait_s == pytest.approx(2 * FINISH_WINDOW_S / 5)
    assert r0(t, 2.0 + FINISH_WINDOW_S + 5).finish_interval_s == NO_FINISH_INTERVAL_S


def test_free_kv_counts_our_unseen_dispatches() -> None:
    t = tracker()
    t.on_scrape("r0", KV, started_at=1.0, now=1.0)
    # capacity 90 blocks (10% headroom), 25 used: 65 blocks = 1,040 tokens free
    assert r0(t, 1.0).kv_free_tokens == pytest.approx(1040.0)
    t.on_dispatch("r0", "a", 1.5, kv_tokens=320)  # 20 blocks the scrape has not seen
    assert r0(t, 1.5).kv_free_tokens == pytest.approx(720.0)
    assert t.views(1.5)[1].kv_free_tokens == float("inf")  # r1 reports no KV numbers


def test_learned_speed_reaches_the_views() -> None:
    prior = Speed(prefill_tokens_per_s=39_000.0, decode_step_s=0.0073)
    t = LoadTracker(SPECS, stale_after_s=100.0, max_pending=0, speed_prior=prior)
    assert r0(t, 0.0).prefill_tokens_per_s == 39_000.0


def test_set_capacity_keeps_the_most_recent_blocks() -> None:
    index = PrefixIndex(max_blocks_per_target=10, ttl_s=100.0)
    index.insert("r0", (1, 2, 3), 0.0)
    index.insert("r0", (7, 8), 1.0)  # most recent: 7 (its start), then 8
    index.set_capacity("r0", 2)
    assert index.size("r0") == 2
    assert index.match((7, 8), 2.0) == {"r0": 2}
    assert index.match((1, 2, 3), 2.0) == {}
    index.set_capacity("r0", 50)  # never above the configured bound
    index.insert("r0", tuple(range(100, 120)), 3.0)
    assert index.size("r0") == 10


def _router(**settings: object) -> Router:
    s = replace(RouterSettings(block_chars=8, stale_after_s=100.0), **settings)  # type: ignore[arg-type]
    router = Router(s, SPECS, make_policy("skylb", {"hold_s": 0.5}), random.Random(0))
    for spec in SPECS:
        router.on_scrape(spec.name, IDLE, started_at=0.0, now=0.0)
    return router


def _chat(rid: str, prompt: str) -> RouteRequest:
    return RouteRequest(request_id=rid, path="/v1/completions", model="m", prompt=prompt)


def test_the_index_follows_each_replicas_kv_size() -> None:
    router = _router()
    router.on_scrape("r1", KV, started_at=1.0, now=1.0)
    # 100 blocks x 16 tokens x 4 chars = 6,400 chars = 800 index blocks of 8 chars
    router.on_scrape("r0", KV, started_at=1.0, now=1.0)
    router.on_request(_chat("a", "y" * 64_000), 1.0)  # 8,000 blocks: only the first 800 stay
    assert router.local_match(router.hashes(_chat("b", "y" * 64_000)), 1.0) <= 800
    fixed = _router(index_follows_kv=False)
    fixed.on_scrape("r0", KV, started_at=1.0, now=1.0)
    fixed.on_scrape("r1", KV, started_at=1.0, now=1.0)
    fixed.on_request(_chat("a", "y" * 64_000), 1.0)
    assert fixed.local_match(fixed.hashes(_chat("b", "y" * 64_000)), 1.0) == 4096  # max_blocks


def _two_busy_conversations(router: Router) -> None:
    """Conversations a and b, ~2.1 s of prefill each (4,700 tok/s), on r0 and r1; their next
    turns wait at the balancer (each holder's queue is over hold_s), b's first."""
    a, b = "a" * 40_000, "b" * 40_000
    [d1] = router.on_request(_chat("a1", a), 1.0)
    [d2] = router.on_request(_chat("b1", b), 1.0)
    assert (d1.decision, d2.decision) == (_route("r0"), _route("r1"))
    for spec in SPECS:  # the engines took them: nothing pending, only the prefill backlog
        assert router.on_scrape(spec.name, IDLE, started_at=1.2, now=1.2) == []
    assert router.on_request(_chat("b2", b + " and more"), 1.0) == []
    assert router.on_request(_chat("a2", a + " and more"), 1.0) == []


def _route(name: str) -> Route:
    return Route(replica=name, address=f"10.0.0.{name[-1]}:8000", reason="predicted")


def test_a_held_head_does_not_block_a_request_whose_replica_has_room() -> None:
    router = _router()
    _two_busy_conversations(router)
    # a1 ends: r0 is free. The head b2 still does best on its busy holder r1 (~1.1 s queued,
    # nothing to prefill) than on r0 (2.1 s): it keeps waiting, and a2 goes to r0 past it.
    out = router.on_finished("a1", 2.0)
    assert [(d.request_id, d.decision.replica) for d in out] == [("a2", "r0")]  # type: ignore[union-attr]
    assert [e.request.request_id for e in router.queued()] == ["b2"]


def test_a_head_waiting_past_the_bypass_limit_is_decided_alone() -> None:
    router = _router(bypass_after_s=0.5)
    _two_busy_conversations(router)
    assert router.on_finished("a1", 2.0) == []  # b2 has waited 1 s: nothing passes it
    assert router.queue_length == 2


def test_fill_follows_the_index_and_hit_rate_the_engine_counters() -> None:
    index = PrefixIndex(max_blocks_per_target=10, ttl_s=100.0)
    assert index.fill("r0") == 0.0
    index.insert("r0", (1, 2, 3, 4, 5), 0.0)
    assert index.fill("r0") == 0.5
    index.set_capacity("r0", 5)
    assert index.fill("r0") == 1.0
    t = tracker()
    counters = [(0, 0), (50, 100), (150, 200), (150, 200), (10, 20)]  # last: a restart
    rates = []
    for i, (hits, queries) in enumerate(counters):
        m = ScrapedMetrics(waiting=0, running=0, prefix_hits=hits, prefix_queries=queries)
        t.on_scrape("r0", m, started_at=float(i), now=float(i))
        rates.append(r0(t, float(i)).cache_hit_rate)
    # EWMA (alpha 0.1) of 0.5 then 1.0; no new queries and a restart change nothing
    assert rates == pytest.approx([0.0, 0.05, 0.145, 0.145, 0.145])
