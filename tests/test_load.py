"""LoadTracker rules: health, pending (own dispatches vs scrape start), availability."""

from __future__ import annotations

import pytest

from skylb_extproc.state.load import LoadTracker
from skylb_extproc.state.speed import Speed, attention_factor
from skylb_extproc.types import ReplicaSpec, ReplicaView, ScrapedMetrics

SPECS = [
    ReplicaSpec("r0", "10.0.0.0:8000", "http://10.0.0.0:8000/metrics"),
    ReplicaSpec("r1", "10.0.0.1:8000", "http://10.0.0.1:8000/metrics"),
]
IDLE = ScrapedMetrics(waiting=0, running=0)


def tracker(max_pending: int = 0) -> LoadTracker:
    return LoadTracker(SPECS, stale_after_s=1.0, max_pending=max_pending)


def view(t: LoadTracker, name: str, now: float) -> ReplicaView:
    return next(x for x in t.views(now) if x.name == name)


def test_never_scraped_is_unhealthy() -> None:
    t = tracker()
    assert [(x.name, x.healthy, x.available) for x in t.views(0.0)] == [
        ("r0", False, False),
        ("r1", False, False),
    ]


def test_staleness_and_failure() -> None:
    t = tracker()
    t.on_scrape("r0", IDLE, started_at=0.9, now=1.0)
    assert view(t, "r0", 1.999).available
    assert not view(t, "r0", 2.0).healthy  # exactly stale_after_s old
    t.on_scrape("r0", IDLE, started_at=2.0, now=2.1)
    assert view(t, "r0", 2.2).healthy
    t.on_scrape("r0", None, started_at=2.2, now=2.3)
    assert not view(t, "r0", 2.3).healthy


def test_older_scrape_result_is_ignored() -> None:
    t = tracker()
    t.on_scrape("r0", IDLE, started_at=1.0, now=1.1)
    t.on_scrape("r0", None, started_at=0.5, now=1.2)  # began before the recorded one
    assert view(t, "r0", 1.2).healthy


def test_scraped_waiting_makes_pending() -> None:
    t = tracker()
    t.on_scrape("r0", ScrapedMetrics(waiting=2, running=5), started_at=0.0, now=0.1)
    x = view(t, "r0", 0.2)
    assert (x.healthy, x.available, x.pending) == (True, False, 2)
    t2 = tracker(max_pending=2)
    t2.on_scrape("r0", ScrapedMetrics(waiting=2, running=5), started_at=0.0, now=0.1)
    assert view(t2, "r0", 0.2).available


def test_own_dispatch_pending_until_started_or_later_scrape() -> None:
    t = tracker()
    t.on_scrape("r0", IDLE, started_at=0.0, now=0.05)
    t.on_dispatch("r0", "a", now=0.1)
    assert (view(t, "r0", 0.1).pending, view(t, "r0", 0.1).available) == (1, False)
    # A scrape that began before the dispatch cannot have seen it.
    t.on_scrape("r0", IDLE, started_at=0.08, now=0.12)
    assert view(t, "r0", 0.12).pending == 1
    # One that began at/after it did: its numbers now include the request.
    t.on_scrape("r0", IDLE, started_at=0.1, now=0.15)
    assert view(t, "r0", 0.15).pending == 1
    t.on_scrape("r0", IDLE, started_at=0.11, now=0.16)
    assert view(t, "r0", 0.16).pending == 0 and view(t, "r0", 0.16).in_flight == 1
    t.on_finished("a", now=0.2)
    assert view(t, "r0", 0.2).in_flight == 0


