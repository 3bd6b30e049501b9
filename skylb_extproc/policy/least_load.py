"""`least_load`: fewest in-flight requests among healthy replicas, pushed at once.

The SkyLB paper's "least load" baseline (SkyLB's `LeastLoadPolicy`): the load is the number of
requests this balancer has sent to a replica and not seen finish, which it knows exactly because
every request passes through it.

Algorithm: among HEALTHY replicas, the one with the fewest in-flight requests; ties in config
order. No healthy replica -> `Reject(503, NO_REPLICA)`.
Parameters: none.
Reads: `ReplicaView.healthy`, `.in_flight`. Ignores `rng`.
Decisions: `Route` (reason "least_load") or `Reject`; never `Wait`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from skylb_extproc.policy.common import ParamReader, least_loaded, no_replica, route
from skylb_extproc.types import Decision, RouteRequest, Snapshot

__all__ = ["LeastLoadPolicy", "create"]


class LeastLoadPolicy:
    """Fewest in-flight healthy replica."""

    name = "least_load"
    lookahead = 0  # FIFO: only the head of the queue is decided
    waits = False
    pending_slack = 0

    def decide(self, request: RouteRequest, snapshot: Snapshot, rng: random.Random) -> Decision:
        chosen = least_loaded((v for v in snapshot.replicas if v.healthy), snapshot.decisions)
        if chosen is None:
            return no_replica(self.name)
        return route(chosen, "least_load")


def create(params: Mapping[str, object]) -> LeastLoadPolicy:
    ParamReader(params).finish()
    return LeastLoadPolicy()
