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

The request goes to the smallest prediction (ties: more matched blocks, fewer in flight, then a
rotation so that an idle pool spreads new conversations). It is held at the balancer (`Wait`)
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
`saturated_hold_s` (float >= 0, default 5.0).
Reads: `ReplicaView.healthy`, `.matched_blocks`, `.in_flight`, `.prefill_tokens_per_s`,
`.backlog_s`, `.admit_wait_s`, `.kv_free_tokens`, `.finish_interval_s`; `Snapshot.prompt_chars`,
`.block_chars`, `.max_tokens`, `.decisions`, `.queued`. Ignores
`rng`. Decisions: `Route` or `Wait`; never `Reject` (the router and the region balancer answer
when no replica is healthy).
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from skylb_extproc.policy.common import (
    ParamReader,
    predicted_ttft,
    queue_seconds,
    route,
)
from skylb_extproc.types import Decision, RouteRequest, Snapshot, Wait

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
    ) -> None:
        self.hold_s = hold_s
        self.lookahead = lookahead
        self.saturated_queue = saturated_queue
        self.saturated_hold_s = saturated_hold_s

    def decide(self, request: RouteRequest, snapshot: Snapshot, rng: random.Random) -> Decision:
        healthy = [v for v in snapshot.replicas if v.healthy]
        if not healthy:
            return Wait()
        n = len(healthy)
        rotation = snapshot.decisions % n
        best = min(
            range(n),
            key=lambda i: (
                predicted_ttft(healthy[i], snapshot),
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
    )
    reader.finish()
    return policy
