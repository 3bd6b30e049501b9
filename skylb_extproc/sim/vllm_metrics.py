"""vLLM's /metrics for the simulated replica: V1 metric names, help texts and label sets.

Names, types and labels follow vLLM 0.32 (tests/contract compares them with the real server);
only the families a balancer or an operator reads are rendered. Of vLLM's histograms only the
two a balancer learns speed from (state/speed.py) are, and with the +Inf bucket alone: their
_sum and _count are what is read. Like vLLM V1 they observe a request when it finishes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from skylb_extproc.sim.model import EngineMetrics
from skylb_extproc.sim.profiles import Profile


class _Replica(Protocol):
    """What the collector reads from the simulated replica."""

    model: str
    profile: Profile

    def metrics(self) -> EngineMetrics: ...


# vLLM V1's metric help texts (vllm/v1/metrics/loggers.py).
_RUNNING_DOC = "Number of requests in model execution batches."
_WAITING_DOC = "Number of requests waiting to be processed."
_KV_DOC = "KV-cache usage. 1 means 100 percent usage."
_QUERIES_DOC = "Prefix cache queries, in terms of number of queried tokens."
_HITS_DOC = "Prefix cache hits, in terms of number of cached tokens."
_PREEMPT_DOC = "Cumulative number of preemption from the engine."
_PROMPT_DOC = "Number of prefill tokens processed."
_GENERATION_DOC = "Number of generation tokens processed."
_PREFILL_TIME_DOC = "Histogram of time spent in PREFILL phase for request."
_DECODE_TIME_DOC = "Histogram of time spent in DECODE phase for request."
_PROMPT_HIST_DOC = "Number of prefill tokens processed."
_COMPUTED_DOC = "Histogram of new KV tokens computed during prefill (excluding cached tokens)."


class VllmCollector(Collector):
    """Reads the engine at scrape time and renders vLLM V1's metric families."""

    def __init__(self, replica: _Replica) -> None:
        self._replica = replica

    def collect(self) -> Iterable[Metric]:
        m = self._replica.metrics()
        labels = {"model_name": self._replica.model, "engine": "0"}
        gauges = (
            ("vllm:num_requests_running", _RUNNING_DOC, m.running),
            ("vllm:num_requests_waiting", _WAITING_DOC, m.waiting),
            ("vllm:kv_cache_usage_perc", _KV_DOC, m.kv_usage),
        )
        for name, doc, value in gauges:
            yield _gauge(name, doc, labels, value)
        counters = (
            ("vllm:prefix_cache_queries", _QUERIES_DOC, m.prefix_cache_queries),
            ("vllm:prefix_cache_hits", _HITS_DOC, m.prefix_cache_hits),
            ("vllm:num_preemptions", _PREEMPT_DOC, m.num_preemptions),
            ("vllm:prompt_tokens", _PROMPT_DOC, m.prompt_tokens_total),
            ("vllm:generation_tokens", _GENERATION_DOC, m.generation_tokens_total),
        )
        for name, doc, value in counters:
            family = CounterMetricFamily(name, doc, labels=list(labels))
            family.add_metric(list(labels.values()), value)
            yield family
        histograms = (
            ("vllm:request_prefill_time_seconds", _PREFILL_TIME_DOC, m.prefill_seconds_sum),
            ("vllm:request_decode_time_seconds", _DECODE_TIME_DOC, m.decode_seconds_sum),
            ("vllm:request_prompt_tokens", _PROMPT_HIST_DOC, m.finished_prompt_tokens),
            ("vllm:request_prefill_kv_computed_tokens", _COMPUTED_DOC, m.finished_computed_tokens),
        )
        for name, doc, total in histograms:
            histogram = HistogramMetricFamily(name, doc, labels=list(labels))
            count = m.prefill_seconds_count  # all observed once per finished request
            histogram.add_metric(list(labels.values()), [("+Inf", count)], sum_value=total)
            yield histogram
        yield self._success(m, labels)
        yield self._cache_config(m)

    def _success(self, m: EngineMetrics, labels: dict[str, str]) -> Metric:
        success = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=[*labels, "finished_reason"],
        )
        reasons = (("stop", 0), ("length", m.finished_length), ("abort", m.finished_abort))
        for reason, count in reasons:
            success.add_metric([*labels.values(), reason], count)
        return success

    def _cache_config(self, m: EngineMetrics) -> Metric:
        # vLLM renders CacheConfig's fields as labels (plus engine) of a gauge set to 1; the
        # label set is vLLM 0.32's, the values those of a GPU replica with this profile.
        tokens = m.block_size * m.num_gpu_blocks
        info = {
            **_CACHE_CONFIG_CONSTANTS,
            "block_size": str(m.block_size),
            "effective_attention_block_size": str(m.block_size),
            "num_gpu_blocks": str(m.num_gpu_blocks),
            "kv_cache_size_tokens": str(tokens),
            "kv_cache_max_concurrency": str(tokens / self._replica.profile.max_model_len),
            "engine": "0",
        }
        return _gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig", info, 1)


# vllm:cache_config_info labels that do not depend on the profile (vLLM 0.32 defaults).
_CACHE_CONFIG_CONSTANTS = {
    "_block_size_resolved": "True",
    "cache_dtype": "auto",
    "cache_hit_alignment_tokens": "None",
    "enable_mamba_shared_prefix_checkpoint": "False",
    "enable_prefix_caching": "True",
    "gpu_memory_utilization": "0.9",
    "hash_block_size": "None",
    "is_attention_free": "False",
    "kv_cache_dtype_skip_layers": "[]",
    "kv_cache_layout": "None",
    "kv_cache_memory_bytes": "None",
    "kv_offloading_backend": "native",
    "kv_offloading_size": "None",
    "kv_sharing_fast_prefill": "False",
    "mamba_block_size": "None",
    "mamba_cache_dtype": "auto",
    "mamba_cache_mode": "none",
    "mamba_page_size_padded": "None",
    "mamba_ssm_cache_dtype": "float32",
    "num_cpu_blocks": "None",
    "num_gpu_blocks_override": "None",
    "prefix_cache_retention_interval": "0",
    "prefix_caching_hash_algo": "sha256",
    "prefix_match_unit": "None",
    "replayssm_buffer_len": "16",
    "skip_page_size_padded": "None",
    "sliding_window": "None",
    "swa_bounded_replay": "True",
    "use_kda_recoverssm": "False",
    "use_replayssm": "False",
    "user_specified_block_size": "True",
}


def _gauge(name: str, doc: str, labels: dict[str, str], value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family
