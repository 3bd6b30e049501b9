"""The live server in memory: a real grpc.aio server on 127.0.0.1:0 driven by a real gRPC client
stub, fake replicas serving /metrics over HTTP, no Envoy."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
import pytest
from admin_client import AdminClient
from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from skylb_extproc.config import (
    Config,
    ListenConfig,
    QueueConfig,
    ScrapeConfig,
)
from skylb_extproc.envoy import proto
from skylb_extproc.server.app import HEALTH_SERVICES, RunningServer, run_server, start_server
from skylb_extproc.types import ReplicaSpec

BUFFERED, DUPLEX = 2, 4
CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello " * 50}]})


@dataclass
class FakeReplica:
    """A replica's /metrics endpoint; `waiting` > 0 makes it unavailable to selective pushing."""

    waiting: float = 0.0
    address: str = ""
    runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def metrics(_: web.Request) -> web.Response:
            return web.Response(text=f"vllm:num_requests_waiting {self.waiting}\n")

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.address = f"127.0.0.1:{self.runner.addresses[0][1]}"


def make_config(
    replicas: list[FakeReplica],
    *,
    grace_s: float = 5.0,
    max_length: int = 8,
    max_wait_s: float = 5.0,
) -> Config:
    return Config(
        region="us",
        replicas=tuple(
            ReplicaSpec(f"r{i}", r.address, f"http://{r.address}/metrics")
            for i, r in enumerate(replicas)
        ),
        listen=ListenConfig(grpc="127.0.0.1:0", admin="127.0.0.1:0"),
        scrape=ScrapeConfig(interval_s=0.02, timeout_s=0.5, stale_after_s=1.0),
        queue=QueueConfig(max_length=max_length, max_wait_s=max_wait_s),
        shutdown_grace_s=grace_s,
    )


@dataclass
class Harness(AdminClient):
    replicas: list[FakeReplica]
    ports: dict[str, int]
    channel: grpc.aio.Channel
    http: aiohttp.ClientSession
    stub: Any = field(init=False)

    def __post_init__(self) -> None:
        self.stub = external_processor_pb2_grpc.ExternalProcessorStub(self.channel)

    @property
    def admin_port(self) -> int:
        return self.ports["admin"]

    async def replica(self, name: str) -> dict[str, Any]:
        rows: list[dict[str, Any]] = (await self.state())["replicas"]
        return next(row for row in rows if row["name"] == name)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not await check():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.01)


@pytest.fixture
async def fakes() -> AsyncIterator[list[FakeReplica]]:
    replicas = [FakeReplica(), FakeReplica()]
    for replica in replicas:
        await replica.start()
    yield replicas
    for replica in replicas:
        assert replica.runner is not None
        await replica.runner.cleanup()


async def _connect(fakes: list[FakeReplica], ports: dict[str, int]) -> Harness:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{ports['grpc']}")
    return Harness(fakes, ports, channel, aiohttp.ClientSession())


async def _close(harness: Harness) -> None:
    await harness.channel.close()
    await harness.http.close()


@contextlib.asynccontextmanager
async def serving(fakes: list[FakeReplica], **config: Any) -> AsyncIterator[Harness]:
    running: RunningServer = await start_server(make_config(fakes, grace_s=0.5, **config))
    harness = await _connect(fakes, running.ports)
    try:
        yield harness
    finally:
        await _close(harness)
        await running.stop(0.5)


@pytest.fixture
async def server(fakes: list[FakeReplica]) -> AsyncIterator[Harness]:
    async with serving(fakes) as harness:
        yield harness


async def healthy_and_available(harness: Harness, available: dict[str, bool]) -> None:
    async def check() -> bool:
        rows = (await harness.state())["replicas"]
        return all(r["healthy"] and r["available"] == available[r["name"]] for r in rows)

    await eventually(check)


# --- messages ----------------------------------------------------------------------------------


def headers(path: str, *, method: str = "POST", eos: bool = False, mode: int = BUFFERED) -> Any:
    values = [(":method", method), (":path", path), (":authority", "llm"), ("x-request-id", "c1")]
    return proto.ProcessingRequest(
        request_headers=proto.HttpHeaders(
            headers=proto.HeaderMap(
                headers=[proto.HeaderValue(key=k, raw_value=v.encode()) for k, v in values]
            ),
            end_of_stream=eos,
        ),
        protocol_config=proto.ProtocolConfiguration(request_body_mode=mode),
    )


def body(data: str | bytes, *, eos: bool = True) -> Any:
    raw = data.encode() if isinstance(data, str) else data
    return proto.ProcessingRequest(request_body=proto.HttpBody(body=raw, end_of_stream=eos))


async def read(call: Any, timeout: float = 5.0) -> Any:
    """The next answer; a test that gets none fails instead of hanging (cancels the RPC)."""
    return await asyncio.wait_for(call.read(), timeout)


