"""`skylb`: predicted time to first token — the default policy.

For every healthy replica r the request's TTFT there is predicted as

    ttft(r) = backlog_s(r) + admit_wait_s(r) + uncached_tokens(r) / prefill_tokens_per_s(r)

- `backlog_s`: prefill this balancer sent r that has not finished yet (a FIFO server of prefill
  seconds, state/load.py);
- `admit_wait_s`: the engine's own queue: requests r cannot admit now (KV blocks or batch slots,
  scraped and projected) x r's recent seconds between finishes;
- `uncached_tokens`: the prompt minus the prefix r holds (the prefix index), at r's prefill speed,
  learned from its metrics with the profile as prior (state/load.py). A cache hit is cheap
  prefill, not a rule: a busy holder of the conversation keeps it while its queue costs less than
  prefilling elsewhere, and loses it when it does not — where SkyLB's availability gate dropped
  the holder whenever it had one request waiting.

The request goes to the smallest prediction, counting one more cost a TTFT does not show: a
prefix prefilled on a replica whose cache is full evicts about as much of other prefixes, which
their next requests pay for in proportion to how much the cache is reused. So the prefill term
is weighted by 1 + `eviction_weight` x the replica's cache fill (its prefix index's occupancy,
bounded by its KV cache) x its recent cache hit rate (engine counters). Without it the holder of
a prefix lost to an idle replica whenever one queued request cost as much as a full prefill
(fast engines, short prompts), and the prefix was copied, evicting another: through two real
vLLM replicas whose caches held 0.75x the prefixes (vLLM's bench serve, docs/benchmarks.md)
the engines' hit rate was 0.75 against 0.86 for SGLang's policy, and 0.86 with this term
(0.5). Ties: more matched blocks, fewer in flight, then a rotation so that an idle pool spreads
new conversations. It is held at the balancer (`Wait`)
when that replica's queueing part (backlog + admit wait) exceeds `hold_s`: pushed, it would only
wait in that replica's queue, where it can no longer take whichever replica frees first, nor be
spilled to another region (the region balancer's spill compares the same prediction with the
peers'). Selective pushing is a consequence: an engine that cannot admit has admit_wait > 0.

Saturated (more than `saturated_queue` requests per healthy replica wait at the balancer), the
bound is `saturated_hold_s` instead: everyone waits anyway and throughput decides, so engines
get enough queued work to keep their batches full. Measured on the Mooncake trace at 8x (far
past capacity): TTFT P90 73 s with a 1 s bound, 65 s with this rule, 72 s pushing at once.

Held requests are decided again on every event; the router considers the first `lookahead`
waiting requests, oldest first, so one held head does not block a request whose best replica
has room (a head waiting longer than the router's bypass limit stops this: no starvation).

Parameters (defaults measured in docs/benchmarks.md): `hold_s` (float >= 0, default 1.0),
`lookahead` (int >= 0, default 8), `saturated_queue` (float >= 0, default 4.0),
`saturated_hold_s` (float >= 0, default 5.0), `eviction_weight` (float >= 0, default 0.5).
Reads: `ReplicaView.healthy`, `.matched_blocks`, `.in_flight`, `.prefill_tokens_per_s`,
`.backlog_s`, `.admit_wait_s`, `.kv_free_tokens`, `.finish_interval_s`, `.cache_fill`,
`.cache_hit_rate`;
`Snapshot.prompt_chars`,
`.block_chars`, `.max_tokens`, `.decisions`, `.queued`. Ignores
`rng`. Decisions: `Route` or `Wait`; never `Reject` (the router and the region balancer answer
when no replica is healthy).
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from skylb_extproc.policy.common import (
    ParamReader,
    kv_tokens,
    prefill_seconds,
    queue_seconds,
    route,
)
from skylb_extproc.types import Decision, ReplicaView, RouteRequest, Snapshot, Wait

__all__ = ["SkyLBPolicy", "create"]

# Any healthy replica may take a request (the prediction, not the pending count, decides).
ANY_PENDING = 1 << 30


class SkyLBPolicy:
    """The healthy replica with the lowest predicted TTFT; held when its queue is long."""

    name = "skylb"
    waits = True
    pending_slack = ANY_PENDING

    def __init__(
        self,
        *,
        hold_s: float = 1.0,
        lookahead: int = 8,
        saturated_queue: float = 4.0,
        saturated_hold_s: float = 5.0,
        eviction_weight: float = 0.5,
    ) -> None:
        self.hold_s = hold_s
        self.lookahead = lookahead
        self.saturated_queue = saturated_queue
        self.saturated_hold_s = saturated_hold_s
        self.eviction_weight = eviction_weight

    def decide(self, request: RouteRequest, snapshot: Snapshot, rng: random.Random) -> Decision:
        healthy = [v for v in snapshot.replicas if v.healthy]
        if not healthy:
            return Wait()
        n = len(healthy)
        rotation = snapshot.decisions % n
        tokens = kv_tokens(snapshot.prompt_chars, snapshot.max_tokens)

        def cost(v: ReplicaView) -> float:
            evicts = 1.0 + self.eviction_weight * v.cache_fill * v.cache_hit_rate
            return queue_seconds(v, tokens) + prefill_seconds(v, snapshot) * evicts

        best = min(
            range(n),
            key=lambda i: (
                cost(healthy[i]),
                -healthy[i].matched_blocks,
                healthy[i].in_flight,
                (i - rotation) % n,
            ),
        )
        chosen = healthy[best]
        # Held on the replica's queue alone: a request that merely does not fit yet would be
        # jumped by every smaller one behind it, and starve.
        hold = self.hold_s
        if snapshot.queued > self.saturated_queue * n:
            hold = self.saturated_hold_s
        if queue_seconds(chosen) > hold:
            return Wait()
        return route(chosen, "prefix" if chosen.matched_blocks else "predicted")


def create(params: Mapping[str, object]) -> SkyLBPolicy:
    reader = ParamReader(params)
    policy = SkyLBPolicy(
        hold_s=reader.number("hold_s", 1.0, low=0.0),
        lookahead=reader.integer("lookahead", 8, low=0),
        saturated_queue=reader.number("saturated_queue", 4.0, low=0.0),
        saturated_hold_s=reader.number("saturated_hold_s", 5.0, low=0.0),
        eviction_weight=reader.number("eviction_weight", 0.5, low=0.0),
    )
    reader.finish()
    return policy
