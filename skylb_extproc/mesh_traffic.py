"""A skewed multi-region workload for the demo: most conversations start in the first region.

Each conversation has a home region whose Envoy it always talks to (as a client near that
region would); the home regions follow the weights exactly (smooth weighted round robin over
the conversations, deterministic). The summary tells where requests were served
(`x-inference-pod` names a replica, the replica names its region), how many each skylb spilled
and received (its /metrics), and the prefix hit rate from the responses' `usage`.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from skylb_extproc.workload import (
    Conversation,
    TurnResult,
    play_conversations,
    summarize,
    summary_tail,
)

__all__ = [
    "RegionCounters",
    "assign_homes",
    "default_weights",
    "format_mesh_summary",
    "metric_total",
    "play_skewed",
    "region_counters",
    "split_concurrency",
]

SPILLS_METRIC = "skylb_spills_total"
RECEIVED_METRIC = "skylb_forwarded_received_total"
REJECTED_METRIC = "skylb_markers_rejected_total"


def default_weights(n: int) -> list[float]:
    """70/20/10 for three regions; otherwise 70% first and the rest shared equally."""
    if n == 1:
        return [1.0]
    if n == 3:
        return [0.7, 0.2, 0.1]
    return [0.7] + [0.3 / (n - 1)] * (n - 1)


def assign_homes(
    conversations: Sequence[Conversation], regions: Sequence[str], weights: Sequence[float]
) -> dict[str, list[Conversation]]:
    """Home region per conversation, proportional to `weights` at every prefix of the list."""
    homes: dict[str, list[Conversation]] = {r: [] for r in regions}
    credit = dict.fromkeys(regions, 0.0)
    total = sum(weights)
    for conv in conversations:
        for region, w in zip(regions, weights, strict=True):
            credit[region] += w / total
        home = max(regions, key=lambda r: credit[r])  # first region wins ties
        credit[home] -= 1.0
        homes[home].append(conv)
    return homes


def split_concurrency(total: int, weights: Sequence[float]) -> list[int]:
    """Concurrent clients per region, proportional to the weights, at least 1 each."""
    norm = sum(weights)
    return [max(1, round(total * w / norm)) for w in weights]


async def play_skewed(
    listeners: Mapping[str, str],
    homes: Mapping[str, Sequence[Conversation]],
    concurrency: Mapping[str, int],
    *,
    model: str,
) -> dict[str, list[TurnResult]]:
    """Every region's clients play their conversations at the same time."""

    async def one(region: str) -> list[TurnResult]:
        if not homes[region]:
            return []
        return await play_conversations(
            listeners[region], homes[region], concurrency=concurrency[region], model=model
        )

    regions = list(homes)
    played = await asyncio.gather(*(one(r) for r in regions))
    return dict(zip(regions, played, strict=True))


def metric_total(metrics_text: str, name: str, **labels: str) -> float:
    """Sum of the samples of counter `name` whose labels include `labels` (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name != name:
                continue
            if all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


@dataclass(frozen=True)
class RegionCounters:
    spills: float  # requests this region's skylb forwarded to a peer
    received: float  # forwarded requests it accepted (valid marker)
    rejected: float  # x-skylb-* headers it stripped (forged, replayed, ...)


def region_counters(admin_url: str) -> RegionCounters:
    with urllib.request.urlopen(f"{admin_url}/metrics", timeout=5.0) as resp:
        text = resp.read().decode("utf-8", "replace")
    return RegionCounters(
        metric_total(text, SPILLS_METRIC),
        metric_total(text, RECEIVED_METRIC),
        metric_total(text, REJECTED_METRIC),
    )


def _counts(counter: Mapping[str, int | float], order: Sequence[str]) -> str:
    return " ".join(f"{r}={counter.get(r, 0):g}" for r in order if counter.get(r, 0)) or "-"


def format_mesh_summary(
    results: Mapping[str, Sequence[TurnResult]],
    region_of_replica: Mapping[str, str],
    counters: Mapping[str, RegionCounters],
    *,
    elapsed_s: float,
) -> str:
    regions = list(results)
    flat = [r for rs in results.values() for r in rs]
    s = summarize(flat)
    served = Counter(region_of_replica.get(r.replica or "", "?") for r in flat if r.ok)
    lines = [
        f"requests: {s['requests']} ({s['streaming']} streaming) in {elapsed_s:.1f}s, "
        f"errors: {len(s['errors'])}",
        f"sent by region:   {_counts({r: len(results[r]) for r in regions}, regions)}",
        f"served by region: {_counts(served, [*regions, '?'])}  (x-inference-pod)",
    ]
    for origin in regions:
        where = Counter(
            region_of_replica.get(r.replica or "", "?") for r in results[origin] if r.ok
        )
        lines.append(f"  {origin} clients -> {_counts(where, [*regions, '?'])}")
    spills = {r: c.spills for r, c in counters.items()}
    received = {r: c.received for r, c in counters.items()}
    lines += [
        f"spills (skylb_spills_total): {_counts(spills, regions)}; "
        f"forwarded received: {_counts(received, regions)}",
        *summary_tail(s),
    ]
    return "\n".join(lines)
