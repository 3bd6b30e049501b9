"""state/speed.py: the prior until enough evidence, chunked deltas, median / EWMA, resets, bad
values. Learned prefill rates are per short-context token: `F` is the attention factor of the
chunks below (1,000 uncached tokens per request, nothing cached) unless a test says otherwise."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from skylb_extproc.state.speed import Speed, SpeedEstimator, attention_factor
from skylb_extproc.types import ScrapedMetrics

PRIOR = Speed(prefill_tokens_per_s=4700.0, decode_step_s=0.062)
F = attention_factor(0.0, 1000.0)


def m(
    prompt: float | None = 0.0,
    hits: float | None = 0.0,
    gen: float | None = 0.0,
    psum: float | None = 0.0,
    pcount: float | None = 0.0,
    dsum: float | None = 0.0,
) -> ScrapedMetrics:
    return ScrapedMetrics(
        waiting=0,
        running=0,
        prefix_hits=hits,
        prompt_tokens=prompt,
        generation_tokens=gen,
        prefill_seconds_sum=psum,
        prefill_seconds_count=pcount,
        decode_seconds_sum=dsum,
    )


def est(**kw: float) -> SpeedEstimator:
    return SpeedEstimator(PRIOR, min_window_s=kw.pop("min_window_s", 0.0), **kw)  # type: ignore[arg-type]


def test_prior_before_any_scrape() -> None:
    e = est()
    assert e.speed == PRIOR
    assert e.has_counters is None


def test_learns_both_from_one_chunk() -> None:
    e = est()
    e.on_scrape(m(), 0.0)
    # 4 requests: 4000 prompt tokens, 1000 cached -> 3000 computed in 0.5 s of prefill;
    # 4 + 396 generated tokens, 396 decode tokens in 3.96 s.
    e.on_scrape(m(prompt=4000, hits=1000, gen=400, psum=0.5, pcount=4, dsum=3.96), 10.0)
    s = e.speed
    assert s.source == "learned"
    assert s.prefill_tokens_per_s == pytest.approx(6000.0 * attention_factor(250.0, 750.0))
    assert s.decode_step_s == pytest.approx(0.01)


@pytest.mark.parametrize(
    ("second", "source", "prefill", "decode"),
    [
        # 3 finished requests: below min_requests, nothing learned
        (m(prompt=3000, gen=300, psum=0.3, pcount=3, dsum=3.0), "prior", 4700.0, 0.062),
        # enough requests, but all cached: no prefill evidence; decode learned
        (m(prompt=4000, hits=4000, gen=400, psum=0.1, pcount=4, dsum=3.96), "prior", 4700.0, 0.01),
        # enough prefill, too few decode tokens (4 requests x 1 token: all from prefill)
        (m(prompt=4000, gen=4, psum=0.5, pcount=4, dsum=0.0), "prior", 8000.0 * F, 0.062),
        # hits grew more than prompt (counted at admission): clamped to 0 computed tokens
        (m(prompt=100, hits=500, gen=400, psum=0.5, pcount=4, dsum=3.96), "prior", 4700.0, 0.01),
        # a missing counter: the prior
        (m(prompt=None, gen=400, psum=0.5, pcount=4, dsum=3.96), "prior", 4700.0, 0.062),
    ],
)
def test_minimum_evidence(
    second: ScrapedMetrics, source: str, prefill: float, decode: float
) -> None:
    e = est()
    e.on_scrape(m(), 0.0)
    e.on_scrape(second, 10.0)
    s = e.speed
    assert s.source == source
    assert (s.prefill_tokens_per_s, s.decode_step_s) == pytest.approx((prefill, decode))


def test_evidence_accumulates_over_scrapes() -> None:
    e = est()
    e.on_scrape(m(), 0.0)
    e.on_scrape(m(prompt=2000, gen=200, psum=0.25, pcount=2, dsum=1.98), 1.0)
    assert e.speed.source == "prior"
    e.on_scrape(m(prompt=4000, gen=400, psum=0.5, pcount=4, dsum=3.96), 2.0)
    assert e.speed.prefill_tokens_per_s == pytest.approx(8000.0 * F)


def test_median_and_ewma_run_on_seconds_per_token() -> None:
    e = est(alpha=0.5)
    e.on_scrape(m(), 0.0)
    e.on_scrape(m(prompt=4000, gen=400, psum=0.5, pcount=4, dsum=3.96), 10.0)  # 1/8000 s/token
    e.on_scrape(m(prompt=8000, gen=800, psum=1.5, pcount=8, dsum=5.94), 20.0)  # 1/4000 s/token
    s = e.speed
    # The median of two chunks is their mean (prefill); the EWMA with alpha 0.5 too (decode).
    assert s.prefill_tokens_per_s == pytest.approx(F / (0.5 / 8000 + 0.5 / 4000))
    assert s.decode_step_s == pytest.approx(0.5 * 0.01 + 0.5 * 0.005)


def test_overlapping_prefills_are_capped_at_wall_time() -> None:
    # 4 requests prefilled side by side: 2 s of summed prefill within 1 s of wall time.
    e = est()
    e.on_scrape(m(), 0.0)
    e.on_scrape(m(prompt=4000, gen=400, psum=2.0, pcount=4, dsum=3.96), 1.0)
    assert e.speed.prefill_tokens_per_s == pytest.approx(4000.0 * F)


def test_finish_time_token_sums_pair_with_the_prefill_time() -> None:
    # vLLM's request_prompt_tokens / request_prefill_kv_computed_tokens sums: the same finished
    # requests as the prefill time, so no wall-time cap (they prefilled before the chunk began)
    # and the prompt / hit counters (which moved for other requests) are not used.
    e = est()
    e.on_scrape(replace(m(), finished_prompt_tokens=0, finished_computed_tokens=0), 0.0)
    second = m(prompt=9000, hits=0, gen=400, psum=2.0, pcount=4, dsum=3.96)
    e.on_scrape(replace(second, finished_prompt_tokens=4000, finished_computed_tokens=3000), 1.0)
    assert e.speed.prefill_tokens_per_s == pytest.approx(1500.0 * attention_factor(250, 750))


def test_min_window_delays_the_prefill_chunk() -> None:
    e = est(min_window_s=2.0)
    e.on_scrape(m(), 0.0)
    e.on_scrape(m(prompt=4000, gen=400, psum=0.5, pcount=4, dsum=3.96), 1.0)
    assert e.speed.prefill_tokens_per_s == 4700.0
    e.on_scrape(m(prompt=8000, gen=800, psum=1.0, pcount=8, dsum=7.92), 2.0)
    assert e.speed.prefill_tokens_per_s == pytest.approx(8000.0 * F)


def test_counter_reset_restarts_the_chunk_and_keeps_what_was_learned() -> None:
    e = est()
    e.on_scrape(m(), 0.0)
    e.on_scrape(m(prompt=4000, gen=400, psum=0.5, pcount=4, dsum=3.96), 10.0)
    learned = e.speed
    # The engine restarted: small counters. Against the old anchor they would be negative.
    e.on_scrape(m(prompt=1000, gen=100, psum=1.0, pcount=1, dsum=0.99), 20.0)
    assert e.speed == learned
    e.on_scrape(m(prompt=5000, gen=500, psum=1.25, pcount=5, dsum=4.95), 30.0)  # +4 from there
    assert e.speed.prefill_tokens_per_s == pytest.approx(F / (0.5 / 8000 + 0.5 / 16000))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
def test_bad_values_count_as_missing(bad: float) -> None:
    e = est()
    e.on_scrape(m(), 0.0)
    e.on_scrape(m(prompt=4000, gen=400, psum=bad, pcount=4, dsum=3.96), 10.0)
    assert e.has_counters is False
    assert e.speed == PRIOR


def test_has_counters_follows_the_last_scrape() -> None:
    e = est()
    e.on_scrape(ScrapedMetrics(waiting=0, running=0), 0.0)
    assert e.has_counters is False
    e.on_scrape(m(), 1.0)
    assert e.has_counters is True


def test_missing_prefix_counter_means_nothing_cached() -> None:
    e = est()
    e.on_scrape(m(hits=None), 0.0)
    e.on_scrape(m(prompt=4000, hits=None, gen=400, psum=0.5, pcount=4, dsum=3.96), 10.0)
    assert e.speed.prefill_tokens_per_s == pytest.approx(8000.0 * F)


@pytest.mark.parametrize(("prefill", "decode"), [(0.0, 0.1), (100.0, math.nan), (-1.0, 0.1)])
def test_speed_rejects_bad_numbers(prefill: float, decode: float) -> None:
    with pytest.raises(ValueError, match="finite number > 0"):
        Speed(prefill, decode)