def test_started_clears_pending_finished_clears_in_flight() -> None:
    t = tracker()
    t.on_scrape("r1", IDLE, started_at=0.0, now=0.0)
    t.on_dispatch("r1", "a", now=0.1)
    t.on_dispatch("r1", "b", now=0.1, pending=False)
    assert (view(t, "r1", 0.1).pending, view(t, "r1", 0.1).in_flight) == (1, 2)
    t.on_started("a", now=0.2)
    assert (view(t, "r1", 0.2).pending, view(t, "r1", 0.2).in_flight) == (0, 2)
    t.on_finished("a", now=0.3)
    t.on_finished("b", now=0.3)
    t.on_finished("never-dispatched", now=0.3)
    t.on_started("never-dispatched", now=0.3)
    assert view(t, "r1", 0.3).in_flight == 0


def test_views_carry_matches_in_config_order() -> None:
    t = tracker()
    assert [(x.name, x.matched_blocks) for x in t.views(0.0, {"r1": 3})] == [("r0", 0), ("r1", 3)]


def test_stale_at_and_state() -> None:
    t = tracker()
    assert t.stale_at(0.0) is None
    t.on_scrape("r1", ScrapedMetrics(waiting=0, running=3, kv_usage=0.5), started_at=0.0, now=0.2)
    assert t.stale_at(0.5) == 1.2
    assert t.stale_at(1.2) is None
    state = t.state(0.5)
    assert state[1].pop("scrape_age_s") == pytest.approx(0.3)
    assert state[1] == {
        "name": "r1",
        "address": "10.0.0.1:8000",
        "healthy": True,
        "available": True,
        "in_flight": 0,
        "pending": 0,
        "waiting": 0,
        "running": 3,
        "kv_usage": 0.5,
        "speed": {"prefill_tokens_per_s": 4700.0, "decode_step_s": 0.062, "source": "prior"},
    }
    assert state[0]["healthy"] is False and state[0]["scrape_age_s"] is None


def _counters(n: int) -> ScrapedMetrics:
    """After n requests of 1000 uncached prompt tokens (0.1 s each) and 100 tokens (1 s)."""
    return ScrapedMetrics(
        waiting=0,
        running=0,
        prefix_hits=0.0,
        prompt_tokens=1000.0 * n,
        generation_tokens=100.0 * n,
        prefill_seconds_sum=0.1 * n,
        prefill_seconds_count=float(n),
        decode_seconds_sum=0.99 * n,
    )


def test_speed_learned_per_replica_into_views_and_state() -> None:
    prior = Speed(prefill_tokens_per_s=1000.0, decode_step_s=0.05)
    t = LoadTracker(SPECS, stale_after_s=100.0, max_pending=0, speed_prior=prior)
    t.on_scrape("r0", _counters(0), started_at=0.0, now=0.0)
    t.on_scrape("r0", _counters(8), started_at=10.0, now=10.0)  # r1 never scraped: the prior
    t.on_scrape("r1", IDLE, started_at=10.0, now=10.0)  # no counters at all
    views = t.views(10.0)
    assert [(v.name, v.prefill_tokens_per_s, v.decode_step_s) for v in views] == [
        # 10,000 tokens per second at 1,000-token prompts, per short-context token
        ("r0", pytest.approx(10_000.0 * attention_factor(0, 1000)), pytest.approx(0.01)),
        ("r1", 1000.0, 0.05),
    ]
    assert [s["speed"]["source"] for s in t.state(10.0)] == ["learned", "prior"]  # type: ignore[index]
    assert (t.lacks_speed_counters("r0"), t.lacks_speed_counters("r1")) == (False, True)


def test_a_never_scraped_replica_does_not_lack_counters_yet() -> None:
    assert not tracker().lacks_speed_counters("r0")


def test_unknown_replica_and_bad_settings() -> None:
    t = tracker()
    with pytest.raises(KeyError):
        t.on_dispatch("nope", "a", 0.0)
    with pytest.raises(KeyError):
        t.replica("nope")
    assert t.replica("r0") == SPECS[0]
    with pytest.raises(ValueError):
        LoadTracker(SPECS + SPECS[:1], stale_after_s=1.0, max_pending=0)
    with pytest.raises(ValueError):
        LoadTracker(SPECS, stale_after_s=0.0, max_pending=0)
    with pytest.raises(ValueError):
        LoadTracker(SPECS, stale_after_s=1.0, max_pending=-1)


