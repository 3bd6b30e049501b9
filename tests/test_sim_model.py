"""ReplicaEngine on the `tiny` profile: expectations computed by hand.

tiny: 8 blocks of 16 tokens, max_num_seqs 2, 32-token budget, step = max(10 + B, N) ms
(B decoding sequences, N tokens in the step), no context or attention cost; 4 chars per token.
"""

from __future__ import annotations

import random

import pytest

from skylb_extproc.sim.kvcache import BlockPool, block_hashes, estimate_tokens
from skylb_extproc.sim.model import Finished, FirstToken, ReplicaEngine, SimEvent, Tokens
from skylb_extproc.sim.profiles import PROFILES, TINY, Profile


def engine(profile: Profile = TINY) -> ReplicaEngine:
    return ReplicaEngine(profile, "r0")


def run_all(eng: ReplicaEngine) -> list[SimEvent]:
    """Advance step by step until idle, as the evaluator would."""
    events: list[SimEvent] = []
    while (t := eng.next_event_time()) is not None:
        events.extend(eng.advance(t))
    return events


def finished(events: list[SimEvent]) -> dict[str, Finished]:
    return {e.request_id: e for e in events if isinstance(e, Finished)}


def text(tag: str, chars: int) -> str:
    """A distinct prompt of exactly `chars` characters."""
    return (tag * chars)[:chars]


def test_token_estimate_and_hashes() -> None:
    assert [estimate_tokens("x" * n) for n in (0, 1, 4, 5, 64)] == [0, 1, 1, 2, 16]
    a, b = text("a", 200), text("a", 128) + text("b", 72)
    assert len(block_hashes(a, 16)) == 3  # 50 tokens: 3 full blocks
    assert block_hashes(a, 16)[:2] == block_hashes(b, 16)[:2]
    assert block_hashes(a, 16)[2] != block_hashes(b, 16)[2]


def test_ttft_and_decode_of_one_request() -> None:
    eng = engine()
    eng.add("r", text("a", 80), 3, now=0.0)  # 20 tokens
    assert eng.next_event_time() == pytest.approx(0.020)  # prefill: max(10, 20) ms
    assert eng.advance(0.020) == [FirstToken("r", pytest.approx(0.020), 0, 20)]  # type: ignore[arg-type]
    assert eng.next_event_time() == pytest.approx(0.031)  # decode of 1: max(10 + 1, 1) ms
    events = eng.advance(1.0)
    assert events == [
        Tokens("r", pytest.approx(0.042), 2),  # type: ignore[arg-type]
        Finished("r", pytest.approx(0.042), 20, 3, 0),  # type: ignore[arg-type]
    ]
    assert eng.next_event_time() is None
    m = eng.metrics()
    assert (m.running, m.waiting, m.kv_usage) == (0, 0, 0.0)
    assert (m.prompt_tokens_total, m.generation_tokens_total, m.finished_length) == (20, 3, 1)
    assert (m.prefix_cache_queries, m.prefix_cache_hits) == (20, 0)


@pytest.mark.parametrize(
    ("chars", "cached", "ttft_ms"),
    [
        (80, 16, 10.0),  # 20 tokens, 1 full block hit, 4 recomputed
        (128, 16, 16.0),  # 32 tokens: full hit, the last block is recomputed (vLLM)
        (132, 32, 10.0),  # 33 tokens: 2 blocks hit, 1 token recomputed
    ],
)
def test_cached_tokens_of_a_repeated_prompt(chars: int, cached: int, ttft_ms: float) -> None:
    eng = engine()
    prompt = text("p", chars)
    eng.add("first", prompt, 1, now=0.0)
    run_all(eng)
    eng.add("again", prompt, 1, now=1.0)
    events = run_all(eng)
    first = events[0]
    assert isinstance(first, FirstToken)
    assert first.cached_tokens == cached and cached % 16 == 0
    assert first.t == pytest.approx(1.0 + ttft_ms / 1000)
    assert finished(events)["again"].cached_tokens == cached
    m = eng.metrics()
    assert m.prefix_cache_hits == cached
    assert m.prefix_cache_queries == 2 * estimate_tokens(prompt)


def test_requests_arriving_together_share_a_step() -> None:
    eng = engine()
    eng.add("a", text("a", 40), 1, now=0.0)  # 10 tokens
    eng.add("b", text("b", 40), 1, now=0.0)
    assert eng.next_event_time() == pytest.approx(0.020)  # one step of 20 tokens
    assert {e.request_id for e in eng.advance(0.020) if isinstance(e, Finished)} == {"a", "b"}


def test_waiting_when_max_num_seqs_exceeded() -> None:
    eng = engine()
    for i in range(3):
        eng.add(f"r{i}", text(str(i), 8), 5, now=0.0)
    assert (eng.metrics().waiting, eng.metrics().running) == (3, 0)
    eng.advance(0.0)  # plans the first step: two slots only
    assert (eng.metrics().waiting, eng.metrics().running) == (1, 2)
    done = finished(run_all(eng))
    assert sorted(done) == ["r0", "r1", "r2"]
    # r2 starts only when r0 and r1 finished: first step 10 ms, then 4 decode steps of 12 ms.
    assert done["r0"].t == pytest.approx(0.058)
    assert done["r2"].t == pytest.approx(0.058 + 0.010 + 4 * 0.011)


