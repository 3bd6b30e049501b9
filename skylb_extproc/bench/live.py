"""`bench --live`: replay the workload through the real stack and write the same records.

Real Envoys and real skylb servers (the demo's `stack.start_region` / `mesh.start_mesh`) in
front of simulated replicas (`sim/replica.py`, the same `ReplicaEngine` as the virtual run),
on loopback. Time is compressed: the replicas run `time_scale` times faster than real time,
requests are sent at `arrival / time_scale`, injected inter-region delays are divided by it,
and measured latencies are multiplied by it, so records are in the same (virtual) seconds as
the evaluator's. What does not scale: the balancers' 100 ms polling and Envoy's own overhead
(both get relatively `time_scale` times slower), so expect live TTFTs somewhat above virtual.

Topologies, as in the virtual run (`bench/topology.py`): per-region policies run one stack per
region (a peered mesh for the spilling ones, its inter-region delay injected by Envoy). The
single-balancer baselines run one stack in the first region over every region's replicas; the
other regions' replicas are reached through delayed links (`bench/wan.py`), and a client in
another region waits the one-way delay before sending and adds it on the way back (the client
does not react to what it receives, so adding is the same as delaying). Open-loop workloads only.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp

from skylb_extproc.bench.engine import RunResult
from skylb_extproc.bench.records import OK, RequestRecord
from skylb_extproc.bench.regions import RttMatrix
from skylb_extproc.bench.timeline import Timeline
from skylb_extproc.bench.trace import TraceRequest, prompt_text
from skylb_extproc.bench.wan import start_links
from skylb_extproc.mesh import MeshOptions, start_mesh
from skylb_extproc.procs import Supervisor
from skylb_extproc.region.config import SpillConfig
from skylb_extproc.stack import (
    StackOptions,
    collect_replicas,
    launch_replicas,
    model_of,
    start_region_over,
)
from skylb_extproc.types import ReplicaSpec

__all__ = ["LiveOptions", "run_live"]

# name -> (skylb policy, params, spill mode or None)
_PER_REGION: dict[str, tuple[str, dict[str, Any], str | None]] = {
    "skylb": ("skylb", {}, "prefix"),
    "skylb-ch": ("consistent_hash", {"selective": True}, "hash"),
    "skylb-cost": ("skylb", {}, "cost"),
    "region-local": ("prefix_affinity", {}, None),
    "skylb-affinity": ("skylb", {"affinity_slack": 1}, "prefix"),
}
_SINGLE_LB: dict[str, str] = {
    "least-load": "least_load",
    "round-robin": "round_robin",
    "consistent-hash": "consistent_hash",
    "sglang": "prefix_affinity",
}


@dataclass(frozen=True)
class LiveOptions:
    regions: tuple[str, ...]
    replicas_per_region: int
    profile: str
    rtt: RttMatrix
    time_scale: float = 10.0
    timeout_s: float = 300.0  # per request, virtual seconds
    backend: str = "sim"  # "vllm": real vLLM replicas (skylb-extproc vllm-setup), real time


@dataclass
class _System:
    listeners: dict[str, str]  # client region -> the Envoy URL its clients use
    balancer: dict[str, str]  # client region -> region of the balancer it talks to
    replica_region: dict[str, str]  # x-inference-pod -> region
    model: str
    spills: bool = False  # a request served outside its balancer's region was forwarded


def _start(sup: Supervisor, workdir: Path, policy: str, opts: LiveOptions) -> _System:
    name, params, mode = _PER_REGION.get(policy, (_SINGLE_LB.get(policy, ""), {}, None))
    stack = StackOptions(
        replicas=opts.replicas_per_region, profile=opts.profile, time_scale=opts.time_scale,
        backend=opts.backend, policy=name, policy_params=params, queue_max_length=100_000,
        queue_max_wait_s=600.0,
    )  # fmt: skip
    model = model_of(opts.profile)
    own = {r: r for r in opts.regions}
    if policy in _SINGLE_LB and len(opts.regions) > 1:
        return _start_single(sup, workdir, stack, opts)
    if mode is not None and len(opts.regions) > 1:
        one_way_ms = opts.rtt.default_s * 1000.0 / opts.time_scale
        mesh = start_mesh(
            sup, workdir, MeshOptions(opts.regions, stack=stack, rtt_ms=2 * one_way_ms,
                                      rtt_pairs_ms=_pairs_ms(opts), spill=SpillConfig(mode=mode))
        )  # fmt: skip
        urls = {r.name: r.listener for r in mesh.regions}
        return _System(urls, own, mesh.region_of_replica(), model, spills=True)
    replicas, pids = _start_replicas(sup, stack, opts.regions)
    listeners: dict[str, str] = {}
    for region, specs in replicas.items():
        mine = {spec.name: pids[spec.name] for spec in specs}
        rs = start_region_over(sup, workdir / region, replace(stack, region=region), specs, mine)
        listeners[region] = rs.listener
    return _System(listeners, own, _region_of(replicas), model)


def _start_single(
    sup: Supervisor, workdir: Path, stack: StackOptions, opts: LiveOptions
) -> _System:
    """One balancer in the first region over every region's replicas, the others via links."""
    home = opts.regions[0]
    replicas, pids = _start_replicas(sup, stack, opts.regions)
    links = {
        spec.name: (spec, 2000.0 * opts.rtt.one_way(home, r) / opts.time_scale)
        for r in opts.regions[1:]
        for spec in replicas[r]
    }
    linked = start_links(sup, workdir, links, stack.startup_timeout_s)
    specs = [linked.get(spec.name, spec) for r in opts.regions for spec in replicas[r]]
    rs = start_region_over(sup, workdir / home, replace(stack, region=home), specs, pids)
    return _System(
        dict.fromkeys(opts.regions, rs.listener),
        dict.fromkeys(opts.regions, home),
        _region_of(replicas),
        model_of(opts.profile),
    )


