"""A sans-I/O model of one vLLM V1 replica: continuous batching in virtual time.

The engine is a pure state machine driven by `now` (seconds, any monotonic origin). The online
simulated server (`sim/replica.py`) drives it in scaled wall time; the evaluator drives it in
virtual time. Same calls give the same events.

Scheduling, as vLLM V1's `vllm/v1/core/sched/scheduler.py` does it (research notes §4-§7):
- One step at a time. A step is planned when the previous one ends (or when work arrives at an
  idle engine) and its duration comes from the profile's step-time model (`sim/profiles.py`).
- Phase 1 walks the RUNNING list in admission order: a decoding request needs 1 token, a
  partially prefilled one the rest of its prompt, capped by the step's token budget. When blocks
  run out, the last admitted running request is preempted (recompute: its blocks are freed and it
  goes back to the head of the queue, keeping its generated tokens); possibly the request itself.
- Phase 2 (only when nothing was preempted) admits WAITING requests in FIFO order while the budget
  lasts and fewer than max_num_seqs run: the prefix cache is matched (full blocks, capped so at
  least one token is recomputed, hence a full hit recomputes its last block), the uncached rest
  is cut to the remaining budget (chunked prefill), and blocks must be allocatable, else the head
  blocks the queue (FCFS).
- Everything scheduled runs as one forward pass. When a request has computed all its known tokens
  it samples one: the first is its FirstToken; it finishes after `max_tokens` (no EOS model).
- Decode blocks are allocated one block at a time as sequences grow. Prompt blocks are hashed
  and cached; full blocks of generated tokens too when the engine knows the output text
  (`output_text`, as the online replica does: its answers are deterministic filler), as vLLM
  caches them, so the next turn of a conversation, which resends the answer, hits them.

Cost: per step, work proportional to the scheduled batch, except in decode windows
(`sim/window.py`): runs of decode-only steps planned at once and applied in bulk, with the same
results. Tokens of one request produced by several steps inside one `advance` call are reported
as one `Tokens` event.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

from skylb_extproc.sim.kvcache import BlockPool, block_hashes, estimate_tokens
from skylb_extproc.sim.profiles import Profile
from skylb_extproc.sim.state import (
    Counters,
    EngineMetrics,
    Finished,
    FirstToken,
    SimEvent,
    SimRequest,
    Tokens,
)
from skylb_extproc.sim.window import Blocked, DecodeWindow, plan_window

__all__ = ["EngineMetrics", "Finished", "FirstToken", "ReplicaEngine", "SimEvent", "Tokens"]


@dataclass(slots=True)
class _Step:
    end: float
    items: list[tuple[SimRequest, int]]


class ReplicaEngine:
    """vLLM V1 continuous batching for one replica; see the module docstring for the algorithm."""

    def __init__(
        self,
        profile: Profile,
        name: str,
        output_text: Callable[[int, int], str] | None = None,
        *,
        windows: bool = True,
    ) -> None:
        """output_text(start, count): the text of output tokens [start, start + count).
        windows=False steps one at a time (the reference the windows are tested against)."""
        self.profile = profile
        self.name = name
        self._output_text = output_text
        self._bs = profile.block_size
        self._pool = BlockPool(profile.num_gpu_blocks)
        self._waiting: deque[SimRequest] = deque()
        self._running: list[SimRequest] = []
        self._requests: dict[str, SimRequest] = {}
        self._step: _Step | None = None
        self._windows = windows
        self._window: DecodeWindow | None = None
        self._blocked: Blocked | None = None  # the last failed admission of the queue's head
        self._plans = 0  # steps planned so far
        self._unconsidered = 0  # waiting requests added since the last step was planned
        self._free_at = 0.0  # when the scheduler can plan the next step
        self._last_now = float("-inf")
        self._events: list[SimEvent] = []
        self._pending_tokens: dict[str, list[float]] = {}  # rid -> [count, t of last]
        self._c = Counters()
        self._reported = (0, 0, 0.0)  # waiting, running, kv usage as vLLM last published them

    # --- public API -----------------------------------------------------------------------

    def validate(self, prompt: str, max_tokens: int) -> int:
        """Prompt tokens of a request the engine accepts; ValueError (vLLM's wording) otherwise."""
        tokens = estimate_tokens(prompt)
        limit = self.profile.max_model_len
        if tokens == 0:
            raise ValueError("The decoder prompt cannot be empty")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}.")
        if tokens >= limit:
            raise ValueError(
                f"This model's maximum context length is {limit} tokens. However, your request "
                f"has {tokens} input tokens. Please reduce the length of the input messages."
            )
        if tokens + max_tokens > limit:
            raise ValueError(
                f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This "
                f"model's maximum context length is {limit} tokens and your request has {tokens} "
                f"input tokens ({max_tokens} > {limit} - {tokens})."
            )
        return tokens

    def add(self, request_id: str, prompt: str, max_tokens: int, now: float) -> None:
        """Queue a request arriving at `now`; it joins the next step that starts at or after it."""
        if request_id in self._requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        tokens = self.validate(prompt, max_tokens)
        self._run(now, include_start=False)
        self._cut_window()
        if self._step is None and self._window is None and not self._has_work():
            self._free_at = now
        # The answer's text is known up front: hash its blocks now, cache them as they fill.
        text = prompt + self._output_text(0, max_tokens) if self._output_text else prompt
        req = SimRequest(request_id, tokens, max_tokens, block_hashes(text, self._bs))
        req.added_in = self._plans
        self._requests[request_id] = req
        self._waiting.append(req)
        self._unconsidered += 1

    def next_event_time(self) -> float | None:
        """End of the step in progress (planning it if work is pending); None when idle."""
        if self._window is None and self._step is None and self._has_work():
            self._begin_step(self._free_at)
        w = self._window
        if w is not None:
            if w.begun == w.finished:
                self._window_begin(w, w.begun + 1)
            return w.ends[w.begun - 1]
        return None if self._step is None else self._step.end

    def next_output_time(self) -> float | None:
        """End of the next step that can sample a first token or finish a request: the decode
        window's last step, else the step in progress. A caller that only needs those events
        can sleep until then and `catch_up` whenever it reads the metrics in between."""
        w = self._window
        return self.next_event_time() if w is None else w.ends[-1]

    def catch_up(self, now: float) -> None:
        """Apply the decode window's steps that end before `now`, as stepping to them would.

        For a caller woken at `next_output_time`: none of these steps emits anything but
        tokens, and the metrics then read as they would at `now`.
        """
        w = self._window
        if w is None:
            return
        done = bisect_left(w.ends, now)
        if done >= len(w.ends):
            raise RuntimeError(f"catch_up({now}) past the window's last step: a wake-up was missed")
        if done > w.finished:
            self._window_finish(w, done)
        self._window_begin(w, done + 1)

    def advance(self, now: float) -> list[SimEvent]:
        """Run every step that ends at or before `now`; return the events since the last call."""
        self._run(now, include_start=True)
        self._flush_tokens()
        events, self._events = self._events, []
        return events

    def cancel(self, request_id: str, now: float) -> None:
        """The client went away: drop the request, free its blocks; no event, unknown id = no-op."""
        self._run(now, include_start=False)
        self._cut_window()
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        req.done = True
        self._pending_tokens.pop(request_id, None)
        if req in self._running:
            self._running.remove(req)
        else:
            self._waiting.remove(req)
            if req.added_in == self._plans:
                self._unconsidered -= 1
        self._pool.free(req.blocks)
        req.blocks = []
        self._c.finished_abort += 1
        self._snapshot()  # vLLM publishes its counts when it processes an abort too

    def reported_metrics(self) -> EngineMetrics:
        """metrics() as vLLM's /metrics shows them: waiting, running and KV usage as of the end
        of the last step. vLLM publishes its scheduler's counts with each step's output, and a
        request that arrives during a step reaches the scheduler only after it, so its gauges
        never count as waiting a request that the next step admits at once (a live snapshot
        would: a balancer reading it would think a half-empty batch full)."""
        waiting, running, usage = self._reported
        return replace(self.metrics(), waiting=waiting, running=running, kv_usage=usage)

    def metrics(self) -> EngineMetrics:
        c = self._c
        return EngineMetrics(
            waiting=len(self._waiting),
            running=len(self._running),
            kv_usage=self._pool.usage(),
            prefix_cache_queries=c.queries,
            prefix_cache_hits=c.hits,
            num_gpu_blocks=self.profile.num_gpu_blocks,
            block_size=self._bs,
            prompt_tokens_total=c.prompt_tokens,
            generation_tokens_total=c.generation_tokens,
            finished_length=c.finished_length,
            finished_abort=c.finished_abort,
            num_preemptions=c.preemptions,
            prefill_seconds_sum=c.prefill_seconds,
            prefill_seconds_count=c.prefill_count,
            decode_seconds_sum=c.decode_seconds,
            finished_prompt_tokens=c.finished_prompt,
            finished_computed_tokens=c.finished_computed,
        )

    # --- time -------------------------------------------------------------------------------

    def _has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def _run(self, now: float, *, include_start: bool) -> None:
        """Finish steps ending at or before `now`, planning the ones that start before it.

        A step starting exactly at `now` is planned only by `advance` (include_start), so that
        several requests added at the same instant share their first step.
        """
        if now < self._last_now:
            raise ValueError(f"time went backwards: {now} < {self._last_now}")
        self._last_now = now
        while True:
            if self._window is not None:
                if not self._run_window(now, include_start):
                    return
                continue
            if self._step is None:
                start = self._free_at
                if not self._has_work() or start > now or (start == now and not include_start):
                    return
                self._begin_step(start)
                continue  # it may have planned a window
            if self._step.end > now:
                return
            self._finish_step(self._step)

    # --- planning a step --------------------------------------------------------------------

    def _begin_step(self, start: float) -> None:
        self._plans += 1
        self._unconsidered = 0
        if self._windows and self._begin_window(start):
            return
        budget = self.profile.max_num_batched_tokens
        items: list[tuple[SimRequest, int]] = []
        preempted = False
        i = 0
        while i < len(self._running) and budget > 0:
            req = self._running[i]
            n = min(req.num_tokens - req.num_computed, budget)
            scheduled, any_preempted = self._grow(req, n)
            preempted = preempted or any_preempted
            if not scheduled:
                break
            items.append((req, n))
            budget -= n
            i += 1
        if not preempted:
            admitted = len(items)
            budget = self._admit(items, budget)
            for req, _ in items[admitted:]:
                if req.scheduled_at < 0:  # vLLM keeps the first SCHEDULED across preemptions
                    req.scheduled_at = start
        if not items:
            raise RuntimeError("scheduler made no progress")  # unreachable: see validate()
        self._step = _Step(start + self._step_seconds(items), items)

    def _grow(self, req: SimRequest, n: int) -> tuple[bool, bool]:
        """Allocate blocks for `n` more tokens of a running request, preempting from the tail.

        Returns (scheduled, preempted_any); scheduled is False when `req` itself was preempted.
        """
        need = self._blocks_for(req.num_computed + n) - len(req.blocks)
        preempted_any = False
        while not self._pool.can_allocate(need, ()):
            victim = self._running.pop()
            self._preempt(victim)
            preempted_any = True
            if victim is req:
                return False, True
        req.blocks.extend(self._pool.allocate(need))
        self._cache_full_blocks(req, req.num_computed + n)
        return True, preempted_any

    def _preempt(self, req: SimRequest) -> None:
        self._pool.free(req.blocks)
        req.blocks = []
        req.num_computed = 0
        req.cached_blocks = 0
        req.preemptions += 1
        self._c.preemptions += 1
        self._waiting.appendleft(req)

    def _admit(self, items: list[tuple[SimRequest, int]], budget: int) -> int:
        """Admit waiting requests FCFS while budget, sequence slots and blocks allow."""
        while self._waiting and budget > 0 and len(self._running) < self.profile.max_num_seqs:
            req = self._waiting[0]
            hits = self._pool.match(req.hashes, (req.num_tokens - 1) // self._bs)
            cached = len(hits) * self._bs
            n = min(req.num_tokens - cached, budget)
            need = self._blocks_for(cached + n) - len(hits)
            if not self._pool.can_allocate(need, hits):
                self._blocked = Blocked(req, self._pool.version, budget, len(hits))
                break
            self._pool.touch(hits)
            req.blocks = hits + self._pool.allocate(need)
            req.num_computed = cached
            req.cached_blocks = len(hits)
            self._cache_full_blocks(req, cached + n)
            if req.preemptions == 0:  # vLLM counts re-admitted requests apart
                self._c.queries += req.num_tokens
                self._c.hits += cached
            if req.cached_tokens < 0:
                req.cached_tokens = cached
            self._waiting.popleft()
            self._running.append(req)
            items.append((req, n))
            budget -= n
        return budget

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self._bs)

    def _cache_full_blocks(self, req: SimRequest, computed_after: int) -> None:
        full = min(computed_after // self._bs, len(req.hashes))
        for j in range(req.cached_blocks, full):
            self._pool.cache(req.blocks[j], req.hashes[j])
        req.cached_blocks = max(req.cached_blocks, full)

    def _step_seconds(self, items: list[tuple[SimRequest, int]]) -> float:
        decodes = tokens = 0
        context = attn = 0.0
        for req, n in items:
            p = req.num_computed
            tokens += n
            context += p
            if n == 1 and req.num_output > 0 and p == req.num_tokens - 1:
                decodes += 1
            else:
                attn += n * (p + n / 2)
        return self.profile.step_ms(decodes, tokens, context, attn) / 1000.0

    # --- finishing a step -------------------------------------------------------------------

    def _finish_step(self, step: _Step) -> None:
        t = step.end
        finished = False
        for req, n in step.items:
            if req.done:  # cancelled while the step ran
                continue
            req.num_computed += n
            if req.num_computed < req.num_tokens:  # a prefill chunk, nothing sampled yet
                continue
            req.num_output += 1
            self._c.generation_tokens += 1
            self._on_token(req, t)
            if req.num_output >= req.max_tokens:
                self._finish(req, t)
                finished = True
        if finished:
            self._running = [r for r in self._running if not r.done]
        self._step = None
        self._free_at = t
        self._snapshot()

    def _snapshot(self) -> None:
        self._reported = self._report(self._pool.usage())

    def _report(self, usage: float) -> tuple[int, int, float]:
        return len(self._waiting) - self._unconsidered, len(self._running), usage

    def _on_token(self, req: SimRequest, t: float) -> None:
        if req.num_output == 1:
            self._c.prompt_tokens += req.prompt_tokens
            req.first_token_at = t
            self._events.append(FirstToken(req.rid, t, req.cached_tokens, req.prompt_tokens))
            return
        self._add_tokens(req.rid, 1, t)

    def _add_tokens(self, rid: str, n: int, t: float) -> None:
        """`n` more tokens of `rid`, the last sampled at `t`, for the next Tokens event."""
        pending = self._pending_tokens.get(rid)
        if pending is None:
            self._pending_tokens[rid] = [n, t]
        else:
            pending[0] += n
            pending[1] = t

    def _finish(self, req: SimRequest, t: float) -> None:
        pending = self._pending_tokens.pop(req.rid, None)
        if pending is not None:
            self._events.append(Tokens(req.rid, pending[1], int(pending[0])))
        self._events.append(
            Finished(req.rid, t, req.prompt_tokens, req.num_output, req.cached_tokens)
        )
        req.done = True
        del self._requests[req.rid]
        self._pool.free(req.blocks)
        req.blocks = []
        c = self._c
        c.finished_length += 1
        c.prefill_seconds += req.first_token_at - req.scheduled_at
        c.prefill_count += 1
        c.decode_seconds += t - req.first_token_at
        c.finished_prompt += req.prompt_tokens
        c.finished_computed += req.prompt_tokens - max(0, req.cached_tokens)

    def _flush_tokens(self) -> None:
        for rid, (count, t) in self._pending_tokens.items():
            self._events.append(Tokens(rid, t, int(count)))
        self._pending_tokens.clear()

    # --- decode windows (sim/window.py) -----------------------------------------------------

    def _begin_window(self, start: float) -> bool:
        p = self.profile
        budget = p.max_num_batched_tokens - len(self._running)
        if budget < 0:
            return False
        blocked = self._blocked
        if blocked is not None and blocked.budget != budget:
            blocked = None
        window = plan_window(
            running=self._running,
            head=self._waiting[0] if self._waiting else None,
            admission_open=budget > 0 and len(self._running) < p.max_num_seqs,
            blocked=blocked,
            pool=self._pool,
            bs=self._bs,
            start=start,
            step_seconds=self._decode_seconds,
        )
        if window is None:
            return False
        self._window = window
        self._window_begin(window, 1)
        return True

    def _decode_seconds(self, batch: int, context: int) -> float:
        # The same call as _step_seconds makes for a decode-only batch, for the same floats.
        return self.profile.step_ms(batch, batch, float(context), 0.0) / 1000.0

    def _run_window(self, now: float, include_start: bool) -> bool:
        """Apply the window's steps up to `now`; True when its last step has finished."""
        w = self._window
        assert w is not None
        done = bisect_right(w.ends, now)
        last = len(w.ends)
        if done == last:
            if last - 1 > w.finished:
                self._window_finish(w, last - 1)
            self._window_begin(w, last)
            self._window = None
            self._finish_step(_Step(w.ends[-1], [(r, 1) for r in w.batch]))
            return True
        if done > w.finished:
            self._window_finish(w, done)
        if done > 0 and (w.ends[done - 1] < now or include_start):
            self._window_begin(w, done + 1)
        return False

    def _window_begin(self, w: DecodeWindow, through: int) -> None:
        """Take the blocks of steps up to `through`, as _grow would at each step's start."""
        for s in range(w.begun + 1, through + 1):
            for i in w.schedule.get(s, ()):
                req = w.batch[i]
                computed = w.base[i] + s
                need = self._blocks_for(computed) - len(req.blocks)
                if need > 0:
                    req.blocks.extend(self._pool.allocate(need))
                self._cache_full_blocks(req, computed)
        w.begun = max(w.begun, through)

    def _window_finish(self, w: DecodeWindow, through: int) -> None:
        """Apply steps up to `through` (none of them finishes a request) to the requests."""
        self._window_begin(w, through)
        usage = self._pool.usage()
        d = through - w.finished
        t = w.ends[through - 1]
        for i, req in enumerate(w.batch):
            req.num_computed = w.base[i] + through
            req.num_output += d
            self._add_tokens(req.rid, d, t)
        self._c.generation_tokens += d * len(w.batch)
        w.finished = through
        self._free_at = t
        self._reported = self._report(usage)

    def _cut_window(self) -> None:
        """The batch or the queue changes: end the window after the step in progress."""
        w = self._window
        if w is None:
            return
        if w.begun == w.finished:
            self._window = None
        else:
            del w.ends[w.begun :]
