"""Selection helpers and parameter parsing shared by the policies.

Kept apart from `base.py` (which imports every policy for its registry) so that policy modules
can import these without an import cycle. Every helper is deterministic: ties go to the fewest
in-flight requests, then to a rotating position (`least_loaded`) or config order (`best_match`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from skylb_extproc.errors import ConfigError
from skylb_extproc.state.speed import attention_factor
from skylb_extproc.types import Outcome, Reject, ReplicaView, Route, Snapshot

__all__ = [
    "ParamReader",
    "best_match",
    "kv_tokens",
    "least_loaded",
    "matched_fraction",
    "no_replica",
    "predicted_ttft",
    "prefill_seconds",
    "prefill_time",
    "queue_seconds",
    "route",
]

# Prompt tokens are estimated from characters (English text with Llama-3-style tokenizers: ~4).
CHARS_PER_TOKEN = 4.0


def matched_fraction(view: ReplicaView, snapshot: Snapshot) -> float:
    """Share of the prompt's characters `view` already holds (0 for an empty prompt, <= 1)."""
    if snapshot.prompt_chars <= 0:
        return 0.0
    return min(1.0, view.matched_blocks * snapshot.block_chars / snapshot.prompt_chars)


def prefill_time(prompt_chars: int, held_chars: int, tokens_per_s: float) -> float:
    """Seconds to prefill the `prompt_chars - held_chars` a replica does not hold.

    `tokens_per_s` is a short-context rate: each new token also attends to the tokens before it
    (state/speed.py `attention_factor`), so a long uncached prompt costs more than its length."""
    held = min(prompt_chars, max(0, held_chars))
    cached = held / CHARS_PER_TOKEN
    uncached = (prompt_chars - held) / CHARS_PER_TOKEN
    return uncached / tokens_per_s * attention_factor(cached, uncached)


def prefill_seconds(view: ReplicaView, snapshot: Snapshot) -> float:
    """Predicted prefill of the part of the prompt `view` does not hold, at its speed."""
    held = view.matched_blocks * snapshot.block_chars
    return prefill_time(snapshot.prompt_chars, held, view.prefill_tokens_per_s)


def queue_seconds(view: ReplicaView, kv_tokens: float = 0.0) -> float:
    """Seconds a request that will hold `kv_tokens` waits at `view` before its prefill starts:
    our prefill backlog there, the engine's own queue, and one more finish if it does not fit."""
    wait = view.backlog_s + view.admit_wait_s
    if kv_tokens > view.kv_free_tokens:
        wait += view.finish_interval_s
    return wait


def kv_tokens(prompt_chars: int, max_tokens: int) -> float:
    """What a request will hold in a replica's KV cache: prompt plus answer."""
    return prompt_chars / CHARS_PER_TOKEN + max_tokens


def predicted_ttft(view: ReplicaView, snapshot: Snapshot) -> float:
    """Queueing plus the prefill of what `view` does not hold (the `skylb` policy's estimate)."""
    tokens = kv_tokens(snapshot.prompt_chars, snapshot.max_tokens)
    return queue_seconds(view, tokens) + prefill_seconds(view, snapshot)


def least_loaded(views: Iterable[ReplicaView], rotation: int = 0) -> ReplicaView | None:
    """Fewest in-flight; among equals the `rotation`-th (mod their count) in config order.

    Policies pass `snapshot.decisions`: on an idle pool every replica ties at 0 in flight, and a
    fixed tie-break would start every new conversation on the first replica (its cache thrashes,
    the others idle). Rotating spreads them, deterministically.
    """
    pool = list(views)
    if not pool:
        return None
    low = min(v.in_flight for v in pool)
    ties = [v for v in pool if v.in_flight == low]
    return ties[rotation % len(ties)]


def best_match(views: Iterable[ReplicaView]) -> ReplicaView | None:
    """Most matched blocks, then fewest in-flight, then position; None if nothing matched."""
    matched = [v for v in views if v.matched_blocks > 0]
    return min(matched, key=lambda v: (-v.matched_blocks, v.in_flight), default=None)


def route(view: ReplicaView, reason: str) -> Route:
    return Route(replica=view.name, address=view.address, reason=reason)


def no_replica(policy: str) -> Reject:
    """The 503 a pushing (non-waiting) policy answers when no replica is healthy."""
    return Reject(503, Outcome.NO_REPLICA, f"no healthy replica ({policy})")


class ParamReader:
    """Reads `policy.params`, rejecting wrong types, bad ranges and unknown keys by key path."""

    def __init__(self, params: Mapping[str, object]) -> None:
        self._params = params
        self._seen: set[str] = set()

    def number(self, key: str, default: float, *, low: float, high: float = float("inf")) -> float:
        """A real number in [low, high]; ints are accepted, bools are not."""
        value = self._take(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(self._path(key), f"must be a number, got {value!r}")
        if not low <= value <= high:
            raise ConfigError(self._path(key), f"must be in [{low}, {high}], got {value!r}")
        return float(value)

    def integer(self, key: str, default: int, *, low: int) -> int:
        """An int >= low (bools and floats are rejected)."""
        value = self._take(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self._path(key), f"must be an integer, got {value!r}")
        if value < low:
            raise ConfigError(self._path(key), f"must be >= {low}, got {value!r}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self._take(key, default)
        if not isinstance(value, bool):
            raise ConfigError(self._path(key), f"must be true or false, got {value!r}")
        return value

    def finish(self) -> None:
        """Raise for the first key no reader asked for (sorted, so the message is stable)."""
        unknown = sorted(set(self._params) - self._seen)
        if unknown:
            raise ConfigError(self._path(unknown[0]), "unknown parameter")

    def _take(self, key: str, default: object) -> object:
        self._seen.add(key)
        return self._params.get(key, default)

    @staticmethod
    def _path(key: str) -> str:
        return f"policy.params.{key}"
