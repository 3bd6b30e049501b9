"""`round_robin`: healthy replicas in turn, pushed at once.

The SkyLB paper's round-robin baseline. The policy keeps no state: the cursor is
`snapshot.decisions` (how many requests this router has routed so far), so the same sequence of
snapshots always yields the same sequence of choices, in the live server and in the evaluator.

Algorithm: healthy = HEALTHY replicas in config order; choose
healthy[snapshot.decisions % len(healthy)]. When the healthy set changes the rotation continues
over the new set from the same counter (no replica is skipped twice in a row for long).
No healthy replica -> `Reject(503, NO_REPLICA)`.
Parameters: none.
Reads: `ReplicaView.healthy`; `Snapshot.decisions`. Ignores `rng`.
Decisions: `Route` (reason "round_robin") or `Reject`; never `Wait`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from skylb_extproc.policy.common import ParamReader, no_replica, route
from skylb_extproc.types import Decision, RouteRequest, Snapshot

__all__ = ["RoundRobinPolicy", "create"]


class RoundRobinPolicy:
    """Healthy replicas in turn, the cursor being the router's decision count."""

    name = "round_robin"
    lookahead = 0  # FIFO: only the head of the queue is decided
    waits = False
    pending_slack = 0

    def decide(self, request: RouteRequest, snapshot: Snapshot, rng: random.Random) -> Decision:
        healthy = [v for v in snapshot.replicas if v.healthy]
        if not healthy:
            return no_replica(self.name)
        return route(healthy[snapshot.decisions % len(healthy)], "round_robin")


def create(params: Mapping[str, object]) -> RoundRobinPolicy:
    ParamReader(params).finish()
    return RoundRobinPolicy()
