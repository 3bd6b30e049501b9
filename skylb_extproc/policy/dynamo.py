"""`dynamo`: NVIDIA Dynamo's KV-aware router (`--router-mode kv`), cost = prefill + decode blocks.

Read from ai-dynamo/dynamo: the long-standing `DefaultWorkerSelector` of
`lib/llm/src/kv_router/scheduler.rs` and its current form in
`lib/kv-router/src/scheduling/selector/default.rs`, with the per-worker bookkeeping of
`ActiveSequences` (`lib/llm/src/kv_router/sequence.rs`, now `lib/kv-router/src/sequences/`):
  prefill_blocks(w) = (active prefill tokens on w + isl - overlap(w) x block_size) / block_size
  decode_blocks(w)  = active blocks on w + request blocks not among them
  cost(w) = overlap_score_weight x prefill_blocks(w) + decode_blocks(w)       (lower wins)
Active blocks are the distinct block hashes of the requests this router sent to w and that have
not finished; active prefill tokens are the uncached prompt tokens of those without a first
token yet (`mark_prefill_completed`). Defaults (`KvRouterConfig::default()`):
`overlap_score_weight` 1.0 (now `prefill_load_scale` 1.0 with `overlap_score_credit` 1.0, the
same cost), `router_temperature` 0.0: the minimum cost, ties uniformly at random
(`minimum_cost_index`); above 0, softmax sampling over min-max-normalised costs:
p(w) ~ exp(-(cost(w) - min) / ((max - min) x temperature)), uniform when all are equal.
Off by default and not modelled: output-block tracking, host/disk cache credits, the overlap
credit decay, the active-request weight (0.0).

Units: blocks of our 64 characters (~16 tokens, vLLM's block). This request's uncached prompt
is prompt_chars / block_chars - matched (the trailing partial block included, as isl is).
The router's own bookkeeping is the core's: `LoadTracker` counts, per replica, the prompt block
hashes of our in-flight requests (`active_blocks`, and `active_overlap_blocks` of this request)
and the uncached prompt blocks of those with no first token yet (`prefill_blocks`).

Deviations: the overlap is the core's approximate prefix index (what Dynamo does with
`--no-kv-events`, its ApproxKvIndexer, TTL 120 s; ours 600 s) where Dynamo by default follows
the engines' KV events. Dynamo's router queue (`router_queue_threshold` 16.0: hold requests
while every worker's active prefill exceeds 16 x max_num_batched_tokens) is not modelled: it
pushes at once.

Algorithm:
  1. candidates = HEALTHY replicas; none -> `Reject(503, NO_REPLICA)`.
  2. cost as above; temperature 0 -> a minimum-cost replica, ties drawn with `rng`; else sample.
     reason "cost".
Parameters: `overlap_score_weight` (number >= 0, default 1.0), `router_temperature`
(number >= 0, default 0.0).
Reads: `ReplicaView.healthy`, `.matched_blocks`, `.active_blocks`, `.active_overlap_blocks`,
`.prefill_blocks`; `Snapshot.prompt_blocks`, `.prompt_chars`, `.block_chars`.
Decisions: `Route` or `Reject`; never `Wait`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

from skylb_extproc.policy.common import ParamReader, no_replica, route
from skylb_extproc.types import Decision, ReplicaView, RouteRequest, Snapshot

__all__ = ["DynamoPolicy", "cost", "create"]


def cost(view: ReplicaView, snapshot: Snapshot, overlap_score_weight: float) -> float:
    """Dynamo's logit of sending this request to `view`, in blocks (lower is better)."""
    isl_blocks = snapshot.prompt_chars / snapshot.block_chars if snapshot.block_chars else 0.0
    prefill = view.prefill_blocks + max(0.0, isl_blocks - view.matched_blocks)
    decode = view.active_blocks + snapshot.prompt_blocks - view.active_overlap_blocks
    return overlap_score_weight * prefill + decode


def _sample(costs: Sequence[float], temperature: float, draw: float) -> int:
    """selector/default.rs softmax_sample_index: the row `draw` (uniform in [0, 1)) lands on."""
    low, high = min(costs), max(costs)
    if low == high:
        weights = [1.0] * len(costs)
    else:
        scale = 1.0 / ((high - low) * temperature)
        weights = [math.exp(-(c - low) * scale) for c in costs]
    total = sum(weights)
    cumulative = 0.0
    for row, weight in enumerate(weights):
        cumulative += weight / total
        if draw <= cumulative:
            return row
    return len(costs) - 1


class DynamoPolicy:
    """Least (overlap-weighted prefill + decode) blocks over healthy replicas."""

    name = "dynamo"
    lookahead = 0  # FIFO: only the head of the queue is decided
    reads_active_blocks = True  # the router counts our in-flight blocks per replica for it
    waits = False
    pending_slack = 0

    def __init__(
        self, *, overlap_score_weight: float = 1.0, router_temperature: float = 0.0
    ) -> None:
        self.overlap_score_weight = overlap_score_weight
        self.router_temperature = router_temperature

    def decide(self, request: RouteRequest, snapshot: Snapshot, rng: random.Random) -> Decision:
        healthy = [v for v in snapshot.replicas if v.healthy]
        if not healthy:
            return no_replica(self.name)
        costs = [cost(v, snapshot, self.overlap_score_weight) for v in healthy]
        if self.router_temperature > 0:
            return route(healthy[_sample(costs, self.router_temperature, rng.random())], "cost")
        best = min(costs)
        ties = [v for v, c in zip(healthy, costs, strict=True) if c == best]
        return route(ties[rng.randrange(len(ties))] if len(ties) > 1 else ties[0], "cost")


def create(params: Mapping[str, object]) -> DynamoPolicy:
    reader = ParamReader(params)
    policy = DynamoPolicy(
        overlap_score_weight=reader.number("overlap_score_weight", 1.0, low=0.0),
        router_temperature=reader.number("router_temperature", 0.0, low=0.0),
    )
    reader.finish()
    return policy
