"""A replica's prefill and decode speed, learned online from its engine's cumulative counters.

Mixed GPUs need no configuration: each replica's speed is measured from what its engine already
exports, and a configured prior (`speed:` in skylb.yaml) stands in until enough was seen.

Inputs (ScrapedMetrics, all cumulative since the engine started; server/scrape.py maps names):
- prompt_tokens: prompt tokens of requests whose prefill completed (vLLM V1 counts a request's
  prompt when its first token is sampled: `IterationStats.update_from_output`, is_prefilling).
- prefix_hits: prompt tokens served from the prefix cache (counted at admission).
- prefill_seconds_sum / _count: per finished request, first token time - first scheduled time
  (vLLM V1 `IterationStats.update_from_finished_request`, vllm/v1/metrics/stats.py: "Prefill
  interval is from first SCHEDULED to first NEW_TOKEN"); _count = finished requests.
- generation_tokens: every sampled token, the first one of each request included.
- decode_seconds_sum: per finished request, last token time - first token time.
- finished_prompt_tokens / finished_computed_tokens (vLLM's request_prompt_tokens and
  request_prefill_kv_computed_tokens sums, optional): per finished request, like the prefill
  time, so a chunk's tokens and seconds belong to the same requests; without them the prompt and
  hit counters stand in, which move at other moments and pair only roughly over a chunk.

Algorithm: a chunk accumulates counter deltas from an anchor scrape until it holds enough
evidence (>= `min_requests` finished requests, >= `min_prefill_tokens` uncached prompt tokens,
>= `min_window_s` of wall time for prefill; >= `min_requests` and >= `min_decode_tokens` decode
tokens for decode); its value is folded into an EWMA (weight `alpha` for the new chunk) and the
anchor moves to that scrape. Chunks, not scrape-to-scrape deltas, because the counters move at
different moments (prompt tokens at the first token, the time sums at the finish): over a chunk
of several requests the two sides cover the same requests up to the ones in flight at its ends.
- prefill seconds per token = min(Δprefill_seconds_sum, Δwall) / max(0, Δprompt - Δprefix_hits)
- decode step seconds = Δdecode_seconds_sum / (Δgeneration_tokens - Δprefill_seconds_count)
  (each finished request sampled its first token in a prefill step, not in a decode step).
The EWMA runs on seconds per token (what a TTFT prediction multiplies by), not on rates.

The rate is normalised to short context: a chunk's uncached tokens are weighted by the
attention factor of its mean request (`attention_factor`), so a replica serving long prompts
does not read as a slow one, and the predictor (policy/common.py `prefill_time`) multiplies the
same factor back for each request.
Bias, and which quantity a TTFT predictor wants. A request's prefill interval covers every
step from its admission to its first token, and with chunked prefill those steps also carry
other requests' chunks and the running decodes. Summed over requests, overlapping prefills count
the same wall time several times, so Σtokens / Σprefill_seconds is the *per-request* rate, lower
than the engine's prefill throughput by the mean prefill concurrency. A TTFT predictor estimates
how long the engine takes to work through the uncached tokens queued ahead plus the request's
own: it wants the throughput while prefill is in progress, decode interference included (which
both quantities contain). The wall time during which some prefill ran is at most
Δprefill_seconds_sum and at most the chunk's wall time Δwall, hence the min: exact when prefills
never overlap (sum < wall) and when some prefill always runs (union = wall); in between still a
lower bound of the throughput, i.e. a conservative TTFT. How low, on the simulated replica
(bursts of 8 uncached 1,500-token prompts, 1 s apart, so the cap rarely engages): 2,148 tok/s
learned vs 4,663 for a lone prompt on the L4 profile, 8,382 vs 39,698 on the H100 profile
(budget 8,192: five prompts share each step). A predictor that adds queued work on top should
know the rate already carries the recent concurrency. With the finish-time token sums (vLLM)
the chunk's tokens and seconds are the same requests' and the wall-time cap is wrong (requests
finishing in a chunk prefilled before it began), so it applies only to the fallback. The speed
is the median of the last `prefill_chunks` chunks: robust to a chunk of a few odd requests,
and on the shared Mooncake trace at 4x load it reads ~0.7-0.8x the H100 profile's short-context
rate (the per-request rate under chunked-prefill sharing). The decode step needs no such care:
each request's decode time / its decode tokens is the step time at the batch it ran in.

Resets: a counter lower than at the anchor means the engine restarted; the chunk is dropped and
restarts there (what was learned is kept: the same replica, the same hardware). Non-finite or
negative counters count as missing. Parameters and defaults: min_requests 4, min_prefill_tokens
256, min_decode_tokens 64, min_window_s 2.0, alpha 0.3 (decode), prefill_chunks 16.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Literal, NamedTuple

from skylb_extproc.types import ScrapedMetrics

__all__ = ["ATTENTION_TOKENS", "DEFAULT_PRIOR", "Speed", "SpeedEstimator", "attention_factor"]

# Context length at which a prefill token's attention costs as much as the rest of its forward
# pass. A property of the model's shape, not of the GPU: Llama-3.1-8B's calibration gives
# k / 2q = 16.8k tokens on an H100 and 19.2k on an L4 (sim/profiles.py).
ATTENTION_TOKENS = 16_384.0


def attention_factor(cached: float, uncached: float) -> float:
    """How much longer `uncached` new tokens take after `cached` ones than at short context:
    each attends to the tokens before it, on average `cached + uncached / 2`."""
    return 1.0 + (cached + uncached / 2) / ATTENTION_TOKENS


Source = Literal["learned", "prior"]


@dataclass(frozen=True, slots=True)
class Speed:
    """A replica's speed: `source` "learned" when both numbers come from its own counters."""

    prefill_tokens_per_s: float
    decode_step_s: float
    source: Source = "prior"

    def __post_init__(self) -> None:
        for name in ("prefill_tokens_per_s", "decode_step_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")


