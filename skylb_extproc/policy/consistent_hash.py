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

The key is `snapshot.key_hash`, from `hashing.affinity_key` (the router and the region spill
both use it): the session header `x-hash-key` when the client sends one, as users of ring-hash
balancers key on a session id or cookie; else the chained hash of the prompt's first
`key_blocks` blocks, i.e. its first key_blocks x 64 characters (all its full blocks if it has
fewer). Why 16 blocks (1,024 characters, ~256 tokens): keying on the first block alone sent every
prompt opening with the same chat template or system prompt to one replica; 16 blocks reach past
a chat template and a short system prompt, so conversations spread, yet most prompts are longer
(shorter than 256 tokens: 13% of Azure's 2023 conversation trace, 25% of the Mooncake synthetic
trace; at 512 tokens it would be 40% and 28%), so a conversation's later turns keep its key and
its replica. Limits: conversations sharing a longer system prompt still share a key, and a
first turn shorter than 16 blocks keys on its whole text, so its second turn may move; clients
that can should send `x-hash-key`.

Parameters: `virtual_nodes` (int >= 1, default 1024: ring size over all replicas),
`selective` (bool, default False), `key_blocks` (int >= 1, default 16: prompt blocks the key
covers without a session header).
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

__all__ = ["DEFAULT_KEY_BLOCKS", "ConsistentHashPolicy", "build_ring", "create"]

DEFAULT_KEY_BLOCKS = 16


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

    def __init__(
        self,
        *,
        virtual_nodes: int = 1024,
        selective: bool = False,
        key_blocks: int = DEFAULT_KEY_BLOCKS,
    ) -> None:
        self.virtual_nodes = virtual_nodes
        self.selective = selective
        self.key_blocks = key_blocks  # read by the router, which derives snapshot.key_hash
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
        key_blocks=reader.integer("key_blocks", DEFAULT_KEY_BLOCKS, low=1),
    )
    reader.finish()
    return policy
