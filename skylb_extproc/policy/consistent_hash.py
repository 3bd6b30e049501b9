"""`consistent_hash`: a ring of virtual nodes keyed by session; SkyLB-CH when `selective`.

SkyLB's `ConsistentHashingPolicy` (ported from Envoy's ring_hash): xxh64 (seed 0) ring points
f"{name}{i}" for i in range(ceil(virtual_nodes / n)) per replica — 1024 points in total for equal
weights, as Envoy's minimum ring size gives. The ring covers every configured replica, so a
replica that turns unhealthy moves only its own keys, and they come back when it recovers.

Algorithm:
  1. eligible = AVAILABLE replicas if `selective` else HEALTHY replicas.
  2. None eligible -> `Wait` if `selective` (SkyLB-CH's local step: the request waits at the
     balancer), else `Reject(503, NO_REPLICA)`.
  3. No key (`snapshot.key_hash` is None) -> the least in-flight eligible replica, as SkyLB does
     without an `x-hash-key` header. reason "least_load".
  4. Else bisect the ring to the first point >= key, walk clockwise (wrapping) to the first
     point whose replica is eligible. reason "hash".

The key is `snapshot.key_hash`: the router derives it from `RouteRequest.hash_key` (the
`x-hash-key` header), else from the first block hash of the prompt, i.e. the conversation's
opening characters. Caveat of the fallback: prompts that open with the same long system prompt
share that key and land on one replica; send `x-hash-key` to spread sessions.

Parameters: `virtual_nodes` (int >= 1, default 1024: ring size over all replicas),
`selective` (bool, default False).
Reads: `ReplicaView.name`, `.healthy`/`.available`, `.in_flight`; `Snapshot.key_hash`.
Ignores `rng`.
Decisions: `Route`; `Wait` only when `selective`; `Reject` only when not `selective`.
"""

from __future__ import annotations

import bisect
import functools
import random
from collections.abc import Mapping

from skylb_extproc.hashing import key_hash
from skylb_extproc.policy.common import ParamReader, least_loaded, no_replica, route
from skylb_extproc.types import Decision, RouteRequest, Snapshot, Wait

__all__ = ["ConsistentHashPolicy", "build_ring", "create"]


@functools.lru_cache(maxsize=64)
def build_ring(
    names: tuple[str, ...], virtual_nodes: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(sorted ring points, index into `names` owning each point); memoised per replica set."""
    if not names:
        return (), ()
    per_target = -(-virtual_nodes // len(names))  # ceil
    points = sorted(
        (key_hash(f"{name}{i}"), owner)
        for owner, name in enumerate(names)
        for i in range(per_target)
    )
    return tuple(p for p, _ in points), tuple(o for _, o in points)


class ConsistentHashPolicy:
    """Ring hash over configured replicas, skipping ineligible ones clockwise."""

    name = "consistent_hash"
    lookahead = 0  # FIFO: only the head of the queue is decided
    pending_slack = 0

    def __init__(self, *, virtual_nodes: int = 1024, selective: bool = False) -> None:
        self.virtual_nodes = virtual_nodes
        self.selective = selective
        self.waits = selective

    def decide(self, request: RouteRequest, snapshot: Snapshot, rng: random.Random) -> Decision:
        views = snapshot.replicas
        eligible = [v.available if self.selective else v.healthy for v in views]
        if not any(eligible):
            return Wait() if self.selective else no_replica(self.name)
        if snapshot.key_hash is None:
            chosen = least_loaded(
                (v for v, ok in zip(views, eligible, strict=True) if ok), snapshot.decisions
            )
            assert chosen is not None  # some replica is eligible
            return route(chosen, "least_load")
        points, owners = build_ring(tuple(v.name for v in views), self.virtual_nodes)
        start = bisect.bisect_left(points, snapshot.key_hash)
        for step in range(len(points)):
            owner = owners[(start + step) % len(points)]
            if eligible[owner]:
                return route(views[owner], "hash")
        raise AssertionError("every replica owns ring points, so an eligible one is reached")


def create(params: Mapping[str, object]) -> ConsistentHashPolicy:
    reader = ParamReader(params)
    policy = ConsistentHashPolicy(
        virtual_nodes=reader.integer("virtual_nodes", 1024, low=1),
        selective=reader.flag("selective", False),
    )
    reader.finish()
    return policy
