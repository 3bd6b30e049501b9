"""Decode windows: runs of alike steps that the replica model plans at once and applies in bulk.

Most steps of a busy replica are alike: every running request decodes one token, nothing is
admitted, nothing preempted, nothing finishes. Stepping them one at a time costs Python work
proportional to the batch per step (Mooncake on 12 replicas: ~540,000 steps per policy). A
window covers steps 1..k of such a run. Its step end times are computed up front (the same float
operations as one step at a time, so the same times); the blocks a step allocates and fills are
taken at that step's start, in the same order as the one-step path, so the pool evolves
identically; token counters are brought up to date only when someone looks (`advance`, `add`,
`cancel`). `tests/test_sim_window.py` checks that events and metrics are identical either way.

A window ends at the first of:
- the step where some request reaches `max_tokens` (the window's last step; it finishes through
  the ordinary path),
- the last step before the blocks run out (the next one would preempt),
- when the queue's head waits for blocks: the last step before a step whose allocations evict one
  of the head's cache hits or whose blocks register the next hash of its prompt (either can let it
  in); until then its admission fails at every step, exactly as it did at the step before the
  window (`Blocked`: same head, same budget, no block freed, touched or cached since).
`add` and `cancel` cut a window after the step in progress.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice

from skylb_extproc.sim.kvcache import BlockPool
from skylb_extproc.sim.state import SimRequest

__all__ = ["Blocked", "DecodeWindow", "plan_window"]


@dataclass(frozen=True, slots=True)
class Blocked:
    """The queue's head failed admission for lack of blocks: with what, at which pool version."""

    request: SimRequest
    pool_version: int
    budget: int
    hit_blocks: int  # the length of its cached prefix then, in blocks


@dataclass(slots=True)
class DecodeWindow:
    """Steps 1..len(ends) of a decode-only batch; step s ends at ends[s - 1]."""

    batch: list[SimRequest]
    base: list[int]  # num_computed of batch[i] when the window was planned
    ends: list[float]
    schedule: dict[int, list[int]]  # step -> batch indices that allocate or fill a block then
    begun: int = 0  # steps whose blocks are taken
    finished: int = 0  # steps applied to the requests' counters


def _first_steps(computed: int, bs: int) -> tuple[int, int]:
    """(first step that fills a block, first step that needs a new one) for a request that has
    `computed` tokens in `blocks_for(computed)` blocks and computes one more per step."""
    fill = (-computed - 1) % bs + 1  # computed + fill is a multiple of bs
    return fill, fill % bs + 1


def _allocations_through(firsts: Sequence[int], step: int, bs: int) -> int:
    """How many blocks the batch takes in steps 1..step."""
    return sum((step - a) // bs + 1 for a in firsts if a <= step)


def _last_fitting_step(firsts: Sequence[int], limit: int, free: int, bs: int) -> int:
    """The last step <= limit whose blocks, with those of the steps before, fit in `free`."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _allocations_through(firsts, mid, bs) <= free:
            lo = mid
        else:
            hi = mid - 1
    return lo


def plan_window(
    *,
    running: list[SimRequest],
    head: SimRequest | None,
    admission_open: bool,
    blocked: Blocked | None,
    pool: BlockPool,
    bs: int,
    start: float,
    step_seconds: Callable[[int, int], float],
) -> DecodeWindow | None:
    """A window starting at `start`, or None when fewer than two steps would be alike.

    `admission_open`: a waiting request could be admitted if blocks allowed (budget and sequence
    slots are left after the batch's decode tokens). `step_seconds(batch, context)` is the
    duration of a decode step of `batch` requests with `context` computed tokens.
    """
    if not running:
        return None
    steps = 1 << 62
    for r in running:
        if r.num_output == 0 or r.num_computed != r.num_tokens - 1:
            return None
        if len(r.blocks) != -(-r.num_computed // bs):
            return None
        steps = min(steps, r.max_tokens - r.num_output)
    needs_head = head is not None and admission_open
    if needs_head and (
        blocked is None or blocked.request is not head or blocked.pool_version != pool.version
    ):
        return None
    fills: list[int] = []
    firsts: list[int] = []
    for r in running:
        fill, alloc = _first_steps(r.num_computed, bs)
        fills.append(fill)
        firsts.append(alloc)
    steps = _last_fitting_step(firsts, steps, pool.num_free, bs)
    if needs_head and steps >= 2:
        assert blocked is not None and head is not None
        steps = _head_limit(running, head, blocked, pool, firsts, steps, bs)
    if steps < 2:
        return None
    schedule: dict[int, list[int]] = {}
    for i, r in enumerate(running):
        events: Sequence[int] = range(firsts[i], steps + 1, bs)
        if r.cached_blocks < len(r.hashes):  # it has blocks left to register
            events = sorted([*events, *range(fills[i], steps + 1, bs)])
        for s in events:
            at = schedule.setdefault(s, [])
            if not at or at[-1] != i:  # block size 1: both at every step
                at.append(i)
    n = len(running)
    context = sum(r.num_computed for r in running)
    ends: list[float] = []
    t = start
    for s in range(steps):
        t = t + step_seconds(n, context + s * n)
        ends.append(t)
    return DecodeWindow(list(running), [r.num_computed for r in running], ends, schedule)


def _head_limit(
    running: list[SimRequest],
    head: SimRequest,
    blocked: Blocked,
    pool: BlockPool,
    firsts: list[int],
    steps: int,
    bs: int,
) -> int:
    """Cut `steps` before the first step that could let the blocked head in."""
    taken = _allocations_through(firsts, steps, bs)
    if taken:
        if head.hash_set is None:  # built once: a request stays the head for many windows
            head.hash_set = frozenset(head.hashes)
        # Evicting a block that holds one of the head's hashes may shorten its cached prefix
        # (cutting at any of them, hit or not, is merely early).
        for i, b in enumerate(islice(pool.free_order(), taken)):
            h = pool.hash_of(b)
            if h is not None and h in head.hash_set:  # steps taking at most i blocks stay
                steps = min(steps, _last_fitting_step(firsts, steps, i, bs))
                break
    cap = min((head.num_tokens - 1) // bs, len(head.hashes))  # what BlockPool.match may use
    if blocked.hit_blocks < cap:
        wanted = head.hashes[blocked.hit_blocks]
        for r in running:  # block j of r fills (and is cached) at step (j + 1) * bs - computed
            base = r.num_computed
            for j in range(r.cached_blocks, min((base + steps) // bs, len(r.hashes))):
                if r.hashes[j] == wanted:
                    steps = min(steps, (j + 1) * bs - base - 1)
                    break
    return steps
