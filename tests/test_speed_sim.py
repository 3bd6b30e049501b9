"""Speed learned from a simulated vLLM replica's /metrics matches its profile (within 30%).

Sequential requests of known lengths go through a ReplicaEngine in virtual time; after each one
its metrics are scraped both ways the balancer sees them: rendered as vLLM's exposition text and
parsed (server/scrape.py), and through the evaluator's `to_scraped`. The profile implies, for a
lone uncached prompt of L <= max_num_batched_tokens tokens, a prefill of one step of
max(a + b, t0 + k·L) + q·L² ms, and a decode step of a + b·1 + c·context ms at batch 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from skylb_extproc.bench.engine import to_scraped
from skylb_extproc.server.scrape import parse_metrics
from skylb_extproc.sim.model import EngineMetrics, Finished, ReplicaEngine
from skylb_extproc.sim.profiles import H100_LLAMA31_8B, L4_LLAMA31_8B, Profile, speed_prior
from skylb_extproc.sim.vllm_metrics import VllmCollector
from skylb_extproc.state.speed import Speed, SpeedEstimator
from skylb_extproc.types import ScrapedMetrics

PROMPT_TOKENS = (1000, 600, 1400, 800, 1200, 1000, 700, 1300)
OUTPUT_TOKENS = 64


class _Replica:
    """What VllmCollector reads: the engine's metrics as vLLM publishes them."""

    def __init__(self, engine: ReplicaEngine) -> None:
        self.model = engine.profile.model
        self.profile = engine.profile
        self._engine = engine

    def metrics(self) -> EngineMetrics:
        return self._engine.reported_metrics()


def _via_exposition(engine: ReplicaEngine) -> Callable[[], ScrapedMetrics]:
    registry = CollectorRegistry()
    registry.register(VllmCollector(_Replica(engine)))
    return lambda: parse_metrics(generate_latest(registry).decode())


def _via_to_scraped(engine: ReplicaEngine) -> Callable[[], ScrapedMetrics]:
    return lambda: to_scraped(engine.reported_metrics())


def _run(
    engine: ReplicaEngine, scrape: Callable[[], ScrapedMetrics], lengths: Iterable[int]
) -> Speed:
    estimator = SpeedEstimator(speed_prior(engine.profile))
    now = 0.0
    estimator.on_scrape(scrape(), now)
    for i, tokens in enumerate(lengths):
        prompt = f"{i:04d}" + "x" * (4 * tokens - 4)  # distinct first block: no prefix hit
        engine.add(f"r{i}", prompt, OUTPUT_TOKENS, now)
        done = False
        while not done:
            at = engine.next_event_time()
            assert at is not None
            now = at
            done = any(isinstance(e, Finished) for e in engine.advance(now))
        now += 0.5  # the client's think time; the next scrape comes after the answer
        estimator.on_scrape(scrape(), now)
    return estimator.speed


def _profile_prefill_rate(p: Profile, lengths: Iterable[int]) -> float:
    """Tokens over prefill seconds of lone one-chunk prompts, as the profile's model says."""
    lengths = list(lengths)
    assert max(lengths) <= p.max_num_batched_tokens
    ms = sum(p.step_ms(0, n, 0.0, n * n / 2) for n in lengths)
    return sum(lengths) / (ms / 1000)


def _profile_decode_step(p: Profile, lengths: Iterable[int]) -> float:
    """The profile's batch-1 step at the mean context of the decode steps."""
    mean_prompt = sum(lengths) / len(list(lengths))
    return p.step_ms(1, 1, mean_prompt + OUTPUT_TOKENS / 2, 0.0) / 1000


@pytest.mark.parametrize("profile", [L4_LLAMA31_8B, H100_LLAMA31_8B], ids=lambda p: p.name)
@pytest.mark.parametrize(
    "via", [_via_exposition, _via_to_scraped], ids=["exposition", "to_scraped"]
)
def test_learned_speed_matches_the_profile(
    profile: Profile, via: Callable[[ReplicaEngine], Callable[[], ScrapedMetrics]]
) -> None:
    engine = ReplicaEngine(profile, "r")
    speed = _run(engine, via(engine), PROMPT_TOKENS)
    assert speed.source == "learned"
    expected_rate = _profile_prefill_rate(profile, PROMPT_TOKENS)
    expected_step = _profile_decode_step(profile, PROMPT_TOKENS)
    assert speed.prefill_tokens_per_s == pytest.approx(expected_rate, rel=0.3)
    assert speed.decode_step_s == pytest.approx(expected_step, rel=0.3)


def test_the_profile_prior_is_kept_before_enough_requests() -> None:
    engine = ReplicaEngine(L4_LLAMA31_8B, "r")
    speed = _run(engine, _via_to_scraped(engine), PROMPT_TOKENS[:3])
    assert speed == speed_prior(L4_LLAMA31_8B) == Speed(5000.0, 0.062, "prior")
