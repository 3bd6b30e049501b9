"""The simulated vLLM server: a real aiohttp server on 127.0.0.1:0 and a real HTTP client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from skylb_extproc.sim.openai_format import filler_text
from skylb_extproc.sim.replica import POD_HEADER, serve_replica

FAST = 100.0  # tiny's 10 ms steps last 0.1 ms


@contextlib.asynccontextmanager
async def running(time_scale: float = FAST, **options: Any) -> AsyncIterator[str]:
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        serve_replica(
            host="127.0.0.1",
            port=0,
            name="sim-a",
            profile="tiny",
            time_scale=time_scale,
            ready=port.set_result,
            **options,
        )
    )
    try:
        yield f"http://127.0.0.1:{await asyncio.wait_for(port, 5)}"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
async def base() -> AsyncIterator[str]:
    async with running() as url:
        yield url


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": content}], **extra}


def sse_events(body: str) -> list[str]:
    assert body.endswith("\n\n")
    events = body[:-2].split("\n\n")
    assert all(e.startswith("data: ") for e in events)
    return [e[len("data: ") :] for e in events]


async def metrics(http: aiohttp.ClientSession, base: str) -> dict[str, dict[str, float]]:
    """{family name: {sample name + sorted labels: value}}"""
    async with http.get(f"{base}/metrics") as r:
        assert r.status == 200 and r.headers[POD_HEADER] == "sim-a"
        text = await r.text()
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + json.dumps(dict(sorted(s.labels.items())))
            out.setdefault(family.name, {})[key] = s.value
    return out


def one(values: dict[str, float]) -> float:
    assert len(values) == 1
    return next(iter(values.values()))


async def test_chat_non_streaming(base: str, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{base}/v1/chat/completions", json=chat("hi", max_tokens=5)) as r:
        assert r.status == 200
        assert r.headers[POD_HEADER] == "sim-a"
        body = await r.json()
    assert body["id"].startswith("chatcmpl-")
    assert (body["object"], body["model"]) == ("chat.completion", "m")
    assert isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == filler_text(0, 5)
    assert (choice["finish_reason"], choice["index"]) == ("length", 0)
    # "<|user|>hi\n<|assistant|>" = 24 characters = 6 tokens
    assert body["usage"] == {
        "prompt_tokens": 6,
        "total_tokens": 11,
        "completion_tokens": 5,
        "prompt_tokens_details": {
            "cached_tokens": 0,
            "created_cache_tokens": 0,
            "multimodal_tokens": None,
        },
        "completion_tokens_details": None,
    }


async def test_completion_non_streaming_defaults_to_16_tokens(
    base: str, http: aiohttp.ClientSession
) -> None:
    async with http.post(f"{base}/v1/completions", json={"model": "x", "prompt": "abcd"}) as r:
        body = await r.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == filler_text(0, 16)
    assert body["usage"]["completion_tokens"] == 16


async def test_chat_streaming_chunks_usage_and_done(base: str, http: aiohttp.ClientSession) -> None:
    payload = chat("hi", max_tokens=4, stream=True, stream_options={"include_usage": True})
    async with http.post(f"{base}/v1/chat/completions", json=payload) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert r.headers[POD_HEADER] == "sim-a"
        events = sse_events(await r.text())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    first, *content, usage = chunks
    assert first["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    assert "".join(c["choices"][0]["delta"]["content"] for c in content) == filler_text(0, 4)
    assert [c["choices"][0]["finish_reason"] for c in content][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in content[:-1])
    assert all("usage" not in c for c in [first, *content])
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 4
    assert usage["usage"]["prompt_tokens_details"] == {
        "cached_tokens": 0,
        "created_cache_tokens": 0,
    }


async def test_completion_streaming_without_usage(base: str, http: aiohttp.ClientSession) -> None:
    payload = {"model": "m", "prompt": "abcd", "max_tokens": 3, "stream": True}
    async with http.post(f"{base}/v1/completions", json=payload) as r:
        events = sse_events(await r.text())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" not in c and c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == filler_text(0, 3)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_cached_tokens_on_a_repeated_prompt(base: str, http: aiohttp.ClientSession) -> None:
    payload = {"model": "m", "prompt": "p" * 132, "max_tokens": 1}  # 33 tokens
    cached = []
    for _ in range(2):
        async with http.post(f"{base}/v1/completions", json=payload) as r:
            cached.append((await r.json())["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert cached == [0, 32]
    m = await metrics(http, base)
    assert one(m["vllm:prefix_cache_hits"]) == 32
    assert one(m["vllm:prefix_cache_queries"]) == 66


async def test_metrics_names_and_labels(base: str, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{base}/v1/completions", json={"prompt": "abcd", "max_tokens": 2}):
        pass
    m = await metrics(http, base)
    labels = '{"engine": "0", "model_name": "tiny-sim"}'
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert m[f"vllm:{gauge}"] == {f"vllm:{gauge}{labels}": 0.0}
    assert m["vllm:prompt_tokens"] == {f"vllm:prompt_tokens_total{labels}": 1.0}
    assert m["vllm:generation_tokens"] == {f"vllm:generation_tokens_total{labels}": 2.0}
    success = m["vllm:request_success"]
    length = '{"engine": "0", "finished_reason": "length", "model_name": "tiny-sim"}'
    assert success[f"vllm:request_success_total{length}"] == 1.0
    assert len(success) == 3  # stop, length, abort
    ((info, value),) = m["vllm:cache_config_info"].items()
    assert value == 1.0
    assert '"block_size": "16"' in info and '"num_gpu_blocks": "8"' in info
    assert '"engine": "0"' in info


async def test_waiting_visible_headers_at_first_token_and_cancel_on_disconnect(
    http: aiohttp.ClientSession,
) -> None:
    """Real time (scale 1): two 60-token streams hold tiny's 2 slots for ~0.7 s."""
    async with running(time_scale=1.0, headers_on_accept=False) as url:
        busy = chat("x", max_tokens=60, stream=True)
        holders = [asyncio.create_task(_read_all(http, url, busy)) for _ in range(2)]
        await asyncio.sleep(0.05)
        queued = asyncio.create_task(_headers(http, url, chat("y", stream=True)))
        await asyncio.sleep(0.15)
        assert not queued.done()  # waiting in the replica: no response headers yet
        m = await metrics(http, url)
        assert one(m["vllm:num_requests_running"]) == 2.0
        assert one(m["vllm:num_requests_waiting"]) == 1.0
        assert one(m["vllm:kv_cache_usage_perc"]) > 0.0
        for task in [*holders, queued]:
            task.cancel()
        await asyncio.gather(*holders, queued, return_exceptions=True)
        abort = '{"engine": "0", "finished_reason": "abort", "model_name": "tiny-sim"}'
        for _ in range(200):  # the server notices the disconnects asynchronously
            m = await metrics(http, url)
            if m["vllm:request_success"][f"vllm:request_success_total{abort}"] == 3.0:
                break
            await asyncio.sleep(0.01)
        assert m["vllm:request_success"][f"vllm:request_success_total{abort}"] == 3.0
        assert one(m["vllm:num_requests_running"]) == 0.0
        assert one(m["vllm:num_requests_waiting"]) == 0.0
        assert one(m["vllm:kv_cache_usage_perc"]) == 0.0


