"""The routing-policy protocol and the registry that builds a policy from configuration.

A policy is a pure decision: `decide(request, snapshot, rng) -> Route | Wait | Reject`. It records
nothing (the router counts dispatches and fills the prefix index), so the live server and the
virtual-time evaluator get the same answers from the same snapshots.

`waits` tells the router whether a policy practises selective pushing: True means it decides
among *available* replicas and may return `Wait` (the request stays in the balancer's queue);
False means it pushes to a healthy replica at once and returns `Reject` when there is none.

Each policy module opens with its algorithm, parameters with defaults, what it reads and the
decisions it may return. `make_policy` validates `policy.params`: an unknown or ill-typed
parameter raises `ConfigError("policy.params.<key>", ...)`; an unknown name names `policy.name`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Protocol

from skylb_extproc.errors import ConfigError
from skylb_extproc.policy import (
    consistent_hash,
    dynamo,
    least_load,
    llm_d,
    prefix_affinity,
    round_robin,
    skylb,
    skylb_paper,
)
from skylb_extproc.types import Decision, RouteRequest, Snapshot

__all__ = ["DEFAULT_POLICY", "POLICY_NAMES", "RoutingPolicy", "make_policy"]


class RoutingPolicy(Protocol):
    """Chooses where one request goes, from a snapshot of the replicas."""

    name: str
    waits: bool  # True: selective pushing (decides among *available* replicas, may return Wait)
    # A waiting policy may also route to a healthy replica with up to this many pending
    # requests (the router's "nothing available" shortcut must not skip it); 0 = available only.
    pending_slack: int
    # How many waiting requests, oldest first, the router offers it per poll (0: the head only).
    lookahead: int

    def decide(self, request: RouteRequest, snapshot: Snapshot, rng: random.Random) -> Decision:
        """Route, Wait or Reject; must not mutate anything."""
        ...


_FACTORIES: dict[str, Callable[[Mapping[str, object]], RoutingPolicy]] = {
    "skylb": skylb.create,
    "skylb_paper": skylb_paper.create,
    "prefix_affinity": prefix_affinity.create,
    "least_load": least_load.create,
    "round_robin": round_robin.create,
    "consistent_hash": consistent_hash.create,
    "llm_d": llm_d.create,
    "dynamo": dynamo.create,
}

DEFAULT_POLICY = "skylb"
POLICY_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def make_policy(name: str, params: Mapping[str, object]) -> RoutingPolicy:
    """Build the policy `name` with validated `params` (ConfigError names the bad key)."""
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ConfigError(
            "policy.name", f"unknown policy {name!r}; one of {', '.join(POLICY_NAMES)}"
        )
    return factory(params)
