"""What the replica model keeps and reports: per-request state, its events and its metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "Counters",
    "EngineMetrics",
    "Finished",
    "FirstToken",
    "SimEvent",
    "SimRequest",
    "Tokens",
]


@dataclass(frozen=True, slots=True)
class FirstToken:
    """The request's first output token was sampled at `t` (end of its last prefill step)."""

    request_id: str
    t: float
    cached_tokens: int
    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class Tokens:
    """`n` more output tokens, the last of them sampled at `t`."""

    request_id: str
    t: float
    n: int


@dataclass(frozen=True, slots=True)
class Finished:
    """The request reached max_tokens at `t`; its blocks are freed (prompt blocks stay cached)."""

    request_id: str
    t: float
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


SimEvent = FirstToken | Tokens | Finished


@dataclass(frozen=True, slots=True)
class EngineMetrics:
    """What vLLM's /metrics would show; prefix-cache counters are in tokens, as vLLM's are."""

    waiting: int
    running: int
    kv_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_gpu_blocks: int
    block_size: int
    prompt_tokens_total: int
    generation_tokens_total: int
    finished_length: int  # request_success_total{finished_reason="length"}
    finished_abort: int  # request_success_total{finished_reason="abort"}
    num_preemptions: int
    # vllm:request_prefill_time_seconds / vllm:request_decode_time_seconds, observed when a
    # request finishes (vLLM V1 IterationStats.update_from_finished_request): prefill = first
    # token - first scheduled (preemptions included), decode = last token - first token.
    prefill_seconds_sum: float = 0.0
    prefill_seconds_count: int = 0
    decode_seconds_sum: float = 0.0
    # vllm:request_prompt_tokens / vllm:request_prefill_kv_computed_tokens (prompt minus its
    # cached tokens), observed at the finish too.
    finished_prompt_tokens: int = 0
    finished_computed_tokens: int = 0


@dataclass(slots=True, eq=False)
class SimRequest:
    """One request's state in the engine (vLLM's `Request`)."""

    rid: str
    prompt_tokens: int
    max_tokens: int
    hashes: tuple[int, ...]
    num_computed: int = 0
    num_output: int = 0
    cached_tokens: int = -1  # prefix hit at first admission (vLLM's num_cached_tokens)
    preemptions: int = 0
    prefill_seconds: float = 0.0
    prefill_count: int = 0
    decode_seconds: float = 0.0
    cached_blocks: int = 0  # leading blocks of `blocks` registered in the prefix cache
    done: bool = False
    added_in: int = 0  # steps planned before it arrived (vLLM: it reaches the scheduler after)
    hash_set: frozenset[int] | None = None  # `hashes` as a set, once a window needs it
    scheduled_at: float = -1.0  # start of the step that first scheduled it (vLLM: SCHEDULED)
    first_token_at: float = -1.0
    blocks: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return self.prompt_tokens + self.num_output


@dataclass(slots=True)
class Counters:
    """The engine's cumulative counters (vLLM's Prometheus counters)."""

    queries: int = 0
    hits: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished_length: int = 0
    finished_abort: int = 0
    preemptions: int = 0
    prefill_seconds: float = 0.0
    prefill_count: int = 0
    decode_seconds: float = 0.0
    finished_prompt: int = 0
    finished_computed: int = 0
