"""Properties of the chained block hashes (hashing.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from skylb_extproc.hashing import block_hashes, key_hash

texts = st.text(max_size=400)
block_sizes = st.integers(min_value=1, max_value=16)


@given(text=texts, cut=st.integers(min_value=0, max_value=400), block=block_sizes)
def test_prefix_of_prompt_gives_prefix_of_hashes(text: str, cut: int, block: int) -> None:
    full = block_hashes(text, model="m", block_chars=block, max_blocks=1000)
    part = block_hashes(text[:cut], model="m", block_chars=block, max_blocks=1000)
    assert full[: len(part)] == part


@given(text=texts, block=block_sizes, max_blocks=st.integers(min_value=0, max_value=50))
def test_count_is_full_blocks_capped(text: str, block: int, max_blocks: int) -> None:
    hashes = block_hashes(text, model="m", block_chars=block, max_blocks=max_blocks)
    assert len(hashes) == min(len(text) // block, max_blocks)


@given(text=st.text(min_size=8, max_size=200), a=st.text(max_size=10), b=st.text(max_size=10))
def test_different_models_share_no_hash(text: str, a: str, b: str) -> None:
    if a == b:
        return
    ha = block_hashes(text, model=a, block_chars=8, max_blocks=100)
    hb = block_hashes(text, model=b, block_chars=8, max_blocks=100)
    assert ha and not set(ha) & set(hb)


@given(text=st.text(min_size=4, max_size=100))
def test_salt_separates_deployments(text: str) -> None:
    plain = block_hashes(text, model="m", block_chars=4, max_blocks=100)
    salted = block_hashes(text, model="m", block_chars=4, max_blocks=100, salt="s")
    assert not set(plain) & set(salted)


def test_divergence_changes_every_later_hash() -> None:
    a = block_hashes("aaaabbbbccccdddd", model="m", block_chars=4, max_blocks=10)
    b = block_hashes("aaaaXbbbccccdddd", model="m", block_chars=4, max_blocks=10)
    assert a[0] == b[0]
    assert all(x != y for x, y in zip(a[1:], b[1:], strict=True))


def test_blocks_are_characters_not_bytes() -> None:
    assert len(block_hashes("ééééé", model="m", block_chars=2, max_blocks=10)) == 2


def test_lone_surrogates_hash() -> None:
    assert len(block_hashes("\ud800abc", model="m", block_chars=2, max_blocks=10)) == 2
    assert key_hash("\udfff") == key_hash("\udfff")


def test_key_hash_is_xxh64_seed_0() -> None:
    # Reference value of XXH64("", seed=0) from the xxHash specification.
    assert key_hash("") == 0xEF46DB3751D8E999
    assert key_hash("session-1") != key_hash("session-2")


@pytest.mark.parametrize(("block_chars", "max_blocks"), [(0, 1), (1, -1)])
def test_bad_arguments(block_chars: int, max_blocks: int) -> None:
    with pytest.raises(ValueError):
        block_hashes("abc", model="m", block_chars=block_chars, max_blocks=max_blocks)
