"""`skylb_paper`: SkyLB's local step as the paper has it — selective pushing with prefix affinity.

The default until the predictive `skylb` policy replaced it (docs/benchmarks.md keeps both).

Algorithm (SkyLB paper §3.3 + its `PrefixTreePolicy`, as evaluated in the final config):
  1. Candidates are the AVAILABLE replicas: healthy and without a pending request (the engine
     can still batch more). None available -> `Wait`: the request stays in the balancer's FIFO
     queue and is decided again on the next event (scrape, start, finish, timer). It is never
     rejected here; the queue's deadline bounds the wait (503 DEADLINE).
  2. If the best prefix match among candidates covers more than `cache_threshold` of the prompt
     (matched_blocks * block_chars / prompt_chars, strictly greater, as SkyLB/SGLang) -> the
     best-matching candidate; ties by fewest in-flight, then config order. reason "prefix".
     With `affinity_slack` k > 0 (ours, not the paper's), a healthy replica with at most k
     pending requests is a candidate for this step too, though not available (on equal matches
     an available one goes first): a long prompt whose prefix it holds costs it little, where
     another replica would prefill it all.
  3. Else the least in-flight candidate (ties rotate with the decision count, so new
     conversations on an idle pool spread instead of all starting on the first replica): a low
     match is the moment to explore an under-used replica (paper §5.1). reason "least_load".

There is no load-imbalance override: SkyLB enables it only for its blind-pushing variants, and
selective pushing already keeps every replica at its own capacity.

Parameters: `cache_threshold` (float in [0, 1], default 0.5 — SkyLB's `PrefixTreeConfig`);
`affinity_slack` (int >= 0, default 0 = the paper's rule; docs/benchmarks.md measures 1).
Reads: `ReplicaView.available`, `.healthy`, `.pending`, `.matched_blocks`, `.in_flight`;
`Snapshot.prompt_chars`,
`.block_chars`. Ignores `rng` (ties are deterministic).
Decisions: `Route` or `Wait`; never `Reject`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from skylb_extproc.policy.common import (
    ParamReader,
    least_loaded,
    matched_fraction,
    route,
)
from skylb_extproc.types import Decision, RouteRequest, Snapshot, Wait

__all__ = ["SkyLBPaperPolicy", "create"]


class SkyLBPaperPolicy:
    """Prefix affinity among available replicas; waits when none is available."""

    name = "skylb_paper"
    waits = True
    lookahead = 0

    def __init__(self, *, cache_threshold: float = 0.5, affinity_slack: int = 0) -> None:
        self.cache_threshold = cache_threshold
        self.pending_slack = affinity_slack

    def decide(self, request: RouteRequest, snapshot: Snapshot, rng: random.Random) -> Decision:
        candidates = [v for v in snapshot.replicas if v.available]
        slack = self.pending_slack
        holders = [
            v for v in snapshot.replicas if v.available or (v.healthy and v.pending <= slack)
        ]
        # Most matched blocks; on a tie an available replica, then fewest in flight (with no
        # slack every holder is available: common.best_match's order).
        best = min(
            (v for v in holders if v.matched_blocks > 0),
            key=lambda v: (-v.matched_blocks, not v.available, v.in_flight),
            default=None,
        )
        if best is not None and matched_fraction(best, snapshot) > self.cache_threshold:
            return route(best, "prefix")
        if not candidates:
            return Wait()
        chosen = least_loaded(candidates, snapshot.decisions)
        assert chosen is not None  # candidates is not empty
        return route(chosen, "least_load")


def create(params: Mapping[str, object]) -> SkyLBPaperPolicy:
    reader = ParamReader(params)
    policy = SkyLBPaperPolicy(
        cache_threshold=reader.number("cache_threshold", 0.5, low=0.0, high=1.0),
        affinity_slack=reader.integer("affinity_slack", 0, low=0),
    )
    reader.finish()
    return policy