# 100 blocks of 16 tokens; headroom 0.1 leaves 90 usable blocks.
KV = ScrapedMetrics(waiting=0, running=1, kv_usage=0.5, block_size=16, num_gpu_blocks=100)


@pytest.mark.parametrize(
    ("scraped", "prompts", "pending"),
    [
        # 50 used + 20 + 20 = 90 blocks: both fit, nothing pending.
        (KV, [320, 320], 0),
        # 50 + 20 + 20 + 1 = 91 > 90: the third overflows.
        (KV, [320, 320, 1], 1),
        # Once one overflows, every later one does too (dispatch order).
        (KV, [800, 16, 16], 3),
        # Waiting requests count on top, and show the batch is full at 1 running: ours waits too.
        (
            ScrapedMetrics(waiting=2, running=1, kv_usage=0.0, block_size=16, num_gpu_blocks=100),
            [16],
            3,
        ),
        # No KV numbers (SGLang, old vLLM): every unseen dispatch is pending.
        (ScrapedMetrics(waiting=0, running=1), [16, 16], 2),
        # An empty prompt still takes a block.
        (
            ScrapedMetrics(waiting=0, running=0, kv_usage=0.89, block_size=16, num_gpu_blocks=100),
            [0],
            0,
        ),
        (
            ScrapedMetrics(waiting=0, running=0, kv_usage=0.9, block_size=16, num_gpu_blocks=100),
            [0],
            1,
        ),
    ],
)
def test_unseen_dispatches_pend_only_when_the_kv_cache_cannot_admit_them(
    scraped: ScrapedMetrics, prompts: list[int], pending: int
) -> None:
    t = tracker()
    t.on_scrape("r0", scraped, started_at=0.0, now=0.1)
    for i, tokens in enumerate(prompts):
        t.on_dispatch("r0", f"q{i}", 0.2, kv_tokens=tokens)
    assert view(t, "r0", 0.3).pending == pending
    assert view(t, "r0", 0.3).available == (pending == 0)


def test_batch_limit_is_learned_from_a_scrape_with_waiting_requests() -> None:
    t = tracker()
    roomy = dict(kv_usage=0.0, block_size=16, num_gpu_blocks=1000)
    t.on_scrape("r0", ScrapedMetrics(waiting=1, running=2, **roomy), started_at=0.0, now=0.1)
    t.on_scrape("r0", ScrapedMetrics(waiting=0, running=1, **roomy), started_at=0.2, now=0.3)
    t.on_dispatch("r0", "a", 0.4, kv_tokens=16)
    assert view(t, "r0", 0.5).pending == 0  # 1 running + 1 unseen = the learned limit of 2
    t.on_dispatch("r0", "b", 0.4, kv_tokens=16)
    assert view(t, "r0", 0.5).pending == 1  # a third would wait in the engine
    # More running and nobody waiting: the limit was higher than learned.
    t.on_scrape("r0", ScrapedMetrics(waiting=0, running=4, **roomy), started_at=0.6, now=0.7)
    t.on_dispatch("r0", "c", 0.8, kv_tokens=16)
    assert view(t, "r0", 0.9).pending == 1  # 4 running + 1 unseen > 4


def test_a_scrape_just_after_a_dispatch_does_not_clear_it() -> None:
    """Engines publish gauges per step: a scrape must begin `visible_after_s` after a dispatch."""
    t = LoadTracker(SPECS, stale_after_s=1.0, max_pending=0, visible_after_s=0.125)
    t.on_scrape("r0", IDLE, started_at=0.0, now=0.01)
    t.on_dispatch("r0", "a", 1.0)
    t.on_scrape("r0", IDLE, started_at=1.0625, now=1.07)  # too soon to show it
    assert view(t, "r0", 1.08).pending == 1
    t.on_scrape("r0", IDLE, started_at=1.1875, now=1.19)
    assert view(t, "r0", 1.2).pending == 0
