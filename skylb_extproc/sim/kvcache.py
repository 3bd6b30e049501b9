"""KV block pool with prefix caching, as vLLM V1's BlockPool / KVCacheManager do it.

- Fixed pool of `num_blocks` blocks. A block is referenced by the requests using it (ref count).
- A full block of prompt tokens is *cached* under its chained hash the moment it is allocated for
  computation (vLLM caches at `allocate_slots`), so a later request with the same prefix can share
  it, even while the first request still runs.
- Unreferenced blocks sit in a free queue, oldest-freed first. A cached block stays cached there
  until allocation pops it (LRU eviction of unreferenced cached blocks). A request's blocks are
  freed tail first, so the end of a prompt is evicted before its start (as vLLM does).
- A cache hit removes the block from the free queue ("touch"), whatever its position.

Block hashes: chained xxh64 over the 64-character chunks of the prompt text (16 tokens of 4
characters each), so two texts that share a character prefix share their leading blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence

from skylb_extproc.hashing import chain_blocks

CHARS_PER_TOKEN = 4


def estimate_tokens(text: str) -> int:
    """One token per 4 characters, rounded up; token i covers characters [4i, 4i+4)."""
    return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


def block_hashes(text: str, block_size: int) -> tuple[int, ...]:
    """Chained hashes of the full token blocks of `text`; a trailing partial block has none."""
    full = estimate_tokens(text) // block_size
    return tuple(chain_blocks(text, block_size * CHARS_PER_TOKEN, full, 0))


class BlockPool:
    """Ref-counted blocks, a hash -> block map of cached blocks, and an LRU free queue."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        self.num_blocks = num_blocks
        self._refs = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        self._cached: dict[int, int] = {}
        # Insertion order = eviction order; dict ops give O(1) touch from the middle.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        # Bumped by whatever can let a waiting request in (a block freed, touched or cached);
        # allocations are not counted: they only happen while a step is planned.
        self.version = 0

    @property
    def num_free(self) -> int:
        """Blocks not referenced by any request (cached or not): what can still be allocated."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def usage(self) -> float:
        """vLLM's kv_cache_usage: referenced blocks / all blocks (cached but free = free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def hash_of(self, block: int) -> int | None:
        """The hash a block is cached under, if any."""
        return self._hash[block]

    def free_order(self) -> Iterator[int]:
        """Free blocks in the order `allocate` takes them."""
        return iter(self._free)

    def match(self, hashes: Sequence[int], max_blocks: int) -> list[int]:
        """Blocks holding the longest cached prefix of `hashes`, at most `max_blocks` of them."""
        found: list[int] = []
        for h in hashes[:max_blocks]:
            block = self._cached.get(h)
            if block is None:
                break
            found.append(block)
        return found

    def can_allocate(self, new_blocks: int, hit_blocks: Sequence[int]) -> bool:
        """Room for `new_blocks` fresh blocks once the free hit blocks leave the free queue."""
        evictable_hits = sum(1 for b in hit_blocks if self._refs[b] == 0)
        return new_blocks <= len(self._free) - evictable_hits

    def touch(self, blocks: Sequence[int]) -> None:
        """Take a reference on cache-hit blocks (removing free ones from the free queue)."""
        self.version += 1
        for b in blocks:
            if self._refs[b] == 0:
                del self._free[b]
            self._refs[b] += 1

    def allocate(self, count: int) -> list[int]:
        """Pop `count` blocks from the head of the free queue, evicting their cached hashes."""
        if count > len(self._free):
            raise RuntimeError(f"allocate({count}) with {len(self._free)} free blocks")
        out: list[int] = []
        for _ in range(count):
            b, _none = self._free.popitem(last=False)
            h = self._hash[b]
            if h is not None:
                self._hash[b] = None
                if self._cached.get(h) == b:
                    del self._cached[h]
            self._refs[b] = 1
            out.append(b)
        return out

    def cache(self, block: int, block_hash: int) -> None:
        """Register a full block under its hash; an existing copy keeps serving that hash."""
        if block_hash in self._cached or self._hash[block] is not None:
            return
        self._hash[block] = block_hash
        self._cached[block_hash] = block
        self.version += 1

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference per block; blocks reaching zero join the free queue, tail first."""
        self.version += 1
        for b in reversed(blocks):
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free[b] = None
