"""One region's balancer: the local `Router` plus cross-region spill and data residency (sans-I/O).

The live server's driver calls it exactly as it called the Router (`on_request`, `on_started`,
`on_finished`, `on_scrape`, `on_timer`, `shutdown`, `next_deadline`, `state`) plus
`on_peer_summary` when a peer's state arrives. Each call returns the actions that became
possible: `Dispatch` (a local Route or a Reject, from the Router) or `Forwarding` (send the
request to a peer region). Without peers it is the Router, unchanged.

Rules, in order (ARCHITECTURE.md §2; `region/spill.py` and `region/cost.py` for the choice):
1. A request forwarded to us (`request.origin` set by the driver after its marker verified) is
   routed here like a local one, waiting if needed, and never forwarded again.
2. Residency always wins: a request may only be served in its allowed regions (the tenant's set
   if `request.tenant` names one, else `allowed_regions`; None = anywhere). A request that may
   not leave waits here, or gets 429/503, exactly as without peers.
3. A request that may not be served *here* is sent at once to the best allowed fresh peer
   (rescue candidates), else 503: holding it here could never end well.
4. No healthy local replica at all: rather than 503 (SkyLB's code), a request is forwarded at
   arrival to a fresh peer with a healthy replica (rescue rule), pass-through requests included.
5. After every event, if requests are still queued (the local policy said Wait: no local replica
   is available), the queue is walked oldest first: each request that may leave is offered to
   the planner (paper rule, or the cost model); a Forward removes it from the queue. Requests
   that may not leave (forwarded to us, or no candidate in their allowed set) are skipped, so
   they never block spillable ones behind them; the first spillable request that stays ends the
   walk (FIFO: the ones behind it would get the same answer). At most `MAX_SKIPPED` skipped
   entries per event bound the work of a long, restricted queue.
6. `spill.mode: predict` (the default, region/predict.py) also asks at arrival, before the
   Router sees the request: it leaves at once when a peer's predicted TTFT beats the local one
   by the margin, and the walk of rule 5 compares the same predictions for held requests.

Our fix of SkyLB's burst problem at region level: forwards sent to a peer after the start of
the poll that produced its last summary count as taking one of its available replicas and one
queue slot, so one summary cannot draw the whole queue into one region.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from skylb_extproc.policy.common import kv_tokens
from skylb_extproc.region.cost import CostModel, wait_estimate
from skylb_extproc.region.peers import PeerSummary, PeerTable, summarize
from skylb_extproc.region.predict import choose_by_prediction
from skylb_extproc.region.spill import Forward, RegionView, SpillPlanner, candidates
from skylb_extproc.router import Router
from skylb_extproc.types import Dispatch, Outcome, Reject, Route, RouteRequest, ScrapedMetrics

__all__ = ["Action", "Forwarding", "RegionBalancer", "Residency", "Spill"]

MAX_SKIPPED = 64
NO_ALLOWED_REGION = Reject(
    503, Outcome.NO_REPLICA, "no region this request may be served in is available"
)


@dataclass(frozen=True, slots=True)
class Forwarding:
    """Forward request `request_id` to peer `forward.region`; it is no longer ours to route."""

    request_id: str
    forward: Forward
    waited_s: float = 0.0
    rescue: bool = False  # sent because no local replica is healthy (or may serve it)


Action = Dispatch | Forwarding


@dataclass(frozen=True)
class Residency:
    """Where requests of this region may be served; None = anywhere."""

    allowed: frozenset[str] | None = None
    tenants: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def allowed_for(self, request: RouteRequest) -> frozenset[str] | None:
        if request.tenant is not None and request.tenant in self.tenants:
            return self.tenants[request.tenant]
        return self.allowed


@dataclass
class Spill:
    """The cross-region half: peers' state, the planner, optionally the cost model."""

    peers: PeerTable
    planner: SpillPlanner
    cost: CostModel | None = None
    margin_s: float = 0.05  # predict mode: a peer must beat local by this much
    max_wait_s: float = 30.0  # predict mode: the local wait when nothing drains


