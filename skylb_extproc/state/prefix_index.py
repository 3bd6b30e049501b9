"""Which target (replica) probably holds which prompt prefix in its KV cache.

An approximation built from routing history, as SGLang's cache-aware router and SkyLB do: when a
request is dispatched to a target, its chained block hashes (see `hashing.py`) are recorded for
that target. A new request's longest recorded prefix per target estimates how much of its prompt
that target can serve from cache.

- Per target a `cachetools.LRUCache` (block hash -> last insert time) bounds memory to
  `max_blocks_per_target` entries per target (~300 B each with the reverse map, measured on
  CPython 3.11: the default 200,000 blocks cost up to ~60 MB per replica).
- A reverse map hash -> targets lets `match` look up each block once instead of once per target;
  evictions update it, so it never names a target whose cache dropped the hash.
- `insert` touches hashes from last to first: the *start* of a prompt becomes the most recently
  used, so it is evicted last. Starts are shared by the most requests (system prompts, earlier
  turns) and a lost start makes every later block unmatchable.
- Entries older than `ttl_s` do not match (engines keep cached blocks minutes, not hours; SGLang
  added 180 s placements for this reason) and are dropped when `match` sees them.
- `match` reads without touching the LRU order: only dispatches say a target really saw a block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from cachetools import Cache, LRUCache

__all__ = ["PrefixIndex"]


class _TargetCache(LRUCache[int, float]):
    """An LRU of one target's block hashes that reports its evictions."""

    def __init__(self, maxsize: int, on_evict: Callable[[int], None]) -> None:
        super().__init__(maxsize)
        self._on_evict = on_evict

    def popitem(self) -> tuple[int, float]:
        key, value = super().popitem()
        self._on_evict(key)
        return key, value

    def peek(self, key: int) -> float:
        """The value, not marking it recently used (`cache[key]` would); KeyError if absent."""
        value: float = Cache.__getitem__(self, key)
        return value


class PrefixIndex:
    """Bounded per-target LRU of block hashes with a reverse map, TTL and longest-prefix match."""

    def __init__(self, *, max_blocks_per_target: int, ttl_s: float) -> None:
        if max_blocks_per_target < 1:
            raise ValueError(f"max_blocks_per_target must be >= 1, got {max_blocks_per_target}")
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self._max = max_blocks_per_target
        self._ttl_s = ttl_s
        self._caches: dict[str, _TargetCache] = {}
        # hash -> targets holding it. A tuple, not a set: most hashes have one holder, and a
        # 1-tuple costs 48 bytes where a set costs 216 (this map is most of the index's memory).
        self._holders: dict[int, tuple[str, ...]] = {}

    def insert(self, target: str, hashes: Sequence[int], now: float) -> None:
        """Record that `target` was sent a prompt with these block hashes at `now`."""
        cache = self._caches.get(target)
        if cache is None:
            cache = _TargetCache(self._max, lambda h: self._forget(target, h))
            self._caches[target] = cache
        holders = self._holders
        for h in reversed(hashes):
            cache[h] = now
            present = holders.get(h, ())
            if target not in present:
                holders[h] = (*present, target)

    def match(self, hashes: Sequence[int], now: float) -> dict[str, int]:
        """target -> number of leading `hashes` it holds (targets with 0 are left out)."""
        result: dict[str, int] = {}
        alive: set[str] | None = None  # targets that matched every block so far
        for depth, h in enumerate(hashes):
            holders = self._fresh_holders(h, now, alive)
            if alive is not None:
                for target in alive - holders:
                    result[target] = depth
            if not holders:
                return result
            alive = holders
        for target in alive or ():
            result[target] = len(hashes)
        return result

    def remove_target(self, target: str) -> None:
        """Forget a target (it left the configuration or lost its cache)."""
        cache = self._caches.pop(target, None)
        if cache is None:
            return
        for h in cache:
            self._forget(target, h)

    def size(self, target: str) -> int:
        """How many block hashes are recorded for `target`."""
        cache = self._caches.get(target)
        return 0 if cache is None else len(cache)

    def targets(self) -> list[str]:
        """Targets with a cache, in the order they were first inserted."""
        return list(self._caches)

    def _fresh_holders(self, h: int, now: float, among: set[str] | None) -> set[str]:
        """Targets holding `h` with an entry younger than the TTL; expired entries are dropped."""
        fresh: set[str] = set()
        oldest = now - self._ttl_s
        for target in self._holders.get(h, ()):
            if among is not None and target not in among:
                continue
            # The reverse map is exact, so the entry exists; peek keeps the LRU order as is.
            if self._caches[target].peek(h) > oldest:
                fresh.add(target)
            else:
                self._drop(target, h)
        return fresh

    def _drop(self, target: str, h: int) -> None:
        cache = self._caches[target]
        if h in cache:
            del cache[h]
        self._forget(target, h)

    def _forget(self, target: str, h: int) -> None:
        holders = self._holders.get(h, ())
        if target not in holders:
            return
        rest = tuple(t for t in holders if t != target)
        if rest:
            self._holders[h] = rest
        else:
            del self._holders[h]
