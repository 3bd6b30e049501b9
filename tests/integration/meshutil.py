"""Helpers of the multi-region integration tests: requests, counters, load, markers."""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from skylb_extproc.mesh import Mesh, wait_peers_fresh
from skylb_extproc.mesh_traffic import metric_total
from skylb_extproc.region.marker import sign
from skylb_extproc.stack import RegionStack, model_of

from .conftest import TINY, get_json, get_text

MODEL = model_of(TINY.profile)  # the simulated replicas accept any model name
REJECT_REASONS = ("missing", "bad_signature", "skew", "replay", "loop")


@dataclass(frozen=True)
class Served:
    status: int
    region: str  # where x-inference-pod says it was served ("?" when no replica answered)
    started: float


def chat_body(text: str, max_tokens: int = 40) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
    }


async def post_chat(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    mesh: Mesh,
    headers: dict[str, str] | None = None,
) -> Served:
    started = time.monotonic()
    async with session.post(f"{url}/v1/chat/completions", json=body, headers=headers) as resp:
        await resp.read()
        pod = resp.headers.get("x-inference-pod", "")
        return Served(resp.status, mesh.region_of_replica().get(pod, "?"), started)


async def burst(mesh: Mesh, region: str, n: int, tag: str, max_tokens: int = 40) -> list[Served]:
    """`n` concurrent requests from clients of `region`."""
    url = mesh.region(region).listener
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        return list(
            await asyncio.gather(
                *(
                    post_chat(session, url, chat_body(f"{tag} {i}", max_tokens), mesh)
                    for i in range(n)
                )
            )
        )


def metric_of(stack: RegionStack, name: str, **labels: str) -> float:
    return metric_total(get_text(f"{stack.admin}/metrics"), name, **labels)


def mesh_counters(mesh: Mesh) -> dict[str, dict[str, float]]:
    return {
        r.name: {
            "spills": metric_of(r, "skylb_spills_total"),
            "received": metric_of(r, "skylb_forwarded_received_total"),
            "received_from_us": metric_of(r, "skylb_forwarded_received_total", origin="us"),
        }
        for r in mesh.regions
    }


def delta(
    after: dict[str, dict[str, float]], before: dict[str, dict[str, float]], key: str
) -> dict[str, float]:
    return {region: after[region][key] - before[region][key] for region in after}


def envoy_counter(stack: RegionStack, name: str) -> int:
    text = get_text(f"{stack.envoy_admin}/stats?filter=^{name}$")
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return 0


async def idle(mesh: Mesh, timeout_s: float = 15.0) -> None:
    """Until no region queues anything, every replica is available again and every peer is
    fresh: the next test starts from a quiet mesh."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = [get_json(f"{r.admin}/state") for r in mesh.regions]
        if all(
            s["queue_length"] == 0 and all(r["available"] for r in s["replicas"]) for s in states
        ):
            break
        await asyncio.sleep(0.05)
    wait_peers_fresh(mesh, timeout_s=timeout_s)


async def fill_directly(stack: RegionStack, stop: asyncio.Event) -> None:
    """Keep every replica of `stack` busy with requests that bypass Envoy (another tenant's
    load, invisible to skylb except through the scrapes): its replicas are never available."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def worker(address: str, k: int) -> None:
            while not stop.is_set():
                body = chat_body(f"filler {k}", max_tokens=60)
                url = f"http://{address}/v1/chat/completions"
                async with session.post(url, json=body) as r:
                    await r.read()

        # Five per replica (its batch holds two): the queue stays non-empty even when a loaded
        # machine delays some workers between two requests.
        await asyncio.gather(*(worker(r.address, k) for r in stack.replicas for k in range(5)))


async def wait_unavailable(stack: RegionStack, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        replicas = get_json(f"{stack.admin}/state")["replicas"]
        if not any(r["available"] for r in replicas):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{stack.name}: replicas still available")


def make_marker(
    secret: bytes, origin: str, destination: str, now: float | None = None
) -> dict[str, str]:
    stamp = time.time() if now is None else now
    marker_id = f"test-{secrets.token_hex(8)}"
    return dict(
        sign(secret, origin=origin, destination=destination, marker_id=marker_id, now=stamp)
    )


def rejections(stack: RegionStack) -> dict[str, float]:
    text = get_text(f"{stack.admin}/metrics")
    return {r: metric_total(text, "skylb_markers_rejected_total", reason=r) for r in REJECT_REASONS}


async def overload_until(mesh: Mesh, region: str, stop_at: float, workers: int = 8) -> list[Served]:
    url = mesh.region(region).listener
    results: list[Served] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def worker(k: int) -> None:
            i = 0
            while time.monotonic() < stop_at:
                try:
                    results.append(await post_chat(session, url, chat_body(f"w{k} {i}", 30), mesh))
                except aiohttp.ClientError:
                    results.append(Served(0, "?", time.monotonic()))
                i += 1

        await asyncio.gather(*(worker(k) for k in range(workers)))
    return results
