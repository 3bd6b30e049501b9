"""Real Envoy + `skylb-extproc serve` + real vLLM (CPU build, tiny model): opt-in, see conftest.

Three vLLM replicas (max_num_seqs 2) start once per session (tests/conftest.py `vllm_pool`); this
module puts one skylb + Envoy in front of them. The test that kills a replica runs last and
takes that replica out of the pool.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import REAL, ReplicaPool, require_vllm
from prometheus_client.parser import text_string_to_metric_families

from skylb_extproc.backends.fidelity import AGREEMENT, replay
from skylb_extproc.procs import Supervisor
from skylb_extproc.server.scrape import parse_metrics
from skylb_extproc.stack import RegionStack, model_of, start_region_over
from skylb_extproc.state.speed import Speed, SpeedEstimator
from skylb_extproc.workload import _WORDS, chat_workload, play_conversations, send_chat

from .conftest import get_json, get_text

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

MODEL = model_of(REAL.profile)


def _region(
    pool: ReplicaPool, workdir: Path, name: str, **params: object
) -> tuple[Supervisor, RegionStack]:
    sup = Supervisor(workdir / "logs")
    opts = replace(pool.opts, region=name, startup_timeout_s=60.0, policy_params=params)
    try:
        return sup, start_region_over(sup, workdir, opts, list(pool.replicas), dict(pool.pids))
    except BaseException:
        sup.stop_all()
        raise


@pytest.fixture(scope="module")
def pool(request: pytest.FixtureRequest) -> ReplicaPool:
    require_vllm()  # before asking for the pool, so a plain `pytest` skips without starting it
    value: ReplicaPool = request.getfixturevalue("vllm_pool")
    return value


@pytest.fixture(scope="module")
def stack(pool: ReplicaPool, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegionStack]:
    sup, region = _region(pool, tmp_path_factory.mktemp("real-vllm"), "real")
    try:
        yield region
    finally:
        sup.stop_all()


def chat_body(content: str, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": content}]
    return {"model": MODEL, "messages": messages, "ignore_eos": True, **extra}


def wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


async def burst(base_url: str, bodies: list[dict[str, Any]]) -> list[Any]:
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        return await asyncio.gather(*(send_chat(session, base_url, b) for b in bodies))


# --- tests (in order: the last one kills a replica) ---------------------------------------------


def test_scraping_reads_real_metric_names_and_labels(stack: RegionStack) -> None:
    for replica in stack.replicas:
        m = parse_metrics(get_text(replica.metrics_url))
        # block size and pool size come from vllm:cache_config_info's labels
        assert (m.block_size, m.num_gpu_blocks) == (32, 1024)
        assert m.kv_usage is not None and m.prefix_hits is not None
        assert m.prefix_queries is not None
    state = get_json(f"{stack.admin}/state")
    for row in state["replicas"]:
        assert row["healthy"] and row["running"] is not None and row["kv_usage"] is not None
    text = get_text(f"{stack.admin}/metrics")
    healthy = {
        s.labels["replica"]: s.value
        for f in text_string_to_metric_families(text)
        if f.name == "skylb_replica_healthy"
        for s in f.samples
    }
    assert healthy == {r.name: 1.0 for r in stack.replicas}


def _sse_chunks(raw: str) -> tuple[list[dict[str, Any]], str]:
    assert raw.endswith("\n\n")
    events = [e.removeprefix("data: ") for e in raw.strip().split("\n\n")]
    return [json.loads(e) for e in events[:-1]], events[-1]


def _stream(base: str, body: dict[str, Any]) -> tuple[Any, str]:
    request = urllib.request.Request(
        f"{base}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        assert resp.status == 200
        return resp.headers, resp.read().decode()


def test_streaming_passes_through_unchanged(stack: RegionStack) -> None:
    """Greedy decoding makes the answer a function of the prompt: through Envoy and straight
    to the replica that served it, the stream carries the same events around the same text."""
    body = chat_body("stream me " * 20, max_tokens=12, stream=True, temperature=0)
    body["stream_options"] = {"include_usage": True}
    envoy_headers, via_envoy = _stream(stack.listener, body)
    served = next(r for r in stack.replicas if r.name == envoy_headers["x-inference-pod"])
    direct_headers, direct = _stream(f"http://{served.address}", body)
    texts = []
    for headers, raw in ((envoy_headers, via_envoy), (direct_headers, direct)):
        assert headers["content-type"] == "text/event-stream; charset=utf-8"
        chunks, done = _sse_chunks(raw)
        assert done == "[DONE]"
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        content = chunks[1:-1]  # tokens per chunk vary with timing: vLLM merges what is ready
        assert all(set(c) == set(content[0]) for c in content[:-1])
        assert content[-1]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12
        texts.append("".join(c["choices"][0]["delta"].get("content", "") for c in content))
    assert texts[0] == texts[1] and texts[0]


def test_conversations_stick_to_the_replica_that_caches_them(stack: RegionStack) -> None:
    conversations = chat_workload(24, seed=101)
    results = asyncio.run(
        play_conversations(
            stack.listener, conversations, concurrency=2, model=MODEL, extra={"ignore_eos": True}
        )
    )
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    home = {r.conversation_id: r.replica for r in results if r.turn == 0}
    assert len(set(home.values())) > 1  # spread over replicas ...
    for r in results:
        assert r.replica == home[r.conversation_id], (r.conversation_id, r.turn)  # ... and kept
        if r.turn > 0:  # the replica really had the prefix: vLLM says so, block-aligned
            assert r.cached_tokens > 0 and r.cached_tokens % 32 == 0, (r.conversation_id, r.turn)


def test_hit_rate_agrees_with_the_simulator(
    stack: RegionStack, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The same workload, the same stack, simulated replicas of the same shape: the prefix hit
    rates agree within 10% (fixed answers, under capacity: see docs/benchmarks.md). Runs before
    the tests that flood vLLM's KV cache, so both sides start with room."""
    sim_pool: ReplicaPool = request.getfixturevalue("sim_pool")

    def play(region: RegionStack, backend: str) -> Any:
        sc = AGREEMENT
        return replay(
            region, backend, requests=120, seed=sc.seed, concurrency=sc.concurrency,
            replay_answers=sc.replay_answers,
        )  # fmt: skip

    sup, sim_stack = _region(sim_pool, tmp_path, "sim")
    try:
        sim = play(sim_stack, "sim")
    finally:
        sup.stop_all()
    real = play(stack, "vllm")
    assert sim.errors == real.errors == 0
    assert abs(sim.hit_rate - real.hit_rate) <= 0.10 * max(sim.hit_rate, real.hit_rate), (
        sim.hit_rate,
        real.hit_rate,
    )