async def _headers(
    http: aiohttp.ClientSession, url: str, payload: dict[str, Any]
) -> aiohttp.ClientResponse:
    response = await http.post(f"{url}/v1/chat/completions", json=payload)
    response.close()
    return response


async def test_waiting_counted_while_clients_wait(http: aiohttp.ClientSession) -> None:
    async with running(time_scale=1.0) as url:
        busy = chat("x", max_tokens=40)
        tasks = [asyncio.create_task(_read_all(http, url, busy)) for _ in range(4)]
        await asyncio.sleep(0.1)
        m = await metrics(http, url)
        assert one(m["vllm:num_requests_running"]) == 2.0
        assert one(m["vllm:num_requests_waiting"]) == 2.0
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_headers_on_accept_by_default(http: aiohttp.ClientSession) -> None:
    async with running(time_scale=1.0) as url:
        busy = chat("x", max_tokens=60, stream=True)
        holders = [asyncio.create_task(_read_all(http, url, busy)) for _ in range(2)]
        await asyncio.sleep(0.05)
        async with asyncio.timeout(0.2):  # queued, yet the headers arrive at once (as vLLM)
            response = await _headers(http, url, chat("y", stream=True))
        assert response.status == 200
        for task in holders:
            task.cancel()
        await asyncio.gather(*holders, return_exceptions=True)


async def _read_all(http: aiohttp.ClientSession, url: str, payload: dict[str, Any]) -> str:
    async with http.post(f"{url}/v1/chat/completions", json=payload) as r:
        return await r.text()


