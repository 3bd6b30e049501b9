"""Values shared by the routing core, its drivers and the evaluator.

Everything here is an immutable value. The core takes these in and hands these out; it never
holds a socket, a clock or a global random generator.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Outcome(enum.Enum):
    """How a request ended, from the balancer's point of view: the only label of result metrics."""

    ROUTED = "routed"  # sent to a local replica
    FORWARDED = "forwarded"  # sent to a peer region's balancer (cross-region spill)
    PASSTHROUGH = "passthrough"  # not an inference request; sent to the least-loaded replica
    BAD_REQUEST = "bad_request"  # 400: unparsable or wrongly shaped body
    TOO_LARGE = "too_large"  # 413: body over the configured limit
    QUEUE_FULL = "queue_full"  # 429: the balancer's wait queue is full
    DEADLINE = "deadline"  # 503: waited longer than queue.max_wait_s
    NO_REPLICA = "no_replica"  # 503: no healthy replica at all (and a policy that does not wait)
    CANCELLED = "cancelled"  # client went away while the request waited at the balancer
    SHUTDOWN = "shutdown"  # 503: the server is stopping


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What the router needs to know about one request; built by parsing/openai.py."""

    request_id: str
    path: str
    method: str = "POST"
    model: str = ""
    prompt: str = ""  # text used for prefix affinity; "" when there is none
    stream: bool = False
    max_tokens: int | None = None
    hash_key: str | None = None  # the x-hash-key header, for consistent hashing
    inference: bool = True  # False: pass-through (other paths and methods), never queued
    # Region that forwarded this request, set only after its signed marker verified: such a
    # request is routed here and never forwarded again. None: a client of this region.
    origin: str | None = None
    tenant: str | None = None  # value of residency.tenant_header, when configured and present


@dataclass(frozen=True, slots=True)
class ReplicaSpec:
    """A configured replica: `address` is the `ip:port` Envoy connects to."""

    name: str
    address: str
    metrics_url: str


@dataclass(frozen=True, slots=True)
class ScrapedMetrics:
    """One successful scrape of a replica's /metrics (vLLM or SGLang names)."""

    waiting: float  # vllm:num_requests_waiting | sglang:num_queue_reqs
    running: float  # vllm:num_requests_running | sglang:num_running_reqs
    kv_usage: float | None = None  # vllm:kv_cache_usage_perc | vllm:gpu_cache_usage_perc, 0..1
    block_size: int | None = None  # from vllm:cache_config_info
    num_gpu_blocks: int | None = None  # from vllm:cache_config_info
    prefix_hits: float | None = None  # vllm:prefix_cache_hits_total (tokens)
    prefix_queries: float | None = None  # vllm:prefix_cache_queries_total (tokens)
    # Counters a replica's speed is learned from (state/speed.py); None when not exported.
    prompt_tokens: float | None = None  # vllm:prompt_tokens_total | sglang:prompt_tokens_total
    generation_tokens: float | None = None  # vllm:generation_tokens_total | sglang:gen..._total
    prefill_seconds_sum: float | None = None  # vllm:request_prefill_time_seconds_sum
    prefill_seconds_count: float | None = None  # vllm:request_prefill_time_seconds_count
    decode_seconds_sum: float | None = None  # vllm:request_decode_time_seconds_sum
    # Observed at the finish like the prefill time, so they pair with it request for request:
    finished_prompt_tokens: float | None = None  # vllm:request_prompt_tokens_sum
    finished_computed_tokens: float | None = None  # vllm:request_prefill_kv_computed_tokens_sum


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """A replica as policies see it at decision time."""

    name: str
    address: str
    healthy: bool  # scrapes succeed (or none configured yet failed for long)
    available: bool  # healthy and no pending request: the selective-pushing test
    in_flight: int  # requests this balancer sent there that have not finished
    pending: int  # scraped waiting + our dispatches not yet confirmed started
    matched_blocks: int = 0  # longest prefix of the request's block hashes this replica holds
    # The replica's measured (or prior) speed: what the predictive policy turns tokens into time.
    prefill_tokens_per_s: float = 4700.0
    decode_step_s: float = 0.062
    # Predicted seconds of prefill we sent there that has not finished yet (state/load.py).
    backlog_s: float = 0.0
    # Predicted seconds a request would wait in the engine's queue for KV blocks or a batch slot.
    admit_wait_s: float = 0.0
    # KV tokens free once our unseen dispatches are admitted (inf: the engine does not say), and
    # the replica's recent seconds between finishes: one more request that does not fit waits
    # about that long for one to end.
    kv_free_tokens: float = float("inf")
    finish_interval_s: float = 0.0
    # How full this replica's prefix index is (0..1; bounded by its KV cache): a prefix copied
    # there evicts others about as much.
    cache_fill: float = 0.0
    # The share of prompt tokens it served from cache lately (engine counters): how much what a
    # copied prefix evicts would have been worth.
    cache_hit_rate: float = 0.0
    # Scraped gauges as the engine reports them (llm-d's queue and KV-utilization scorers);
    # 0 when never scraped or not exported, as llm-d's metrics default to.
    waiting: float = 0.0  # vllm:num_requests_waiting of the last successful scrape
    kv_usage: float = 0.0  # vllm:kv_cache_usage_perc of the last successful scrape, 0..1
    # What this balancer's own in-flight requests hold there (Dynamo's ActiveSequences):
    active_blocks: int = 0  # distinct prompt block hashes of our requests in flight there
    active_overlap_blocks: int = 0  # leading blocks of this request among those
    prefill_blocks: float = 0.0  # uncached prompt blocks of ours there without a first token yet


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The view a policy decides on; built by the router for one decision."""

    replicas: tuple[ReplicaView, ...]
    prompt_blocks: int  # how many block hashes the request has
    prompt_chars: int  # length of the request's prompt text
    block_chars: int  # characters per hashed block
    decisions: int  # decisions made so far by this router (round robin cursor)
    max_tokens: int = 0  # the request's max_tokens (0: not given)
    key_hash: int | None = None  # 64-bit hash of the consistent-hashing key, if any
    queued: int = 0  # requests waiting in this balancer's queue (this one included)


@dataclass(frozen=True, slots=True)
class Route:
    """Send the request to this local replica."""

    replica: str
    address: str
    reason: str = ""  # short label: "prefix", "least_load", "round_robin", "hash", ...


@dataclass(frozen=True, slots=True)
class Wait:
    """Keep the request queued at the balancer; decide again on the next event."""


@dataclass(frozen=True, slots=True)
class Reject:
    """Answer the client directly; nothing is sent upstream."""

    status: int
    outcome: Outcome
    message: str


Decision = Route | Wait | Reject


@dataclass(frozen=True, slots=True)
class PeerForward:
    """Send the request to peer region `region`: Envoy routes it by `cluster` (x-skylb-cluster)
    and passes `headers` (the signed forwarding marker) to the peer."""

    region: str
    cluster: str
    headers: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Dispatch:
    """An action the driver must perform: answer the stream of `request_id` with `decision`."""

    request_id: str
    decision: Route | Reject
    waited_s: float = 0.0  # time spent in the balancer's queue
    matched_fraction: float = 0.0  # share of the prompt the chosen replica already holds