@pytest.fixture
def holding(pool: ReplicaPool, tmp_path: Path) -> Iterator[RegionStack]:
    """The default policy holding a request whenever its best replica has any queue at all
    (`hold_s: 0`; by default it pushes up to 1 s of predicted queue)."""
    sup, region = _region(pool, tmp_path, "hold", hold_s=0.0)
    try:
        yield region
    finally:
        sup.stop_all()


def test_selective_pushing_holds_requests_at_the_balancer(holding: RegionStack) -> None:
    """Fill every replica straight (2 running + 1 waiting each, as vLLM reports; ~4 s of
    decoding), then send 3
    requests through the balancer: skylb keeps them in its queue, not one reaches a replica
    that reports a waiting request, and they go out once the replicas have room."""
    asyncio.run(_hold_while_full(holding))


async def _hold_while_full(stack: RegionStack) -> None:
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        fill = [
            asyncio.create_task(
                send_chat(session, f"http://{r.address}", chat_body(f"fill {r.name} {i} " * 8,
                          max_tokens=4000))
            )
            for r in stack.replicas
            for i in range(3)
        ]  # fmt: skip
        # skylb's own scrapes show each replica running 2 with 1 waiting: none is available
        await asyncio.to_thread(wait_for, lambda: _all_full(stack), 30, "every replica full")
        before = _waited(stack)
        held = [
            asyncio.create_task(send_chat(session, stack.listener, chat_body(f"held {i} " * 8,
                                max_tokens=16)))
            for i in range(3)
        ]  # fmt: skip
        await asyncio.to_thread(
            wait_for, lambda: _queue_length(stack) == 3, 10, "3 requests queued at skylb"
        )
        await asyncio.sleep(1.0)  # ten scrapes later: still held
        state = get_json(f"{stack.admin}/state")
        assert state["queue_length"] == 3 and not any(t.done() for t in held)
        # skylb sent none of them, because every replica still reports a waiting request
        assert [r["in_flight"] for r in state["replicas"]] == [0] * len(stack.replicas)
        assert all(r["waiting"] >= 1 for r in state["replicas"])
        for task in fill:
            task.cancel()  # the clients go away: vLLM aborts them and the replicas have room
        await asyncio.gather(*fill, return_exceptions=True)
        results = await asyncio.gather(*held)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert _waited(stack) - before == 3  # each waited at the balancer (> 10 ms)


def _all_full(stack: RegionStack) -> bool:
    rows = get_json(f"{stack.admin}/state")["replicas"]
    return all((r["waiting"] or 0) >= 1 and not r["available"] for r in rows)


