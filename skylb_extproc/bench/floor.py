"""The workload's floor: the TTFT no balancer can beat, request by request.

A request's floor is its time to first token alone on an idle replica that already holds
everything an infinite cache would (the oracle's matched prefix, bench/oracle.py), plus the
network round trip it cannot avoid: none when its home region has replicas, else the round trip
to the nearest region that has some. With a heterogeneous fleet it is the best over regions of
(round trip to the region + idle prefill on that region's profile), so a faster GPU one hop
away can set the floor.

The idle prefill is what `sim/model.py` computes for a lone request: the prefix cache holds
min(matched, (L - 1) // block_size) whole blocks (a full hit recomputes its last block), the
uncached rest runs in chunks of `max_num_batched_tokens`, each chunk one step whose duration is
the profile's step-time model (`Profile.step_ms`) with the tokens computed so far as context and
its causal attention over them; the first token is sampled at the end of the last chunk.
Requests no region's replica accepts (prompt + output over `max_model_len`) have no floor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from skylb_extproc.bench.oracle import ORACLE_BLOCK_TOKENS
from skylb_extproc.bench.records import percentiles
from skylb_extproc.bench.regions import RttMatrix
from skylb_extproc.bench.trace import TraceRequest
from skylb_extproc.sim.profiles import Profile

__all__ = ["idle_prefill_s", "request_floor_s", "workload_floor"]


def idle_prefill_s(profile: Profile, prompt_tokens: int, matched_tokens: int) -> float:
    """Seconds from arrival to first token of a lone request on an idle `profile` replica
    whose cache holds the prompt's first `matched_tokens` tokens (in any block size)."""
    bs = profile.block_size
    cached = min(matched_tokens // bs, (prompt_tokens - 1) // bs) * bs
    done, t = cached, 0.0
    while done < prompt_tokens:
        n = min(prompt_tokens - done, profile.max_num_batched_tokens)
        # The same arguments as ReplicaEngine._step_seconds for a one-request prefill step.
        t += profile.step_ms(0, n, float(done), n * (done + n / 2)) / 1000.0
        done += n
    return t


def _accepts(profile: Profile, req: TraceRequest) -> bool:
    return 0 < req.prompt_tokens < profile.max_model_len and (
        req.prompt_tokens + req.output_tokens <= profile.max_model_len
    )


def request_floor_s(
    req: TraceRequest,
    matched_blocks: int,
    profiles: Mapping[str, Profile],
    rtt: RttMatrix,
) -> float | None:
    """The request's floor over the regions with replicas (`profiles`: region -> profile)."""
    matched = matched_blocks * ORACLE_BLOCK_TOKENS
    best: float | None = None
    for region, profile in profiles.items():
        if not _accepts(profile, req):
            continue
        t = 2.0 * rtt.one_way(req.region, region) + idle_prefill_s(
            profile, req.prompt_tokens, matched
        )
        best = t if best is None else min(best, t)
    return best


def workload_floor(
    requests: Sequence[TraceRequest],
    matched_blocks: Sequence[int],
    profiles: Mapping[str, Profile],
    rtt: RttMatrix,
) -> dict[str, object]:
    """`{"ttft_s": {mean, p50, p90, p99}, "requests", "without_floor"}` over the workload."""
    floors = [
        request_floor_s(r, m, profiles, rtt) for r, m in zip(requests, matched_blocks, strict=True)
    ]
    values = [f for f in floors if f is not None]
    return {
        "ttft_s": percentiles(values),
        "requests": len(values),
        "without_floor": len(floors) - len(values),
    }