# Llama-3.1-8B on one L4, the paper's setup (ARCHITECTURE.md §6: prefill ≈ 4.7k tok/s, decode
# step ≈ 62 ms): what skylb.yaml's `speed:` section defaults to.
DEFAULT_PRIOR = Speed(prefill_tokens_per_s=4700.0, decode_step_s=0.062)


class _Counters(NamedTuple):
    """The counters of one scrape that speed is learned from, and when it arrived (a tuple:
    one is built per scrape, 10 per second per replica)."""

    at: float
    prompt: float
    hits: float
    generation: float
    prefill_sum: float
    prefill_count: float
    decode_sum: float
    # Prompt and computed (uncached) tokens of finished requests, when the engine has them
    # (vLLM's request_prompt_tokens / request_prefill_kv_computed_tokens sums); -1: it has not.
    fin_prompt: float = -1.0
    fin_computed: float = -1.0

    def any_below(self, other: _Counters) -> bool:
        """Whether some counter went down since `other`: the engine restarted."""
        return (
            self.prompt < other.prompt
            or self.hits < other.hits
            or self.generation < other.generation
            or self.prefill_sum < other.prefill_sum
            or self.prefill_count < other.prefill_count
            or self.decode_sum < other.decode_sum
            or self.fin_prompt < other.fin_prompt
            or self.fin_computed < other.fin_computed
        )


_INF = math.inf


def _counters(m: ScrapedMetrics, now: float) -> _Counters | None:
    """The speed counters of `m`; None when one is missing, non-finite or negative."""
    prompt, generation = m.prompt_tokens, m.generation_tokens
    psum, pcount, dsum = m.prefill_seconds_sum, m.prefill_seconds_count, m.decode_seconds_sum
    hits = 0.0 if m.prefix_hits is None else m.prefix_hits  # no prefix cache: nothing cached
    if prompt is None or generation is None or psum is None or pcount is None or dsum is None:
        return None
    # Chained comparisons are False for NaN, so this also rejects NaN.
    if not (
        0 <= prompt < _INF
        and 0 <= hits < _INF
        and 0 <= generation < _INF
        and 0 <= psum < _INF
        and 0 <= pcount < _INF
        and 0 <= dsum < _INF
    ):
        return None
    fin_prompt, fin_computed = m.finished_prompt_tokens, m.finished_computed_tokens
    if fin_prompt is None or fin_computed is None or not (0 <= fin_computed <= fin_prompt < _INF):
        fin_prompt = fin_computed = -1.0
    return _Counters(now, prompt, hits, generation, psum, pcount, dsum, fin_prompt, fin_computed)


