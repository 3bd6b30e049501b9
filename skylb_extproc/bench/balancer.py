"""One region's balancer in the evaluator: the shared `Router`, plus cross-region spill.

The Router decides local dispatch exactly as in the live server. After every event, if its queue
is not empty the policy said Wait for the head, which for the selective policies (skylb,
selective consistent_hash) means no local replica is available; then `region/spill.py` is asked
where the head may go. A forwarded head leaves the Router's queue (`on_finished` of a queued
request removes it, the Router's own contract for a stream that leaves the queue) and is handed
to the driver as a `Spill`; the receiving region's balancer gets it as a forwarded request and
never forwards it again, so a request crosses at most one region boundary.

Our fix of SkyLB's burst problem, at region level: between two peer summaries the balancer
counts what it forwarded to each peer and treats each as taking one available replica and one
queue slot there, so one stale summary cannot draw the whole queue into one region.

The Router exposes no public head of its queue; `_head` reads `Router._queue` (the one private
access of the evaluator; a `Router.head()` would remove it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from skylb_extproc.dispatch.queue import Queued
from skylb_extproc.hashing import key_hash
from skylb_extproc.region.peers import PeerSummary, PeerTable
from skylb_extproc.region.spill import Forward, RegionView, SpillPlanner
from skylb_extproc.router import Router
from skylb_extproc.types import Dispatch, RouteRequest, ScrapedMetrics

__all__ = ["Action", "RegionBalancer", "Spill"]


@dataclass(frozen=True, slots=True)
class Spill:
    """Forward `request` to the balancer of `forward.region`."""

    request: RouteRequest
    forward: Forward
    waited_s: float


Action = Dispatch | Spill


class RegionBalancer:
    """A Router for one region's replicas, optionally spilling its queue head to peers."""

    def __init__(
        self,
        region: str,
        router: Router,
        *,
        block_chars: int,
        planner: SpillPlanner | None = None,
        peers: PeerTable | None = None,
    ) -> None:
        self.region = region
        self.router = router
        self._block_chars = block_chars
        self._planner = planner
        self._peers = peers
        self._forwarded_in: set[str] = set()
        self._sent_since: dict[str, int] = {}  # peer -> forwards since its last summary
        self.spills = 0

    def on_request(self, request: RouteRequest, now: float, *, forwarded: bool) -> list[Action]:
        if forwarded:
            self._forwarded_in.add(request.request_id)
        return self._spill(list(self.router.on_request(request, now)), now)

    def on_started(self, request_id: str, now: float) -> list[Action]:
        return self._spill(list(self.router.on_started(request_id, now)), now)

    def on_finished(self, request_id: str, now: float) -> list[Action]:
        self._forwarded_in.discard(request_id)
        return self._spill(list(self.router.on_finished(request_id, now)), now)

    def on_scrape(
        self, replica: str, metrics: ScrapedMetrics | None, *, started_at: float, now: float
    ) -> list[Action]:
        out = self.router.on_scrape(replica, metrics, started_at=started_at, now=now)
        return self._spill(list(out), now)

    def on_timer(self, now: float) -> list[Action]:
        return self._spill(list(self.router.on_timer(now)), now)

    def on_peer_summary(self, summary: PeerSummary, now: float) -> list[Action]:
        if self._peers is None:
            return []
        self._peers.update(summary, now)
        self._sent_since[summary.region] = 0
        return self._spill([], now)

    def summary(self, now: float) -> PeerSummary:
        """What this region publishes to its peers."""
        replicas = self.router.state(now)["replicas"]
        assert isinstance(replicas, list)
        return PeerSummary(
            region=self.region,
            queue_length=self.router.queue_length,
            available_replicas=sum(1 for r in replicas if r["available"]),
            in_flight=tuple(int(r["in_flight"]) for r in replicas),
        )

    def _head(self) -> Queued | None:
        return self.router._queue.head()

    def _views(self, now: float) -> list[RegionView]:
        assert self._peers is not None
        out: list[RegionView] = []
        for v in self._peers.views(now):
            sent = self._sent_since.get(v.name, 0)
            avail = max(0, v.available_replicas - sent)
            out.append(replace(v, available_replicas=avail, queue_length=v.queue_length + sent))
        return out

    def _spill(self, out: list[Action], now: float) -> list[Action]:
        """Forward queue heads while the planner finds a peer for them."""
        if self._planner is None:
            return out
        while (head := self._head()) is not None:
            req = head.request
            if req.request_id in self._forwarded_in:
                break  # never forwarded twice; FIFO: it blocks the ones behind it, as in SkyLB
            key = key_hash(req.hash_key) if req.hash_key else (head.hashes[:1] or (None,))[0]
            fwd = self._planner.decide(
                self._views(now),
                our_queue=self.router.queue_length,
                hashes=head.hashes,
                prompt_chars=len(req.prompt),
                block_chars=self._block_chars,
                key_hash=key,
                now=now,
            )
            if fwd is None:
                break
            out.extend(self.router.on_finished(req.request_id, now))
            self._planner.record(fwd.region, head.hashes, now)
            self._sent_since[fwd.region] = self._sent_since.get(fwd.region, 0) + 1
            self.spills += 1
            out.append(Spill(req, fwd, now - head.arrived))
        return out
