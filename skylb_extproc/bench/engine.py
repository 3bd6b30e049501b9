"""The virtual-time engine: the shared Router and ReplicaEngine driven by a discrete-event loop.

Why virtual time: the paper's claims must be checkable in seconds without GPUs, and a run must be
reproducible byte for byte. Events sit in a heap ordered by (time, kind, seq); the loop owns the
sequence number, so equal times and kinds resolve in scheduling order and nothing else (no wall
clock, no hash order, no unseeded randomness) can change a result.

Network model: one-way latency `rtt.one_way(a, b)` between regions, none inside a region. A
request travels client -> entry balancer -> (serving balancer, if spilled) -> replica, and its
tokens travel back the same way; TTFT and E2E are measured at the client. Balancers learn of a
response start / end when it passes through them (`on_started` at the first token).

Polling: every 100 ms each balancer scrapes its replicas (a remote replica's numbers are read
one-way RTT after the scrape starts and arrive a round trip after it: `started_at` tells the
LoadTracker which dispatches the scrape could have seen), and each SkyLB region polls its peers'
summaries the same way. Router deadlines (queue expiry, replica staleness) get timer events.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from skylb_extproc.bench.records import OK, RequestRecord
from skylb_extproc.bench.timeline import Timeline
from skylb_extproc.bench.topology import System
from skylb_extproc.bench.trace import TraceRequest, prompt_text
from skylb_extproc.bench.workloads import Workload
from skylb_extproc.region.balancer import Action, Forwarding
from skylb_extproc.sim.model import EngineMetrics, Finished, FirstToken, ReplicaEngine
from skylb_extproc.types import Reject, Route, RouteRequest, ScrapedMetrics

__all__ = ["SCRAPE_INTERVAL_S", "RunResult", "Simulation", "to_scraped"]

SCRAPE_INTERVAL_S = 0.1
SAMPLE_INTERVAL_S = 1.0
WARMUP_S = 1.0
# Event kinds, in the order they run at equal times. WAKE runs last so that requests reaching a
# replica at the same instant share its next step, as they would in vLLM.
(SEND, LB_REQUEST, LB_STARTED, LB_FINISHED, TICK, REMOTE_SAMPLE, REMOTE_DELIVER, PEER_SAMPLE,
 PEER_DELIVER, TIMER, REPLICA_ADD, CLIENT_DONE, SAMPLE, WAKE) = range(14)  # fmt: skip


def to_scraped(m: EngineMetrics) -> ScrapedMetrics:
    """The replica's /metrics as the balancer's scraper would parse them."""
    return ScrapedMetrics(
        waiting=float(m.waiting),
        running=float(m.running),
        kv_usage=m.kv_usage,
        block_size=m.block_size,
        num_gpu_blocks=m.num_gpu_blocks,
        prefix_hits=float(m.prefix_cache_hits),
        prefix_queries=float(m.prefix_cache_queries),
        prompt_tokens=float(m.prompt_tokens_total),
        generation_tokens=float(m.generation_tokens_total),
        prefill_seconds_sum=m.prefill_seconds_sum,
        prefill_seconds_count=float(m.prefill_seconds_count),
        decode_seconds_sum=m.decode_seconds_sum,
        finished_prompt_tokens=float(m.finished_prompt_tokens),
        finished_computed_tokens=float(m.finished_computed_tokens),
    )


@dataclass(slots=True)
class _Flight:
    request: TraceRequest
    record: RequestRecord
    route_request: RouteRequest | None = None  # holds the prompt text until a replica has it
    serving: str = ""  # region of the balancer that dispatched it


@dataclass
class RunResult:
    records: list[RequestRecord]
    timeline: Timeline


class Simulation:
    """One run of one system on one workload."""

    def __init__(
        self,
        system: System,
        workload: Workload,
        *,
        on_done: Callable[[int], None] | None = None,
    ) -> None:
        self.s = system
        self.workload = workload
        self._heap: list[tuple[float, int, int, Any]] = []
        self._seq = 0
        self.now = 0.0
        self._flights: dict[str, _Flight] = {}
        self._records: list[RequestRecord] = []
        self._open = 0  # requests scheduled to be sent and not yet done at their client
        self._done = 0
        self._wake_at: dict[str, float] = {}
        self._timer_at: dict[str, float] = {}
        self._on_done = on_done
        self._t0 = 0.0
        self._summaries: dict[str, tuple[float, Any]] = {}
        self.timeline = Timeline(list(dict.fromkeys(system.replica_region.values())))
        self._handlers: dict[int, Callable[[Any], None]] = {
            SEND: self._on_send, LB_REQUEST: self._on_lb_request, LB_STARTED: self._on_started,
            LB_FINISHED: self._on_finished, TICK: self._on_tick, REMOTE_SAMPLE: self._on_sample,
            REMOTE_DELIVER: self._on_deliver, PEER_SAMPLE: self._on_peer_sample,
            PEER_DELIVER: self._on_peer_deliver, TIMER: self._on_timer,
            REPLICA_ADD: self._on_replica_add, CLIENT_DONE: self._on_client_done,
            SAMPLE: self._on_timeline, WAKE: self._on_wake,
        }  # fmt: skip

    def push(self, t: float, kind: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, kind, self._seq, payload))

    def run(self) -> RunResult:
        first = self.workload.start()
        for req in first:
            self._schedule_send(req)
        # The system was running before the trace starts: replicas are scraped (healthy) and
        # peers polled by the first arrival, so no policy rejects it for lack of a first scrape.
        self._t0 = min((r.arrival for r in first), default=0.0) - WARMUP_S
        self.push(self._t0, TICK, 0)
        self.push(self._t0 + WARMUP_S, SAMPLE, None)
        while self._heap:
            t, kind, _, payload = heapq.heappop(self._heap)
            self.now = t
            self._handlers[kind](payload)
        return RunResult(self._records, self.timeline)

    # --- clients ----------------------------------------------------------------------------

    def _schedule_send(self, req: TraceRequest) -> None:
        self._open += 1
        self.push(req.arrival, SEND, req)

    def _on_send(self, req: TraceRequest) -> None:
        entry = self.s.entry[req.region]
        rec = RequestRecord(req.request_id, req.region, req.arrival, balancer=entry)
        rec.prompt_tokens = req.prompt_tokens
        self._records.append(rec)
        self._flights[req.request_id] = _Flight(req, rec)
        self.push(
            self.now + self._rtt(req.region, entry), LB_REQUEST, (req.request_id, entry, False)
        )

    def _back(self, flight: _Flight, start: str) -> float:
        """Latency from region `start` back to the client along the request's path."""
        rec = flight.record
        serving = flight.serving or rec.balancer
        return (self._rtt(start, serving) + self._rtt(serving, rec.balancer)
                + self._rtt(rec.balancer, rec.region))  # fmt: skip

    def _on_client_done(self, rid: str) -> None:
        flight = self._flights.pop(rid)
        self._open -= 1
        self._done += 1
        rec = flight.record
        if rec.outcome == OK:
            self.timeline.completed(self.now, rec.prompt_tokens + rec.output_tokens)
        if self._on_done is not None:
            self._on_done(self._done)
        nxt = self.workload.on_done(flight.request, self.now)
        if nxt is not None:
            self._schedule_send(nxt)

    # --- balancers --------------------------------------------------------------------------

    def _on_lb_request(self, payload: tuple[str, str, bool]) -> None:
        rid, region, forwarded = payload
        flight = self._flights[rid]
        if flight.route_request is None:
            req = flight.request
            flight.route_request = RouteRequest(
                request_id=rid, path="/v1/completions", model=self.s.model,
                prompt=prompt_text(req), stream=True, max_tokens=req.output_tokens,
                hash_key=req.group,
            )  # fmt: skip
        if forwarded:  # the peer verified the marker: it knows where the request comes from
            flight.route_request = replace(flight.route_request, origin=flight.serving)
        flight.serving = region
        lb = self.s.balancers[region]
        self._act(region, lb.on_request(flight.route_request, self.now))

    def _on_started(self, payload: tuple[str, str]) -> None:
        rid, region = payload
        self._act(region, self.s.balancers[region].on_started(rid, self.now))

    def _on_finished(self, payload: tuple[str, str]) -> None:
        rid, region = payload
        self._act(region, self.s.balancers[region].on_finished(rid, self.now))

    def _on_timer(self, region: str) -> None:
        if self._timer_at.get(region) == self.now:
            del self._timer_at[region]
            self._act(region, self.s.balancers[region].on_timer(self.now))

    def _act(self, region: str, actions: list[Action]) -> None:
        """Perform what a balancer decided, then re-arm its timer."""
        for a in actions:
            flight = self._flights[a.request_id]
            if isinstance(a, Forwarding):
                flight.record.forwarded_to = a.forward.region
                flight.record.queued_s += a.waited_s
                self.timeline.spilled(region)
                self.push(self.now + self._rtt(region, a.forward.region), LB_REQUEST,
                          (flight.record.id, a.forward.region, True))  # fmt: skip
            elif isinstance(a.decision, Route):
                replica = a.decision.replica
                rrec = flight.record
                rrec.dispatch, rrec.replica = self.now, replica
                rrec.est_match = a.matched_fraction
                rrec.queued_s += a.waited_s
                rrec.replica_region = self.s.replica_region[replica]
                self.push(self.now + self._rtt(region, rrec.replica_region), REPLICA_ADD, rrec.id)
            else:
                self._reject(flight, a.decision)
        deadline = self.s.balancers[region].next_deadline()
        armed = self._timer_at.get(region)
        if deadline is not None and (armed is None or deadline < armed):
            self._timer_at[region] = max(deadline, self.now)
            self.push(max(deadline, self.now), TIMER, region)

    def _reject(self, flight: _Flight, decision: Reject) -> None:
        flight.record.outcome = decision.outcome.value
        flight.route_request = None
        self.push(self.now + self._back(flight, flight.serving), CLIENT_DONE, flight.record.id)

    # --- replicas ---------------------------------------------------------------------------

    def _on_replica_add(self, rid: str) -> None:
        flight = self._flights[rid]
        rec = flight.record
        engine = self.s.replicas[rec.replica]
        assert flight.route_request is not None
        prompt, flight.route_request = flight.route_request.prompt, None
        try:
            engine.validate(prompt, flight.request.output_tokens)
        except ValueError:
            rec.outcome = "too_long"  # the replica answers 400; nothing is generated
            self.push(self.now + self._rtt(rec.replica_region, flight.serving), LB_FINISHED,
                      (rid, flight.serving))  # fmt: skip
            self.push(self.now + self._back(flight, rec.replica_region), CLIENT_DONE, rid)
            return
        engine.add(rid, prompt, flight.request.output_tokens, self.now)
        self.push(self.now, WAKE, rec.replica)

    def _on_wake(self, replica: str) -> None:
        """Run the replica to now; go on in place while its next output comes before any event.

        Nothing else can happen before the heap's next event, so running the replica without a
        round trip through the heap is the same schedule. It is woken only at steps that can
        emit a first token or a finish (`next_output_time`: a decode window's steps in between
        just add tokens); whoever reads its metrics earlier calls `catch_up` first.
        """
        engine = self.s.replicas[replica]
        while True:
            for ev in engine.advance(self.now):
                if isinstance(ev, FirstToken):
                    self._first_token(ev)
                elif isinstance(ev, Finished):
                    self._finished(ev)
            t = engine.next_output_time()
            if t is None:
                return
            if self._heap and t >= self._heap[0][0]:
                break
            self.now = t
        if self._wake_at.get(replica) != t:
            self._wake_at[replica] = t
            self.push(t, WAKE, replica)

    def _first_token(self, ev: FirstToken) -> None:
        flight = self._flights[ev.request_id]
        rec = flight.record
        rec.cached_tokens = ev.cached_tokens
        rec.ttft = ev.t + self._back(flight, rec.replica_region) - rec.arrival
        self.push(ev.t + self._rtt(rec.replica_region, flight.serving), LB_STARTED,
                  (rec.id, flight.serving))  # fmt: skip

    def _finished(self, ev: Finished) -> None:
        flight = self._flights[ev.request_id]
        rec = flight.record
        rec.outcome, rec.output_tokens, rec.cached_tokens = (
            OK,
            ev.completion_tokens,
            ev.cached_tokens,
        )
        back = self._back(flight, rec.replica_region)
        rec.e2e = ev.t + back - rec.arrival
        self.push(ev.t + self._rtt(rec.replica_region, flight.serving), LB_FINISHED,
                  (rec.id, flight.serving))  # fmt: skip
        self.push(ev.t + back, CLIENT_DONE, rec.id)

    # --- polling ----------------------------------------------------------------------------

    def _on_tick(self, k: int) -> None:
        for region, replicas in self.s.scrapes.items():
            by_region: dict[str, list[str]] = {}
            for name in replicas:
                by_region.setdefault(self.s.replica_region[name], []).append(name)
            for where, names in by_region.items():
                self.push(self.now + self._rtt(region, where), REMOTE_SAMPLE,
                          (region, where, self.now, names))  # fmt: skip
            for peer in self.s.peers.get(region, []):
                self.push(self.now + self._rtt(region, peer), PEER_SAMPLE, (region, peer, self.now))
        if self._open > 0:  # tick k at t0 + k * interval: no drift from repeated additions
            self.push(self._t0 + (k + 1) * SCRAPE_INTERVAL_S, TICK, k + 1)

    def _on_sample(self, payload: tuple[str, str, float, list[str]]) -> None:
        region, where, started, names = payload
        got = [(n, to_scraped(self._replica_now(n).metrics())) for n in names]
        self.push(self.now + self._rtt(where, region), REMOTE_DELIVER, (region, started, got))

    def _on_deliver(self, payload: tuple[str, float, list[tuple[str, ScrapedMetrics]]]) -> None:
        region, started, got = payload
        lb = self.s.balancers[region]
        actions: list[Action] = []
        for name, metrics in got:
            actions += lb.on_scrape(name, metrics, started_at=started, now=self.now)
        self._act(region, actions)  # performed in order, as if one by one: same pushes

    def _on_peer_sample(self, payload: tuple[str, str, float]) -> None:
        region, peer, started = payload
        cached = self._summaries.get(peer)
        if cached is None or cached[0] != self.now:  # several peers poll at the same instant
            cached = self._summaries[peer] = (self.now, self.s.balancers[peer].summary(self.now))
        summary = cached[1]
        self.push(self.now + self._rtt(peer, region), PEER_DELIVER, (region, summary, started))

    def _on_peer_deliver(self, payload: tuple[str, Any, float]) -> None:
        region, summary, started = payload
        lb = self.s.balancers[region]
        self._act(region, lb.on_peer_summary(summary, self.now, started_at=started))

    def _on_timeline(self, _: None) -> None:
        queues = {r: lb.queue_length for r, lb in self.s.balancers.items()}
        busy: dict[str, int] = {}
        for name in self.s.replicas:
            m = self._replica_now(name).metrics()
            where = self.s.replica_region[name]
            busy[where] = busy.get(where, 0) + m.running + m.waiting
        self.timeline.sample(self.now, queues, busy)
        if self._open > 0:
            self.push(self.now + SAMPLE_INTERVAL_S, SAMPLE, None)

    def _replica_now(self, name: str) -> ReplicaEngine:
        engine = self.s.replicas[name]
        engine.catch_up(self.now)
        return engine

    def _rtt(self, a: str, b: str) -> float:
        return self.s.rtt.one_way(a, b)
