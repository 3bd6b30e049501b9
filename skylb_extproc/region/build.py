"""Config -> the core of one region: Router, and with peers the spill planner, peer table,
cost model and residency rules, wrapped in a `RegionBalancer`. Pure: the secret and the clocks
belong to the server (`server/app.py`)."""

from __future__ import annotations

import random
from typing import Literal

from skylb_extproc.config import Config
from skylb_extproc.policy.base import make_policy
from skylb_extproc.region.balancer import RegionBalancer, Residency, Spill
from skylb_extproc.region.cost import CostModel, CostSettings
from skylb_extproc.region.peers import PeerTable
from skylb_extproc.region.spill import SpillPlanner, SpillSettings
from skylb_extproc.router import Router

__all__ = ["build_balancer", "build_router"]

_MODES: dict[str, Literal["prefix", "hash", "cost", "predict"]] = {
    "prefix": "prefix",
    "hash": "hash",
    "cost": "cost",
    "predict": "predict",
}


def build_router(config: Config) -> Router:
    policy = make_policy(config.policy.name, config.policy.params)
    return Router(config.router_settings(), config.replicas, policy, random.Random(config.seed))


def build_balancer(config: Config) -> RegionBalancer:
    """Without peers: the Router alone (one-region behaviour, unchanged)."""
    router = build_router(config)
    if not config.peers:
        return RegionBalancer(config.region, router)
    return RegionBalancer(
        config.region,
        router,
        spill=_spill(config),
        residency=_residency(config),
        rate_window_s=config.spill.cost.rate_window_s,
    )


def _spill(config: Config) -> Spill:
    s = config.spill
    # The core keeps one-way delays; rtt_ms is a round trip. Unknown = 0 until measured.
    table = PeerTable(
        {p.name: (p.rtt_ms or 0.0) / 2000.0 for p in config.peers}, stale_after_s=s.stale_after_s
    )
    settings = SpillSettings(
        mode=_MODES[s.mode],
        tau=s.tau,
        cache_threshold=s.cache_threshold,
        index_blocks_per_region=config.prefix.max_blocks_per_replica,
        index_ttl_s=config.prefix.ttl_s,
    )
    regions = [config.region, *(p.name for p in config.peers)]
    cost = None
    if s.mode == "cost":
        c = s.cost
        cost = CostModel(
            CostSettings(
                margin_s=c.margin_s,
                prefill_tokens_per_s=c.prefill_tokens_per_s,
                chars_per_token=c.chars_per_token,
                max_wait_s=config.queue.max_wait_s,
            )
        )
    planner = SpillPlanner(config.region, regions, settings)
    return Spill(table, planner, cost, margin_s=s.cost.margin_s, max_wait_s=config.queue.max_wait_s)


def _residency(config: Config) -> Residency:
    r = config.residency
    allowed = None if r.allowed_regions is None else frozenset(r.allowed_regions)
    return Residency(allowed, {name: frozenset(rs) for name, rs in r.tenants.items()})