def destination(response: Any) -> str | None:
    phase = response.WhichOneof("response")
    if phase not in ("request_headers", "request_body"):
        return None
    for option in getattr(response, phase).response.header_mutation.set_headers:
        if option.header.key == "x-gateway-destination-endpoint":
            return bytes(option.header.raw_value).decode()
    return None


async def buffered_request(harness: Harness, payload: str = CHAT) -> tuple[Any, Any]:
    """Open a stream and send a buffered chat request; returns (call, headers answer)."""
    call = harness.stub.Process()
    await call.write(headers("/v1/chat/completions"))
    first = await read(call)
    assert first.WhichOneof("response") == "request_headers"
    await call.write(body(payload))
    return call, first


# --- tests -------------------------------------------------------------------------------------


async def test_buffered_request_is_routed_to_the_available_replica(
    server: Harness, fakes: list[FakeReplica]
) -> None:
    fakes[0].waiting = 3  # r0 has a queue: only r1 is available
    await healthy_and_available(server, {"r0": False, "r1": True})
    call, _ = await buffered_request(server)
    answer = await read(call)
    assert answer.WhichOneof("response") == "request_body"
    assert destination(answer) == fakes[1].address
    assert (await server.replica("r1"))["in_flight"] == 1
    await call.done_writing()
    assert await read(call) == grpc.aio.EOF
    await eventually(lambda: _in_flight(server, "r1", 0))


async def _in_flight(server: Harness, name: str, expected: int) -> bool:
    return bool((await server.replica(name))["in_flight"] == expected)


async def test_passthrough_get_is_routed_in_the_headers_answer(
    server: Harness, fakes: list[FakeReplica]
) -> None:
    await healthy_and_available(server, {"r0": True, "r1": True})
    call = server.stub.Process()
    await call.write(headers("/v1/models", method="GET", eos=True))
    answer = await read(call)
    assert answer.WhichOneof("response") == "request_headers"
    assert destination(answer) in {fakes[0].address, fakes[1].address}
    call.cancel()


async def test_duplex_request_routes_in_headers_with_the_whole_body(
    server: Harness, fakes: list[FakeReplica]
) -> None:
    fakes[1].waiting = 1
    await healthy_and_available(server, {"r0": True, "r1": False})
    call = server.stub.Process()
    await call.write(headers("/v1/chat/completions", mode=DUPLEX))
    half = len(CHAT) // 2
    await call.write(body(CHAT[:half], eos=False))
    await call.write(body(CHAT[half:], eos=True))
    answer = await read(call)
    assert answer.WhichOneof("response") == "request_headers"
    assert destination(answer) == fakes[0].address
    common = answer.request_headers.response
    assert common.status == proto.CONTINUE_AND_REPLACE
    assert common.body_mutation.body == CHAT.encode()
    call.cancel()


async def test_bad_body_gets_400_and_is_counted(server: Harness) -> None:
    await healthy_and_available(server, {"r0": True, "r1": True})
    call, _ = await buffered_request(server, payload="{not json")
    answer = await read(call)
    assert answer.WhichOneof("response") == "immediate_response"
    assert answer.immediate_response.status.code == 400
    call.cancel()
    _, text = await server.get("/metrics")
    assert 'skylb_decisions_total{outcome="bad_request",policy="skylb"} 1.0' in text


async def test_request_waits_until_a_scrape_frees_a_replica(
    server: Harness, fakes: list[FakeReplica]
) -> None:
    fakes[0].waiting = fakes[1].waiting = 2
    await healthy_and_available(server, {"r0": False, "r1": False})
    call, _ = await buffered_request(server)
    pending = asyncio.ensure_future(call.read())  # never cancel a read: that cancels the RPC
    await eventually(lambda: _queue_length(server, 1))
    await asyncio.sleep(0.1)
    assert not pending.done()
    fakes[1].waiting = 0
    answer = await asyncio.wait_for(pending, 3.0)
    assert destination(answer) == fakes[1].address
    assert (await server.state())["queue_length"] == 0
    call.cancel()
    _, text = await server.get("/metrics")
    assert "skylb_queue_wait_seconds_count 1.0" in text


async def _queue_length(server: Harness, expected: int) -> bool:
    return bool((await server.state())["queue_length"] == expected)


async def test_abort_while_waiting_leaves_the_queue(
    server: Harness, fakes: list[FakeReplica]
) -> None:
    fakes[0].waiting = fakes[1].waiting = 2
    await healthy_and_available(server, {"r0": False, "r1": False})
    call, _ = await buffered_request(server)
    await eventually(lambda: _queue_length(server, 1))
    call.cancel()
    await eventually(lambda: _queue_length(server, 0))
    fakes[0].waiting = 0  # a replica frees up: nothing may be routed to it any more
    await healthy_and_available(server, {"r0": True, "r1": False})
    assert (await server.replica("r0"))["in_flight"] == 0
    _, text = await server.get("/metrics")
    assert 'skylb_decisions_total{outcome="cancelled",policy="skylb"} 1.0' in text
    assert "skylb_streams_active 0.0" in text


