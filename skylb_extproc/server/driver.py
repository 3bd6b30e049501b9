"""The asyncio driver around the sans-I/O Router.

The Router decides; the driver owns the clock, the futures of requests waiting for a decision,
one timer for the router's next deadline, and the metrics. Every router call returns the
dispatches that became possible, and the driver performs them all before returning: resolve the
waiting stream's future, record the outcome. Nothing here blocks and nothing awaits except
`decide`, so calls from the servicer, the scrapers and the timer never interleave inside a
router call.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from skylb_extproc.server.metrics import ServerMetrics
from skylb_extproc.types import Dispatch, Outcome, Reject, Route, RouteRequest, ScrapedMetrics

if TYPE_CHECKING:
    from skylb_extproc.router import Router

log = logging.getLogger(__name__)

# A timer never fires sooner than this after being armed: a deadline the router reports as
# already due would otherwise spin the loop if on_timer did not move it.
MIN_TIMER_DELAY_S = 0.001

SHUTDOWN_REJECT = Reject(503, Outcome.SHUTDOWN, "the load balancer is shutting down")


@dataclass(slots=True)
class _Waiting:
    request: RouteRequest
    future: asyncio.Future[Route | Reject]
    known_at: float


class Driver:
    """Runs the router in real time. Create and use it inside the running event loop."""

    def __init__(
        self,
        router: Router,
        *,
        region: str,
        metrics: ServerMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._router = router
        self._region = region
        self._metrics = metrics
        self._clock = clock
        self._ids = itertools.count(1)
        self._waiting: dict[str, _Waiting] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._armed: float | None = None
        self._streams = 0
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
        self._metrics.streams_active.set(self._streams)

    def stream_closed(self) -> None:
        self._streams -= 1
        self._metrics.streams_active.set(self._streams)

    @property
    def streams_active(self) -> int:
        return self._streams

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    # --- events ---------------------------------------------------------------------------------

    def submit(self, request: RouteRequest) -> asyncio.Future[Route | Reject]:
        """The future decision of a request: often already done, else resolved by a later event.

        A stream that ends while waiting must call `on_finished`: that takes the request out of
        the router's queue (and cancels the future).
        """
        future: asyncio.Future[Route | Reject] = asyncio.get_running_loop().create_future()
        now = self.now()
        if self._shutting_down:
            self._metrics.decided(Outcome.SHUTDOWN, latency_s=0.0)
            future.set_result(SHUTDOWN_REJECT)
            return future
        # Registered before the router call: it may dispatch this very request synchronously.
        self._waiting[request.request_id] = _Waiting(request, future, now)
        try:
            self._perform(self._router.on_request(request, now))
        except BaseException:
            self._waiting.pop(request.request_id, None)
            raise
        return future

    async def decide(self, request: RouteRequest) -> Route | Reject:
        """`submit` and wait; a cancelled wait still needs `on_finished` (the servicer does it)."""
        return await self.submit(request)

    def on_started(self, request_id: str) -> None:
        self._perform(self._router.on_started(request_id, self.now()))

    def on_finished(self, request_id: str) -> None:
        """The stream ended, for any reason; idempotent, and fine for never-decided requests."""
        waiting = self._waiting.pop(request_id, None)
        if waiting is not None:
            self._metrics.decided(Outcome.CANCELLED)
            waiting.future.cancel()
        self._perform(self._router.on_finished(request_id, self.now()))

    def on_scrape(self, replica: str, metrics: ScrapedMetrics | None, started_at: float) -> None:
        if metrics is None:
            self._metrics.scrape_failed(replica)
        dispatches = self._router.on_scrape(replica, metrics, started_at=started_at, now=self.now())
        self._perform(dispatches)

    def on_failed(self, outcome: Outcome) -> None:
        """A stream answered by the Envoy layer itself (400, 413): counted, never routed."""
        self._metrics.decided(outcome)

    def shutdown(self) -> None:
        """Reject everything queued (503) and every later decision; idempotent."""
        if self._shutting_down:
            return
        self._shutting_down = True
        self._perform(self._router.shutdown(self.now()))

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for waiting in self._waiting.values():
            waiting.future.cancel()
        self._waiting.clear()

    def state(self) -> dict[str, object]:
        state = dict(self._router.state(self.now()))
        state.update(
            region=self._region,
            streams_active=self._streams,
            waiting_for_decision=len(self._waiting),
            shutting_down=self._shutting_down,
        )
        return state

    # --- performing dispatches ------------------------------------------------------------------

    def _perform(self, dispatches: list[Dispatch]) -> None:
        if dispatches:
            now = self.now()
            for dispatch in dispatches:
                self._resolve(dispatch, now)
        self._rearm()

    def _resolve(self, dispatch: Dispatch, now: float) -> None:
        waiting = self._waiting.pop(dispatch.request_id, None)
        if waiting is None or waiting.future.done():
            return  # the stream is gone already; the router was told by on_finished
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

    # --- the timer ------------------------------------------------------------------------------

    def _rearm(self) -> None:
        deadline = self._router.next_deadline()
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
            self._perform(self._router.on_timer(self.now()))
        except Exception:  # a timer callback has no caller to raise to: log and keep ticking
            log.exception("router.on_timer failed")
            self._rearm()
