"""Cross-region spill: where the head of a region's queue goes when no local replica can take it.

SkyLB's rule (paper Algorithm 1, research code `_probe_lb_status` + `_queue_processor`), kept
sans-I/O so the live server and the virtual-time evaluator share it:

1. This module is asked only when no local replica is available (the local policy said Wait) and
   the request came from a local client: a forwarded request is never forwarded again.
2. Candidate peers: `fresh` (a recent state summary), at least one available replica, queue
   length <= `tau` (10, the code's `_STEAL_TRIGGER_THRESHOLD`) and <= our own queue length (in the
   code, not in the paper: never push work to a region busier than us).
3. `prefix` mode (SkyLB): a per-region `PrefixIndex` holds the prompts *we* forwarded to each
   peer (cross-region prefix sharing is low, so our own history is the useful signal). If the
   longest match among candidates covers more than `cache_threshold` (0.5, as the local step) of
   the prompt, the best-matching candidate; ties by lowest load, then lowest RTT, then peer order.
   Otherwise the candidate with the lowest load (then RTT, then order): a weak match is no
   reason to pick a region.
4. `hash` mode (SkyLB-CH): a ring of `virtual_nodes` points over every region, ours included so
   that a key maps to the same region wherever it is decided; walk clockwise from the key's hash
   to the first candidate. No key: lowest load, as the local CH policy does.
5. No candidate: None, the request keeps waiting at home.
6. Rescue (`rescue=True`, our fix: SkyLB's code answers 503 when a region has no replica): when
   no local replica is healthy at all, waiting at home is hopeless, so every fresh peer with a
   healthy replica (or, if it does not report health, an available one) is a candidate, without
   the tau / queue bounds; a weak prefix match picks the shortest queue, then load, then RTT.
7. `cost` mode uses the same index and rules 2 and 6; `region/cost.py` chooses among candidates.

Load of a region = its in-flight requests per replica (from its summary): regions of different
sizes compare fairly, and it includes traffic other regions sent there, which our own count of
forwarded requests (SkyLB's code) would miss.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from skylb_extproc.policy.consistent_hash import build_ring
from skylb_extproc.state.prefix_index import PrefixIndex

__all__ = [
    "Forward",
    "RegionView",
    "SpillPlanner",
    "SpillSettings",
    "candidates",
    "choose_by_hash",
    "choose_by_prefix",
    "rescue_candidates",
]


@dataclass(frozen=True, slots=True)
class RegionView:
    """A peer region as our last poll of its state saw it."""

    name: str
    queue_length: int
    available_replicas: int
    in_flight: tuple[int, ...]  # per replica
    rtt_s: float  # one way, measured or configured
    fresh: bool  # the summary is younger than the staleness bound
    healthy_replicas: int | None = None  # None: the peer does not report it
    dispatch_rate: float = 0.0  # its recent local dispatches per second
    wait_s: float = 0.0  # its shortest predicted queue before a prefill starts
    prefill_tokens_per_s: float | None = None  # its replicas' mean prefill speed, if reported
    kv_free_tokens: float | None = None  # most KV tokens free on one replica (None: unknown)
    finish_interval_s: float = 0.0  # that replica's seconds between finishes

    @property
    def load(self) -> float:
        """In-flight requests per replica."""
        return sum(self.in_flight) / max(1, len(self.in_flight))


@dataclass(frozen=True, slots=True)
class Forward:
    """Send the request to peer `region`'s balancer."""

    region: str
    reason: str  # "prefix" | "least_load" | "hash" | "cost" | "predict"
    matched_blocks: int = 0
    prefill_s: float = 0.0  # predict mode: its predicted prefill there, until the next summary
    kv_tokens: float = 0.0  # predict mode: the KV tokens it will hold there


@dataclass(frozen=True, slots=True)
class SpillSettings:
    mode: Literal["prefix", "hash", "cost", "predict"] = "prefix"
    tau: int = 10
    cache_threshold: float = 0.5
    virtual_nodes: int = 1024
    index_blocks_per_region: int = 200_000
    index_ttl_s: float = 600.0


def candidates(peers: Sequence[RegionView], *, our_queue: int, tau: int) -> list[RegionView]:
    """Peers that may take a request now (rule 2), in the given order."""
    return [
        p
        for p in peers
        if p.fresh
        and p.available_replicas >= 1
        and p.queue_length <= tau
        and p.queue_length <= our_queue
    ]