class SpeedEstimator:
    """One replica's speed: the prior until its counters taught enough (see module docstring)."""

    def __init__(
        self,
        prior: Speed,
        *,
        min_requests: int = 4,
        min_prefill_tokens: int = 256,
        min_decode_tokens: int = 64,
        min_window_s: float = 2.0,
        alpha: float = 0.3,
        prefill_chunks: int = 16,
    ) -> None:
        if min_requests < 1 or min_prefill_tokens < 1 or min_decode_tokens < 1:
            raise ValueError("minimum sample sizes must be >= 1")
        if min_window_s < 0 or not 0 < alpha <= 1:
            raise ValueError(f"need min_window_s >= 0 and 0 < alpha <= 1, got {alpha}")
        self._prior = prior
        self._min_requests = min_requests
        self._min_prefill_tokens = min_prefill_tokens
        self._min_decode_tokens = min_decode_tokens
        self._min_window_s = min_window_s
        self._alpha = alpha
        self._prefill_anchor: _Counters | None = None
        self._decode_anchor: _Counters | None = None
        # Seconds per short-context token of the last chunks; their median is the speed.
        self._prefill_chunks: deque[float] = deque(maxlen=max(1, prefill_chunks))
        self._decode_step_s: float | None = None  # EWMA, once learned
        self._has_counters: bool | None = None  # None: no successful scrape yet
        self._speed = prior  # rebuilt only when a chunk is learned: views read it per decision

    @property
    def has_counters(self) -> bool | None:
        """Whether the last scrape carried every speed counter; None before the first scrape."""
        return self._has_counters

    @property
    def speed(self) -> Speed:
        """The learned numbers where learned, the prior's elsewhere."""
        return self._speed

    def _current(self) -> Speed:
        prefill = statistics.median(self._prefill_chunks) if self._prefill_chunks else None
        decode = self._decode_step_s
        prior = self._prior
        return Speed(
            prefill_tokens_per_s=prior.prefill_tokens_per_s if prefill is None else 1 / prefill,
            decode_step_s=prior.decode_step_s if decode is None else decode,
            source="learned" if prefill is not None and decode is not None else "prior",
        )

    def on_scrape(self, metrics: ScrapedMetrics, now: float) -> None:
        """A successful scrape whose result arrived at `now`."""
        current = _counters(metrics, now)
        self._has_counters = current is not None
        if current is None:
            return
        if self._prefill_anchor is None or current.any_below(self._prefill_anchor):
            self._prefill_anchor = current
        if self._decode_anchor is None or current.any_below(self._decode_anchor):
            self._decode_anchor = current
        if self._learn_prefill(current) | self._learn_decode(current):
            self._speed = self._current()

    def _learn_prefill(self, c: _Counters) -> bool:
        """Close the prefill chunk if it holds enough evidence; True if the value changed."""
        a = self._prefill_anchor
        assert a is not None
        if c.prefill_count - a.prefill_count < self._min_requests:
            return False  # the common case, checked first: scrapes come every 100 ms
        aligned = a.fin_computed >= 0 and c.fin_computed >= 0
        if aligned:
            # Observed at the finish, as the prefill time: the same requests on both sides.
            tokens = c.fin_computed - a.fin_computed
            hits = (c.fin_prompt - a.fin_prompt) - tokens
        else:  # prompt tokens count at the first token, hits at admission: close over a chunk
            hits = c.hits - a.hits
            tokens = max(0.0, (c.prompt - a.prompt) - hits)
        wall = c.at - a.at
        if tokens < self._min_prefill_tokens or wall < self._min_window_s:
            return False
        seconds = c.prefill_sum - a.prefill_sum
        if wall > 0 and not aligned:
            seconds = min(seconds, wall)
        self._prefill_anchor = c
        if seconds <= 0:
            return False
        # Per short-context token: long prompts spend the extra time on attention, which the
        # predictor adds back per request (each request taken as the chunk's mean).
        requests = max(1.0, c.prefill_count - a.prefill_count)
        per_token = seconds / (tokens * attention_factor(hits / requests, tokens / requests))
        if not (math.isfinite(per_token) and per_token > 0):
            return False
        self._prefill_chunks.append(per_token)
        return True

    def _learn_decode(self, c: _Counters) -> bool:
        """Close the decode chunk if it holds enough evidence; True if the value changed."""
        a = self._decode_anchor
        assert a is not None
        requests = c.prefill_count - a.prefill_count
        tokens = (c.generation - a.generation) - requests
        if requests < self._min_requests or tokens < self._min_decode_tokens:
            return False
        seconds = c.decode_sum - a.decode_sum
        self._decode_anchor = c
        if seconds <= 0:
            return False
        self._decode_step_s = self._fold(self._decode_step_s, seconds / tokens)
        return True

    def _fold(self, old: float | None, new: float) -> float | None:
        if not (math.isfinite(new) and new > 0):
            return old
        return new if old is None else (1 - self._alpha) * old + self._alpha * new
