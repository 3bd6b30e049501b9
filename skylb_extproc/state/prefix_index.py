"""Which target (replica) probably holds which prompt prefix in its KV cache.

An approximation built from routing history, as SGLang's cache-aware router and SkyLB do: when a
request is dispatched to a target, its chained block hashes (see `hashing.py`) are recorded for
that target. A new request's longest recorded prefix per target estimates how much of its prompt
that target can serve from cache.

- Per target an LRU (block hash -> last insert time, an OrderedDict) bounds memory to
  `max_blocks_per_target` entries per target (~150 B each, measured on CPython 3.11: the default
  200,000 blocks cost up to ~30 MB per replica).
- `insert` touches hashes from last to first: the *start* of a prompt becomes the most recently
  used, so it is evicted last. Starts are shared by the most requests (system prompts, earlier
  turns) and a lost start makes every later block unmatchable.
- Entries older than `ttl_s` do not match (engines keep cached blocks minutes, not hours; SGLang
  added 180 s placements for this reason); the LRU order evicts them first.
- `match` reads without touching the LRU order: only dispatches say a target really saw a block.

Why `match` can binary-search each target: hashes are chained (a hash stands for its whole
prefix), and every insert records a prompt from its first block. So whenever block i of a chain
is recorded for a target, blocks 0..i-1 were recorded at the same insert or later: they are more
recent in the LRU order (evicted after it) and no older (fresh if it is). What a target holds of
a prompt is therefore a prefix of its hashes, found in O(log n) lookups rather than n.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

__all__ = ["PrefixIndex"]


class _TargetCache:
    """An LRU of one target's block hashes -> last insert time, least recent first.

    An OrderedDict (C) rather than `cachetools.LRUCache`: the evaluator inserts millions of
    hashes per run, and each LRUCache insert costs several Python calls."""

    __slots__ = ("_entries", "maxsize")

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._entries: OrderedDict[int, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: int) -> bool:
        return key in self._entries

    def touch(self, keys: Iterable[int], stamp: float) -> None:
        """Record each key at `stamp` as the most recently used, in turn (the last one ends
        most recent); the least recent go once at the end, which leaves the same entries as
        evicting after each one."""
        entries = self._entries
        to_end = entries.move_to_end
        for key in keys:
            if key in entries:
                to_end(key)
            entries[key] = stamp
        while len(entries) > self.maxsize:
            entries.popitem(last=False)

    def fresh(self, key: int, oldest: float) -> bool:
        """Recorded after `oldest`; reading does not mark it used."""
        stamp = self._entries.get(key)
        return stamp is not None and stamp > oldest

    def resize(self, maxsize: int) -> None:
        """A new bound; the least recently used entries go until it holds."""
        self.maxsize = maxsize
        while len(self._entries) > maxsize:
            self._entries.popitem(last=False)


class PrefixIndex:
    """Bounded per-target LRU of chained block hashes with a TTL and longest-prefix match."""

    def __init__(self, *, max_blocks_per_target: int, ttl_s: float) -> None:
        if max_blocks_per_target < 1:
            raise ValueError(f"max_blocks_per_target must be >= 1, got {max_blocks_per_target}")
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self._max = max_blocks_per_target
        self._ttl_s = ttl_s
        self._caches: dict[str, _TargetCache] = {}

    def insert(self, target: str, hashes: Sequence[int], now: float) -> None:
        """Record that `target` was sent a prompt with these chained block hashes at `now`."""
        cache = self._caches.get(target)
        if cache is None:
            cache = self._caches[target] = _TargetCache(self._max)
        cache.touch(reversed(hashes), now)

    def match(self, hashes: Sequence[int], now: float) -> dict[str, int]:
        """target -> number of leading `hashes` it holds (targets with 0 are left out)."""
        result: dict[str, int] = {}
        if not hashes:
            return result
        oldest = now - self._ttl_s
        first = hashes[0]
        for target, cache in self._caches.items():
            if not cache.fresh(first, oldest):
                continue
            lo, hi = 1, len(hashes)  # blocks [0, lo) are held; [hi, n) are not
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if cache.fresh(hashes[mid - 1], oldest):
                    lo = mid
                else:
                    hi = mid - 1
            result[target] = lo
        return result

    def set_capacity(self, target: str, max_blocks: int) -> None:
        """Bound `target` to `max_blocks` entries (at most the configured bound), evicting the
        least recently used ones now if it holds more: a replica's KV cache can hold no more."""
        size = max(1, min(self._max, max_blocks))
        cache = self._caches.get(target)
        if cache is None:
            self._caches[target] = _TargetCache(size)
        elif cache.maxsize != size:
            cache.resize(size)

    def fill(self, target: str) -> float:
        """How full `target`'s index is, 0..1: with the index bounded by the replica's KV cache,
        how much a new prefix there would evict."""
        cache = self._caches.get(target)
        return 0.0 if cache is None else len(cache) / cache.maxsize

    def remove_target(self, target: str) -> None:
        """Forget a target (it left the configuration or lost its cache)."""
        self._caches.pop(target, None)

    def size(self, target: str) -> int:
        """How many block hashes are recorded for `target` (expired ones until evicted)."""
        cache = self._caches.get(target)
        return 0 if cache is None else len(cache)

    def targets(self) -> list[str]:
        """Targets with a cache, in the order they were first inserted."""
        return list(self._caches)