@pytest.mark.parametrize(
    ("path", "body", "kind", "param", "needle"),
    [
        ("/v1/chat/completions", b"{not json", "Bad Request", "body.1", "json_invalid"),
        ("/v1/chat/completions", b"[1, 2]", "Bad Request", "body", "valid dictionary"),
        ("/v1/chat/completions", b"", "Bad Request", "body", "missing"),
        ("/v1/chat/completions", b'{"model": "m"}', "Bad Request", "body.messages", "missing"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": 3}]}',
            "Bad Request",
            "body.messages",
            "content",
        ),
        ("/v1/chat/completions", b'{"messages": []}', "BadRequestError", None, "empty"),
        ("/v1/completions", b'{"model": "m"}', "BadRequestError", "prompt", "prompt"),
        (
            "/v1/completions",
            b'{"prompt": "a", "max_tokens": "x"}',
            "Bad Request",
            "body.max_tokens",
            "int_parsing",
        ),
        (
            "/v1/completions",
            b'{"prompt": "a", "max_tokens": 1.5}',
            "Bad Request",
            "body.max_tokens",
            "int_from_float",
        ),
        (
            "/v1/completions",
            b'{"prompt": "a", "stream": "x"}',
            "Bad Request",
            "body.stream",
            "bool",
        ),
        (
            "/v1/completions",
            b'{"prompt": "a", "max_tokens": 0}',
            "BadRequestError",
            "max_tokens",
            "at least 1",
        ),
        (
            "/v1/completions",
            b'{"prompt": "a", "max_tokens": 999}',
            "BadRequestError",
            "max_tokens",
            "max_model_len=128",
        ),
        (
            "/v1/completions",
            b'{"prompt": "", "max_tokens": 1}',
            "BadRequestError",
            "prompt",
            "empty",
        ),
        (
            "/v1/completions",
            b'{"prompt": "a", "stream_options": {}}',
            "BadRequestError",
            "stream_options",
            "stream=True",
        ),
        (
            "/v1/completions",
            json.dumps({"prompt": "a" * 600}).encode(),
            "BadRequestError",
            "input_tokens",
            "context length",
        ),
    ],
)
async def test_400_errors(
    base: str,
    http: aiohttp.ClientSession,
    path: str,
    body: bytes,
    kind: str,
    param: str | None,
    needle: str,
) -> None:
    """vLLM 0.32's two kinds: pydantic's ("Bad Request", param = location) and its own."""
    headers = {"Content-Type": "application/json"}
    async with http.post(f"{base}{path}", data=body, headers=headers) as r:
        assert r.status == 400
        assert r.headers[POD_HEADER] == "sim-a"
        error = (await r.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == (kind, param, 400)
    assert needle in error["message"]


async def test_prompt_plus_max_tokens_beyond_the_context_stops_there(
    base: str, http: aiohttp.ClientSession
) -> None:
    """vLLM 0.32 serves it and stops at max_model_len (tiny: 128 tokens)."""
    payload = {"prompt": "abcd" * 100, "max_tokens": 100}  # 100 prompt tokens
    async with http.post(f"{base}/v1/completions", json=payload) as r:
        assert r.status == 200
        usage = (await r.json())["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (100, 28)


async def test_not_json_content_type(base: str, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{base}/v1/completions", data=b'{"prompt": "a"}') as r:
        assert r.status == 400
        error = (await r.json())["error"]
    assert (error["type"], error["param"]) == ("Bad Request", None)
    assert "Only 'application/json'" in error["message"]


async def test_unknown_model_with_a_served_name(http: aiohttp.ClientSession) -> None:
    async with running(served_model_name="served") as url:
        async with http.post(f"{url}/v1/completions", json={"model": "other", "prompt": "a"}) as r:
            assert r.status == 404
            error = (await r.json())["error"]
        assert error["type"] == "NotFoundError" and error["param"] == "model"
        async with http.post(f"{url}/v1/completions", json={"model": "served", "prompt": "a"}) as r:
            assert r.status == 200


async def test_models_health_and_unknown_route(base: str, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{base}/health") as r:
        assert r.status == 200 and r.headers[POD_HEADER] == "sim-a"
    async with http.get(f"{base}/v1/models") as r:
        (card,) = (await r.json())["data"]
    assert (card["id"], card["object"], card["max_model_len"]) == ("tiny-sim", "model", 128)
    async with http.get(f"{base}/nope") as r:
        assert r.status == 404 and r.headers[POD_HEADER] == "sim-a"
        assert await r.json() == {"detail": "Not Found"}


def test_cli_entry_point_prints_port_and_stops_on_sigterm() -> None:
    code = (
        "import argparse, sys; from skylb_extproc.sim.replica import main_sim_replica; "
        "sys.exit(main_sim_replica(argparse.Namespace(host='127.0.0.1', port=0, name='cli', "
        "profile='tiny', time_scale=1.0)))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = json.loads(proc.stdout.readline())
        assert line["name"] == "cli" and line["port"] > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_rejects_an_unknown_profile() -> None:
    code = (
        "import argparse, sys; from skylb_extproc.sim.replica import main_sim_replica; "
        "sys.exit(main_sim_replica(argparse.Namespace(host='127.0.0.1', port=0, name='cli', "
        "profile='nope', time_scale=1.0)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2 and "unknown profile" in result.stderr
