"""`llm_d`: the llm-d router's (Gateway API Inference Extension EPP's) default scheduling profile.

Read from llm-d/llm-d-inference-scheduler (now llm-d/llm-d-router; the EPP left
kubernetes-sigs/gateway-api-inference-extension, whose README points there) at 520af47, May 2026:
- `pkg/epp/config/loader/defaults.go` `loadDefaultConfig`: one profile "default" with
  `queue-scorer` weight 2, `kv-cache-utilization-scorer` weight 2, `prefix-cache-scorer`
  weight 3; `ensureSchedulingLayer` adds the `max-score-picker` (the Helm chart's
  `config/charts/epplib/templates/_config.yaml` profile is the same). No filter.
- `pkg/epp/scheduling/scheduler_profile.go` `runScorerPlugins`: score = sum of weight x
  clamp(scorer score, 0, 1).
- `scorer/queuedepth/queue.go`: (max - waiting) / (max - min) of the candidates' scraped
  `vllm:num_requests_waiting`; 1.0 for all when max == min.
- `scorer/kvcacheutilization/kvcache_utilization.go`: 1 - `vllm:kv_cache_usage_perc` (0..1).
- `scorer/prefix/plugin.go`: matched blocks / total blocks of the request (0 when it has none);
  `requestcontrol/dataproducer/approximateprefix/types.go`: blocks of 16 tokens (our 64
  characters at 4 characters a token), at most `defaultMaxPrefixBlocks` = 256 blocks matched.
- `picker/maxscore/picker.go`: shuffle the candidates, then a stable sort by score, take the
  first: the highest score, ties uniformly at random.

Algorithm:
  1. candidates = HEALTHY replicas; none -> `Reject(503, NO_REPLICA)`.
  2. total = min(prompt_blocks, max_prefix_blocks); prefix = min(matched, total) / total.
  3. score = queue_weight x queue + kv_weight x (1 - kv_usage) + prefix_weight x prefix.
  4. Route to a highest-score replica, ties drawn with `rng`. reason "score".

Deviations, each forced by the shared core: the prefix match comes from the router's prefix
index (longest prefix per replica, TTL 600 s, 200k blocks a replica) where llm-d keeps its own
per-server LRU of 31,250 blocks without TTL and counts, per server, the blocks it holds along
the leading run any server holds; scraped gauges are as fresh as the driver's scrapes (llm-d
scrapes every 50 ms). llm-d's flow control (off by default) and saturation detector (sheds only
negative-priority requests) are not modelled: the picker pushes at once.

Parameters (defaults = the source's): `queue_weight` 2, `kv_weight` 2, `prefix_weight` 3
(numbers >= 0), `max_prefix_blocks` (int >= 1) 256.
Reads: `ReplicaView.healthy`, `.waiting`, `.kv_usage`, `.matched_blocks`;
`Snapshot.prompt_blocks`. Uses `rng` for ties only.
Decisions: `Route` or `Reject`; never `Wait`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from skylb_extproc.policy.common import ParamReader, no_replica, route
from skylb_extproc.types import Decision, ReplicaView, RouteRequest, Snapshot

__all__ = ["LlmDPolicy", "create", "scores"]


def _clamp(score: float) -> float:
    """scheduler_profile.go enforceScoreRange: every scorer's output is clamped to [0, 1]."""
    return min(1.0, max(0.0, score))


def _queue_scores(views: Sequence[ReplicaView]) -> list[float]:
    low = min(v.waiting for v in views)
    high = max(v.waiting for v in views)
    if high == low:
        return [1.0] * len(views)
    return [(high - v.waiting) / (high - low) for v in views]


def scores(
    views: Sequence[ReplicaView],
    prompt_blocks: int,
    weights: tuple[float, float, float],
    max_prefix_blocks: int,
) -> list[float]:
    """The weighted score of each of `views` (queue, kv, prefix weights), as the profile sums."""
    queue_w, kv_w, prefix_w = weights
    total = min(prompt_blocks, max_prefix_blocks)
    out: list[float] = []
    for view, queue in zip(views, _queue_scores(views), strict=True):
        prefix = min(view.matched_blocks, total) / total if total > 0 else 0.0
        out.append(queue_w * _clamp(queue) + kv_w * _clamp(1.0 - view.kv_usage) + prefix_w * prefix)
    return out


class LlmDPolicy:
    """Weighted queue / KV-utilization / prefix scorers and a max-score picker."""

    name = "llm_d"
    lookahead = 0  # FIFO: only the head of the queue is decided
    waits = False
    pending_slack = 0

    def __init__(
        self,
        *,
        queue_weight: float = 2.0,
        kv_weight: float = 2.0,
        prefix_weight: float = 3.0,
        max_prefix_blocks: int = 256,
    ) -> None:
        self.weights = (queue_weight, kv_weight, prefix_weight)
        self.max_prefix_blocks = max_prefix_blocks

    def decide(self, request: RouteRequest, snapshot: Snapshot, rng: random.Random) -> Decision:
        healthy = [v for v in snapshot.replicas if v.healthy]
        if not healthy:
            return no_replica(self.name)
        scored = scores(healthy, snapshot.prompt_blocks, self.weights, self.max_prefix_blocks)
        best = max(scored)
        ties = [v for v, s in zip(healthy, scored, strict=True) if s == best]
        return route(ties[rng.randrange(len(ties))] if len(ties) > 1 else ties[0], "score")


def create(params: Mapping[str, object]) -> LlmDPolicy:
    reader = ParamReader(params)
    policy = LlmDPolicy(
        queue_weight=reader.number("queue_weight", 2.0, low=0.0),
        kv_weight=reader.number("kv_weight", 2.0, low=0.0),
        prefix_weight=reader.number("prefix_weight", 3.0, low=0.0),
        max_prefix_blocks=reader.integer("max_prefix_blocks", 256, low=1),
    )
    reader.finish()
    return policy
