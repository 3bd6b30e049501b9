"""The routing core: parse result in, dispatches out; no clock, no I/O, no threads.

The driver (the asyncio server, or the virtual-time evaluator) feeds events with their `now`:
a request became known, a response started, a stream ended, a scrape finished, a timer fired.
Each call returns the `Dispatch`es that became possible at that instant, and the driver answers
those streams. Dispatching is event-driven: the queue is polled on every event that can make a
replica available (arrival, start, finish, scrape) and on the timer for deadlines, so a request
never waits for a tick, unlike SkyLB's 10 ms loop.

Per inference request: prompt -> chained block hashes (once) -> wait queue -> on each poll, the
queue head is matched against the prefix index, the replicas' views are built, and the policy
decides. `Route` pops it, counts the dispatch in the LoadTracker (so it is pending there until it
starts or a scrape that began after it reports it: a burst between two scrapes cannot pile onto
one replica) and records its hashes for the chosen replica in the prefix index (what SGLang and
SkyLB do at dispatch). `Wait` stops the poll: FIFO, the head goes first. `Reject` pops it.

Non-inference requests (GET /v1/models, ...) never queue: least in-flight healthy replica, not
counted as pending (they never wait in an engine's batch queue), else 503 NO_REPLICA.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from skylb_extproc.dispatch.queue import Queued, WaitQueue
from skylb_extproc.hashing import affinity_key, block_hashes
from skylb_extproc.policy.base import RoutingPolicy
from skylb_extproc.policy.common import (
    CHARS_PER_TOKEN,
    least_loaded,
    matched_fraction,
    predicted_ttft,
    prefill_seconds,
)
from skylb_extproc.policy.consistent_hash import DEFAULT_KEY_BLOCKS
from skylb_extproc.state.load import LoadTracker
from skylb_extproc.state.prefix_index import PrefixIndex
from skylb_extproc.state.speed import DEFAULT_PRIOR, Speed
from skylb_extproc.types import (
    Dispatch,
    Outcome,
    Reject,
    ReplicaSpec,
    ReplicaView,
    Route,
    RouteRequest,
    ScrapedMetrics,
    Snapshot,
    Wait,
)

__all__ = ["Router", "RouterSettings"]

QUEUE_FULL = Reject(429, Outcome.QUEUE_FULL, "the load balancer's queue is full")
DEADLINE = Reject(503, Outcome.DEADLINE, "no replica became available in time")
NO_REPLICA = Reject(503, Outcome.NO_REPLICA, "no healthy replica")
SHUTDOWN = Reject(503, Outcome.SHUTDOWN, "the load balancer is shutting down")


@dataclass(frozen=True, slots=True)
class RouterSettings:
    """The router's knobs; `config.Config.router_settings()` builds them from skylb.yaml."""

    block_chars: int = 64
    max_blocks: int = 4096
    hash_salt: str = ""
    index_blocks_per_replica: int = 200_000
    index_ttl_s: float = 600.0
    queue_max_length: int = 1024
    queue_max_wait_s: float = 30.0
    stale_after_s: float = 1.0
    max_pending: int = 0
    # Response headers prove the engine took the request only if it sends them at the first
    # token. vLLM's OpenAI server sends them on accept, while the request may still be queued.
    confirm_on_headers: bool = False
    # Share of a replica's KV cache kept free when projecting what our unseen dispatches use.
    kv_headroom: float = 0.1
    # A dispatch shows in a replica's metrics only in scrapes that begin this long after it:
    # engines update their gauges once per step, and the request has to reach the engine first.
    dispatch_visible_after_s: float = 0.1
    # Every replica's speed until its counters taught better (state/speed.py): L4, Llama-3.1-8B.
    speed_prior: Speed = DEFAULT_PRIOR
    # A head that has waited this long is decided alone again (no request behind it jumps it).
    bypass_after_s: float = 10.0
    # Bound each replica's prefix index by its KV cache (scraped cache_config_info): an index
    # larger than the cache promises hits the engine has long evicted.
    index_follows_kv: bool = True


