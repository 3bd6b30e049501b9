"""One region end to end: simulated vLLM replicas <- real Envoy -> skylb ext_proc.

The Done criteria of the one-region issue, each as a test. Stacks come from conftest.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from skylb_extproc.demo import RegionStack, model_of
from skylb_extproc.procs import Supervisor, pid_alive
from skylb_extproc.workload import (
    TurnResult,
    chat_workload,
    send_chat,
    summarize,
)

from .conftest import FAST, TINY, get_json, get_text

pytestmark = pytest.mark.integration

FAST_MODEL = model_of(FAST.profile)
TINY_MODEL = model_of(TINY.profile)
CHAT = "/v1/chat/completions"


def chat_body(
    text: str = "hello there", *, model: str = FAST_MODEL, **extra: Any
) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 8,
        **extra,
    }


async def post_raw(
    url: str, data: bytes, *, content_type: str = "application/json", timeout_s: float = 30.0
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
        session.post(url, data=data, headers={"content-type": content_type}) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.read()


async def assert_serving(stack: RegionStack, model: str = FAST_MODEL) -> None:
    """A good request still succeeds (the server survived whatever came before)."""
    status, headers, body = await post_raw(
        stack.listener + CHAT, json.dumps(chat_body(model=model)).encode()
    )
    assert status == 200, body[:300]
    assert headers.get("x-inference-pod") in {r.name for r in stack.replicas}


def assert_json_error(body: bytes, status: int) -> dict[str, Any]:
    payload: dict[str, Any] = json.loads(body)
    assert isinstance(payload.get("error"), dict), payload
    assert payload["error"].get("message"), payload
    assert payload["error"].get("code") == status, payload
    return payload


# --- routing: affinity, spread, cache hits ----------------------------------------------------


async def wait_all_available(stack: RegionStack, timeout_s: float = 5.0) -> None:
    """Until skylb sees every replica available (no pending request, fresh scrape)."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(stack.admin + "/state") as resp:
                state = await resp.json()
            if all(r["available"] for r in state["replicas"]):
                return
            assert time.monotonic() < deadline, state
            await asyncio.sleep(0.02)


async def test_conversations_stick_spread_and_hit_the_cache(region: RegionStack) -> None:
    # Long system prompts keep the shared history far above the policy's 50 % match threshold,
    # so "same replica" is the policy's promise, not luck.
    conversations = chat_workload(
        18,
        seed=7,
        turns_per_conversation=(3, 3),
        system_words=200,
        question_words=(10, 20),
        max_tokens=(8, 16),
    )
    url = region.listener
    async with aiohttp.ClientSession() as session:
        # First turns all at once: a replica that just got one is not available (its request
        # is pending), so the others go elsewhere.
        first = await asyncio.gather(
            *(
                send_chat(session, url, c.request_body(0, [], model=FAST_MODEL))
                for c in conversations
            )
        )
        assert all(r.ok for r in first), [r.error for r in first]
        assert len({r.replica for r in first}) >= 2, [r.replica for r in first]
        answers = {c.conversation_id: [r.answer] for c, r in zip(conversations, first, strict=True)}
        # Later turns one by one, each while every replica is available: prefix affinity decides.
        results = list(first)
        for turn in (1, 2):
            for conv, home in zip(conversations, first, strict=True):
                await wait_all_available(region)
                body = conv.request_body(turn, answers[conv.conversation_id], model=FAST_MODEL)
                r = await send_chat(session, url, body, conv.conversation_id, turn)
                assert r.ok, r.error
                assert r.replica == home.replica, (
                    conv.conversation_id,
                    turn,
                    r.replica,
                    home.replica,
                )
                assert r.cached_tokens > 0, (conv.conversation_id, turn)
                answers[conv.conversation_id].append(r.answer)
                results.append(r)
    assert summarize(results)["hit_rate"] > 0.3


