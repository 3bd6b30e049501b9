"""What one region knows about its peers: the last state summary of each, and its freshness.

A region polls every peer's small summary (queue length, available replicas, in-flight per
replica) every ~100 ms. A summary older than `stale_after_s` (0.5 s by default) marks the peer
not fresh, and `spill.candidates` never sends anything there until a new summary arrives: a peer
we cannot hear from may be down or cut off, and its last numbers are no promise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from skylb_extproc.policy.common import queue_seconds
from skylb_extproc.region.spill import RegionView
from skylb_extproc.types import ReplicaView

__all__ = ["PeerSummary", "PeerTable", "summarize", "summary_from_json", "summary_to_json"]


@dataclass(frozen=True, slots=True)
class PeerSummary:
    """The state a region publishes to its peers (the body of its /peer/state answer)."""

    region: str
    queue_length: int
    available_replicas: int
    in_flight: tuple[int, ...]
    healthy_replicas: int | None = None  # None: not reported (older publishers, the evaluator)
    dispatch_rate: float = 0.0  # local dispatches per second, recently (the cost model's drain)
    timestamp: float = 0.0  # publisher's UNIX time; informative, freshness is our arrival time
    # For `spill.mode: predict`: the shortest predicted queue before a prefill starts on one of
    # its healthy replicas, and their mean prefill speed (None: not reported, older publishers).
    wait_s: float = 0.0
    prefill_tokens_per_s: float | None = None
    # The most KV tokens free on one healthy replica (None: unknown or unlimited), and that
    # replica's seconds between finishes: a request larger than that waits about that long.
    kv_free_tokens: float | None = None
    finish_interval_s: float = 0.0


def summarize(
    region: str,
    queue_length: int,
    replicas: Sequence[ReplicaView],
    *,
    dispatch_rate: float = 0.0,
    timestamp: float = 0.0,
) -> PeerSummary:
    """A region's summary from its queue length and its replicas as its router sees them."""
    healthy = [r for r in replicas if r.healthy]
    speeds = [r.prefill_tokens_per_s for r in healthy]
    roomiest = max(healthy, key=lambda r: r.kv_free_tokens, default=None)
    free = None if roomiest is None else roomiest.kv_free_tokens
    return PeerSummary(
        region=region,
        queue_length=queue_length,
        available_replicas=sum(1 for r in replicas if r.available),
        in_flight=tuple(r.in_flight for r in replicas),
        healthy_replicas=sum(1 for r in replicas if r.healthy),
        dispatch_rate=dispatch_rate,
        timestamp=timestamp,
        wait_s=min((queue_seconds(r) for r in healthy), default=0.0),
        prefill_tokens_per_s=sum(speeds) / len(speeds) if speeds else None,
        kv_free_tokens=None if free is None or math.isinf(free) else free,
        finish_interval_s=0.0 if roomiest is None else roomiest.finish_interval_s,
    )


def summary_to_json(summary: PeerSummary) -> dict[str, Any]:
    """The /peer/state body."""
    return {
        "region": summary.region,
        "queue_length": summary.queue_length,
        "available_replicas": summary.available_replicas,
        "healthy_replicas": summary.healthy_replicas,
        "in_flight": list(summary.in_flight),
        "dispatch_rate": summary.dispatch_rate,
        "timestamp": summary.timestamp,
        "wait_s": summary.wait_s,
        "prefill_tokens_per_s": summary.prefill_tokens_per_s,
        "kv_free_tokens": summary.kv_free_tokens,
        "finish_interval_s": summary.finish_interval_s,
    }


def _count(data: Mapping[str, Any], key: str) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key}: expected a count, got {value!r}")
    return value


def _real(data: Mapping[str, Any], key: str) -> float:
    value = data.get(key, 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{key}: expected a number, got {value!r}")
    return float(value)


def summary_from_json(data: object) -> PeerSummary:
    """Parse a /peer/state body; ValueError when it is not one (a peer is trusted, not blind)."""
    if not isinstance(data, Mapping) or not isinstance(data.get("region"), str):
        raise ValueError("not a peer state object")
    in_flight = data.get("in_flight")
    if not isinstance(in_flight, list):
        raise ValueError("in_flight: expected a list")
    healthy = data.get("healthy_replicas")
    speed = data.get("prefill_tokens_per_s")
    if speed is not None and _real(data, "prefill_tokens_per_s") <= 0:
        raise ValueError(f"prefill_tokens_per_s: expected a speed > 0, got {speed!r}")
    return PeerSummary(
        region=data["region"],
        queue_length=_count(data, "queue_length"),
        available_replicas=_count(data, "available_replicas"),
        in_flight=tuple(_count({"in_flight": v}, "in_flight") for v in in_flight),
        healthy_replicas=None if healthy is None else _count(data, "healthy_replicas"),
        dispatch_rate=_real(data, "dispatch_rate"),
        timestamp=_real(data, "timestamp"),
        wait_s=max(0.0, _real(data, "wait_s")),
        prefill_tokens_per_s=None if speed is None else _real(data, "prefill_tokens_per_s"),
        kv_free_tokens=None
        if data.get("kv_free_tokens") is None
        else _real(data, "kv_free_tokens"),
        finish_interval_s=max(0.0, _real(data, "finish_interval_s")),
    )


class PeerTable:
    """Latest summary per peer, when it arrived and the peer's one-way RTT."""

    def __init__(self, peers: Mapping[str, float], *, stale_after_s: float = 0.5) -> None:
        """`peers`: name -> one-way RTT in seconds (configured, or measured and updated later)."""
        if stale_after_s <= 0:
            raise ValueError(f"stale_after_s must be > 0, got {stale_after_s}")
        self._rtt = dict(peers)
        self._stale_after_s = stale_after_s
        self._last: dict[str, tuple[PeerSummary, float]] = {}

    def update(self, summary: PeerSummary, now: float, *, rtt_s: float | None = None) -> None:
        """A summary from `summary.region` arrived at `now` (unknown peers are ignored)."""
        if summary.region not in self._rtt:
            return
        self._last[summary.region] = (summary, now)
        if rtt_s is not None:
            self._rtt[summary.region] = rtt_s

    def views(self, now: float) -> tuple[RegionView, ...]:
        """Every configured peer, in configuration order; never-heard peers are not fresh."""
        out: list[RegionView] = []
        for name, rtt in self._rtt.items():
            got = self._last.get(name)
            if got is None:
                out.append(RegionView(name, 0, 0, (), rtt, fresh=False))
                continue
            s, at = got
            fresh = now - at < self._stale_after_s
            out.append(
                RegionView(
                    name,
                    s.queue_length,
                    s.available_replicas,
                    s.in_flight,
                    rtt,
                    fresh,
                    healthy_replicas=s.healthy_replicas,
                    dispatch_rate=s.dispatch_rate,
                    wait_s=s.wait_s,
                    prefill_tokens_per_s=s.prefill_tokens_per_s,
                    kv_free_tokens=s.kv_free_tokens,
                    finish_interval_s=s.finish_interval_s,
                )
            )
        return tuple(out)

    def names(self) -> tuple[str, ...]:
        return tuple(self._rtt)

    def age(self, name: str, now: float) -> float | None:
        """Seconds since `name`'s last summary arrived; None if none ever did."""
        got = self._last.get(name)
        return None if got is None else now - got[1]

    def rtt(self, name: str) -> float:
        """The one-way RTT currently used for `name` (KeyError for unknown peers)."""
        return self._rtt[name]
