"""The workload's floor: idle prefill equals a fresh ReplicaEngine's; the RTT and fleet rules."""

from __future__ import annotations

import pytest

from skylb_extproc.bench.floor import idle_prefill_s, request_floor_s, workload_floor
from skylb_extproc.bench.oracle import oracle_matches
from skylb_extproc.bench.regions import RttMatrix
from skylb_extproc.bench.trace import TraceRequest, segment_text
from skylb_extproc.sim.model import FirstToken, ReplicaEngine
from skylb_extproc.sim.profiles import PROFILES


def _drain(engine: ReplicaEngine, now: float) -> list[object]:
    events: list[object] = []
    t: float | None = now
    while t is not None:
        events += engine.advance(t)
        t = engine.next_event_time()
    return events


def _engine_ttft(profile: str, prefix_chars: int, prompt_chars: int) -> tuple[float, int]:
    """First token time of a lone request on a replica that served `prefix_chars` before."""
    text = segment_text(7, prompt_chars)
    engine = ReplicaEngine(PROFILES[profile], "r")
    start = 0.0
    if prefix_chars:
        engine.add("warm", text[:prefix_chars], 1, 0.0)
        _drain(engine, 0.0)
        start = 100.0  # idle again, the prefix cached
    engine.add("b", text, 1, start)
    first = [e for e in _drain(engine, start) if isinstance(e, FirstToken)]
    assert len(first) == 1
    return first[0].t - start, first[0].cached_tokens


@pytest.mark.parametrize(
    ("profile", "prefix_chars", "prompt_chars"),
    [
        ("tiny", 0, 100),  # 25 tokens, one chunk
        ("tiny", 0, 400),  # 100 tokens: chunks of 32, the last 4
        ("tiny", 256, 400),  # 64 tokens cached (4 blocks)
        ("tiny", 400, 400),  # a full hit recomputes its last block
        ("l4-llama3.1-8b", 0, 20_000),  # 5,000 tokens: 3 chunks of 2,048 at most
        ("l4-llama3.1-8b", 12_000, 30_001),  # a partial block at the end, 3,000 cached
        ("h100-llama3.1-8b", 0, 200_000),  # 50,000 tokens: 7 chunks of 8,192
        ("h100-llama3.1-8b", 150_000, 200_000),
        ("cpu-tiny-llama", 1_000, 9_000),  # 32-token blocks: 250 tokens match 7 blocks
    ],
)
def test_idle_prefill_equals_a_lone_request_on_the_engine(
    profile: str, prefix_chars: int, prompt_chars: int
) -> None:
    ttft, cached = _engine_ttft(profile, prefix_chars, prompt_chars)
    tokens = -(-prompt_chars // 4)
    bs = PROFILES[profile].block_size
    assert cached == min(prefix_chars // 4 // bs, (tokens - 1) // bs) * bs
    assert idle_prefill_s(PROFILES[profile], tokens, prefix_chars // 4) == pytest.approx(
        ttft, rel=1e-12
    )


def test_tiny_prefill_by_hand() -> None:
    # tiny: max(10 + 0·1, 0 + 1·n) ms per chunk, no context or attention cost: 100 tokens =
    # chunks 32, 32, 32, 4 -> 32 + 32 + 32 + 10 (the floor of a 4-token step) = 106 ms.
    assert idle_prefill_s(PROFILES["tiny"], 100, 0) == pytest.approx(0.106)
    assert idle_prefill_s(PROFILES["tiny"], 100, 64) == pytest.approx(0.032 + 0.010)


def _req(region: str, tokens: int, out: int = 1) -> TraceRequest:
    return TraceRequest("r", 0.0, "g", ((1, tokens * 4),), tokens, out, region)


L4, H100 = PROFILES["l4-llama3.1-8b"], PROFILES["h100-llama3.1-8b"]
RTT = RttMatrix(0.1, {})


@pytest.mark.parametrize(
    ("req", "profiles", "expected"),
    [
        # Home region has replicas: no round trip.
        (_req("eu", 500), {"eu": L4}, idle_prefill_s(L4, 500, 0)),
        # No replica at home: the round trip to the nearest region is unavoidable.
        (_req("asia", 500), {"eu": L4}, 0.2 + idle_prefill_s(L4, 500, 0)),
        # Heterogeneous: a short prompt is faster at home on the L4 ...
        (_req("eu", 500), {"us": H100, "eu": L4}, idle_prefill_s(L4, 500, 0)),
        # ... a long one one round trip away on the H100.
        (_req("eu", 15_000), {"us": H100, "eu": L4}, 0.2 + idle_prefill_s(H100, 15_000, 0)),
        # Too long for the L4's context: only the H100 can serve it.
        (_req("eu", 19_600), {"us": H100, "eu": L4}, 0.2 + idle_prefill_s(H100, 19_600, 0)),
        (_req("eu", 19_600), {"eu": L4}, None),
    ],
)
def test_request_floor(
    req: TraceRequest, profiles: dict[str, object], expected: float | None
) -> None:
    assert request_floor_s(req, 0, profiles, RTT) == expected  # type: ignore[arg-type]


def test_workload_floor_uses_the_oracle_match_and_counts_unservable() -> None:
    a = TraceRequest("a", 0.0, "g", ((5, 4096),), 1024, 1, "us")
    b = TraceRequest("b", 1.0, "g", ((5, 4096), (6, 4096)), 2048, 1, "us")
    c = TraceRequest("c", 2.0, "h", ((9, 90_000),), 22_500, 1, "us")  # over the L4's context
    reqs = [a, b, c]
    matches = oracle_matches(reqs)
    assert matches == [0, 64, 0]  # b holds a's 1,024 tokens = 64 blocks of 16
    floor = workload_floor(reqs, matches, {"us": L4}, RTT)
    assert floor["requests"] == 2 and floor["without_floor"] == 1
    ttft = floor["ttft_s"]
    assert isinstance(ttft, dict)
    assert ttft["p50"] == idle_prefill_s(L4, 1024, 0)  # b's 1,024 uncached tokens cost as a's
    assert ttft["p90"] == idle_prefill_s(L4, 2048, 1024)