async def test_streaming_passes_through_intact(region: RegionStack) -> None:
    body = chat_body(
        "tell me a story", max_tokens=12, stream=True, stream_options={"include_usage": True}
    )
    async with (
        aiohttp.ClientSession() as session,
        session.post(region.listener + CHAT, json=body) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = (await resp.read()).decode()
    events = [e for e in raw.split("\n\n") if e.strip()]
    assert events[-1].strip() == "data: [DONE]"
    chunks = [json.loads(e.strip()[len("data:") :]) for e in events[:-1]]
    assert all(e.startswith("data:") for e in events)
    text = "".join(
        (c["choices"][0].get("delta") or {}).get("content") or ""
        for c in chunks
        if c.get("choices")
    )
    assert text
    assert any(c.get("usage") for c in chunks)


# --- bad input ----------------------------------------------------------------------------------

BAD_BODIES = {
    "invalid-json": b'{"model": "m", "messages": [',
    "not-an-object": b"[1, 2, 3]",
    "wrong-types": json.dumps({"model": 5, "messages": "hi"}).encode(),
    "empty-messages": json.dumps({"model": FAST_MODEL, "messages": []}).encode(),
    "bad-max-tokens": json.dumps(
        {"model": FAST_MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}
    ).encode(),
    "non-utf8": b'{"model": "m", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
async def test_bad_input_gets_400_and_server_keeps_serving(region: RegionStack, case: str) -> None:
    status, _, body = await post_raw(region.listener + CHAT, BAD_BODIES[case])
    assert status == 400, body[:300]
    assert_json_error(body, 400)
    await assert_serving(region)


async def test_get_on_chat_completions_passes_through(region: RegionStack) -> None:
    # Documented answer: a request that is not an inference POST is not parsed or queued; it
    # goes to the least-loaded replica, which answers as vLLM does (405 Method Not Allowed).
    async with aiohttp.ClientSession() as session, session.get(region.listener + CHAT) as resp:
        assert resp.status == 405
        assert resp.headers.get("x-inference-pod") in {r.name for r in region.replicas}
    await assert_serving(region)


async def test_multi_megabyte_body_routes(region: RegionStack) -> None:
    # 3 MiB of padding in a field the parser and the replica ignore: the body travels in
    # many chunks in duplex mode, one message in buffered mode (limit 16 MiB).
    body = chat_body("short prompt", user="x" * (3 * 1024 * 1024))
    status, headers, payload = await post_raw(
        region.listener + CHAT, json.dumps(body).encode(), timeout_s=60
    )
    assert status == 200, payload[:300]
    assert headers.get("x-inference-pod") in {r.name for r in region.replicas}


# --- waiting at the balancer ---------------------------------------------------------------------


async def test_busy_replicas_make_requests_wait_at_the_balancer(busy_region: RegionStack) -> None:
    # 2 replicas x 2 running sequences: 12 concurrent 40-token answers cannot all be pushed.
    bodies = [chat_body(f"q{i}", model=TINY_MODEL, max_tokens=40) for i in range(12)]
    max_queue = 0

    async def watch(done: asyncio.Event) -> None:
        nonlocal max_queue
        async with aiohttp.ClientSession() as session:
            while not done.is_set():
                async with session.get(busy_region.admin + "/state") as resp:
                    max_queue = max(max_queue, int((await resp.json())["queue_length"]))
                await asyncio.sleep(0.02)

    done = asyncio.Event()
    watcher = asyncio.create_task(watch(done))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        results = await asyncio.gather(
            *(send_chat(session, busy_region.listener, b) for b in bodies)
        )
    done.set()
    await watcher
    assert [r.status for r in results] == [200] * len(bodies), [r.error for r in results]
    assert max_queue > 0
    waited = _histogram_count(get_text(busy_region.admin + "/metrics"), "skylb_queue_wait_seconds")
    assert waited >= len(bodies)


def _histogram_count(metrics: str, name: str) -> float:
    return sum(float(m) for m in re.findall(rf"^{name}_count(?:{{[^}}]*}})? (\S+)$", metrics, re.M))


async def _replica_state(stack: RegionStack) -> dict[str, Any]:
    """The only replica's /state entry, plus the balancer's `queue_length`."""
    async with aiohttp.ClientSession() as session, session.get(stack.admin + "/state") as resp:
        body = await resp.json()
        state: dict[str, Any] = body["replicas"][0]
        return {**state, "queue_length": body["queue_length"]}


async def _fill_the_only_replica(
    stack: RegionStack, session: aiohttp.ClientSession
) -> list[asyncio.Task[TurnResult]]:
    """Push long requests one at a time until skylb holds one or sees the replica waiting.

    Returns the fillers; one of them may be the request held at the balancer."""
    fillers: list[asyncio.Task[TurnResult]] = []
    for i in range(6):
        state = await _replica_state(stack)
        if state["waiting"] >= 1 and not state["available"]:
            return fillers
        body = chat_body(f"filler {i}", model=TINY_MODEL, max_tokens=50)
        fillers.append(asyncio.create_task(send_chat(session, stack.listener, body)))
        deadline = time.monotonic() + 30
        while (state := await _replica_state(stack))["in_flight"] < len(fillers):
            if state["queue_length"]:
                return fillers  # held: the balancer judged the replica full
            assert time.monotonic() < deadline, "filler neither dispatched nor queued"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.15)  # a scrape sees it running or waiting
    raise AssertionError(f"replica never filled up: {await _replica_state(stack)}")


async def test_queue_full_429_and_deadline_503(limits_region: RegionStack) -> None:
    # One tiny replica (2 running sequences, ~2.4 s per 50-token answer), a queue of 1 and a
    # 0.5 s deadline. Once the replica is full, one request waits at the balancer until its
    # deadline (503: the last filler, or a late one) and the others find the queue full (429).
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        fillers = await _fill_the_only_replica(limits_region, session)
        bodies = [chat_body(f"late {i}", model=TINY_MODEL, max_tokens=50) for i in range(4)]
        late = await asyncio.gather(
            *(send_chat(session, limits_region.listener, b) for b in bodies)
        )
        pushed = await asyncio.gather(*fillers)
    statuses = sorted(r.status for r in [*pushed, *late])
    assert statuses.count(503) == 1, [r.body for r in [*pushed, *late]]
    assert all(r.status in (200, 503) for r in pushed), [r.error for r in pushed]
    assert sorted(r.status for r in late)[:3] == [429, 429, 429], [r.body for r in late]
    for r in [*pushed, *late]:
        if r.status != 200:
            payload = assert_json_error(r.body.encode(), r.status)
            assert payload["error"]["type"] == {429: "queue_full", 503: "deadline"}[r.status]
    await wait_all_available(limits_region, timeout_s=10)
    await assert_serving(limits_region, TINY_MODEL)


async def test_body_over_the_limit_gets_413(limits_region: RegionStack) -> None:
    body = json.dumps(chat_body("x" * (100 * 1024), model=TINY_MODEL)).encode()
    status, _, payload = await post_raw(limits_region.listener + CHAT, body)
    assert status == 413
    assert_json_error(payload, 413)

    async def chunked() -> AsyncIterator[bytes]:
        # No Content-Length, and more than Envoy's 1 MiB buffer: in BUFFERED mode Envoy itself
        # answers 413 (its local reply made JSON), in duplex skylb does.
        for _ in range(160):
            yield body[:8192]

    async with (
        aiohttp.ClientSession() as session,
        session.post(limits_region.listener + CHAT, data=chunked()) as resp,
    ):
        assert resp.status == 413
        assert_json_error(await resp.read(), 413)
    await wait_all_available(limits_region, timeout_s=10)
    await assert_serving(limits_region, TINY_MODEL)


# --- a replica dies -----------------------------------------------------------------------------


def _host_stats(stack: RegionStack, address: str) -> dict[str, int]:
    """Envoy's per-host counters (rq_total, cx_connect_fail, ...) of the replica cluster."""
    stats: dict[str, int] = {}
    for line in get_text(stack.envoy_admin + "/clusters").splitlines():
        parts = line.split("::")
        if (
            len(parts) == 4
            and parts[0] == "replicas"
            and parts[1] == address
            and parts[3].isdigit()
        ):
            stats[parts[2]] = int(parts[3])
    return stats


async def _traffic_until(
    stack: RegionStack, stop: asyncio.Event, results: list[TurnResult], workers: int = 6
) -> list[TurnResult]:
    """`workers` clients each playing conversations back to back until `stop` is set; each
    answer is appended to `results` as it comes."""
    conversations = iter(
        chat_workload(10_000, seed=3, turns_per_conversation=(4, 4), max_tokens=(8, 16))
    )

    async def worker(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            conv = next(conversations)
            answers: list[str] = []
            for turn in range(len(conv.turns)):
                body = conv.request_body(turn, answers, model=FAST_MODEL)
                r = await send_chat(session, stack.listener, body, conv.conversation_id, turn)
                results.append(r)
                answers.append(r.answer)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        await asyncio.gather(*(worker(session) for _ in range(workers)))
    return results


async def test_killed_replica_gets_no_new_requests(fresh_region: RegionStack) -> None:
    victim = fresh_region.replicas[1]
    stop = asyncio.Event()
    seen: list[TurnResult] = []
    traffic = asyncio.create_task(_traffic_until(fresh_region, stop, seen))
    deadline = time.monotonic() + 30
    while _host_stats(fresh_region, victim.address).get("rq_total", 0) == 0:
        assert time.monotonic() < deadline, "the victim never got a request"
        await asyncio.sleep(0.05)
    os.kill(fresh_region.replica_pids[victim.name], signal.SIGKILL)
    killed_at = time.monotonic()
    await asyncio.sleep(1.0)
    before = _host_stats(fresh_region, victim.address)
    # Traffic goes on until 20 requests started after the first second have been answered.
    while sum(1 for r in seen if r.started > killed_at + 1.0) < 20:
        assert time.monotonic() < deadline + 60, "traffic stalled after the kill"
        await asyncio.sleep(0.05)
    stop.set()
    results = await asyncio.wait_for(traffic, timeout=60)  # the run does not hang
    after = _host_stats(fresh_region, victim.address)
    # Envoy never even tried to connect to the dead replica after the first second.
    for key in ("rq_total", "cx_total", "cx_connect_fail"):
        assert after.get(key, 0) == before.get(key, 0), (key, before, after)
    late = [r for r in results if r.started > killed_at + 1.0]
    assert len(late) >= 20
    assert all(r.ok and r.replica != victim.name for r in late), [r.error for r in late if not r.ok]
    errors = [r.error for r in results if not r.ok]
    print(f"kill test: {len(results)} requests, {len(errors)} failed around the kill: {errors[:3]}")


async def test_unreachable_balancer_gets_json_500(fresh_region: RegionStack) -> None:
    """Envoy's own answer when skylb is gone has skylb's JSON shape (local_reply_config)."""
    await assert_serving(fresh_region)
    os.kill(fresh_region.skylb_pid, signal.SIGKILL)
    status, _, body = await post_raw(fresh_region.listener + CHAT, json.dumps(chat_body()).encode())
    assert status == 500
    assert "cannot be reached" in assert_json_error(body, 500)["error"]["message"]


async def test_requests_during_a_graceful_stop_get_json_503(fresh_region: RegionStack) -> None:
    """SIGTERM to skylb: through real Envoy, a request during the grace gets skylb's JSON 503
    (a refused ext_proc stream would make Envoy answer its own 500)."""
    await assert_serving(fresh_region)
    os.kill(fresh_region.skylb_pid, signal.SIGTERM)
    await asyncio.sleep(0.3)  # the stop has begun; the grace (10 s) has not ended
    status, _, body = await post_raw(fresh_region.listener + CHAT, json.dumps(chat_body()).encode())
    assert status == 503, body[:300]
    assert "shutting down" in assert_json_error(body, 503)["error"]["message"]


# --- the demo command ---------------------------------------------------------------------------


def _children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


DEMO_ARGS = ["--replicas-per-region", "2", "--time-scale", "50"]


def test_demo_prints_ready_json_and_stops_children_on_sigterm(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path)
    argv = [sys.executable, "-m", "skylb_extproc", "demo", *DEMO_ARGS, "--traffic", "0"]
    demo = sup.start("demo", argv)
    try:
        ready = demo.read_json_line(timeout_s=60)
        regions: Any = ready["regions"]
        (region,) = regions
        assert region["name"] == "local"
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", region["listener"])
        assert get_json(region["admin"] + "/state")["queue_length"] == 0
        assert [r["name"] for r in region["replicas"]] == ["r0", "r1"]
        children = _children_of(demo.pid)
        assert len(children) == 4  # two replicas, skylb, Envoy
        os.kill(demo.pid, signal.SIGTERM)  # the demo only, not its group
        assert demo.popen.wait(timeout=30) == 0
        deadline = time.monotonic() + 5
        while any(pid_alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in children if pid_alive(p)]
    finally:
        sup.stop_all()


def test_demo_traffic_exits_zero_with_a_summary() -> None:
    argv = [sys.executable, "-m", "skylb_extproc", "demo", *DEMO_ARGS, "--traffic", "20"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert json.loads(lines[0])["regions"][0]["name"] == "local"
    summary = "\n".join(lines[1:])
    assert "requests: 20" in summary and "errors: 0" in summary, summary
    assert "prefix hit rate:" in summary