class Router:
    """Wires hashing, prefix index, load tracking, policy and wait queue; sans-I/O."""

    def __init__(
        self,
        settings: RouterSettings,
        replicas: Sequence[ReplicaSpec],
        policy: RoutingPolicy,
        rng: random.Random,
    ) -> None:
        if not replicas:
            raise ValueError("a router needs at least one replica")
        self._settings = settings
        self._policy = policy
        self._rng = rng
        self._load = LoadTracker(
            replicas,
            stale_after_s=settings.stale_after_s,
            max_pending=settings.max_pending,
            kv_headroom=settings.kv_headroom,
            visible_after_s=settings.dispatch_visible_after_s,
            speed_prior=settings.speed_prior,
        )
        self._index = PrefixIndex(
            max_blocks_per_target=settings.index_blocks_per_replica, ttl_s=settings.index_ttl_s
        )
        self._queue = WaitQueue(
            max_length=settings.queue_max_length, max_wait_s=settings.queue_max_wait_s
        )
        self._decisions = 0  # policy Route decisions so far: the round-robin cursor
        self._fills: dict[str, float] = {}  # replica -> how full its prefix index is
        # Counting every block of every request in flight is for policies that read it (Dynamo).
        self._track_blocks = bool(getattr(policy, "reads_active_blocks", False))
        # Blocks of prompt the consistent-hashing key covers without a session header.
        self._key_blocks: int = getattr(policy, "key_blocks", DEFAULT_KEY_BLOCKS)
        self._now = float("-inf")  # latest `now` seen, for next_deadline()
        self._closed = False

    # --- events ---------------------------------------------------------------------------------

    def on_request(
        self, request: RouteRequest, now: float, hashes: tuple[int, ...] | None = None
    ) -> list[Dispatch]:
        """A request is known (headers, or the whole body): answer now or queue it. `hashes`:
        its block hashes when the caller has them already (`hashes(request)`)."""
        out = self._advance(now)
        if self._closed:
            out.append(Dispatch(request.request_id, SHUTDOWN))
        elif not request.inference:
            out.append(self._passthrough(request, now))
        elif not self._queue.offer(
            request, self._hashes(request) if hashes is None else hashes, now
        ):
            out.append(Dispatch(request.request_id, QUEUE_FULL))
        else:
            out.extend(self._poll(now))
        return out

    def on_started(self, request_id: str, now: float) -> list[Dispatch]:
        """Response headers seen: with `confirm_on_headers`, no longer pending."""
        if self._settings.confirm_on_headers:
            self._load.on_started(request_id, now)
        self._load.on_prefilled(request_id, now)
        return self._advance(now) + self._poll(now)

    def on_finished(self, request_id: str, now: float) -> list[Dispatch]:
        """The stream ended (any reason). Still queued = cancelled: no Dispatch for it."""
        if self._queue.remove(request_id) is None:
            self._load.on_finished(request_id, now)
        return self._advance(now) + self._poll(now)

    def on_scrape(
        self, replica: str, metrics: ScrapedMetrics | None, *, started_at: float, now: float
    ) -> list[Dispatch]:
        """A scrape of `replica` that began at `started_at` ended at `now` (None: it failed)."""
        self._load.on_scrape(replica, metrics, started_at=started_at, now=now)
        if self._settings.index_follows_kv and metrics and metrics.num_gpu_blocks:
            tokens = metrics.num_gpu_blocks * (metrics.block_size or 16)
            blocks = int(tokens * CHARS_PER_TOKEN) // self._settings.block_chars
            self._index.set_capacity(replica, blocks)
            self._fills[replica] = self._index.fill(replica)
        return self._advance(now) + self._poll(now)

    def on_timer(self, now: float) -> list[Dispatch]:
        """Called at (or after) `next_deadline()`: expires overdue requests, then polls."""
        return self._advance(now) + self._poll(now)

    def shutdown(self, now: float) -> list[Dispatch]:
        """Reject every queued request (503 SHUTDOWN) and every later one."""
        out = self._advance(now)
        self._closed = True
        while self._queue.head() is not None:
            entry = self._queue.pop()
            out.append(Dispatch(entry.request.request_id, SHUTDOWN, now - entry.arrived))
        return out

    # --- queries --------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The earliest queue deadline or instant a healthy replica turns stale, if any."""
        instants = [self._queue.next_deadline(), self._load.stale_at(self._now)]
        return min((t for t in instants if t is not None), default=None)

    def state(self, now: float) -> dict[str, object]:
        """JSON for the admin /state endpoint."""
        return {
            "replicas": self._load.state(now),
            "queue_length": len(self._queue),
            "policy": self._policy.name,
        }

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    @property
    def block_chars(self) -> int:
        return self._settings.block_chars

    def queued(self) -> Iterator[Queued]:
        """The waiting requests, oldest first (do not change the queue while iterating)."""
        return iter(self._queue)

    def take(self, request_id: str) -> Queued | None:
        """Remove a waiting request that is answered elsewhere (forwarded to a peer region).

        Unlike `on_finished` it does not poll: the request could not be routed here anyway."""
        return self._queue.remove(request_id)

    def views(self, now: float) -> tuple[ReplicaView, ...]:
        """The replicas as policies see them at `now` (no prefix match)."""
        return self._load.views(now)

    def any_healthy(self, now: float) -> bool:
        return self._load.any_healthy(now)

    def lacks_speed_counters(self, replica: str) -> bool:
        """Whether the last successful scrape of `replica` lacked the speed counters."""
        return self._load.lacks_speed_counters(replica)

    def hashes(self, request: RouteRequest) -> tuple[int, ...]:
        """The prompt's block hashes, as the queue and the prefix index use them."""
        return self._hashes(request)

    def affinity_key(self, request: RouteRequest, hashes: Sequence[int]) -> int | None:
        """The consistent-hashing key of `request` (hashing.affinity_key with our policy's N)."""
        return affinity_key(request.hash_key, hashes, self._key_blocks)

    def best_local(
        self, request: RouteRequest, hashes: tuple[int, ...], now: float
    ) -> float | None:
        """The lowest predicted TTFT of `request` on a healthy local replica (None: none is)."""
        snapshot = self._snapshot_of(request, hashes, now)
        healthy = (v for v in snapshot.replicas if v.healthy)
        return min((predicted_ttft(v, snapshot) for v in healthy), default=None)

    @property
    def prefill_tokens_per_s(self) -> float:
        """The replicas' prior prefill speed (what a peer that reports none is assumed to have)."""
        return self._settings.speed_prior.prefill_tokens_per_s

    def local_match(self, hashes: Sequence[int], now: float) -> int:
        """Most leading blocks of `hashes` any local replica holds."""
        return max(self._index.match(hashes, now).values(), default=0) if hashes else 0

    # --- internals ------------------------------------------------------------------------------

    def _advance(self, now: float) -> list[Dispatch]:
        """Move the clock and reject requests whose deadline has come (503 DEADLINE)."""
        self._now = max(self._now, now)
        return [
            Dispatch(entry.request.request_id, DEADLINE, now - entry.arrived)
            for entry in self._queue.expire(now)
        ]

    def _poll(self, now: float) -> list[Dispatch]:
        """Decide waiting requests until none of the window can go (or the queue is empty).

        The window is the head alone, or the first 1 + `policy.lookahead` requests while the
        head has waited less than `bypass_after_s`; after each answer it starts again from the
        head, which always gets the first chance."""
        out: list[Dispatch] = []
        while (head := self._queue.head()) is not None:
            if self._policy.waits and not self._load.any_available(now, self._policy.pending_slack):
                break  # a waiting policy can only Wait: skip the prefix match (the costly part)
            window = 1
            if now - head.arrived < self._settings.bypass_after_s:
                window += self._policy.lookahead
            answered = next(
                (d for e in itertools.islice(self._queue, window) if (d := self._decide(e, now))),
                None,
            )
            if answered is None:
                break
            out.append(answered)
        return out

    def _decide(self, entry: Queued, now: float) -> Dispatch | None:
        """The policy's answer for a waiting request (it leaves the queue), or None: Wait."""
        snapshot = self._snapshot(entry, now)
        decision = self._policy.decide(entry.request, snapshot, self._rng)
        if isinstance(decision, Wait):
            return None
        self._queue.remove(entry.request.request_id)
        if isinstance(decision, Route):
            return self._dispatch(entry, decision, snapshot, now)
        return Dispatch(entry.request.request_id, decision, now - entry.arrived)

    def _dispatch(self, entry: Queued, route: Route, snapshot: Snapshot, now: float) -> Dispatch:
        """Record a Route: count it as in flight and pending, remember its prefix there."""
        request_id = entry.request.request_id
        # What the request will hold in the replica's KV cache once its answer is complete.
        prompt_tokens = math.ceil(len(entry.request.prompt) / CHARS_PER_TOKEN)
        chosen = next(v for v in snapshot.replicas if v.name == route.replica)
        # The prompt blocks the replica must compute: all but those it holds (Dynamo's new_tokens).
        uncached = max(0.0, snapshot.prompt_chars / snapshot.block_chars - chosen.matched_blocks)
        self._load.on_dispatch(
            route.replica,
            request_id,
            now,
            kv_tokens=prompt_tokens + (entry.request.max_tokens or 0),
            blocks=entry.hashes if self._track_blocks else (),
            prefill_blocks=uncached,
            prefill_s=prefill_seconds(chosen, snapshot),
        )
        self._index.insert(route.replica, entry.hashes, now)
        self._fills[route.replica] = self._index.fill(route.replica)
        self._decisions += 1
        return Dispatch(
            request_id,
            route,
            waited_s=now - entry.arrived,
            matched_fraction=matched_fraction(chosen, snapshot),
        )

    def _snapshot(self, entry: Queued, now: float) -> Snapshot:
        return self._snapshot_of(entry.request, entry.hashes, now)

    def _snapshot_of(self, request: RouteRequest, hashes: tuple[int, ...], now: float) -> Snapshot:
        matched = self._index.match(hashes, now) if hashes else None
        return Snapshot(
            replicas=self._load.views(now, matched, hashes, self._fills),
            prompt_blocks=len(hashes),
            prompt_chars=len(request.prompt),
            block_chars=self._settings.block_chars,
            decisions=self._decisions,
            max_tokens=request.max_tokens or 0,
            key_hash=self.affinity_key(request, hashes),
            queued=len(self._queue),
        )

    def _hashes(self, request: RouteRequest) -> tuple[int, ...]:
        s = self._settings
        return block_hashes(
            request.prompt,
            model=request.model,
            block_chars=s.block_chars,
            max_blocks=s.max_blocks,
            salt=s.hash_salt,
        )

    def _passthrough(self, request: RouteRequest, now: float) -> Dispatch:
        chosen = least_loaded(v for v in self._load.views(now) if v.healthy)
        if chosen is None:
            return Dispatch(request.request_id, NO_REPLICA)
        self._load.on_dispatch(chosen.name, request.request_id, now, pending=False)
        route = Route(replica=chosen.name, address=chosen.address, reason="passthrough")
        return Dispatch(request.request_id, route)
