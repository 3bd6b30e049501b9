"""Properties of PrefixIndex against a plain reference model."""

from __future__ import annotations

from collections import OrderedDict

import pytest
from hypothesis import given
from hypothesis import strategies as st

from skylb_extproc.state.prefix_index import PrefixIndex

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
    """What PrefixIndex must answer: per-target LRU without TTL (times never age here)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.caches: dict[str, OrderedDict[int, None]] = {}

    def insert(self, target: str, hashes: list[int]) -> None:
        cache = self.caches.setdefault(target, OrderedDict())
        for h in reversed(hashes):
            cache[h] = None
            cache.move_to_end(h)
            if len(cache) > self.capacity:
                cache.popitem(last=False)

    def match(self, hashes: list[int]) -> dict[str, int]:
        out = {}
        for target, cache in self.caches.items():
            depth = 0
            while depth < len(hashes) and hashes[depth] in cache:
                depth += 1
            if depth:
                out[target] = depth
        return out


def check_consistent(index: PrefixIndex) -> None:
    """The reverse map names exactly the targets whose cache holds each hash."""
    caches = index._caches
    holders = index._holders
    for target, cache in caches.items():
        for h in cache:
            assert target in holders[h]
    for h, names in holders.items():
        assert names, "empty holder sets must be deleted"
        for target in names:
            assert h in caches[target]


@given(ops=ops, capacity=st.integers(min_value=1, max_value=6))
def test_matches_reference_and_stays_consistent(
    ops: list[tuple[str, str, list[int]]], capacity: int
) -> None:
    index = PrefixIndex(max_blocks_per_target=capacity, ttl_s=100.0)
    ref = Reference(capacity)
    for op, target, hashes in ops:
        if op == "insert":
            index.insert(target, hashes, now=0.0)
            ref.insert(target, hashes)
        elif op == "remove":
            index.remove_target(target)
            ref.caches.pop(target, None)
        else:
            assert index.match(hashes, now=1.0) == ref.match(hashes)
        for name in TARGETS:
            assert index.size(name) <= capacity
            assert index.size(name) == len(ref.caches.get(name, ()))
        check_consistent(index)


# Chained hashes of one prompt are distinct, so the generated ones are too.
@given(prompt=st.lists(st.integers(), min_size=1, max_size=30, unique=True), cut=st.integers(0, 30))
def test_match_is_longest_prefix(prompt: list[int], cut: int) -> None:
    index = PrefixIndex(max_blocks_per_target=100, ttl_s=10.0)
    index.insert("a", prompt[:cut], now=0.0)
    expected = min(cut, len(prompt))
    assert index.match(prompt, now=0.0) == ({"a": expected} if expected else {})


def test_match_stops_at_first_miss() -> None:
    index = PrefixIndex(max_blocks_per_target=100, ttl_s=10.0)
    index.insert("a", [1, 2, 3, 4], now=0.0)
    index.insert("b", [1, 2], now=0.0)
    index.insert("c", [9, 2, 3, 4], now=0.0)
    assert index.match([1, 2, 3, 4], now=0.0) == {"a": 4, "b": 2}
    # "a" lacks block 5: its later blocks 3, 4 must not count after the gap.
    assert index.match([1, 2, 5, 3, 4], now=0.0) == {"a": 2, "b": 2}
    assert index.match([7, 1, 2], now=0.0) == {}


def test_prompt_start_is_evicted_last() -> None:
    index = PrefixIndex(max_blocks_per_target=3, ttl_s=10.0)
    index.insert("a", [1, 2, 3, 4, 5], now=0.0)
    assert index.size("a") == 3
    assert index.match([1, 2, 3, 4, 5], now=0.0) == {"a": 3}
    # A later prompt evicts the least recently inserted blocks: the tail of the old one.
    index.insert("a", [8, 9], now=1.0)
    assert index.match([1, 2, 3], now=1.0) == {"a": 1}
    assert index.match([8, 9], now=1.0) == {"a": 2}


def test_ttl_expiry_drops_entries() -> None:
    index = PrefixIndex(max_blocks_per_target=10, ttl_s=5.0)
    index.insert("a", [1, 2, 3], now=0.0)
    index.insert("a", [1], now=3.0)  # refreshes block 1 only
    assert index.match([1, 2, 3], now=4.999) == {"a": 3}
    assert index.match([1, 2, 3], now=5.0) == {"a": 1}
    assert index.size("a") == 2  # block 2 seen expired and dropped; 3 not reached
    assert index.match([1], now=8.0) == {}
    assert index.size("a") == 1
    check_consistent(index)


def test_match_does_not_refresh_lru_order() -> None:
    index = PrefixIndex(max_blocks_per_target=2, ttl_s=10.0)
    index.insert("a", [1], now=0.0)
    index.insert("a", [2], now=0.0)
    index.match([1], now=0.0)
    index.insert("a", [3], now=0.0)  # evicts 1: matching is not use
    assert index.match([1], now=0.0) == {}
    assert index.match([2], now=0.0) == {"a": 1}


def test_remove_target_and_targets() -> None:
    index = PrefixIndex(max_blocks_per_target=10, ttl_s=10.0)
    index.insert("b", [1, 2], now=0.0)
    index.insert("a", [1], now=0.0)
    assert index.targets() == ["b", "a"]
    index.remove_target("b")
    index.remove_target("zzz")
    assert index.targets() == ["a"]
    assert index.size("b") == 0
    assert index.match([1, 2], now=0.0) == {"a": 1}
    check_consistent(index)


@pytest.mark.parametrize(("blocks", "ttl"), [(0, 1.0), (1, 0.0)])
def test_bad_arguments(blocks: int, ttl: float) -> None:
    with pytest.raises(ValueError):
        PrefixIndex(max_blocks_per_target=blocks, ttl_s=ttl)
