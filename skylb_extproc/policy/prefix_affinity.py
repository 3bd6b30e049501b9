"""`prefix_affinity`: SGLang's cache-aware router — prefix affinity with blind pushing.

The baseline the SkyLB paper calls "SGLang router": every request is pushed to a HEALTHY replica
at once (no balancer-side waiting), so replicas queue internally.

Algorithm (sgl-project/sglang `sgl-router/src/policies/cache_aware.rs`):
  1. No healthy replica -> `Reject(503, NO_REPLICA)`.
  2. Imbalanced when both (max - min) > `balance_abs_threshold` and
     max > min * `balance_rel_threshold` over the healthy replicas' in-flight counts (the load
     SGLang's router counts itself) -> the least in-flight healthy replica. reason "balance".
  3. Else if the best prefix match covers more than `cache_threshold` of the prompt -> that
     replica (ties by fewest in-flight, then config order). reason "prefix".
  4. Else the least in-flight healthy replica (ties in config order). reason "least_load".
     Deviation: SGLang picks the replica with the smallest tree (most free cache) here; SkyLB's
     port of the same policy picks the least-loaded one, and so do we, so that the two prefix
     policies differ only in pushing and thresholds.

Parameters and defaults — SGLang router's command-line defaults (`RouterArgs` in
`sgl-router/py_src/sglang_router/router_args.py`: cache_threshold 0.3, balance_abs_threshold 64,
balance_rel_threshold 1.5; the Rust `CacheAwareConfig::default()` used only when embedding the
library differs: 0.5 / 32 / 1.1):
  `cache_threshold` float in [0, 1], default 0.3;
  `balance_abs_threshold` int >= 0, default 64;
  `balance_rel_threshold` float >= 0, default 1.5.
Reads: `ReplicaView.healthy`, `.matched_blocks`, `.in_flight`; `Snapshot.prompt_chars`,
`.block_chars`. Ignores `rng`.
Decisions: `Route` or `Reject`; never `Wait`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from skylb_extproc.policy.common import (
    ParamReader,
    best_match,
    least_loaded,
    matched_fraction,
    no_replica,
    route,
)
from skylb_extproc.types import Decision, RouteRequest, Snapshot

__all__ = ["PrefixAffinityPolicy", "create"]


class PrefixAffinityPolicy:
    """Cache-aware routing over healthy replicas with SGLang's imbalance override."""

    name = "prefix_affinity"
    lookahead = 0  # FIFO: only the head of the queue is decided
    waits = False
    pending_slack = 0

    def __init__(
        self,
        *,
        cache_threshold: float = 0.3,
        balance_abs_threshold: int = 64,
        balance_rel_threshold: float = 1.5,
    ) -> None:
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold

    def decide(self, request: RouteRequest, snapshot: Snapshot, rng: random.Random) -> Decision:
        healthy = [v for v in snapshot.replicas if v.healthy]
        least = least_loaded(healthy, snapshot.decisions)
        if least is None:
            return no_replica(self.name)
        highest = max(v.in_flight for v in healthy)
        lowest = least.in_flight
        if (
            highest - lowest > self.balance_abs_threshold
            and highest > lowest * self.balance_rel_threshold
        ):
            return route(least, "balance")
        best = best_match(healthy)
        if best is not None and matched_fraction(best, snapshot) > self.cache_threshold:
            return route(best, "prefix")
        return route(least, "least_load")


def create(params: Mapping[str, object]) -> PrefixAffinityPolicy:
    reader = ParamReader(params)
    policy = PrefixAffinityPolicy(
        cache_threshold=reader.number("cache_threshold", 0.3, low=0.0, high=1.0),
        balance_abs_threshold=reader.integer("balance_abs_threshold", 64, low=0),
        balance_rel_threshold=reader.number("balance_rel_threshold", 1.5, low=0.0),
    )
    reader.finish()
    return policy
