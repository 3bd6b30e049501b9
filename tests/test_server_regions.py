"""Two live skylb servers (us, eu) in memory: grpc.aio on port 0, fake replicas' /metrics, no Envoy.

us polls eu's /peer/state; eu polls a fake "asia" peer that always has room. us's replica is
busy, so us answers a request with a forward to eu (x-skylb-cluster + signed marker). eu accepts
that marker, counts it, and routes the request locally — waiting while its own replica is busy,
never forwarding it on to asia — while a forged or replayed marker is stripped, counted and
treated as a local client request (which eu does forward to asia).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from admin_client import AdminClient
from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from test_server import CHAT, FakeReplica, body, destination, eventually, read

from skylb_extproc.config import (
    Config,
    ListenConfig,
    PeerConfig,
    PolicyConfig,
    QueueConfig,
    ScrapeConfig,
    SpillConfig,
)
from skylb_extproc.envoy import proto
from skylb_extproc.region.marker import AUTH_HEADER, state_auth
from skylb_extproc.region.peers import PeerSummary, summary_to_json
from skylb_extproc.server.app import RunningServer, start_server
from skylb_extproc.types import ReplicaSpec

BUFFERED = 2
SECRET = b"test-secret"


@dataclass
class Region(AdminClient):
    name: str
    replica: FakeReplica
    server: RunningServer
    channel: grpc.aio.Channel
    http: aiohttp.ClientSession

    @property
    def stub(self) -> Any:
        return external_processor_pb2_grpc.ExternalProcessorStub(self.channel)

    @property
    def admin_port(self) -> int:
        return self.server.ports["admin"]

    async def metric(self, line: str) -> bool:
        return line in (await self.get("/metrics"))[1]

    async def close(self) -> None:
        await self.channel.close()
        await self.http.close()
        await self.server.stop(0.2)
        assert self.replica.runner is not None
        await self.replica.runner.cleanup()


def config(name: str, replica: FakeReplica, peers: tuple[PeerConfig, ...], secret: Path) -> Config:
    return Config(
        region=name,
        replicas=(ReplicaSpec(f"{name}0", replica.address, f"http://{replica.address}/metrics"),),
        listen=ListenConfig(grpc="127.0.0.1:0", admin="127.0.0.1:0"),
        scrape=ScrapeConfig(interval_s=0.02, timeout_s=0.5, stale_after_s=1.0),
        queue=QueueConfig(max_length=8, max_wait_s=5.0),
        shutdown_grace_s=0.2,
        peers=peers,
        secret_file=str(secret),
        # The paper's rules: this test is about markers and forwarding, named by their reasons.
        policy=PolicyConfig(name="skylb_paper"),
        spill=SpillConfig(mode="prefix", poll_interval_s=0.02, stale_after_s=0.5),
    )


async def start_region(
    name: str, waiting: float, peers: tuple[PeerConfig, ...], secret: Path
) -> Region:
    replica = FakeReplica(waiting=waiting)
    await replica.start()
    server = await start_server(config(name, replica, peers, secret))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.ports['grpc']}")
    return Region(name, replica, server, channel, aiohttp.ClientSession())


@contextlib.asynccontextmanager
async def fake_asia() -> AsyncIterator[str]:
    """A peer state endpoint that always reports room (it ignores auth: it is a fake)."""

    async def state(_: web.Request) -> web.Response:
        return web.json_response(summary_to_json(PeerSummary("asia", 0, 4, (0, 0, 0, 0), 4)))

    app = web.Application()
    app.router.add_get("/peer/state", state)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/peer/state"
    finally:
        await runner.cleanup()


@pytest.fixture
async def regions(tmp_path: Path) -> AsyncIterator[tuple[Region, Region]]:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET + b"\n")
    async with fake_asia() as asia_url:
        asia = PeerConfig("asia", "peer-asia", asia_url)
        eu = await start_region("eu", 0.0, (asia,), secret)
        eu_url = f"http://127.0.0.1:{eu.server.ports['admin']}/peer/state"
        us = await start_region("us", 3.0, (PeerConfig("eu", "peer-eu", eu_url, 80.0),), secret)
        try:
            yield us, eu
        finally:
            await us.close()
            await eu.close()


# --- helpers ------------------------------------------------------------------------------------


def request_headers(extra: tuple[tuple[str, str], ...] = ()) -> Any:
    values = [(":method", "POST"), (":path", "/v1/chat/completions"), *extra]
    return proto.ProcessingRequest(
        request_headers=proto.HttpHeaders(
            headers=proto.HeaderMap(
                headers=[proto.HeaderValue(key=k, raw_value=v.encode()) for k, v in values]
            )
        ),
        protocol_config=proto.ProtocolConfiguration(request_body_mode=BUFFERED),
    )


async def send(region: Region, extra: tuple[tuple[str, str], ...] = ()) -> tuple[Any, Any]:
    """A buffered chat request; returns (call, pending read of the routing answer)."""
    call = region.stub.Process()
    await call.write(request_headers(extra))
    assert (await read(call)).WhichOneof("response") == "request_headers"
    await call.write(body(CHAT))
    return call, asyncio.ensure_future(call.read())  # never cancel a read: it cancels the RPC


def mutation(answer: Any) -> tuple[dict[str, str], list[str]]:
    m = answer.request_body.response.header_mutation
    sets = {o.header.key: bytes(o.header.raw_value).decode() for o in m.set_headers}
    return sets, list(m.remove_headers)


async def ready(us: Region, eu: Region) -> None:
    async def check() -> bool:
        us_state, eu_state = await us.state(), await eu.state()
        return bool(
            us_state["replicas"][0]["healthy"]
            and not us_state["replicas"][0]["available"]
            and us_state["peers"][0]["fresh"]
            and us_state["peers"][0]["available_replicas"] == 1
            and eu_state["peers"][0]["fresh"]
        )

    await eventually(check)


# --- the test -----------------------------------------------------------------------------------


async def test_forward_verify_and_forgeries(regions: tuple[Region, Region]) -> None:
    us, eu = regions
    await ready(us, eu)

    # us: its replica is busy, eu has room -> forward to eu, with a signed marker
    us_call, pending = await send(us)
    sets, removes = mutation(await asyncio.wait_for(pending, 5.0))
    assert sets["x-skylb-cluster"] == "peer-eu" and sets["x-skylb-origin"] == "us"
    assert "x-gateway-destination-endpoint" not in sets
    assert "x-gateway-destination-endpoint" in removes
    marker = tuple((k, v) for k, v in sets.items() if k != "x-skylb-cluster")
    assert await us.metric(
        'skylb_spills_total{destination="eu",origin="us",reason="least_load"} 1.0'
    )

    # eu's replica turns busy before the forwarded request arrives: it must wait there
    eu.replica.waiting = 2.0
    await eventually(lambda: _available(eu, False))
    eu_call, eu_pending = await send(eu, marker)
    await eventually(lambda: _queue_length(eu, 1))
    assert await eu.metric('skylb_forwarded_received_total{origin="us"} 1.0')

    # a replayed marker and a forged one: stripped, counted, and served as eu's own clients'
    # requests -- which eu may forward to asia (a local client's request can spill)
    replay_call, replay_pending = await send(eu, marker)
    forged = (("x-skylb-origin", "us"), ("x-skylb-ts", f"{time.time():.6f}"),
              ("x-skylb-id", "x1"), ("x-skylb-sig", "00" * 32))  # fmt: skip
    forged_call, forged_pending = await send(eu, forged)
    for pending_answer in (replay_pending, forged_pending):
        sets, removes = mutation(await asyncio.wait_for(pending_answer, 5.0))
        assert sets["x-skylb-cluster"] == "peer-asia" and sets["x-skylb-origin"] == "eu"
    assert await eu.metric('skylb_markers_rejected_total{reason="replay"} 1.0')
    assert await eu.metric('skylb_markers_rejected_total{reason="bad_signature"} 1.0')

    # the verified one never left: it is served locally once eu's replica frees up
    assert not eu_pending.done()
    eu.replica.waiting = 0.0
    answer = await asyncio.wait_for(eu_pending, 5.0)
    assert destination(answer) == eu.replica.address
    sets, removes = mutation(answer)
    assert "x-skylb-cluster" not in sets
    assert set(removes) == {"x-skylb-origin", "x-skylb-ts", "x-skylb-id", "x-skylb-sig"}
    # the second went where the first one's prompt went: our index of what we forwarded
    assert await eu.metric(
        'skylb_spills_total{destination="asia",origin="eu",reason="least_load"} 1.0'
    )
    assert await eu.metric('skylb_spills_total{destination="asia",origin="eu",reason="prefix"} 1.0')
    for call in (us_call, eu_call, replay_call, forged_call):
        call.cancel()


async def _available(region: Region, expected: bool) -> bool:
    return bool((await region.state())["replicas"][0]["available"] == expected)


async def _queue_length(region: Region, expected: int) -> bool:
    return bool((await region.state())["queue_length"] == expected)


async def test_peer_state_needs_the_secret(regions: tuple[Region, Region]) -> None:
    _, eu = regions
    for headers in (None, {AUTH_HEADER: "garbage"}, {AUTH_HEADER: state_auth(b"x", "eu", 0.0)}):
        status, text = await eu.get("/peer/state", headers)
        assert (status, json.loads(text)) == (401, {"error": "unauthorized"})
    wrong_region = {AUTH_HEADER: state_auth(SECRET, "us", time.time())}
    assert (await eu.get("/peer/state", wrong_region))[0] == 401
    status, text = await eu.get("/peer/state", {AUTH_HEADER: state_auth(SECRET, "eu", time.time())})
    assert status == 200
    state = json.loads(text)
    assert (state["region"], state["healthy_replicas"], len(state["in_flight"])) == ("eu", 1, 1)


async def test_peer_metrics_and_state(regions: tuple[Region, Region]) -> None:
    us, eu = regions
    await ready(us, eu)
    peer = (await us.state())["peers"][0]
    assert peer["name"] == "eu" and peer["age_s"] < 0.5 and peer["rtt_s"] < 0.5
    text = (await us.get("/metrics"))[1]
    assert 'skylb_peer_staleness_seconds{peer="eu"}' in text
    assert 'skylb_peer_rtt_seconds{peer="eu"}' in text


async def test_a_dead_peer_gets_nothing_within_the_staleness_bound(
    regions: tuple[Region, Region],
) -> None:
    us, eu = regions
    await ready(us, eu)
    await eu.server.stop(0.0)  # eu's skylb is gone: its /peer/state no longer answers
    await asyncio.sleep(0.55)  # stale_after_s = 0.5
    assert (await us.state())["peers"][0]["fresh"] is False
    call, pending = await send(us)
    await eventually(lambda: _queue_length(us, 1))
    assert not pending.done()
    assert 'skylb_peer_poll_errors_total{peer="eu"}' in (await us.get("/metrics"))[1]
    call.cancel()
