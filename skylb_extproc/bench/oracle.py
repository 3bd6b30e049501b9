"""The oracle prefix hit rate: the ceiling any router could reach on a workload.

An infinite cache that has seen the prompt of every earlier request (in trace order) would serve
a request's longest prefix shared with any of them. Counted like the simulated replica counts
`cached_tokens`: in whole 16-token blocks (64 characters at 4 characters per token), chained
hashes so that a block only matches with its whole prefix, and at most (prompt_tokens - 1) // 16
blocks hit, as vLLM caps a hit so that at least one token is computed (a full hit recomputes its
last block; sim/model.py does the same). Outputs are not cached:
the next turn's copy of an answer is new text to the oracle too.

Hit rate = cached prompt tokens / prompt tokens, the same definition as the policies' rate.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from skylb_extproc.bench.trace import CHARS_PER_TOKEN, TraceRequest, prompt_text
from skylb_extproc.hashing import block_hashes

__all__ = ["ORACLE_BLOCK_TOKENS", "cached_tokens", "hit_rate", "oracle_hit_rate", "oracle_matches"]

ORACLE_BLOCK_TOKENS = 16
_BLOCK_CHARS = ORACLE_BLOCK_TOKENS * CHARS_PER_TOKEN


def cached_tokens(matched_blocks: int, prompt_tokens: int) -> int:
    """Tokens served from cache for a match of `matched_blocks` leading blocks."""
    cap = max(0, (prompt_tokens - 1) // ORACLE_BLOCK_TOKENS)
    return min(matched_blocks, cap) * ORACLE_BLOCK_TOKENS


def oracle_matches(requests: Iterable[TraceRequest]) -> list[int]:
    """Per request, the leading 16-token blocks an infinite cache of earlier prompts holds."""
    seen: set[int] = set()
    out: list[int] = []
    for req in requests:
        hashes = block_hashes(
            prompt_text(req), model="", block_chars=_BLOCK_CHARS, max_blocks=1 << 30
        )
        matched = 0
        for h in hashes:
            if h not in seen:
                break
            matched += 1
        seen.update(hashes)
        out.append(matched)
    return out


def hit_rate(requests: Sequence[TraceRequest], matches: Sequence[int]) -> float:
    """Cached prompt tokens / prompt tokens for the given per-request matches."""
    hit = sum(cached_tokens(m, r.prompt_tokens) for r, m in zip(requests, matches, strict=True))
    total = sum(r.prompt_tokens for r in requests)
    return hit / total if total else 0.0


def oracle_hit_rate(requests: Iterable[TraceRequest]) -> float:
    """Share of prompt tokens an infinite cache seeing every earlier prompt would hit."""
    reqs = list(requests)
    return hit_rate(reqs, oracle_matches(reqs))
