"""Decode windows change nothing: the engine with windows against the same engine stepping one
step at a time, call for call, on random workloads that admit, chunk, preempt, cancel and hit
the prefix cache (events, both metrics views and the next step's end must be identical)."""

from __future__ import annotations

import heapq
import random
from dataclasses import replace

import pytest

from skylb_extproc.sim import window
from skylb_extproc.sim.model import Finished, ReplicaEngine, SimEvent
from skylb_extproc.sim.profiles import PROFILES, TINY, Profile

# A small pool makes windows end on preemption and on evicting the blocked head's hits.
SMALL_L4 = replace(PROFILES["l4-llama3.1-8b"], num_gpu_blocks=90, max_model_len=90 * 16)
SEQ_CAPPED = replace(PROFILES["h100-llama3.1-8b"], max_num_seqs=3)


def filler(start: int, count: int) -> str:
    return "".join(f"w{(start + i) % 7} " for i in range(count))[: count * 4].ljust(count * 4)


def _pair(profile: Profile, output_text: bool) -> tuple[ReplicaEngine, ReplicaEngine]:
    text = filler if output_text else None
    return (
        ReplicaEngine(profile, "r", text, windows=True),
        ReplicaEngine(profile, "r", text, windows=False),
    )


def _same(a: ReplicaEngine, b: ReplicaEngine, got: list[SimEvent], want: list[SimEvent]) -> None:
    assert got == want
    assert a.metrics() == b.metrics()
    assert a.reported_metrics() == b.reported_metrics()


def _prompt(rng: random.Random, shared: list[str], i: int, limit_chars: int) -> str:
    prompt = rng.choice(shared) + f"q{i}-" * rng.randint(1, 120)
    return prompt[: limit_chars - 1]


@pytest.mark.parametrize(
    ("profile", "output_text", "seed"),
    [
        (TINY, False, 1),
        (TINY, True, 2),
        (SMALL_L4, False, 3),
        (SMALL_L4, True, 4),
        (PROFILES["l4-llama3.1-8b"], False, 5),
        (SEQ_CAPPED, True, 6),
    ],
)
def test_call_for_call_identical(profile: Profile, output_text: bool, seed: int) -> None:
    rng = random.Random(seed)
    fast, ref = _pair(profile, output_text)
    shared = [f"s{k}-" * rng.randint(20, 400) for k in range(4)]
    limit = profile.max_model_len * 4 // 2
    t, ids, windows = 0.0, [], 0
    for i in range(400):
        t += rng.expovariate(8.0)
        op = rng.random()
        if op < 0.45:
            rid = f"r{i}"
            prompt = _prompt(rng, shared, i, limit)
            max_tokens = rng.randint(1, min(300, profile.max_model_len // 2))
            fast.add(rid, prompt, max_tokens, t)
            ref.add(rid, prompt, max_tokens, t)
            ids.append(rid)
            _same(fast, ref, [], [])
        elif op < 0.52 and ids:
            rid = ids.pop(rng.randrange(len(ids)))
            fast.cancel(rid, t)
            ref.cancel(rid, t)
            _same(fast, ref, [], [])
        else:
            _same(fast, ref, fast.advance(t), ref.advance(t))
        assert fast.next_event_time() == ref.next_event_time()
        windows += fast._window is not None
    while (end := ref.next_event_time()) is not None:
        assert fast.next_event_time() == end
        _same(fast, ref, fast.advance(end), ref.advance(end))
    assert fast.next_event_time() is None
    assert windows > 0  # the scenario exercised windows


def test_woken_only_for_outputs_with_catch_up_reads() -> None:
    """The evaluator's use: sleep until next_output_time, catch_up before reading metrics.

    A small event loop (arrivals, metric reads, wake-ups; reads before wake-ups at equal times)
    drives one engine that way and the reference step by step: same finishes, same metrics.
    """
    rng = random.Random(9)
    profile = PROFILES["h100-llama3.1-8b"]
    arrivals = [(rng.uniform(0, 40), f"p{i % 5}-" * rng.randint(50, 900)) for i in range(40)]
    outs = [rng.randint(1, 400) for _ in range(40)]
    reads = [rng.uniform(0, 60) for _ in range(200)]

    def drive(eng: ReplicaEngine, lazy: bool) -> tuple[list[SimEvent], list[object], int]:
        heap = [(t, 0, i) for i, (t, _) in enumerate(arrivals)] + [(t, 1, -1) for t in reads]
        heapq.heapify(heap)
        finishes: list[SimEvent] = []
        seen: list[object] = []
        wakes = 0
        while heap:
            now, kind, i = heapq.heappop(heap)
            if kind == 0:
                eng.add(f"r{i}", arrivals[i][1], outs[i], now)
            elif kind == 1:
                if lazy:
                    eng.catch_up(now)
                seen.append((eng.metrics(), eng.reported_metrics()))
                continue
            else:
                wakes += 1
            finishes += [e for e in eng.advance(now) if isinstance(e, Finished)]
            nxt = eng.next_output_time() if lazy else eng.next_event_time()
            if nxt is not None:
                heapq.heappush(heap, (nxt, 2, -1))
        return finishes, seen, wakes

    got, got_seen, fast_wakes = drive(ReplicaEngine(profile, "r"), True)
    want, want_seen, ref_wakes = drive(ReplicaEngine(profile, "r", windows=False), False)
    assert got == want and len(got) == 40
    assert got_seen == want_seen
    assert fast_wakes * 5 < ref_wakes  # most decode steps were skipped, not visited


def test_conversation_turns_waiting_on_a_running_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Next turns (prompt + part of a previous answer) queue for blocks while the answer they
    extend is still decoding: caching its next block may let them in, so windows must end
    there. Identical call for call; the scenario must reach that case."""
    reached = 0
    head_limit = window._head_limit

    def spy(running, head, blocked, pool, firsts, steps, bs):  # type: ignore[no-untyped-def]
        nonlocal reached
        cap = min((head.num_tokens - 1) // bs, len(head.hashes))
        if blocked.hit_blocks < cap:
            reached += any(head.hashes[blocked.hit_blocks] in r.hashes for r in running)
        return head_limit(running, head, blocked, pool, firsts, steps, bs)

    monkeypatch.setattr(window, "_head_limit", spy)
    profile = replace(PROFILES["l4-llama3.1-8b"], num_gpu_blocks=40, max_model_len=40 * 16)
    for seed in range(20):
        rng = random.Random(seed)
        fast, ref = _pair(profile, output_text=True)
        t = 0.0
        answered: list[tuple[str, int]] = []
        for i in range(60):
            t += rng.expovariate(4.0)
            if answered and rng.random() < 0.7:
                prompt, out = rng.choice(answered)
                prompt += filler(0, rng.randint(1, out))
            else:
                prompt = f"s{rng.randint(0, 3)}-" * rng.randint(30, 80)
            max_tokens = rng.randint(20, 120)
            if len(prompt) // 4 + max_tokens >= profile.max_model_len:
                continue
            fast.add(f"r{i}", prompt, max_tokens, t)
            ref.add(f"r{i}", prompt, max_tokens, t)
            answered.append((prompt, max_tokens))
            _same(fast, ref, fast.advance(t), ref.advance(t))
        while (end := ref.next_event_time()) is not None:
            assert fast.next_event_time() == end
            _same(fast, ref, fast.advance(end), ref.advance(end))
    assert reached > 0