def _start_replicas(
    sup: Supervisor, stack: StackOptions, regions: Sequence[str]
) -> tuple[dict[str, list[ReplicaSpec]], dict[str, int]]:
    """Every region's replicas, started side by side and named by region (x-inference-pod then
    tells where a request was served); returns them per region, and their pids by name."""
    launched = {r: launch_replicas(sup, stack, prefix=f"{r}-") for r in regions}
    replicas = {r: collect_replicas(cs, stack.startup_timeout_s) for r, cs in launched.items()}
    return replicas, {c.name: c.pid for cs in launched.values() for c in cs}


def _region_of(replicas: Mapping[str, Sequence[ReplicaSpec]]) -> dict[str, str]:
    return {spec.name: region for region, specs in replicas.items() for spec in specs}


def _pairs_ms(opts: LiveOptions) -> dict[frozenset[str], float]:
    """Round trips in wall milliseconds for the pairs given explicitly."""
    return {pair: 2000.0 * s / opts.time_scale for pair, s in opts.rtt.pairs.items()}


async def _send(
    session: aiohttp.ClientSession, system: _System, req: TraceRequest, t0: float, opts: LiveOptions
) -> RequestRecord:
    loop = asyncio.get_running_loop()
    balancer = system.balancer[req.region]
    one_way = opts.rtt.one_way(req.region, balancer)  # virtual seconds, each way
    rec = RequestRecord(req.request_id, req.region, req.arrival, balancer=balancer)
    rec.prompt_tokens = req.prompt_tokens
    body = {
        "model": system.model, "prompt": prompt_text(req), "max_tokens": req.output_tokens,
        "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    await asyncio.sleep(max(0.0, t0 + req.arrival / opts.time_scale - loop.time()))
    sent = loop.time()
    await asyncio.sleep(one_way / opts.time_scale)
    url = system.listeners[req.region] + "/v1/completions"
    try:
        async with session.post(url, json=body, headers={"x-hash-key": req.group}) as resp:
            if resp.status != 200:
                rec.outcome = f"http_{resp.status}"
                return rec
            rec.replica = resp.headers.get("x-inference-pod", "")
            first = await _read_stream(resp, rec, loop)
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
        rec.outcome = f"error: {type(exc).__name__}"
        return rec
    end = loop.time()
    rec.replica_region = system.replica_region.get(rec.replica, "")
    spilled = system.spills and rec.replica_region not in ("", balancer)
    rec.forwarded_to = rec.replica_region if spilled else ""
    rec.ttft = ((first if first is not None else end) - sent) * opts.time_scale + one_way
    rec.e2e = (end - sent) * opts.time_scale + one_way
    rec.outcome = OK
    return rec


async def _read_stream(
    resp: aiohttp.ClientResponse, rec: RequestRecord, loop: asyncio.AbstractEventLoop
) -> float | None:
    """Read SSE chunks; the first one's arrival is the first token. Fills the usage fields."""
    first: float | None = None
    async for raw in resp.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        first = loop.time() if first is None else first
        usage = json.loads(data).get("usage")
        if isinstance(usage, dict):
            rec.prompt_tokens = int(usage.get("prompt_tokens") or rec.prompt_tokens)
            rec.output_tokens = int(usage.get("completion_tokens") or 0)
            details = usage.get("prompt_tokens_details") or {}
            rec.cached_tokens = int(details.get("cached_tokens") or 0)
    return first


async def _replay(
    system: _System, reqs: Sequence[TraceRequest], opts: LiveOptions
) -> list[RequestRecord]:
    timeout = aiohttp.ClientTimeout(total=opts.timeout_s / opts.time_scale + 30.0)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        t0 = asyncio.get_running_loop().time() + 0.5
        return list(await asyncio.gather(*(_send(session, system, r, t0, opts) for r in reqs)))


def run_live(
    policies: Sequence[str], reqs: Sequence[TraceRequest], opts: LiveOptions
) -> Mapping[str, RunResult]:
    """Each policy in turn on a fresh stack; unknown names are left out."""
    out: dict[str, RunResult] = {}
    for policy in policies:
        if policy not in _PER_REGION and policy not in _SINGLE_LB:
            continue
        with (
            tempfile.TemporaryDirectory(prefix="skylb-live-") as tmp,
            Supervisor(Path(tmp) / "logs") as sup,
        ):
            system = _start(sup, Path(tmp), policy, opts)
            records = asyncio.run(_replay(system, reqs, opts))
            sup.stop_all()
        out[policy] = RunResult(records, Timeline(list(opts.regions)))
    return out