class RegionBalancer:
    """A Router for one region's replicas, spilling to peers when `spill` is given."""

    def __init__(
        self,
        region: str,
        router: Router,
        *,
        spill: Spill | None = None,
        residency: Residency | None = None,
        rate_window_s: float = 10.0,
    ) -> None:
        self.region = region
        self.router = router
        self._spill = spill
        self._residency = residency or Residency()
        self._rate_window_s = rate_window_s
        self._dispatched: deque[float] = deque()  # local inference dispatch instants
        # peer -> forwards not yet in its summary: (when, predicted prefill s, KV tokens)
        self._sent: dict[str, list[tuple[float, float, float]]] = {}
        self._out: dict[str, str] = {}  # forwarded request id -> peer, until its stream ends

    # --- events ---------------------------------------------------------------------------------

    def on_request(self, request: RouteRequest, now: float) -> list[Action]:
        hashes = None
        if self._spill is not None and request.origin is None:
            direct = self._direct(request, now)
            if direct is None and self._spill.planner.settings.mode == "predict":
                hashes = self.router.hashes(request) if request.inference else ()
                direct = self._predicted(request, hashes, now)
            if direct is not None:
                return [direct]
        return self._after(self.router.on_request(request, now, hashes), now)

    def on_started(self, request_id: str, now: float) -> list[Action]:
        return self._after(self.router.on_started(request_id, now), now)

    def on_finished(self, request_id: str, now: float) -> list[Action]:
        self._out.pop(request_id, None)
        return self._after(self.router.on_finished(request_id, now), now)

    def on_scrape(
        self, replica: str, metrics: ScrapedMetrics | None, *, started_at: float, now: float
    ) -> list[Action]:
        return self._after(
            self.router.on_scrape(replica, metrics, started_at=started_at, now=now), now
        )

    def on_timer(self, now: float) -> list[Action]:
        return self._after(self.router.on_timer(now), now)

    def on_peer_summary(
        self,
        summary: PeerSummary,
        now: float,
        *,
        started_at: float | None = None,
        rtt_s: float | None = None,
    ) -> list[Action]:
        """A peer's summary, polled from `started_at`, arrived at `now` (`rtt_s`: one way)."""
        if self._spill is None:
            return []
        self._spill.peers.update(summary, now, rtt_s=rtt_s)
        begun = now if started_at is None else started_at
        sent = self._sent.get(summary.region, [])
        self._sent[summary.region] = [x for x in sent if x[0] >= begun]
        return self._after([], now)

    def shutdown(self, now: float) -> list[Action]:
        return list(self.router.shutdown(now))

    # --- queries --------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        return self.router.next_deadline()

    @property
    def queue_length(self) -> int:
        return self.router.queue_length

    def dispatch_rate(self, now: float) -> float:
        """Local inference dispatches per second over the last `rate_window_s`."""
        self._trim(now)
        return len(self._dispatched) / self._rate_window_s

    def summary(self, now: float, *, timestamp: float = 0.0) -> PeerSummary:
        """What this region publishes to its peers (`timestamp`: UNIX time, informative)."""
        return summarize(
            self.region,
            self.router.queue_length,
            self.router.views(now),
            dispatch_rate=self.dispatch_rate(now),
            timestamp=timestamp,
        )

    def state(self, now: float) -> dict[str, object]:
        """The router's /state plus, with peers, each peer as we see it."""
        state = dict(self.router.state(now))
        if self._spill is not None:
            state["spill_mode"] = self._spill.planner.settings.mode
            state["peers"] = [self._peer_state(v, now) for v in self._spill.peers.views(now)]
        return state

    def _peer_state(self, view: RegionView, now: float) -> dict[str, object]:
        assert self._spill is not None
        age = self._spill.peers.age(view.name, now)
        cost = self._spill.cost
        return {
            "name": view.name,
            "fresh": view.fresh,
            "age_s": age,
            "rtt_s": 2 * view.rtt_s,
            "queue_length": view.queue_length,
            "available_replicas": view.available_replicas,
            "healthy_replicas": view.healthy_replicas,
            "load": view.load,
            "dispatch_rate": view.dispatch_rate,
            "forwarded_in_flight": sum(1 for p in self._out.values() if p == view.name),
            "cost_on": None if cost is None else cost.is_on(view.name),
        }

    # --- internals ------------------------------------------------------------------------------

    def _direct(self, request: RouteRequest, now: float) -> Action | None:
        """Rules 3 and 4: forward at arrival, or reject; None = the Router takes it."""
        allowed = self._residency.allowed_for(request)
        here = allowed is None or self.region in allowed
        if here and self.router.any_healthy(now):
            return None
        hashes = self.router.hashes(request) if request.inference else ()
        queue = self.router.queue_length
        fwd = self._choose(request, hashes, allowed, now, queue=queue, rescue=True)
        if fwd is not None:
            return self._forward(request.request_id, hashes, fwd, now, rescue=True)
        return None if here else Dispatch(request.request_id, NO_ALLOWED_REGION)

    def _predicted(
        self, request: RouteRequest, hashes: tuple[int, ...], now: float
    ) -> Action | None:
        """`predict` mode at arrival: leave at once if a peer is the better bet (rule 5 asks
        again while it waits)."""
        allowed = self._residency.allowed_for(request)
        if not request.inference or not self._may_leave(allowed):
            return None
        queue = self.router.queue_length
        fwd = self._choose(request, hashes, allowed, now, queue=queue, rescue=False)
        return None if fwd is None else self._forward(request.request_id, hashes, fwd, now)

    def _after(self, out: list[Dispatch], now: float) -> list[Action]:
        """Count local dispatches (the rate), then spill what the queue still holds (rule 5)."""
        for dispatch in out:
            decision = dispatch.decision
            if isinstance(decision, Route) and decision.reason != "passthrough":
                self._dispatched.append(now)
        actions: list[Action] = list(out)
        if self._spill is not None and self.router.queue_length:
            actions.extend(self._walk(now))
        return actions

    def _walk(self, now: float) -> list[Action]:
        rescue = not self.router.any_healthy(now)
        out: list[Action] = []
        skipped = 0
        # The queue is not changed while walked (it can be long, and most walks stop at the
        # head): forwarded requests leave it afterwards, and each decision counts those before.
        for entry in self.router.queued():
            if skipped > MAX_SKIPPED:
                break
            request = entry.request
            allowed = self._residency.allowed_for(request)
            if request.origin is not None or not self._may_leave(allowed):
                skipped += 1
                continue
            queue = self.router.queue_length - len(out)
            fwd = self._choose(request, entry.hashes, allowed, now, queue=queue, rescue=rescue)
            if fwd is not None:
                waited = now - entry.arrived
                out.append(self._forward(request.request_id, entry.hashes, fwd, now, waited))
            elif allowed is None:
                break  # FIFO: the head stays, and nothing behind it has more choice
            else:
                skipped += 1
        for action in out:
            self.router.take(action.request_id)
        return out

    def _may_leave(self, allowed: frozenset[str] | None) -> bool:
        return allowed is None or any(r != self.region for r in allowed)

    def _choose(
        self,
        request: RouteRequest,
        hashes: tuple[int, ...],
        allowed: frozenset[str] | None,
        now: float,
        *,
        queue: int,
        rescue: bool,
    ) -> Forward | None:
        """Where to forward `request` (None: keep it) while our queue holds `queue` requests."""
        assert self._spill is not None
        views = [v for v in self._views(now) if allowed is None or v.name in allowed]
        if not views:
            return None
        planner, cost = self._spill.planner, self._spill.cost
        if planner.settings.mode == "predict" and not rescue:
            return self._choose_by_prediction(request, hashes, views, now, queue)
        if cost is not None and not rescue:
            return self._choose_by_cost(request, hashes, views, now, queue)
        key = self.router.affinity_key(request, hashes)
        return planner.decide(
            views,
            our_queue=queue,
            hashes=hashes,
            prompt_chars=len(request.prompt),
            block_chars=self.router.block_chars,
            key_hash=key,
            now=now,
            rescue=rescue,
        )

    def _choose_by_cost(
        self,
        request: RouteRequest,
        hashes: tuple[int, ...],
        views: list[RegionView],
        now: float,
        queue: int,
    ) -> Forward | None:
        assert self._spill is not None and self._spill.cost is not None
        planner, cost = self._spill.planner, self._spill.cost
        ok = candidates(views, our_queue=queue, tau=planner.settings.tau)
        block = self.router.block_chars
        prompt = len(request.prompt)
        local_s = cost.local_cost(
            queue_length=queue,
            rate=self.dispatch_rate(now),
            prompt_chars=prompt,
            matched_chars=min(prompt, self.router.local_match(hashes, now) * block),
        )
        matched = planner.match(hashes, now) if ok else {}
        return cost.choose(
            views, ok, local_s=local_s, matched=matched, prompt_chars=prompt, block_chars=block
        )

    def _choose_by_prediction(
        self,
        request: RouteRequest,
        hashes: tuple[int, ...],
        views: list[RegionView],
        now: float,
        queue: int,
    ) -> Forward | None:
        """`queue` requests wait here ahead of this one: they drain at our dispatch rate."""
        assert self._spill is not None
        local = self.router.best_local(request, hashes, now)
        if local is not None:
            local += wait_estimate(queue, self.dispatch_rate(now), self._spill.max_wait_s)
        sent = {v.name: _unsummarized(self._sent.get(v.name, ()), v) for v in views}
        return choose_by_prediction(
            views,
            local_s=local,
            matched=self._spill.planner.match(hashes, now),
            prompt_chars=len(request.prompt),
            block_chars=self.router.block_chars,
            kv_tokens=kv_tokens(len(request.prompt), request.max_tokens or 0),
            sent=sent,
            margin_s=self._spill.margin_s,
            tokens_per_s=self.router.prefill_tokens_per_s,
            max_wait_s=self._spill.max_wait_s,
            our_queue=queue,
        )

    def _forward(
        self,
        request_id: str,
        hashes: tuple[int, ...],
        fwd: Forward,
        now: float,
        waited_s: float = 0.0,
        *,
        rescue: bool = False,
    ) -> Forwarding:
        assert self._spill is not None
        self._spill.planner.record(fwd.region, hashes, now)
        self._sent.setdefault(fwd.region, []).append((now, fwd.prefill_s, fwd.kv_tokens))
        self._out[request_id] = fwd.region
        return Forwarding(request_id, fwd, waited_s, rescue)

    def _views(self, now: float) -> list[RegionView]:
        assert self._spill is not None
        out: list[RegionView] = []
        for v in self._spill.peers.views(now):
            sent = len(self._sent.get(v.name, ()))
            if sent:
                avail = max(0, v.available_replicas - sent)
                v = replace(v, available_replicas=avail, queue_length=v.queue_length + sent)
            out.append(v)
        return out

    def _trim(self, now: float) -> None:
        horizon = now - self._rate_window_s
        while self._dispatched and self._dispatched[0] < horizon:
            self._dispatched.popleft()


def _unsummarized(
    sent: Sequence[tuple[float, float, float]], peer: RegionView
) -> tuple[float, float]:
    """Prefill seconds per healthy replica and KV tokens we sent `peer` since its summary."""
    replicas = max(1, peer.healthy_replicas or 1)
    return sum(x[1] for x in sent) / replicas, sum(x[2] for x in sent)
