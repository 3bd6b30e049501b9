"""Properties of PrefixIndex against a plain reference model.

Prompts are lists of small "token" ints made into chained hashes (`chain`), as the router's are:
the index relies on a hash standing for its whole prefix.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
from hypothesis import given
from hypothesis import strategies as st

from skylb_extproc.hashing import key_hash
from skylb_extproc.state.prefix_index import PrefixIndex


def chain(tokens: list[int]) -> list[int]:
    """Chained hashes: the i-th stands for tokens[: i + 1]."""
    return [key_hash(",".join(map(str, tokens[: i + 1]))) for i in range(len(tokens))]


TARGETS = ("a", "b", "c")
# Small hash alphabet so that prompts share prefixes and evictions happen often.
prompts = st.lists(st.integers(min_value=0, max_value=12), max_size=8)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), st.sampled_from(TARGETS), prompts),
        st.tuples(st.just("remove"), st.sampled_from(TARGETS), st.just([])),
        st.tuples(st.just("match"), st.just(""), prompts),
    ),
    max_size=40,
)


class Reference:
    """What PrefixIndex must answer: per-target LRU of hash -> time, walked block by block."""

    def __init__(self, capacity: int, ttl_s: float) -> None:
        self.capacity = capacity
        self.ttl_s = ttl_s
        self.caches: dict[str, OrderedDict[int, float]] = {}

    def insert(self, target: str, hashes: list[int], now: float) -> None:
        cache = self.caches.setdefault(target, OrderedDict())
        for h in reversed(hashes):
            cache[h] = now
            cache.move_to_end(h)
            if len(cache) > self.capacity:
                cache.popitem(last=False)

    def match(self, hashes: list[int], now: float) -> dict[str, int]:
        out = {}
        for target, cache in self.caches.items():
            depth = 0
            while depth < len(hashes) and cache.get(hashes[depth], -1e18) > now - self.ttl_s:
                depth += 1
            if depth:
                out[target] = depth
        return out


@given(ops=ops, capacity=st.integers(min_value=1, max_value=6), ttl=st.sampled_from([2.5, 100]))
def test_matches_reference(
    ops: list[tuple[str, str, list[int]]], capacity: int, ttl: float
) -> None:
    index = PrefixIndex(max_blocks_per_target=capacity, ttl_s=ttl)
    ref = Reference(capacity, ttl)
    for now, (op, target, tokens) in enumerate(ops):  # one time unit per operation
        hashes = chain(tokens)
        if op == "insert":
            index.insert(target, hashes, now=now)
            ref.insert(target, hashes, now)
        elif op == "remove":
            index.remove_target(target)
            ref.caches.pop(target, None)
        else:
            assert index.match(hashes, now=now) == ref.match(hashes, now)
        for name in TARGETS:
            assert index.size(name) <= capacity
            assert index.size(name) == len(ref.caches.get(name, ()))


# Chained hashes of one prompt are distinct, so the generated ones are too.
@given(prompt=st.lists(st.integers(), min_size=1, max_size=30, unique=True), cut=st.integers(0, 30))
def test_match_is_longest_prefix(prompt: list[int], cut: int) -> None:
    index = PrefixIndex(max_blocks_per_target=100, ttl_s=10.0)
    index.insert("a", prompt[:cut], now=0.0)
    expected = min(cut, len(prompt))
    assert index.match(prompt, now=0.0) == ({"a": expected} if expected else {})


def test_match_stops_at_first_miss() -> None:
    index = PrefixIndex(max_blocks_per_target=100, ttl_s=10.0)
    index.insert("a", chain([1, 2, 3, 4]), now=0.0)
    index.insert("b", chain([1, 2]), now=0.0)
    index.insert("c", chain([9, 2, 3, 4]), now=0.0)
    assert index.match(chain([1, 2, 3, 4]), now=0.0) == {"a": 4, "b": 2}
    # Block 5 differs: every later hash differs too (chained), so "a" holds 2.
    assert index.match(chain([1, 2, 5, 3, 4]), now=0.0) == {"a": 2, "b": 2}
    assert index.match(chain([7, 1, 2]), now=0.0) == {}


def test_prompt_start_is_evicted_last() -> None:
    index = PrefixIndex(max_blocks_per_target=3, ttl_s=10.0)
    index.insert("a", chain([1, 2, 3, 4, 5]), now=0.0)
    assert index.size("a") == 3
    assert index.match(chain([1, 2, 3, 4, 5]), now=0.0) == {"a": 3}
    # A later prompt evicts the least recently inserted blocks: the tail of the old one.
    index.insert("a", chain([8, 9]), now=1.0)
    assert index.match(chain([1, 2, 3]), now=1.0) == {"a": 1}
    assert index.match(chain([8, 9]), now=1.0) == {"a": 2}


def test_ttl_expiry() -> None:
    index = PrefixIndex(max_blocks_per_target=10, ttl_s=5.0)
    index.insert("a", chain([1, 2, 3]), now=0.0)
    index.insert("a", chain([1]), now=3.0)  # refreshes block 1 only
    assert index.match(chain([1, 2, 3]), now=4.999) == {"a": 3}
    assert index.match(chain([1, 2, 3]), now=5.0) == {"a": 1}
    assert index.match(chain([1]), now=8.0) == {}
    assert index.size("a") == 3  # expired entries wait for the LRU to evict them first
    index.insert("a", chain([4, 5, 6]), now=9.0)
    assert index.match(chain([4, 5, 6]), now=9.0) == {"a": 3}


def test_match_does_not_refresh_lru_order() -> None:
    index = PrefixIndex(max_blocks_per_target=2, ttl_s=10.0)
    index.insert("a", chain([1]), now=0.0)
    index.insert("a", chain([2]), now=0.0)
    index.match(chain([1]), now=0.0)
    index.insert("a", chain([3]), now=0.0)  # evicts 1: matching is not use
    assert index.match(chain([1]), now=0.0) == {}
    assert index.match(chain([2]), now=0.0) == {"a": 1}


def test_remove_target_and_targets() -> None:
    index = PrefixIndex(max_blocks_per_target=10, ttl_s=10.0)
    index.insert("b", chain([1, 2]), now=0.0)
    index.insert("a", chain([1]), now=0.0)
    assert index.targets() == ["b", "a"]
    index.remove_target("b")
    index.remove_target("zzz")
    assert index.targets() == ["a"]
    assert index.size("b") == 0
    assert index.match(chain([1, 2]), now=0.0) == {"a": 1}


@pytest.mark.parametrize(("blocks", "ttl"), [(0, 1.0), (1, 0.0)])
def test_bad_arguments(blocks: int, ttl: float) -> None:
    with pytest.raises(ValueError):
        PrefixIndex(max_blocks_per_target=blocks, ttl_s=ttl)
