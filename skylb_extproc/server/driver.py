"""The asyncio driver around the sans-I/O core (a `RegionBalancer`, or a bare `Router`).

The core decides; the driver owns the clocks, the futures of requests waiting for a decision,
one timer for the core's next deadline, the marker checks (`Peering`) and the metrics. Every core
call returns the actions that became possible, and the driver performs them all before
returning: resolve the waiting stream's future (a `Route`, a `Reject`, or a `PeerForward` with a
freshly signed marker), record the outcome. Nothing here blocks and nothing awaits except
`decide`, so calls from the servicer, the scrapers, the peer poller and the timer never
interleave inside a core call.

A request arriving with `x-skylb-*` headers has its marker verified before the core sees it:
verified -> `RouteRequest.origin` is the forwarding region (served here, never forwarded again);
a loop (our own marker came back) is counted as rejected and, as a forwarded request, never
forwarded again; anything else is counted as rejected and the request is a local client's. The
stream machine strips the headers from the request in every case.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from skylb_extproc.region.balancer import Action, Forwarding
from skylb_extproc.region.marker import RejectReason, Verified
from skylb_extproc.region.peers import PeerSummary, summary_to_json
from skylb_extproc.server.metrics import ServerMetrics
from skylb_extproc.server.peering import Peering
from skylb_extproc.types import (
    Outcome,
    PeerForward,
    Reject,
    Route,
    RouteRequest,
    ScrapedMetrics,
)

if TYPE_CHECKING:
    from skylb_extproc.region.balancer import RegionBalancer

Decision = Route | Reject | PeerForward

log = logging.getLogger(__name__)

# A timer never fires sooner than this after being armed: a deadline the router reports as
# already due would otherwise spin the loop if on_timer did not move it.
MIN_TIMER_DELAY_S = 0.001

SHUTDOWN_REJECT = Reject(503, Outcome.SHUTDOWN, "the load balancer is shutting down")
RTT_SMOOTHING = 0.3  # weight of the newest RTT sample: steady, yet follows a route change in ~1 s


@dataclass(slots=True)
class _Waiting:
    request: RouteRequest
    future: asyncio.Future[Decision]
    known_at: float


class Driver:
    """Runs the router in real time. Create and use it inside the running event loop."""

    def __init__(
        self,
        core: RegionBalancer,
        *,
        region: str,
        metrics: ServerMetrics,
        clock: Callable[[], float] = time.monotonic,
        peering: Peering | None = None,
    ) -> None:
        self._core = core
        self._speed_warned: set[str] = set()  # replicas whose missing speed counters were logged
        self._region = region
        self._metrics = metrics
        self._clock = clock
        self._peering = peering or Peering(region)
        self._rtt: dict[str, float] = {}  # peer -> smoothed round trip
        self._ids = itertools.count(1)
        self._waiting: dict[str, _Waiting] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._armed: float | None = None
        self._streams = 0
        self._streams_opened = 0  # ever: a graceful stop sees streams that came and went
        self._shutting_down = False
        metrics.attach_state(self.state)

    # --- clock, ids, streams --------------------------------------------------------------------

    def now(self) -> float:
        return self._clock()

    def new_request_id(self) -> str:
        # Ours, not the client's x-request-id: clients may repeat or forge theirs.
        return f"{self._region}-{next(self._ids)}"

    def stream_opened(self) -> None:
        self._streams += 1
        self._streams_opened += 1
        self._metrics.streams_active.set(self._streams)

    def stream_closed(self) -> None:
        self._streams -= 1
        self._metrics.streams_active.set(self._streams)

    @property
    def streams_active(self) -> int:
        return self._streams

    @property
    def streams_opened(self) -> int:
        return self._streams_opened

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    # --- events ---------------------------------------------------------------------------------

    def submit(
        self, request: RouteRequest, skylb_headers: Sequence[tuple[str, str]] = ()
    ) -> asyncio.Future[Decision]:
        """The future decision of a request: often already done, else resolved by a later event.

        `skylb_headers`: the request's x-skylb-* headers (a forwarding marker, or forgeries).
        A stream that ends while waiting must call `on_finished`: that takes the request out of
        the router's queue (and cancels the future).
        """
        future: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        now = self.now()
        if self._shutting_down:
            self._metrics.decided(Outcome.SHUTDOWN, latency_s=0.0)
            future.set_result(SHUTDOWN_REJECT)
            return future
        if skylb_headers:
            request = self._check_marker(request, dict(skylb_headers))
        # Registered before the router call: it may dispatch this very request synchronously.
        self._waiting[request.request_id] = _Waiting(request, future, now)
        try:
            self._perform(self._core.on_request(request, now))
        except BaseException:
            self._waiting.pop(request.request_id, None)
            raise
        return future

    async def decide(
        self, request: RouteRequest, skylb_headers: Sequence[tuple[str, str]] = ()
    ) -> Decision:
        """`submit` and wait; a cancelled wait still needs `on_finished` (the servicer does it)."""
        return await self.submit(request, skylb_headers)

    def _check_marker(self, request: RouteRequest, headers: dict[str, str]) -> RouteRequest:
        result = self._peering.verify(headers)
        if isinstance(result, Verified):
            self._metrics.forwarded_received(result.origin)
            return dataclasses.replace(request, origin=result.origin)
        self._metrics.marker_rejected(result.reason.value)
        if result.reason is RejectReason.LOOP:
            # Our own forward came back (a misrouted cluster): serve it, never send it out again.
            return dataclasses.replace(request, origin=self._region)
        return request

    def on_started(self, request_id: str) -> None:
        self._perform(self._core.on_started(request_id, self.now()))

    def on_finished(self, request_id: str) -> None:
        """The stream ended, for any reason; idempotent, and fine for never-decided requests."""
        waiting = self._waiting.pop(request_id, None)
        if waiting is not None:
            self._metrics.decided(Outcome.CANCELLED)
            waiting.future.cancel()
        self._perform(self._core.on_finished(request_id, self.now()))

    def on_scrape(self, replica: str, metrics: ScrapedMetrics | None, started_at: float) -> None:
        if metrics is None:
            self._metrics.scrape_failed(replica)
        dispatches = self._core.on_scrape(replica, metrics, started_at=started_at, now=self.now())
        if metrics is not None:
            self._warn_without_speed(replica)
        self._perform(dispatches)

    def _warn_without_speed(self, replica: str) -> None:
        """Say once per replica that its metrics lack the speed counters (its prior stays)."""
        if replica in self._speed_warned or not self._core.router.lacks_speed_counters(replica):
            return
        self._speed_warned.add(replica)
        speed = next(v for v in self._core.router.views(self.now()) if v.name == replica)
        log.warning(
            "replica %s: its /metrics lack the speed counters (prompt/generation tokens, "
            "prefill/decode time); using the configured speed: %.0f prefill tokens/s, "
            "%.3f s per decode step",
            replica,
            speed.prefill_tokens_per_s,
            speed.decode_step_s,
        )

    def on_peer_summary(
        self, peer: str, summary: PeerSummary | None, started_at: float, rtt_s: float
    ) -> None:
        """A poll of `peer` that began at `started_at` ended (None: it failed)."""
        if summary is None:
            self._metrics.peer_poll_failed(peer)
            return
        old = self._rtt.get(peer)
        rtt = rtt_s if old is None else old + RTT_SMOOTHING * (rtt_s - old)
        self._rtt[peer] = rtt
        now = self.now()
        self._perform(
            self._core.on_peer_summary(summary, now, started_at=started_at, rtt_s=rtt / 2)
        )

    def peer_state(self, auth: str | None) -> dict[str, object] | None:
        """The /peer/state body for an authenticated poll; None when `auth` does not verify."""
        if not self._peering.state_allowed(auth):
            return None
        summary = self._core.summary(self.now(), timestamp=self._peering.wall_clock())
        return summary_to_json(summary)

    def on_failed(self, outcome: Outcome) -> None:
        """A stream answered by the Envoy layer itself (400, 413): counted, never routed."""
        self._metrics.decided(outcome)

    def shutdown(self) -> None:
        """Reject everything queued (503) and every later decision; idempotent."""
        if self._shutting_down:
            return
        self._shutting_down = True
        self._perform(self._core.shutdown(self.now()))

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for waiting in self._waiting.values():
            waiting.future.cancel()
        self._waiting.clear()

    def state(self) -> dict[str, object]:
        state = dict(self._core.state(self.now()))
        state.update(
            region=self._region,
            streams_active=self._streams,
            waiting_for_decision=len(self._waiting),
            shutting_down=self._shutting_down,
        )
        return state

    # --- performing dispatches ------------------------------------------------------------------

    def _perform(self, actions: Sequence[Action]) -> None:
        if actions:
            now = self.now()
            for action in actions:
                self._resolve(action, now)
        self._rearm()

    def _resolve(self, dispatch: Action, now: float) -> None:
        waiting = self._waiting.pop(dispatch.request_id, None)
        if waiting is None or waiting.future.done():
            return  # the stream is gone already; the router was told by on_finished
        if isinstance(dispatch, Forwarding):
            self._forward(waiting, dispatch, now)
            return
        request, decision = waiting.request, dispatch.decision
        if isinstance(decision, Route):
            outcome = Outcome.ROUTED if request.inference else Outcome.PASSTHROUGH
            if request.inference:
                self._metrics.matched(dispatch.matched_fraction, len(request.prompt))
        else:
            outcome = decision.outcome
        self._metrics.decided(outcome, latency_s=now - waiting.known_at)
        if request.inference and outcome is not Outcome.QUEUE_FULL:
            self._metrics.dequeued(dispatch.waited_s)
        waiting.future.set_result(decision)

    def _forward(self, waiting: _Waiting, action: Forwarding, now: float) -> None:
        forward = self._peering.forward(action.request_id, action.forward.region)
        reason = "rescue" if action.rescue else action.forward.reason
        self._metrics.spilled(self._region, forward.region, reason)
        self._metrics.decided(Outcome.FORWARDED, latency_s=now - waiting.known_at)
        if waiting.request.inference:
            self._metrics.dequeued(action.waited_s)
        waiting.future.set_result(forward)

    # --- the timer ------------------------------------------------------------------------------

    def _rearm(self) -> None:
        deadline = self._core.next_deadline()
        if deadline == self._armed and (deadline is None or self._timer is not None):
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._armed = deadline
        if deadline is not None:
            delay = max(deadline - self.now(), MIN_TIMER_DELAY_S)
            self._timer = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._armed = None
        try:
            self._perform(self._core.on_timer(self.now()))
        except Exception:  # a timer callback has no caller to raise to: log and keep ticking
            log.exception("router.on_timer failed")
            self._rearm()
