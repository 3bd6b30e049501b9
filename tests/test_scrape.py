# ruff: noqa: E501  (exposition lines are as long as the engines print them)
"""server/scrape.py: vLLM and SGLang exposition text -> ScrapedMetrics; the live scrape loop.

The samples follow the exposition real engines emit (shapes seen in vLLM 0.6 with the older
`gpu_cache_usage_perc`, vLLM V1 with `engine` labels and `kv_cache_usage_perc`, SGLang's
documented /metrics output); values are made up.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from skylb_extproc.server.scrape import Scraper, parse_metrics
from skylb_extproc.types import ReplicaSpec, ScrapedMetrics

# vLLM 0.6-era (V0 engine): gpu_cache_usage_perc, an unlabelled info gauge with "None" values.
VLLM_V0 = """\
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",cpu_offload_gb="0",enable_prefix_caching="True",gpu_memory_utilization="0.9",num_cpu_blocks="2048",num_gpu_blocks="27500",num_gpu_blocks_override="None",sliding_window="None"} 1.0
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="meta-llama/Llama-3.1-8B-Instruct"} 7.0
# HELP vllm:num_requests_swapped Number of requests swapped to CPU.
# TYPE vllm:num_requests_swapped gauge
vllm:num_requests_swapped{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="meta-llama/Llama-3.1-8B-Instruct"} 2.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.625
# HELP vllm:gpu_prefix_cache_hit_rate GPU prefix cache block hit rate.
# TYPE vllm:gpu_prefix_cache_hit_rate gauge
vllm:gpu_prefix_cache_hit_rate{model_name="meta-llama/Llama-3.1-8B-Instruct"} -1.0
# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="0",running_lora_adapters="",waiting_lora_adapters=""} 1.7e+09
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{model_name="meta-llama/Llama-3.1-8B-Instruct"} 1480.0
# HELP vllm:iteration_tokens_total Histogram of number of tokens per engine_step.
# TYPE vllm:iteration_tokens_total histogram
vllm:iteration_tokens_total_sum{model_name="meta-llama/Llama-3.1-8B-Instruct"} 1103.0
vllm:iteration_tokens_total_bucket{le="1.0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 994.0
vllm:iteration_tokens_total_bucket{le="+Inf",model_name="meta-llama/Llama-3.1-8B-Instruct"} 998.0
vllm:iteration_tokens_total_count{model_name="meta-llama/Llama-3.1-8B-Instruct"} 998.0
"""

# vLLM V1: per-engine labels (two data-parallel engines), kv_cache_usage_perc, prefix counters
# with _created samples, cache_config_info carrying the engine label.
VLLM_V1 = """\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 12662.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="Qwen/Qwen3-8B"} 3.0
vllm:num_requests_running{engine="1",model_name="Qwen/Qwen3-8B"} 5.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="Qwen/Qwen3-8B"} 0.0
vllm:num_requests_waiting{engine="1",model_name="Qwen/Qwen3-8B"} 1.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="Qwen/Qwen3-8B"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="Qwen/Qwen3-8B"} 0.75
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="Qwen/Qwen3-8B"} 1000.0
vllm:prefix_cache_queries_total{engine="1",model_name="Qwen/Qwen3-8B"} 3000.0
vllm:prefix_cache_queries_created{engine="0",model_name="Qwen/Qwen3-8B"} 1.7e+09
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="Qwen/Qwen3-8B"} 750.0
vllm:prefix_cache_hits_total{engine="1",model_name="Qwen/Qwen3-8B"} 250.0
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="32",cache_dtype="auto",enable_prefix_caching="True",engine="0",num_gpu_blocks="8192"} 1.0
vllm:cache_config_info{block_size="32",cache_dtype="auto",enable_prefix_caching="True",engine="1",num_gpu_blocks="8192"} 1.0
# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{engine="0",le="1.0",model_name="Qwen/Qwen3-8B"} 1.0
vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="Qwen/Qwen3-8B"} 4.0
vllm:e2e_request_latency_seconds_sum{engine="0",model_name="Qwen/Qwen3-8B"} 6.0
vllm:e2e_request_latency_seconds_count{engine="0",model_name="Qwen/Qwen3-8B"} 4.0
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="Qwen/Qwen3-8B"} 1200.0
vllm:prompt_tokens_total{engine="1",model_name="Qwen/Qwen3-8B"} 3400.0
vllm:prompt_tokens_created{engine="0",model_name="Qwen/Qwen3-8B"} 1.7e+09
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="Qwen/Qwen3-8B"} 90.0
vllm:generation_tokens_total{engine="1",model_name="Qwen/Qwen3-8B"} 210.0
# HELP vllm:request_prefill_time_seconds Histogram of time spent in PREFILL phase for request.
# TYPE vllm:request_prefill_time_seconds histogram
vllm:request_prefill_time_seconds_bucket{engine="0",le="0.3",model_name="Qwen/Qwen3-8B"} 3.0
vllm:request_prefill_time_seconds_bucket{engine="0",le="+Inf",model_name="Qwen/Qwen3-8B"} 3.0
vllm:request_prefill_time_seconds_count{engine="0",model_name="Qwen/Qwen3-8B"} 3.0
vllm:request_prefill_time_seconds_sum{engine="0",model_name="Qwen/Qwen3-8B"} 0.125
vllm:request_prefill_time_seconds_bucket{engine="1",le="0.3",model_name="Qwen/Qwen3-8B"} 5.0
vllm:request_prefill_time_seconds_bucket{engine="1",le="+Inf",model_name="Qwen/Qwen3-8B"} 5.0
vllm:request_prefill_time_seconds_count{engine="1",model_name="Qwen/Qwen3-8B"} 5.0
vllm:request_prefill_time_seconds_sum{engine="1",model_name="Qwen/Qwen3-8B"} 0.375
# HELP vllm:request_decode_time_seconds Histogram of time spent in DECODE phase for request.
# TYPE vllm:request_decode_time_seconds histogram
vllm:request_decode_time_seconds_bucket{engine="0",le="+Inf",model_name="Qwen/Qwen3-8B"} 3.0
vllm:request_decode_time_seconds_count{engine="0",model_name="Qwen/Qwen3-8B"} 3.0
vllm:request_decode_time_seconds_sum{engine="0",model_name="Qwen/Qwen3-8B"} 2.5
vllm:request_decode_time_seconds_bucket{engine="1",le="+Inf",model_name="Qwen/Qwen3-8B"} 5.0
vllm:request_decode_time_seconds_count{engine="1",model_name="Qwen/Qwen3-8B"} 5.0
vllm:request_decode_time_seconds_sum{engine="1",model_name="Qwen/Qwen3-8B"} 4.0
"""

# SGLang (--enable-metrics): queue/running gauges and token_usage, per model and tp rank.
SGLANG = """\
# HELP sglang:prompt_tokens_total Number of prefill tokens processed.
# TYPE sglang:prompt_tokens_total counter
sglang:prompt_tokens_total{model_name="meta-llama/Llama-3.1-8B-Instruct"} 8.128902e+06
# HELP sglang:generation_tokens_total Number of generation tokens processed.
# TYPE sglang:generation_tokens_total counter
sglang:generation_tokens_total{model_name="meta-llama/Llama-3.1-8B-Instruct"} 7.557572e+06
# HELP sglang:cached_tokens_total Number of cached prompt tokens by source (device/host/storage).
# TYPE sglang:cached_tokens_total counter
sglang:cached_tokens_total{cache_source="device",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0e+06
sglang:cached_tokens_total{cache_source="host",model_name="meta-llama/Llama-3.1-8B-Instruct"} 5.0e+05
# HELP sglang:e2e_request_latency_seconds Histogram of End-to-end request latency in seconds
# TYPE sglang:e2e_request_latency_seconds histogram
sglang:e2e_request_latency_seconds_sum{model_name="meta-llama/Llama-3.1-8B-Instruct"} 2.80
sglang:e2e_request_latency_seconds_bucket{le="+Inf",model_name="meta-llama/Llama-3.1-8B-Instruct"} 7.0
sglang:e2e_request_latency_seconds_count{model_name="meta-llama/Llama-3.1-8B-Instruct"} 7.0
# HELP sglang:token_usage The token usage
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.28
# HELP sglang:cache_hit_rate The cache hit rate
# TYPE sglang:cache_hit_rate gauge
sglang:cache_hit_rate{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0075
# HELP sglang:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE sglang:time_to_first_token_seconds histogram
sglang:time_to_first_token_seconds_sum{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.30
sglang:time_to_first_token_seconds_bucket{le="0.1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 6.0
sglang:time_to_first_token_seconds_bucket{le="+Inf",model_name="meta-llama/Llama-3.1-8B-Instruct"} 7.0
sglang:time_to_first_token_seconds_count{model_name="meta-llama/Llama-3.1-8B-Instruct"} 7.0
# HELP sglang:num_running_reqs The number of running requests
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="meta-llama/Llama-3.1-8B-Instruct"} 162.0
# HELP sglang:num_used_tokens The number of used tokens
# TYPE sglang:num_used_tokens gauge
sglang:num_used_tokens{model_name="meta-llama/Llama-3.1-8B-Instruct"} 123859.0
# HELP sglang:num_queue_reqs The number of requests in the waiting queue
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="meta-llama/Llama-3.1-8B-Instruct"} 26.0
"""


def test_vllm_v0_with_gpu_cache_usage() -> None:
    assert parse_metrics(VLLM_V0) == ScrapedMetrics(
        waiting=2.0,
        running=7.0,
        kv_usage=0.625,
        block_size=16,
        num_gpu_blocks=27500,
        prompt_tokens=1480.0,  # V0 had no prefill/decode time histograms: no speed learned
    )


def test_vllm_v1_sums_engines_and_averages_usage() -> None:
    assert parse_metrics(VLLM_V1) == ScrapedMetrics(
        waiting=1.0,
        running=8.0,
        kv_usage=0.5,
        block_size=32,
        num_gpu_blocks=16384,
        prefix_hits=1000.0,
        prefix_queries=4000.0,
        prompt_tokens=4600.0,
        generation_tokens=300.0,
        prefill_seconds_sum=0.5,
        prefill_seconds_count=8.0,
        decode_seconds_sum=6.5,
    )


def test_sglang() -> None:
    assert parse_metrics(SGLANG) == ScrapedMetrics(
        waiting=26.0,
        running=162.0,
        kv_usage=0.28,
        prefix_hits=3.5e6,  # cached_tokens_total over its cache sources
        prompt_tokens=8.128902e6,
        generation_tokens=7.557572e6,
        prefill_seconds_sum=0.30,  # time_to_first_token_seconds stands in for prefill
        prefill_seconds_count=7.0,
        decode_seconds_sum=pytest.approx(2.5),  # e2e - ttft
    )


def test_kv_cache_usage_preferred_when_both_names_present() -> None:
    text = (
        'vllm:num_requests_waiting{model_name="m"} 0.0\n'
        'vllm:gpu_cache_usage_perc{model_name="m"} 0.7\n'
        'vllm:kv_cache_usage_perc{model_name="m"} 0.4\n'
    )
    metrics = parse_metrics(text)
    assert metrics.kv_usage == 0.4
    assert metrics.running == 0.0  # absent running counts as idle


def test_cache_config_info_with_unset_values() -> None:
    text = (
        "vllm:num_requests_waiting 0\n"
        'vllm:cache_config_info{block_size="16",num_gpu_blocks="None"} 1.0\n'
    )
    metrics = parse_metrics(text)
    assert (metrics.block_size, metrics.num_gpu_blocks) == (16, None)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "# HELP nothing here\n",
        'vllm:num_requests_running{engine="0"} 1.0\nvllm:kv_cache_usage_perc{engine="0"} 0.1\n',
        "sglang:num_running_reqs 3\n",
        "<html>502 Bad Gateway</html>\n",
    ],
    ids=["empty", "comment-only", "vllm-no-waiting", "sglang-no-queue", "html"],
)
def test_missing_queue_metric_is_an_error(text: str) -> None:
    with pytest.raises(ValueError):
        parse_metrics(text)


# --- the loop against a real HTTP server ------------------------------------------------------


@pytest.fixture
async def replica_server() -> AsyncIterator[tuple[str, list[str]]]:
    """A /metrics server on port 0 whose body the test changes; also serves /broken (500)."""
    body = ['vllm:num_requests_waiting{engine="0"} 3.0\n']

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=body[0])

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"{host}:{port}", body
    finally:
        await runner.cleanup()


async def test_scraper_feeds_results_and_failures(replica_server: tuple[str, list[str]]) -> None:
    address, _ = replica_server
    replicas = [
        ReplicaSpec("ok", address, f"http://{address}/metrics"),
        ReplicaSpec("broken", "127.0.0.1:9", f"http://{address}/missing"),
    ]
    seen: dict[str, list[ScrapedMetrics | None]] = {"ok": [], "broken": []}
    errors: list[str] = []
    clock = asyncio.get_running_loop().time
    scraper = Scraper(
        replicas,
        interval_s=0.02,
        timeout_s=1.0,
        sink=lambda name, metrics, started: seen[name].append(metrics),
        clock=clock,
        on_error=errors.append,
    )
    await scraper.start()
    try:
        for _ in range(200):
            if len(seen["ok"]) >= 3 and len(seen["broken"]) >= 3:
                break
            await asyncio.sleep(0.01)
    finally:
        await scraper.close()
    assert seen["ok"][0] == ScrapedMetrics(waiting=3.0, running=0.0)
    assert all(m is None for m in seen["broken"])
    assert set(errors) == {"broken"}


async def test_scraper_period_includes_the_scrape_duration(
    replica_server: tuple[str, list[str]],
) -> None:
    address, _ = replica_server
    starts: list[float] = []
    clock = asyncio.get_running_loop().time
    scraper = Scraper(
        [ReplicaSpec("ok", address, f"http://{address}/metrics")],
        interval_s=0.05,
        timeout_s=1.0,
        sink=lambda name, metrics, started: starts.append(started),
        clock=clock,
    )
    await scraper.start()
    await asyncio.sleep(0.32)
    await scraper.close()
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert 5 <= len(starts) <= 8
    assert all(0.03 < gap < 0.09 for gap in gaps), gaps
