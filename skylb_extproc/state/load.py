"""What the balancer knows about each replica's load: scraped metrics plus its own dispatches.

SkyLB's selective pushing sends a request only to an *available* replica, one with no pending
(waiting, not yet batched) request, learned from `vllm:num_requests_waiting` every 100 ms. Between
two scrapes nothing stopped SkyLB's code from sending a burst to the same replica. Here the
balancer also counts its own dispatches the last scrape cannot have seen (sent after that scrape
began, not confirmed started): those the replica's free KV cache cannot admit are pending too.
vLLM admits a waiting request when blocks for its prompt are free, so with the scraped
`kv_cache_usage_perc` and `cache_config_info` (block size, block count) we project the usage our
unseen dispatches add, in dispatch order, and count the ones that overflow
`(1 - kv_headroom)` of the cache. The engine's sequence limit (`max_num_seqs`) is not exported,
so it is learned: the running count of a scrape that shows waiting requests is the most the
replica batches (raised when a later scrape shows more running and none waiting); unseen
dispatches beyond it are pending too. An engine that reports no KV numbers gets the
conservative rule: every unseen dispatch is pending. A dispatch sent before the scrape began is
already inside the scraped numbers.

Rules (docs/internals.md):
- healthy: the last scrape succeeded and is younger than `stale_after_s` (measured from the
  moment the result arrived). Never scraped = unhealthy; a failed scrape = unhealthy at once.
- pending = scraped waiting + those of our unstarted dispatches sent at or after the last
  successful scrape's start (same instant: counted, we cannot know the order) that the scraped
  free KV cannot admit (all of them when the engine reports no KV numbers).
- available = healthy and pending <= max_pending.
- in_flight = dispatched and not finished.
- backlog_s = the prefill we sent that a first-token-free model says is still queued or running:
  the replica is a FIFO server of prefill seconds (each dispatch adds its predicted prefill at
  the replica's speed); a finished request caps it at the prefill of those still unfinished.
  vLLM answers headers on accept, not at the first token, so no start signal is used: the live
  server and the evaluator predict the same way.
- admit_wait_s = pending x the replica's recent seconds between finishes (our requests, last
  `FINISH_WINDOW_S`): a request the engine cannot admit waits for requests ahead to end.
- active_blocks = distinct prompt block hashes of our in-flight requests there; prefill_blocks =
  the uncached prompt blocks (at dispatch) of those without a first token yet (`on_prefilled`).
  What NVIDIA Dynamo's router counts of the requests it routed (its ActiveSequences).

A scrape result that began before the one already recorded is ignored: it is older news.

Each replica's prefill and decode speed is learned from its successful scrapes by its own
`SpeedEstimator` (state/speed.py), starting from `speed_prior`; views carry it.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from skylb_extproc.state.speed import DEFAULT_PRIOR, Speed, SpeedEstimator
from skylb_extproc.types import ReplicaSpec, ReplicaView, ScrapedMetrics

__all__ = ["FINISH_WINDOW_S", "LoadTracker"]

FINISH_WINDOW_S = 10.0
# Seconds between finishes assumed before any finish was seen (a cold, saturated replica).
NO_FINISH_INTERVAL_S = 2.0


@dataclass
class _Replica:
    spec: ReplicaSpec
    speed: SpeedEstimator
    reuse: _HitRate = field(default_factory=lambda: _HitRate())
    metrics: ScrapedMetrics | None = None  # last successful scrape
    ok_at: float | None = None  # when the last successful scrape's result arrived
    scrape_started_at: float | None = None  # start of the last recorded scrape (ok or failed)
    failed: bool = True  # never scraped counts as failed
    seq_cap: int | None = None  # learned batch limit: running when requests were seen waiting
    in_flight: set[str] = field(default_factory=set)
    # Our unstarted dispatches the last successful scrape cannot have seen:
    # id -> (dispatched at, tokens it will hold in the KV cache: prompt + max_tokens).
    unseen: dict[str, tuple[float, int]] = field(default_factory=dict)
    busy_until: float = -math.inf  # when the prefill we sent ends, if the replica is FIFO
    prefill_s: dict[str, float] = field(default_factory=dict)  # unfinished id -> its prefill
    finishes: deque[float] = field(default_factory=deque)  # our finishes, last FINISH_WINDOW_S
    # Prompt block hashes of our in-flight requests -> how many of them hold each one. Chained
    # hashes make this set prefix-closed: a request holding block i holds blocks 0..i-1.
    blocks: dict[int, int] = field(default_factory=dict)
    # Our in-flight requests without a first token yet -> their uncached prompt blocks.
    prefill: dict[str, float] = field(default_factory=dict)


class _HitRate:
    """The share of prompt tokens a replica served from its prefix cache lately: an EWMA of the
    scraped hit / query counter deltas (vLLM's and SGLang's prefix_cache_hits/queries)."""

    ALPHA = 0.1  # per scrape with new queries: ~10 scrapes of memory

    def __init__(self) -> None:
        self.rate = 0.0
        self._last: tuple[float, float] | None = None

    def on_scrape(self, m: ScrapedMetrics) -> None:
        if m.prefix_hits is None or m.prefix_queries is None:
            return
        last, self._last = self._last, (m.prefix_hits, m.prefix_queries)
        if last is None:
            return
        hits, queries = m.prefix_hits - last[0], m.prefix_queries - last[1]
        if queries > 0 and 0 <= hits <= queries:  # a restart makes them negative: skipped
            self.rate += self.ALPHA * (hits / queries - self.rate)


class LoadTracker:
    """Per-replica health, pending and in-flight counts; one per router."""

    def __init__(
        self,
        replicas: Sequence[ReplicaSpec],
        *,
        stale_after_s: float,
        max_pending: int,
        kv_headroom: float = 0.1,
        visible_after_s: float = 0.0,
        speed_prior: Speed | None = None,
    ) -> None:
        if stale_after_s <= 0:
            raise ValueError(f"stale_after_s must be > 0, got {stale_after_s}")
        if max_pending < 0:
            raise ValueError(f"max_pending must be >= 0, got {max_pending}")
        self._replicas: dict[str, _Replica] = {}
        prior = speed_prior or DEFAULT_PRIOR
        for spec in replicas:
            if spec.name in self._replicas:
                raise ValueError(f"duplicate replica name {spec.name!r}")
            self._replicas[spec.name] = _Replica(spec, SpeedEstimator(prior))
        self._stale_after_s = stale_after_s
        self._max_pending = max_pending
        self._kv_headroom = kv_headroom
        self._visible_after_s = visible_after_s
        self._where: dict[str, str] = {}  # request id -> replica, while in flight
        self._version = 0  # bumped by every event that changes what views show
        self._base_key: tuple[float, int, int] | None = None
        self._base: tuple[ReplicaView, ...] = ()
        self._held: dict[str, Sequence[int]] = {}  # request id -> its prompt block hashes

    def on_dispatch(
        self,
        replica: str,
        request_id: str,
        now: float,
        *,
        pending: bool = True,
        kv_tokens: int = 0,
        prefill_s: float = 0.0,
        blocks: Sequence[int] = (),
        prefill_blocks: float = 0.0,
    ) -> None:
        """We sent `request_id` to `replica`.

        `pending=False` for requests that never wait in the engine's queue (pass-through calls
        such as GET /v1/models): they count as in flight but never make a replica unavailable.
        `kv_tokens`: what the request will hold in the replica's KV cache (prompt + max_tokens),
        for projecting whether the replica can admit it before a scrape has seen it.
        `prefill_s`: its predicted prefill there, added to the replica's backlog.
        `blocks`: its prompt block hashes; `prefill_blocks`: the prompt blocks the replica must
        compute (not cached there); both held until it finishes (prefill: until `on_prefilled`).
        """
        self._version += 1
        state = self._get(replica)
        self.on_finished(request_id, now)  # a reused id replaces the old record
        self._where[request_id] = replica
        state.in_flight.add(request_id)
        if pending:
            state.unseen[request_id] = (now, kv_tokens)
        if prefill_s > 0:
            state.busy_until = max(now, state.busy_until) + prefill_s
            state.prefill_s[request_id] = prefill_s
        if blocks:
            self._held[request_id] = blocks
            for h in blocks:
                state.blocks[h] = state.blocks.get(h, 0) + 1
        if prefill_blocks > 0:
            state.prefill[request_id] = prefill_blocks

    def on_prefilled(self, request_id: str, now: float) -> None:
        """The first token came back: its prompt is computed (Dynamo's mark_prefill_completed)."""
        self._version += 1
        replica = self._where.get(request_id)
        if replica is not None:
            self._replicas[replica].prefill.pop(request_id, None)

    def on_started(self, request_id: str, now: float) -> None:
        """Response headers seen: the engine has taken the request, it no longer waits."""
        self._version += 1
        replica = self._where.get(request_id)
        if replica is not None:
            self._replicas[replica].unseen.pop(request_id, None)

    def on_finished(self, request_id: str, now: float) -> None:
        """The stream ended, for any reason. Unknown ids are ignored (never dispatched)."""
        self._version += 1
        replica = self._where.pop(request_id, None)
        if replica is not None:
            state = self._replicas[replica]
            state.in_flight.discard(request_id)
            state.unseen.pop(request_id, None)
            if state.prefill_s.pop(request_id, None) is not None:
                # It is done, so at most the prefill of those still unfinished is left.
                left = now + sum(state.prefill_s.values())
                state.busy_until = min(state.busy_until, left)
                state.finishes.append(now)
                _trim(state.finishes, now)
            state.prefill.pop(request_id, None)
            for h in self._held.pop(request_id, ()):
                left = state.blocks[h] - 1
                if left:
                    state.blocks[h] = left
                else:
                    del state.blocks[h]

    def on_scrape(
        self, replica: str, metrics: ScrapedMetrics | None, *, started_at: float, now: float
    ) -> None:
        """Record a scrape that began at `started_at` and ended at `now`; None = it failed."""
        self._version += 1
        state = self._get(replica)
        if state.scrape_started_at is not None and started_at < state.scrape_started_at:
            return
        state.scrape_started_at = started_at
        if metrics is None:
            state.failed = True
            return
        state.failed = False
        state.metrics = metrics
        state.seq_cap = _learn_seq_cap(state.seq_cap, metrics)
        state.speed.on_scrape(metrics, now)
        state.reuse.on_scrape(metrics)
        state.ok_at = now
        # Dispatches sent before this scrape began are inside its numbers from now on.
        # An engine publishes its gauges per step: a request that reached it during the step
        # (or was still on the wire) is not in them yet.
        visible_before = started_at - self._visible_after_s
        state.unseen = {rid: u for rid, u in state.unseen.items() if u[0] >= visible_before}

    def views(
        self,
        now: float,
        matched: Mapping[str, int] | None = None,
        hashes: Sequence[int] = (),
        fills: Mapping[str, float] | None = None,
    ) -> tuple[ReplicaView, ...]:
        """Every configured replica, in config order, as policies see it at `now`; `hashes`:
        the request's block hashes, for `active_overlap_blocks`; `fills`: each replica's prefix
        index occupancy (the router's)."""
        # What does not depend on the request is built once per instant and state: a waiting
        # queue is decided again on every event, request after request, on the same state.
        key = (now, self._version, id(fills))
        if self._base_key != key:
            self._base = tuple(
                self._view(name, s, now, fills) for name, s in self._replicas.items()
            )
            self._base_key = key
        matched = matched or {}
        tracked = hashes and any(s.blocks for s in self._replicas.values())
        if not matched and not tracked:
            return self._base
        out: list[ReplicaView] = []
        for view, state in zip(self._base, self._replicas.values(), strict=True):
            m = matched.get(view.name, 0)
            overlap = _held_prefix(state.blocks, hashes) if tracked else 0
            if m or overlap:
                view = replace(view, matched_blocks=m, active_overlap_blocks=overlap)
            out.append(view)
        return tuple(out)

    def _view(
        self, name: str, state: _Replica, now: float, fills: Mapping[str, float] | None
    ) -> ReplicaView:
        healthy = self._healthy(state, now)
        pending, free = self._admission(state)
        interval = _finish_interval(state.finishes, now)
        m = state.metrics
        speed = state.speed.speed
        return ReplicaView(
            name=name,
            address=state.spec.address,
            healthy=healthy,
            available=healthy and pending <= self._max_pending,
            in_flight=len(state.in_flight),
            pending=pending,
            prefill_tokens_per_s=speed.prefill_tokens_per_s,
            decode_step_s=speed.decode_step_s,
            backlog_s=max(0.0, state.busy_until - now),
            admit_wait_s=pending * interval,
            kv_free_tokens=free,
            finish_interval_s=interval,
            cache_fill=fills.get(name, 0.0) if fills else 0.0,
            cache_hit_rate=state.reuse.rate,
            waiting=0.0 if m is None else m.waiting,
            kv_usage=0.0 if m is None or m.kv_usage is None else m.kv_usage,
            active_blocks=len(state.blocks),
            prefill_blocks=sum(state.prefill.values()),
        )

    def any_healthy(self, now: float) -> bool:
        """Whether views(now) has a healthy replica (without building the views)."""
        return any(self._healthy(s, now) for s in self._replicas.values())

    def any_available(self, now: float, slack: int = 0) -> bool:
        """Whether views(now) has an available replica, or a healthy one with at most `slack`
        pending requests (without building the views)."""
        most = max(self._max_pending, slack)
        return any(
            self._healthy(s, now) and self._pending(s) <= most for s in self._replicas.values()
        )

    def lacks_speed_counters(self, name: str) -> bool:
        """Whether the last successful scrape of `name` lacked the speed counters (its speed
        stays the prior's); False before any successful scrape."""
        return self._get(name).speed.has_counters is False

    def replica(self, name: str) -> ReplicaSpec:
        """The configured replica called `name` (KeyError if there is none)."""
        return self._get(name).spec

    def stale_at(self, now: float) -> float | None:
        """The earliest instant after `now` at which a healthy replica turns stale, if any."""
        instants = [
            s.ok_at + self._stale_after_s
            for s in self._replicas.values()
            if self._healthy(s, now) and s.ok_at is not None
        ]
        return min(instants, default=None)

    def state(self, now: float) -> list[dict[str, object]]:
        """JSON-ready per-replica state for the admin /state endpoint."""
        out: list[dict[str, object]] = []
        for view in self.views(now):
            state = self._replicas[view.name]
            metrics = state.metrics
            speed = state.speed.speed
            out.append(
                {
                    "name": view.name,
                    "address": view.address,
                    "healthy": view.healthy,
                    "available": view.available,
                    "in_flight": view.in_flight,
                    "pending": view.pending,
                    "waiting": None if metrics is None else metrics.waiting,
                    "running": None if metrics is None else metrics.running,
                    "kv_usage": None if metrics is None else metrics.kv_usage,
                    "scrape_age_s": None if state.ok_at is None else now - state.ok_at,
                    "speed": {
                        "prefill_tokens_per_s": speed.prefill_tokens_per_s,
                        "decode_step_s": speed.decode_step_s,
                        "source": speed.source,
                    },
                }
            )
        return out

    def _get(self, name: str) -> _Replica:
        try:
            return self._replicas[name]
        except KeyError:
            raise KeyError(f"unknown replica {name!r}") from None

    def _healthy(self, state: _Replica, now: float) -> bool:
        return (
            not state.failed and state.ok_at is not None and now - state.ok_at < self._stale_after_s
        )

    def _pending(self, state: _Replica) -> int:
        return self._admission(state)[0]

    def _admission(self, state: _Replica) -> tuple[int, float]:
        """(pending, KV tokens still free once our unseen dispatches are in; inf: unknown)."""
        # ceil: any positive waiting gauge means the engine's batch is full.
        m = state.metrics
        scraped = 0 if m is None else math.ceil(m.waiting)
        if m is None or m.kv_usage is None or not m.num_gpu_blocks or not m.block_size:
            return scraped + len(state.unseen), math.inf
        capacity = m.num_gpu_blocks * (1.0 - self._kv_headroom)
        used = m.kv_usage * m.num_gpu_blocks
        seqs_left = math.inf if state.seq_cap is None else state.seq_cap - m.running
        overflow = 0
        for n, (_, tokens) in enumerate(state.unseen.values(), 1):  # dispatch order
            used += max(1, math.ceil(tokens / m.block_size))
            overflow += used > capacity or n > seqs_left
        return scraped + overflow, max(0.0, capacity - used) * m.block_size


def _learn_seq_cap(cap: int | None, m: ScrapedMetrics) -> int | None:
    """Requests waiting next to `running` ones: the batch is full at `running`."""
    running = math.floor(m.running)
    if m.waiting > 0:
        return running
    if cap is not None and running > cap:
        return running
    return cap


def _trim(finishes: deque[float], now: float) -> None:
    while finishes and finishes[0] < now - FINISH_WINDOW_S:
        finishes.popleft()


def _finish_interval(finishes: deque[float], now: float) -> float:
    """Mean seconds between our finishes over the last window (a guess before any)."""
    _trim(finishes, now)
    if not finishes:
        return NO_FINISH_INTERVAL_S
    return FINISH_WINDOW_S / len(finishes)


def _held_prefix(held: Mapping[int, int], hashes: Sequence[int]) -> int:
    """How many leading `hashes` are in `held`. The set is prefix-closed along a hash chain, so
    the answer is the first miss, found by bisection instead of a lookup per block."""
    if not held or not hashes:
        return 0
    return bisect_left(range(len(hashes)), True, key=lambda i: hashes[i] not in held)