def test_chunked_prefill_mixed_with_decode() -> None:
    eng = engine()
    eng.add("short", text("s", 40), 3, now=0.0)  # 10 tokens: first token at 10 ms
    eng.add("long", text("l", 160), 1, now=0.010)  # 40 tokens: chunks of 31 then 9
    # step 2: 1 decode + 31 prefill tokens = max(11, 32) ms; step 3: 1 decode + 9 = max(11, 10)
    assert eng.next_event_time() == pytest.approx(0.042)
    done = finished(run_all(eng))
    assert done["short"].t == pytest.approx(0.053)
    assert done["long"].t == pytest.approx(0.053)


def test_lru_keeps_a_recent_prefix() -> None:
    eng = engine()
    a = text("a", 256)  # 64 tokens = 4 blocks, 2 chunks of 32
    eng.add("a1", a, 1, now=0.0)
    eng.add("b", text("b", 256), 1, now=1.0)
    eng.add("a2", a, 1, now=2.0)
    events = run_all(eng)
    assert finished(events)["a2"].cached_tokens == 48  # 63 tokens at most: 3 blocks


def test_eviction_takes_the_oldest_tail_blocks_first() -> None:
    eng = engine()
    a = text("a", 256)
    eng.add("a1", a, 1, now=0.0)  # blocks 0-3
    eng.add("b", text("b", 256), 1, now=1.0)  # blocks 4-7; free queue: a's tail first
    eng.add("c", text("c", 128), 1, now=2.0)  # 2 blocks: evicts a's blocks 3 and 2
    eng.add("a2", a, 1, now=3.0)
    events = run_all(eng)
    assert finished(events)["a2"].cached_tokens == 32


def test_eviction_under_capacity_loses_the_prefix() -> None:
    eng = engine()
    a = text("a", 256)
    for i, (rid, prompt) in enumerate(
        [("a1", a), ("b", text("b", 256)), ("c", text("c", 256)), ("a2", a)]
    ):
        eng.add(rid, prompt, 1, now=float(i))
    assert finished(run_all(eng))["a2"].cached_tokens == 0


def test_preemption_recomputes_and_still_completes() -> None:
    eng = engine()
    # Two 48-token prompts growing to 87 tokens need 2 x 6 blocks: only 8 exist.
    eng.add("x", text("x", 192), 40, now=0.0)
    eng.add("y", text("y", 192), 40, now=0.0)
    done = finished(run_all(eng))
    assert {r: (f.prompt_tokens, f.completion_tokens) for r, f in done.items()} == {
        "x": (48, 40),
        "y": (48, 40),
    }
    m = eng.metrics()
    assert m.num_preemptions >= 1
    assert m.generation_tokens_total == 80
    assert (m.running, m.waiting, m.kv_usage) == (0, 0, 0.0)


def test_cancel_frees_blocks_and_counts_abort() -> None:
    eng = engine()
    eng.add("r", text("r", 80), 50, now=0.0)
    eng.advance(0.05)
    assert eng.metrics().kv_usage == pytest.approx(2 / 8)
    eng.cancel("r", now=0.05)
    eng.cancel("r", now=0.05)  # unknown now: no-op
    assert eng.advance(1.0) == []
    m = eng.metrics()
    assert (m.running, m.kv_usage, m.finished_abort, m.finished_length) == (0, 0.0, 1, 0)
    assert eng.next_event_time() is None


def test_cancel_while_waiting() -> None:
    eng = engine()
    eng.add("a", text("a", 40), 1, now=0.0)
    eng.cancel("a", now=0.0)
    assert eng.next_event_time() is None and eng.advance(1.0) == []


def test_validation_errors() -> None:
    eng = engine()
    with pytest.raises(ValueError, match="cannot be empty"):
        eng.add("a", "", 1, now=0.0)
    with pytest.raises(ValueError, match="at least 1"):
        eng.add("a", "x", 0, now=0.0)
    with pytest.raises(ValueError, match="maximum context length is 128"):
        eng.add("a", text("a", 4 * 120), 9, now=0.0)
    eng.add("a", "x", 1, now=1.0)
    with pytest.raises(ValueError, match="duplicate"):
        eng.add("a", "x", 1, now=1.0)
    with pytest.raises(ValueError, match="backwards"):
        eng.advance(0.5)


def _workload(profile: Profile, seed: int, n: int) -> list[SimEvent]:
    rng = random.Random(seed)
    eng = ReplicaEngine(profile, "r")
    shared = [text(str(i), 400) for i in range(5)]
    events: list[SimEvent] = []
    t = 0.0
    for i in range(n):
        t += rng.expovariate(20.0)
        events.extend(eng.advance(t))
        prompt = rng.choice(shared) + text(f"q{i}-", rng.randint(1, 300))
        eng.add(f"r{i}", prompt, rng.randint(1, 64), now=t)
    events.extend(run_all(eng))
    return events


def test_deterministic_and_token_accounting() -> None:
    profile = PROFILES["l4-llama3.1-8b"]
    first, second = _workload(profile, 7, 300), _workload(profile, 7, 300)
    assert first == second
    done = finished(first)
    assert len(done) == 300
    for rid, fin in done.items():
        streamed = sum(
            1 if isinstance(e, FirstToken) else e.n
            for e in first
            if e.request_id == rid and isinstance(e, FirstToken | Tokens)
        )
        assert streamed == fin.completion_tokens
    assert any(f.cached_tokens > 0 for f in done.values())


def test_block_pool_refuses_over_allocation() -> None:
    pool = BlockPool(2)
    blocks = pool.allocate(2)
    with pytest.raises(RuntimeError):
        pool.allocate(1)
    pool.free(blocks)
    assert pool.num_free == 2 and pool.usage() == 0.0
