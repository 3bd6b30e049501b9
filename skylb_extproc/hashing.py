"""Prompt text -> chained block hashes, and the 64-bit hash of consistent-hashing keys.

Why chained: `h[i]` depends on every character before block `i`, so two prompts share hash `i`
only if they share the whole prefix up to the end of block `i` (llm-d's approximate prefix
scheme). A prefix index keyed by these hashes can then answer "longest shared prefix" by walking
the hashes in order and stopping at the first miss, with no trie.

Why characters, not tokens: the balancer has no tokenizer, and SkyLB/SGLang's routers key their
trees on characters too. Blocks are `block_chars` characters of the text; a trailing partial block
is not hashed (it would change as the conversation grows and never match again).

Why seeded by model (+ salt): the same text sent to two models must not look cached on a replica
that only served the other model; the salt lets operators keep indexes of two deployments apart.

`affinity_key` is the one rule consistent hashing keys on (router and region spill alike): the
client's session header when sent, else the chained hash of the prompt's first `key_blocks`
blocks (all its full blocks when it has fewer), which identifies the whole leading text.
"""

from __future__ import annotations

from collections.abc import Sequence

import xxhash

__all__ = ["affinity_key", "block_hashes", "chain_blocks", "key_hash"]


def _encode(text: str) -> bytes:
    # JSON can carry lone surrogates ("\ud800"); hashing must not crash on them.
    return text.encode("utf-8", "surrogatepass")


def block_hashes(
    text: str, *, model: str, block_chars: int, max_blocks: int, salt: str = ""
) -> tuple[int, ...]:
    """Chained xxh64 of the first `max_blocks` full `block_chars`-character blocks of `text`.

    `h[-1] = xxh64(f"{salt}\\x00{model}")` and `h[i] = xxh64(block_i, seed=h[i-1])`, so a prefix of
    a prompt yields a prefix of its hashes.
    """
    if block_chars < 1:
        raise ValueError(f"block_chars must be >= 1, got {block_chars}")
    if max_blocks < 0:
        raise ValueError(f"max_blocks must be >= 0, got {max_blocks}")
    count = min(len(text) // block_chars, max_blocks)
    seed = xxhash.xxh64_intdigest(_encode(f"{salt}\x00{model}"))
    return tuple(chain_blocks(text, block_chars, count, seed))


def chain_blocks(text: str, block_chars: int, count: int, seed: int) -> list[int]:
    """xxh64 of `count` consecutive `block_chars`-character blocks of `text` (the last one may be
    short), each seeded with the previous block's hash, the first with `seed`."""
    out: list[int] = []
    end = count * block_chars
    if text.isascii():  # characters are bytes: encode once, hash slices (2x faster)
        data = text.encode("ascii")
        for start in range(0, end, block_chars):
            seed = xxhash.xxh64_intdigest(data[start : start + block_chars], seed)
            out.append(seed)
        return out
    for start in range(0, end, block_chars):
        seed = xxhash.xxh64_intdigest(_encode(text[start : start + block_chars]), seed)
        out.append(seed)
    return out


def key_hash(key: str) -> int:
    """xxh64 with seed 0, as SkyLB's consistent-hashing policy hashes keys and ring points."""
    return xxhash.xxh64_intdigest(_encode(key))


def affinity_key(hash_key: str | None, hashes: Sequence[int], key_blocks: int) -> int | None:
    """The consistent-hashing key of a request: `key_hash(hash_key)` when the client sent one,
    else `hashes[min(key_blocks, len(hashes)) - 1]` (chained, so it stands for every character
    up to the end of that block); None for a prompt without a full block."""
    if hash_key:
        return key_hash(hash_key)
    if not hashes or key_blocks < 1:
        return None
    return hashes[min(key_blocks, len(hashes)) - 1]
