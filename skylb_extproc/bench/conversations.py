"""The synthetic conversation model that gives the Azure trace its prefixes.

The Azure LLM conversation trace has real arrival times and token counts but no text, so any
prefix sharing in a replay comes from this model, not from production. Hit rates measured on it
describe the model; the arrivals and lengths are real.

The model, in arrival order:
1. A conversation idle for more than `IDLE_S` (300 s) closes.
2. With probability `P_CONTINUE` (0.5, drawn from `random.Random(seed)`), the request continues
   an open conversation whose history (last prompt + last output) is shorter than the request's
   `ContextTokens`: the one with the longest such history (the most plausible growth; ties: the
   oldest). Its prompt is that history followed by fresh text up to `ContextTokens`.
3. Otherwise, or when no open conversation is short enough, it opens a new conversation with
   fresh text.
The previous turn's output is part of the next prompt (as in chat), as fresh text with its own id.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from skylb_extproc.bench.trace import CHARS_PER_TOKEN, TraceRequest

__all__ = ["IDLE_S", "P_CONTINUE", "synthesize"]

IDLE_S = 300.0
P_CONTINUE = 0.5
_FIRST_TEXT_ID = 1 << 40  # far from Mooncake's small ids, should traces ever be mixed


@dataclass(slots=True)
class _Conversation:
    cid: int
    history: tuple[tuple[int, int], ...]  # segments of the last prompt + its output
    history_tokens: int
    last_time: float


class _Ids:
    def __init__(self) -> None:
        self.next = _FIRST_TEXT_ID

    def take(self) -> int:
        self.next += 1
        return self.next


def _pick(open_convs: list[_Conversation], ctx: int) -> _Conversation | None:
    best: _Conversation | None = None
    for conv in open_convs:
        if conv.history_tokens >= ctx:
            continue
        if best is None or conv.history_tokens > best.history_tokens:
            best = conv
    return best


def synthesize(rows: list[tuple[float, int, int]], *, seed: int) -> list[TraceRequest]:
    """Turn (arrival, context tokens, generated tokens) rows into conversation turns."""
    rng = random.Random(seed)
    ids = _Ids()
    open_convs: list[_Conversation] = []
    out: list[TraceRequest] = []
    for arrival, ctx, gen in rows:
        open_convs = [c for c in open_convs if arrival - c.last_time <= IDLE_S]
        conv = _pick(open_convs, ctx) if rng.random() < P_CONTINUE else None
        if conv is None:
            conv = _Conversation(len(out), (), 0, arrival)
            open_convs.append(conv)
        fresh = (ids.take(), (ctx - conv.history_tokens) * CHARS_PER_TOKEN)
        segments = (*conv.history, fresh)
        out.append(TraceRequest(f"r{len(out)}", arrival, f"c{conv.cid}", segments, ctx, gen))
        conv.history = (*segments, (ids.take(), gen * CHARS_PER_TOKEN))
        conv.history_tokens = ctx + gen
        conv.last_time = arrival
    return out