async def test_abort_after_routing_frees_in_flight(
    server: Harness, fakes: list[FakeReplica]
) -> None:
    fakes[0].waiting = 1
    await healthy_and_available(server, {"r0": False, "r1": True})
    call, _ = await buffered_request(server)
    assert destination(await read(call)) == fakes[1].address
    assert (await server.replica("r1"))["in_flight"] == 1
    call.cancel()
    await eventually(lambda: _in_flight(server, "r1", 0))


async def test_deadline_and_full_queue_are_rejected(fakes: list[FakeReplica]) -> None:
    fakes[0].waiting = fakes[1].waiting = 2
    async with serving(fakes, max_length=1, max_wait_s=0.3) as server:
        await healthy_and_available(server, {"r0": False, "r1": False})
        first, _ = await buffered_request(server)
        await eventually(lambda: _queue_length(server, 1))
        second, _ = await buffered_request(server)
        full = await read(second)
        assert full.immediate_response.status.code == 429
        expired = await read(first)  # the driver's timer fires at the queue deadline
        assert expired.immediate_response.status.code == 503
        assert b"deadline" in expired.immediate_response.body
        first.cancel()
        second.cancel()
        _, text = await server.get("/metrics")
    assert 'skylb_decisions_total{outcome="queue_full",policy="skylb"} 1.0' in text
    assert 'skylb_decisions_total{outcome="deadline",policy="skylb"} 1.0' in text


async def test_health_service_reports_serving(server: Harness) -> None:
    stub = health_pb2_grpc.HealthStub(server.channel)
    for service in HEALTH_SERVICES:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


async def test_admin_endpoints(server: Harness) -> None:
    assert (await server.get("/healthz"))[0] == 200
    await healthy_and_available(server, {"r0": True, "r1": True})
    assert (await server.get("/readyz"))[0] == 200
    state = await server.state()
    assert state["region"] == "us" and state["policy"] == "skylb"
    assert [r["name"] for r in state["replicas"]] == ["r0", "r1"]
    assert state["replicas"][0]["waiting"] == 0.0
    status, text = await server.get("/metrics")
    assert status == 200
    assert 'skylb_replica_healthy{replica="r0"} 1.0' in text
    assert "skylb_queue_length 0.0" in text
    assert 'skylb_decisions_total{outcome="routed",policy="skylb"} 0.0' in text


async def test_graceful_stop_rejects_queued_and_drains_in_flight(fakes: list[FakeReplica]) -> None:
    fakes[0].waiting = 1
    ports: dict[str, int] = {}
    is_ready, stop = asyncio.Event(), asyncio.Event()

    def on_ready(bound: dict[str, int]) -> None:
        ports.update(bound)
        is_ready.set()

    task = asyncio.create_task(run_server(make_config(fakes), ready=on_ready, stop=stop))
    await asyncio.wait_for(is_ready.wait(), 5.0)
    harness = await _connect(fakes, ports)
    try:
        await healthy_and_available(harness, {"r0": False, "r1": True})
        routed, _ = await buffered_request(harness)
        assert destination(await read(routed)) == fakes[1].address
        fakes[1].waiting = 1  # r1 looks busy now: the next request queues
        await healthy_and_available(harness, {"r0": False, "r1": False})
        queued, _ = await buffered_request(harness)
        await eventually(lambda: _queue_length(harness, 1))
        stop.set()
        rejected = await read(queued)
        assert rejected.immediate_response.status.code == 503
        queued.cancel()  # as Envoy does after an immediate response
        assert (await harness.get("/readyz"))[0] == 503  # admin stays up during the grace
        assert not task.done()  # the routed stream is still open
        # A request arriving during the grace gets skylb's JSON 503, not a refused stream
        # (Envoy would answer that with its own 500).
        late, _ = await buffered_request(harness)
        answer = (await read(late)).immediate_response
        assert answer.status.code == 503
        assert "shutting down" in json.loads(answer.body)["error"]["message"]
        late.cancel()
        await routed.done_writing()
        await asyncio.wait_for(task, 2.0)  # well within the 5 s grace: the drain ended it
    finally:
        await _close(harness)


async def test_unsupported_body_mode_fails_the_stream(server: Harness) -> None:
    call = server.stub.Process()
    await call.write(headers("/v1/chat/completions", mode=1))  # STREAMED: cannot carry a route
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await read(call)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    async def closed() -> bool:
        return bool((await server.state())["streams_active"] == 0)

    await eventually(closed)