def _queue_length(stack: RegionStack) -> int:
    return int(get_json(f"{stack.admin}/state")["queue_length"])


def _waited(stack: RegionStack) -> int:
    """Requests skylb held longer than 10 ms so far (its queue-wait histogram)."""
    text = get_text(f"{stack.admin}/metrics")
    count = under = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "skylb_queue_wait_seconds":
            for s in family.samples:
                if s.name.endswith("_count"):
                    count = s.value
                elif s.name.endswith("_bucket") and float(s.labels["le"]) == 0.01:
                    under = s.value
    return int(count - under)


def _timed_completion(base: str, prompt: str, max_tokens: int) -> tuple[float, float, int, int]:
    """(TTFT, last token time, prompt tokens, cached tokens) of one streamed completion."""
    body = {
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    request = urllib.request.Request(
        f"{base}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    start = time.monotonic()
    first = last = 0.0
    usage: dict[str, Any] = {}
    with urllib.request.urlopen(request, timeout=60) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line.removeprefix("data: "))
            assert "error" not in chunk, chunk
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                last = time.monotonic() - start
                first = first or last
            usage = chunk.get("usage") or usage
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return first, last, usage["prompt_tokens"], cached


def test_speed_learned_from_metrics_matches_responses(pool: ReplicaPool) -> None:
    """Sequential single requests to one replica: the prefill rate learned from its /metrics
    (uncached prompt tokens / summed vLLM prefill time) is within 30% of the one its responses
    show. Each prompt is sent twice: the repeat, all cached but its last block, answers after
    what is not prefill (HTTP, tokenizing the same text, the hand-over to the engine core), so
    TTFT - the repeat's TTFT is the prefill of the tokens the first computed and it did not."""
    base = pool.url(0)  # the kill test below takes the last one
    estimator = SpeedEstimator(Speed(1.0, 1.0), min_window_s=0.0)
    estimator.on_scrape(parse_metrics(get_text(f"{base}/metrics")), time.monotonic())
    tokens = seconds = decode_s = 0.0
    decode_tokens = 0
    rng = random.Random(7)
    for i in range(8):
        # ~1.7 tokens a word with the tiny model's tokenizer: ~1,700 of max_model_len 4,096
        prompt = f"{i} speed " + " ".join(rng.choice(_WORDS) for _ in range(1000))
        ttft, end, _, cached = _timed_completion(base, prompt, 16)
        again, _, _, cached_again = _timed_completion(base, prompt, 2)
        assert cached_again > cached
        tokens += cached_again - cached  # computed by the first, not by the repeat
        seconds += ttft - again
        decode_s += end - ttft
        decode_tokens += 15
    time.sleep(0.5)  # vLLM publishes finished requests' histograms with the next stats update
    estimator.on_scrape(parse_metrics(get_text(f"{base}/metrics")), time.monotonic())
    learned = estimator.speed
    measured_rate, measured_step = tokens / seconds, decode_s / decode_tokens
    print(  # the numbers, for the report (pytest -s)
        f"speed: learned {learned}; responses {measured_rate:.0f} tok/s, {measured_step:.5f} s"
        f"/step, over {tokens:.0f} prompt tokens"
    )
    assert estimator.has_counters, "vLLM's CPU build lacks a speed counter"
    assert learned.source == "learned"
    assert learned.prefill_tokens_per_s == pytest.approx(measured_rate, rel=0.3)
    assert learned.decode_step_s == pytest.approx(measured_step, rel=0.3)


def test_killed_replica_gets_no_new_requests(stack: RegionStack, pool: ReplicaPool) -> None:
    victim = stack.replicas[-1]
    bodies = [chat_body(f"before the kill {i} " * 10, max_tokens=200) for i in range(9)]

    async def kill_mid_run() -> list[Any]:
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            tasks = [asyncio.create_task(send_chat(session, stack.listener, b)) for b in bodies]
            await asyncio.sleep(0.3)
            # SIGKILL the launcher's group: vLLM and its engine die with it (a crash, no goodbye)
            os.killpg(pool.pids[victim.name], signal.SIGKILL)
            return await asyncio.gather(*tasks)

    asyncio.run(kill_mid_run())  # requests the victim held may fail: it crashed
    pool.replicas.remove(victim)  # gone for whoever uses the pool after this test
    wait_for(
        lambda: (
            not next(
                r for r in get_json(f"{stack.admin}/state")["replicas"] if r["name"] == victim.name
            )["healthy"]
        ),
        5,
        "skylb to mark the killed replica unhealthy",
    )
    after = [chat_body(f"after the kill {i} " * 10, max_tokens=16) for i in range(12)]
    results = asyncio.run(burst(stack.listener, after))
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert victim.name not in {r.replica for r in results}
