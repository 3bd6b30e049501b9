"""Scraping replicas' Prometheus /metrics (vLLM or SGLang) into ScrapedMetrics.

`parse_metrics` is pure. `Scraper` runs one asyncio task per replica over a shared aiohttp
session and hands every result (a ScrapedMetrics, or None for a failure) to a callback together
with the instant the scrape *started*: the router needs it to tell which of its own dispatches a
scrape could have seen.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from skylb_extproc.server.polling import Poll, PollingLoops
from skylb_extproc.types import ReplicaSpec, ScrapedMetrics

log = logging.getLogger(__name__)

# Per quantity, the accepted sample names (first present wins): vLLM first, then SGLang.
WAITING = ("vllm:num_requests_waiting", "sglang:num_queue_reqs")
RUNNING = ("vllm:num_requests_running", "sglang:num_running_reqs")
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage")
# SGLang's cached_tokens_total (sum over its cache_source labels: device, host, storage) counts
# prompt tokens not computed, as vLLM's prefix hits do.
PREFIX_HITS = (
    "vllm:prefix_cache_hits_total",
    "vllm:gpu_prefix_cache_hits_total",
    "sglang:cached_tokens_total",
)
PREFIX_QUERIES = ("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total")
CACHE_CONFIG = "vllm:cache_config_info"
# Speed counters (state/speed.py). vLLM V1 (vllm/v1/metrics/loggers.py, stats.py): prompt
# tokens counted when a request's prefill completes, every sampled token, and per finished
# request its prefill time (first token - first scheduled) and decode time (last token - first
# token). SGLang (python/sglang/srt/metrics/collector.py) has no prefill-time histogram: its
# time_to_first_token_seconds (from arrival, so queueing and tokenizing included: a slower
# rate under load) stands in for prefill, and its decode time is e2e_request_latency_seconds_sum
# minus time_to_first_token_seconds_sum (the two are observed at the finish and at the first
# token, so they line up only over several requests, which the estimator's chunks span).
PROMPT_TOKENS = ("vllm:prompt_tokens_total", "sglang:prompt_tokens_total")
GENERATION_TOKENS = ("vllm:generation_tokens_total", "sglang:generation_tokens_total")
PREFILL_SUM = ("vllm:request_prefill_time_seconds_sum", "sglang:time_to_first_token_seconds_sum")
PREFILL_COUNT = (
    "vllm:request_prefill_time_seconds_count",
    "sglang:time_to_first_token_seconds_count",
)
DECODE_SUM = "vllm:request_decode_time_seconds_sum"
# vLLM only: per finished request, like the prefill time (state/speed.py pairs them).
FINISHED_PROMPT = "vllm:request_prompt_tokens_sum"
FINISHED_COMPUTED = "vllm:request_prefill_kv_computed_tokens_sum"
SGLANG_E2E_SUM = "sglang:e2e_request_latency_seconds_sum"
SGLANG_TTFT_SUM = "sglang:time_to_first_token_seconds_sum"
_WANTED = frozenset(
    (
        *WAITING, *RUNNING, *KV_USAGE, *PREFIX_HITS, *PREFIX_QUERIES, CACHE_CONFIG,
        *PROMPT_TOKENS, *GENERATION_TOKENS, *PREFILL_SUM, *PREFILL_COUNT, DECODE_SUM,
        SGLANG_E2E_SUM, FINISHED_PROMPT, FINISHED_COMPUTED,
    )
)  # fmt: skip


@dataclass
class _Series:
    """Samples of one name: values and label sets, across engines / models / tp ranks."""

    values: list[float]
    labels: list[dict[str, str]]


def _collect(text: str) -> dict[str, _Series]:
    found: dict[str, _Series] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name not in _WANTED or math.isnan(sample.value):
                continue
            series = found.setdefault(sample.name, _Series([], []))
            series.values.append(float(sample.value))
            series.labels.append(dict(sample.labels))
    return found


def _first(found: dict[str, _Series], names: Iterable[str]) -> _Series | None:
    for name in names:
        if name in found:
            return found[name]
    return None


def _sum(series: _Series | None) -> float | None:
    return None if series is None else sum(series.values)


def _mean(series: _Series | None) -> float | None:
    # Usage is a fraction per engine: several engines (data parallel) are averaged, not added.
    if series is None or not series.values:
        return None
    return sum(series.values) / len(series.values)


def _label_int(labels: dict[str, str], key: str) -> int | None:
    text = labels.get(key, "")
    try:
        return int(float(text))  # vLLM renders some as "16" and unset ones as "None"
    except ValueError:
        return None


def _cache_config(series: _Series | None) -> tuple[int | None, int | None]:
    """block_size (first engine's) and num_gpu_blocks (summed over engines) from the info gauge."""
    if series is None:
        return None, None
    sizes = [_label_int(labels, "block_size") for labels in series.labels]
    blocks = [_label_int(labels, "num_gpu_blocks") for labels in series.labels]
    block_size = next((s for s in sizes if s is not None), None)
    known = [b for b in blocks if b is not None]
    return block_size, (sum(known) if known else None)


def _decode_sum(found: dict[str, _Series]) -> float | None:
    """vLLM's decode-time sum, else SGLang's end-to-end minus time-to-first-token sums."""
    if DECODE_SUM in found:
        return _sum(found[DECODE_SUM])
    e2e, ttft = _sum(found.get(SGLANG_E2E_SUM)), _sum(found.get(SGLANG_TTFT_SUM))
    return None if e2e is None or ttft is None else max(0.0, e2e - ttft)


def parse_metrics(text: str) -> ScrapedMetrics:
    """Prometheus exposition text -> ScrapedMetrics; ValueError without a known queue metric."""
    try:
        found = _collect(text)
    except Exception as exc:  # the parser raises ValueError, IndexError, ... on malformed text
        raise ValueError(f"unparsable metrics text: {exc}") from exc
    waiting = _sum(_first(found, WAITING))
    if waiting is None:
        raise ValueError(f"no queue metric ({' or '.join(WAITING)}) in the scraped text")
    block_size, num_gpu_blocks = _cache_config(found.get(CACHE_CONFIG))
    return ScrapedMetrics(
        waiting=waiting,
        running=_sum(_first(found, RUNNING)) or 0.0,
        kv_usage=_mean(_first(found, KV_USAGE)),
        block_size=block_size,
        num_gpu_blocks=num_gpu_blocks,
        prefix_hits=_sum(_first(found, PREFIX_HITS)),
        prefix_queries=_sum(_first(found, PREFIX_QUERIES)),
        prompt_tokens=_sum(_first(found, PROMPT_TOKENS)),
        generation_tokens=_sum(_first(found, GENERATION_TOKENS)),
        prefill_seconds_sum=_sum(_first(found, PREFILL_SUM)),
        prefill_seconds_count=_sum(_first(found, PREFILL_COUNT)),
        decode_seconds_sum=_decode_sum(found),
        finished_prompt_tokens=_sum(found.get(FINISHED_PROMPT)),
        finished_computed_tokens=_sum(found.get(FINISHED_COMPUTED)),
    )


# --- the live loop ------------------------------------------------------------------------------

# (replica name, metrics or None, started_at) -> None; the driver adds `now` itself.
ScrapeSink = Callable[[str, ScrapedMetrics | None, float], None]


class Scraper:
    """One polling task per replica; the period is measured from scrape start to scrape start."""

    def __init__(
        self,
        replicas: Sequence[ReplicaSpec],
        *,
        interval_s: float,
        timeout_s: float,
        sink: ScrapeSink,
        clock: Callable[[], float],
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self._replicas = tuple(replicas)
        self._loops = PollingLoops(interval_s=interval_s, timeout_s=timeout_s, clock=clock)
        self._sink = sink
        self._clock = clock
        self._on_error = on_error

    async def start(self) -> None:
        await self._loops.start([(f"scrape-{r.name}", self._poller(r)) for r in self._replicas])

    async def close(self) -> None:
        await self._loops.close()

    async def scrape_once(self, replica: ReplicaSpec) -> ScrapedMetrics | None:
        """Fetch and parse one replica's metrics; None (logged, counted) on any failure."""
        try:
            async with self._loops.session.get(replica.metrics_url) as response:
                response.raise_for_status()
                text = await response.text()
            return parse_metrics(text)
        except (aiohttp.ClientError, TimeoutError, ValueError, UnicodeDecodeError) as exc:
            log.debug("scrape of %s failed: %r", replica.name, exc)
            if self._on_error is not None:
                self._on_error(replica.name)
            return None

    def _poller(self, replica: ReplicaSpec) -> Poll:
        async def poll() -> None:
            started = self._clock()
            self._sink(replica.name, await self.scrape_once(replica), started)

        return poll
