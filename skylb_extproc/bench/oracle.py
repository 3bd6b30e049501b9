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

from collections.abc import Iterable

from skylb_extproc.bench.trace import CHARS_PER_TOKEN, TraceRequest, prompt_text
from skylb_extproc.hashing import block_hashes

__all__ = ["ORACLE_BLOCK_TOKENS", "cached_tokens", "oracle_hit_rate"]

ORACLE_BLOCK_TOKENS = 16
_BLOCK_CHARS = ORACLE_BLOCK_TOKENS * CHARS_PER_TOKEN


def cached_tokens(matched_blocks: int, prompt_tokens: int) -> int:
    """Tokens served from cache for a match of `matched_blocks` leading blocks."""
    cap = max(0, (prompt_tokens - 1) // ORACLE_BLOCK_TOKENS)
    return min(matched_blocks, cap) * ORACLE_BLOCK_TOKENS


def oracle_hit_rate(requests: Iterable[TraceRequest]) -> float:
    """Share of prompt tokens an infinite cache seeing every earlier prompt would hit."""
    seen: set[int] = set()
    hit = total = 0
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
        hit += cached_tokens(matched, req.prompt_tokens)
        total += req.prompt_tokens
    return hit / total if total else 0.0