def rescue_candidates(peers: Sequence[RegionView]) -> list[RegionView]:
    """Peers that may take a request from a region without any healthy replica (rule 6)."""
    return [
        p
        for p in peers
        if p.fresh
        and (p.available_replicas if p.healthy_replicas is None else p.healthy_replicas) >= 1
    ]


def _least_loaded(peers: Sequence[RegionView], *, by_queue: bool = False) -> RegionView:
    if by_queue:
        return min(peers, key=lambda p: (p.queue_length, p.load, p.rtt_s))
    return min(peers, key=lambda p: (p.load, p.rtt_s))  # min keeps the first of equals


def choose_by_prefix(
    peers: Sequence[RegionView],
    matched: Mapping[str, int],
    *,
    prompt_chars: int,
    block_chars: int,
    cache_threshold: float,
    by_queue: bool = False,
) -> Forward | None:
    """Rule 3 over already-filtered candidates; `matched` = region -> matched leading blocks.

    `by_queue` (rule 6) ranks the least-loaded choice by queue length first."""
    if not peers:
        return None
    best = max((matched.get(p.name, 0) for p in peers), default=0)
    if best > 0 and prompt_chars > 0 and best * block_chars / prompt_chars > cache_threshold:
        tied = [p for p in peers if matched.get(p.name, 0) == best]
        chosen = _least_loaded(tied, by_queue=by_queue)
        return Forward(chosen.name, "prefix", best)
    chosen = _least_loaded(peers, by_queue=by_queue)
    return Forward(chosen.name, "least_load", matched.get(chosen.name, 0))


def choose_by_hash(
    peers: Sequence[RegionView],
    key_hash: int | None,
    *,
    ring_regions: Sequence[str],
    virtual_nodes: int,
) -> Forward | None:
    """Rule 4 over already-filtered candidates; the ring covers `ring_regions`."""
    if not peers:
        return None
    if key_hash is None:
        return Forward(_least_loaded(peers).name, "least_load")
    eligible = {p.name for p in peers}
    names = tuple(ring_regions)
    points, owners = build_ring(names, virtual_nodes)
    start = bisect.bisect_left(points, key_hash)
    for step in range(len(points)):
        name = names[owners[(start + step) % len(points)]]
        if name in eligible:
            return Forward(name, "hash")
    raise ValueError("a candidate region is missing from ring_regions")


class SpillPlanner:
    """One region's spill decisions plus the index of what it forwarded where."""

    def __init__(self, region: str, regions: Sequence[str], settings: SpillSettings) -> None:
        self.region = region
        self.settings = settings
        self._ring_regions = tuple(regions)
        self._index = PrefixIndex(
            max_blocks_per_target=settings.index_blocks_per_region, ttl_s=settings.index_ttl_s
        )

    def decide(
        self,
        peers: Sequence[RegionView],
        *,
        our_queue: int,
        hashes: Sequence[int],
        prompt_chars: int,
        block_chars: int,
        key_hash: int | None,
        now: float,
        rescue: bool = False,
    ) -> Forward | None:
        """Where the head of our queue goes, or None to keep it waiting. Records nothing.

        `rescue`: no local replica is healthy (rule 6)."""
        s = self.settings
        others = [p for p in peers if p.name != self.region]
        if rescue:
            ok = rescue_candidates(others)
        else:
            ok = candidates(others, our_queue=our_queue, tau=s.tau)
        if s.mode == "hash":
            return choose_by_hash(
                ok, key_hash, ring_regions=self._ring_regions, virtual_nodes=s.virtual_nodes
            )
        return choose_by_prefix(
            ok,
            self.match(hashes, now) if ok else {},
            prompt_chars=prompt_chars,
            block_chars=block_chars,
            cache_threshold=s.cache_threshold,
            by_queue=rescue,
        )

    def match(self, hashes: Sequence[int], now: float) -> dict[str, int]:
        """Region -> leading blocks of `hashes` among the prompts we forwarded there."""
        return self._index.match(hashes, now) if hashes else {}

    def record(self, region: str, hashes: Sequence[int], now: float) -> None:
        """We forwarded a prompt with these hashes to `region`."""
        if self.settings.mode != "hash":
            self._index.insert(region, hashes, now)
