"""What one region knows about its peers: the last state summary of each, and its freshness.

A region polls every peer's small summary (queue length, available replicas, in-flight per
replica) every ~100 ms. A summary older than `stale_after_s` (0.5 s by default) marks the peer
not fresh, and `spill.candidates` never sends anything there until a new summary arrives: a peer
we cannot hear from may be down or cut off, and its last numbers are no promise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from skylb_extproc.region.spill import RegionView
from skylb_extproc.types import ReplicaView

__all__ = ["PeerSummary", "PeerTable", "summarize"]


@dataclass(frozen=True, slots=True)
class PeerSummary:
    """The state a region publishes to its peers (the body of its /state answer)."""

    region: str
    queue_length: int
    available_replicas: int
    in_flight: tuple[int, ...]


def summarize(region: str, queue_length: int, replicas: Sequence[ReplicaView]) -> PeerSummary:
    """A region's summary from its queue length and its replicas as its router sees them."""
    return PeerSummary(
        region=region,
        queue_length=queue_length,
        available_replicas=sum(1 for r in replicas if r.available),
        in_flight=tuple(r.in_flight for r in replicas),
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
                RegionView(name, s.queue_length, s.available_replicas, s.in_flight, rtt, fresh)
            )
        return tuple(out)
