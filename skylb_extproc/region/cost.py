"""`spill.mode: cost` — our extension: forward when the expected time to first token is lower.

SkyLB's rule forwards the head whenever a peer has a free replica, however short our own wait
and however far the peer. It ignores the RTT it measures and the prefill a local prefix hit
saves. This model compares, for the head of our queue (asked only when no local replica is
available; the same candidates as the paper rule, `spill.candidates`):

    local  = wait(queue_length, our dispatch rate) + prefill(prompt - best local prefix match)
    peer p = RTT(p) + wait(p.queue_length, p.dispatch_rate) + prefill(prompt - our index for p)

- `wait(n, rate)`: n requests must be dispatched first, at `rate` per second; 0 for n = 0, and
  `max_wait_s` (the queue deadline) when nothing drains. Our wait counts the whole queue (the
  head included): it is what a request arriving now expects, so a deeper queue spills sooner.
- `prefill(chars)`: chars / chars_per_token / prefill_tokens_per_s.
- RTT(p) = 2 x the one-way delay: the request goes there and its first token comes back.

Hysteresis, so traffic does not flap between regions on noise: each peer has a sticky state.
An "off" peer turns on only when it beats local by `margin_s`; an "on" peer turns off only when
it is worse than local by `margin_s`. A peer that goes stale turns off. Among "on" candidates
the cheapest is chosen (ties: load, then RTT, then peer order); none -> None (wait at home).
Parameters and defaults in `CostSettings`; reason label "cost".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from skylb_extproc.region.spill import Forward, RegionView

__all__ = ["CostModel", "CostSettings", "wait_estimate"]


@dataclass(frozen=True, slots=True)
class CostSettings:
    margin_s: float = 0.05
    prefill_tokens_per_s: float = 4700.0  # Llama-3.1-8B on one L4 (ARCHITECTURE.md §6)
    chars_per_token: float = 4.0
    max_wait_s: float = 30.0  # the estimate when nothing drains: the queue's deadline


def wait_estimate(ahead: int, rate: float, cap: float) -> float:
    """Seconds until `ahead` dispatches happen at `rate` per second, at most `cap`."""
    if ahead <= 0:
        return 0.0
    if rate <= 0:
        return cap
    return min(ahead / rate, cap)


class CostModel:
    """Expected-TTFT comparison with per-peer sticky on/off state (the hysteresis)."""

    def __init__(self, settings: CostSettings) -> None:
        if settings.prefill_tokens_per_s <= 0 or settings.chars_per_token <= 0:
            raise ValueError("prefill_tokens_per_s and chars_per_token must be > 0")
        self.settings = settings
        self._on: set[str] = set()

    def prefill_s(self, uncached_chars: float) -> float:
        s = self.settings
        return max(0.0, uncached_chars) / s.chars_per_token / s.prefill_tokens_per_s

    def local_cost(
        self, *, queue_length: int, rate: float, prompt_chars: int, matched_chars: int
    ) -> float:
        wait = wait_estimate(queue_length, rate, self.settings.max_wait_s)
        return wait + self.prefill_s(prompt_chars - matched_chars)

    def peer_cost(self, peer: RegionView, *, prompt_chars: int, matched_chars: int) -> float:
        wait = wait_estimate(peer.queue_length, peer.dispatch_rate, self.settings.max_wait_s)
        return 2 * peer.rtt_s + wait + self.prefill_s(prompt_chars - matched_chars)

    def choose(
        self,
        peers: Sequence[RegionView],
        candidates: Sequence[RegionView],
        *,
        local_s: float,
        matched: Mapping[str, int],
        prompt_chars: int,
        block_chars: int,
    ) -> Forward | None:
        """Update the sticky states from this decision's costs; the peer to forward to, if any.

        `peers`: every peer view (stale ones turn off); `candidates`: those that may take it now;
        `matched`: region -> leading blocks in our index of what we forwarded there."""
        for peer in peers:
            if not peer.fresh:
                self._on.discard(peer.name)
        costs: dict[str, float] = {}
        for peer in candidates:
            chars = min(prompt_chars, matched.get(peer.name, 0) * block_chars)
            costs[peer.name] = cost = self.peer_cost(
                peer, prompt_chars=prompt_chars, matched_chars=chars
            )
            self._flip(peer.name, cost, local_s)
        on = [p for p in candidates if p.name in self._on]
        if not on:
            return None
        best = min(on, key=lambda p: (costs[p.name], p.load, p.rtt_s))
        return Forward(best.name, "cost", matched.get(best.name, 0))

    def is_on(self, peer: str) -> bool:
        return peer in self._on

    def _flip(self, peer: str, cost: float, local_s: float) -> None:
        margin = self.settings.margin_s
        if peer in self._on and cost > local_s + margin:
            self._on.discard(peer)
        elif peer not in self._on and cost + margin < local_s:
            self._on.add(peer)
