"""The systems compared: which balancers exist, where, with which policy, over which replicas.

| name | balancers | local policy (router.py) | pushing | cross-region |
|---|---|---|---|---|
| skylb | per region | `skylb` (predicted TTFT) | held when queue > hold_s | by predicted TTFT |
| skylb-paper | per region | `skylb_paper` (prefix) | selective | by prefix index |
| skylb-ch | per region, own replicas | `consistent_hash` | selective | spill by region ring |
| skylb-cost | per region | `skylb_paper` (prefix) | selective | by expected TTFT |
| region-local | per region, own replicas | `prefix_affinity` | blind | none |
| llm-d | per region, own replicas | `llm_d` (prefix 3 : queue 2 : kv 2) | blind | none |
| dynamo | per region, own replicas | `dynamo` (prefill + decode blocks) | blind | none |
| least-load | one, in the first region, all replicas | `least_load` | blind | via the one LB |
| round-robin | same | `round_robin` | blind | via the one LB |
| consistent-hash | same | `consistent_hash` | blind | via the one LB |
| sglang | same | `prefix_affinity` | blind | via the one LB |
| skylb-affinity (on request) | per region | `skylb_paper`, slack 1 | selective | by prefix |
| skylb-local (on request) | as skylb | `skylb` | as skylb | none (the ablation) |

`skylb` is the default policy and spill mode of the live server: per replica a predicted TTFT
(prefill backlog + engine queue + uncached prefill at the replica's learned speed, prior = its
profile), per peer the same plus the round trip (policy/skylb.py, region/predict.py). Its
prefix index is bounded by each replica's scraped KV size; the baselines keep theirs as their
authors do. `skylb-paper` is the paper's rule, kept for comparison.

`region-local` stands for the GKE/GIE-style per-region gateway: it scores replicas by prefix and
load and pushes at once (the gateway keeps no queue of its own), and never leaves its region.
The single-balancer baselines sit in the first region, as the paper's ran in us-east-2, so
clients of other regions pay the RTT to it and it pays the RTT to other regions' replicas.

`llm-d` and `dynamo` are deployed as their users deploy them: one picker (an llm-d EPP, a Dynamo
frontend with `--router-mode kv`) per region in front of that region's replicas, pushing at
once, with no notion of other regions.

The on-request systems run only when named in `--policies`: `skylb-ch` and `skylb-cost` (the
paper's rule with other spill modes), `skylb-affinity` (the paper's skylb, except that a
replica holding more than `cache_threshold` of the prompt also takes it with one request
pending: policy/skylb_paper.py), and `skylb-local` (`skylb` without spilling).

`skylb-cost` is an earlier extension (region/cost.py): the paper's local rule, spilling only
when a peer's expected TTFT (RTT + its queue wait + uncached prefill) beats waiting at home,
with hysteresis; its prefill speed is the profile's (1000 / prefill_k_ms tokens/s). Every
balancer is the core `region.balancer.RegionBalancer`, the one the live server runs; the
single-balancer baselines get one without peers, which is the Router unchanged.

Clients send `x-hash-key` = their conversation (prefix group), as the paper's clients send their
session; consistent hashing keys on it.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, TypeVar

from skylb_extproc.bench.regions import RttMatrix
from skylb_extproc.policy.base import make_policy
from skylb_extproc.region.balancer import RegionBalancer, Spill
from skylb_extproc.region.cost import CostModel, CostSettings
from skylb_extproc.region.peers import PeerTable
from skylb_extproc.region.spill import SpillPlanner, SpillSettings
from skylb_extproc.router import Router, RouterSettings
from skylb_extproc.sim.model import ReplicaEngine
from skylb_extproc.sim.profiles import Profile, speed_prior
from skylb_extproc.types import ReplicaSpec

__all__ = ["BENCH_ROUTER_SETTINGS", "POLICIES", "SYSTEMS", "System", "build_system"]

Mode = Literal["prefix", "hash", "cost", "predict"]
# name -> (router policy, its params, one balancer per region?, spill mode or None)
_TABLE: dict[str, tuple[str, dict[str, object], bool, Mode | None]] = {
    "skylb": ("skylb", {}, True, "predict"),
    "skylb-paper": ("skylb_paper", {}, True, "prefix"),
    "skylb-local": ("skylb", {}, True, None),
    "skylb-ch": ("consistent_hash", {"selective": True}, True, "hash"),
    "skylb-cost": ("skylb_paper", {}, True, "cost"),
    "region-local": ("prefix_affinity", {}, True, None),
    "least-load": ("least_load", {}, False, None),
    "round-robin": ("round_robin", {}, False, None),
    "consistent-hash": ("consistent_hash", {}, False, None),
    "sglang": ("prefix_affinity", {}, False, None),
    "llm-d": ("llm_d", {}, True, None),
    "dynamo": ("dynamo", {}, True, None),
    "skylb-affinity": ("skylb_paper", {"affinity_slack": 1}, True, "prefix"),
}
SYSTEMS: tuple[str, ...] = tuple(_TABLE)
# What runs unless --policies names others: every system but the on-request ones, the
# skylb-paper variants (ch, cost, affinity) and the no-spill ablation run when named.
ON_REQUEST = ("skylb-ch", "skylb-cost", "skylb-affinity", "skylb-local")
POLICIES: tuple[str, ...] = tuple(s for s in SYSTEMS if s not in ON_REQUEST)

# The live server's defaults except the queue bounds (confirm_on_headers stays off, as for vLLM,
# which sends response headers on accept). Waiting is part of the latency being measured, so
# the balancer's queue neither fills nor expires here (the live defaults, 1024 entries and 30 s,
# would turn an overload into 429/503 answers for the selective policies only).
BENCH_ROUTER_SETTINGS = RouterSettings(queue_max_length=1_000_000, queue_max_wait_s=1e9)


@dataclass
class System:
    """Balancers (by the region they run in), replicas, and who reaches what."""

    policy: str
    balancers: dict[str, RegionBalancer]
    replicas: dict[str, ReplicaEngine]
    replica_region: dict[str, str]
    scrapes: dict[str, list[str]]  # balancer region -> replicas it scrapes
    entry: dict[str, str]  # client region -> region of the balancer it talks to
    spills: bool
    rtt: RttMatrix
    model: str = ""
    peers: dict[str, list[str]] = field(default_factory=dict)  # balancer -> peers it polls


def _router(
    policy: str, params: dict[str, object], specs: Sequence[ReplicaSpec], seed: str,
    profile: Profile,
) -> Router:  # fmt: skip
    # The replicas' speed prior is their profile's (the live server learns it from /metrics).
    settings = replace(
        BENCH_ROUTER_SETTINGS,
        index_follows_kv=policy == "skylb",  # the baselines' indexes are as their authors'
        speed_prior=speed_prior(profile),
    )
    return Router(settings, specs, make_policy(policy, params), random.Random(seed))


def _regional_balancer(
    name: str, region: str, regions: Sequence[str], specs: list[ReplicaSpec], rtt: RttMatrix,
    seed: int, profile: Profile,
) -> RegionBalancer:  # fmt: skip
    policy, params, _, mode = _TABLE[name]
    router = _router(policy, params, specs, f"{seed}:{name}:{region}", profile)
    if mode is None:
        return RegionBalancer(region, router)
    planner = SpillPlanner(region, regions, SpillSettings(mode=mode))
    peers = PeerTable({p: rtt.one_way(region, p) for p in regions if p != region})
    cost = None
    if mode == "cost":
        cost = CostModel(CostSettings(prefill_tokens_per_s=1000.0 / profile.prefill_k_ms))
    return RegionBalancer(region, router, spill=Spill(peers, planner, cost))


def build_system(
    name: str,
    regions: Sequence[str],
    replicas_per_region: int | Mapping[str, int],
    profile: Profile | Mapping[str, Profile],
    rtt: RttMatrix,
    seed: int,
) -> System:
    """A fresh system (fresh replicas, empty caches) for policy `name`.

    `replicas_per_region` and `profile` are one value for every region or a mapping region ->
    value (a heterogeneous fleet; every profile must serve the same model)."""
    policy, params, per_region, mode = _TABLE[name]
    counts = _each(replicas_per_region, regions)
    profiles = _each(profile, regions)
    models = {p.model for p in profiles.values()}
    if len(models) != 1:
        raise ValueError(f"profiles of one system serve different models: {sorted(models)}")
    names = {r: [f"{r}-{i}" for i in range(counts[r])] for r in regions}
    engines = {n: ReplicaEngine(profiles[r], n) for r in regions for n in names[r]}
    where = {n: r for r in regions for n in names[r]}
    specs = {n: ReplicaSpec(n, f"{n}:8000", f"http://{n}:8000/metrics") for n in engines}
    model = models.pop()
    if not per_region:
        home = regions[0]
        seed_text = f"{seed}:{name}:{home}"
        router = _router(policy, params, list(specs.values()), seed_text, profiles[home])
        lb = RegionBalancer(home, router)
        entry = dict.fromkeys(regions, home)
        return System(name, {home: lb}, engines, where, {home: list(engines)}, entry, False,
                      rtt, model)  # fmt: skip
    balancers = {
        r: _regional_balancer(
            name, r, regions, [specs[n] for n in names[r]], rtt, seed, profiles[r]
        )
        for r in regions
    }
    polls = {r: [p for p in regions if p != r] for r in regions} if mode else {}
    return System(name, balancers, engines, where, dict(names), {r: r for r in regions},
                  mode is not None, rtt, model, polls)  # fmt: skip


_T = TypeVar("_T")


def _each(value: _T | Mapping[str, _T], regions: Sequence[str]) -> dict[str, _T]:
    """Region -> value from one value for all or a mapping (which must cover every region)."""
    if isinstance(value, Mapping):
        return {r: value[r] for r in regions}
    return dict.fromkeys(regions, value)
