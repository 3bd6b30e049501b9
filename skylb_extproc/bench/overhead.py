"""The cost of the ext_proc hop: Envoy alone vs Envoy + skylb (BUFFERED, FULL_DUPLEX_STREAMED).

    python -m skylb_extproc.bench.overhead [--requests N] [--concurrency 1,32] [--out FILE]

One run starts a trivial aiohttp upstream (a fixed OpenAI-style JSON answer and a vLLM-shaped
/metrics saying "idle", so nothing but the proxy path is measured), one `skylb-extproc serve`
(policy skylb, `scrape.max_pending` unbounded so no request is held at the balancer) and three
Envoys: without the ext_proc filter, and with it in each body mode. An aiohttp client sends
~2 KB chat bodies with bounded concurrency: a warm-up, then N requests per setup, split into
rounds that rotate the order of the setups so drift hits all of them alike. skylb's CPU per
request comes from /proc/<pid>/stat (utime+stime) around its phases, minus its idle rate
(scraping) measured while the Envoy-alone setup runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from skylb_extproc.config import Config, ListenConfig, PolicyConfig, ScrapeConfig
from skylb_extproc.envoy_config import EnvoySettings, envoy_command, render_envoy_config
from skylb_extproc.procs import Supervisor, free_port, wait_http_ready
from skylb_extproc.stack import child_env, collect_skylb, launch_skylb
from skylb_extproc.types import ReplicaSpec

SETUPS = ("envoy only", "envoy + skylb BUFFERED", "envoy + skylb FULL_DUPLEX")
MODES = {SETUPS[1]: "buffered", SETUPS[2]: "duplex"}
ROUNDS = 5
TICKS = os.sysconf("SC_CLK_TCK")
ANSWER = json.dumps({
    "id": "chatcmpl-0", "object": "chat.completion", "created": 0, "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                 "finish_reason": "length"}],
    "usage": {"prompt_tokens": 500, "completion_tokens": 1, "total_tokens": 501},
}).encode()  # fmt: skip
JSON = {"content-type": "application/json"}
METRICS = (
    "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting 0\n"
    "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 0\n"
)


# --- upstream (a child process: `python -m skylb_extproc.bench.overhead --serve-upstream`) ------


async def _serve_upstream() -> None:
    async def chat(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=ANSWER, content_type="application/json")

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=METRICS, content_type="text/plain")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(json.dumps({"port": runner.addresses[0][1]}), flush=True)
    await asyncio.Event().wait()


# --- processes ----------------------------------------------------------------------------------


def envoy_yaml(settings: EnvoySettings, ext_proc: bool) -> str:
    """The shipped config; without ext_proc, the same minus that filter and its cluster."""
    text = render_envoy_config(settings)
    if ext_proc:
        return text
    doc: dict[str, Any] = yaml.safe_load(text)
    static = doc["static_resources"]
    hcm = static["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    filters = hcm["http_filters"]
    hcm["http_filters"] = [f for f in filters if f["name"] != "envoy.filters.http.ext_proc"]
    static["clusters"] = [c for c in static["clusters"] if c["name"] != "skylb_extproc"]
    return yaml.safe_dump(doc, sort_keys=False)


def start_envoy(sup: Supervisor, workdir: Path, setup: str, grpc: str, upstream: str) -> str:
    """Start one Envoy for `setup`; its listener URL once a request went through."""
    replicas = [ReplicaSpec("r0", upstream, f"http://{upstream}/metrics")]
    settings = EnvoySettings(
        listen_port=free_port(), admin_port=free_port(), grpc_address=grpc,
        replicas=replicas, body_mode=MODES.get(setup, "buffered"),
    )  # fmt: skip
    path = workdir / f"envoy-{len(sup.children)}.yaml"
    path.write_text(envoy_yaml(settings, setup in MODES), encoding="utf-8")
    child = sup.start(f"envoy-{len(sup.children)}", envoy_command(path))
    listener = f"http://127.0.0.1:{settings.listen_port}"
    wait_http_ready(f"http://127.0.0.1:{settings.admin_port}/ready", timeout_s=60, child=child)
    wait_http_ready(f"{listener}/metrics", timeout_s=60, child=child)  # through the filters
    return listener


def cpu_s(pid: int) -> float:
    """utime + stime of `pid` (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def body(i: int) -> bytes:
    """A ~2 KB chat body, distinct per request (so skylb hashes a fresh prompt each time)."""
    text = f"request {i}: " + "the quick brown fox jumps over the lazy dog " * 45
    return json.dumps({
        "model": "m", "max_tokens": 1,
        "messages": [{"role": "system", "content": "You are brief."},
                     {"role": "user", "content": text}],
    }).encode()  # fmt: skip


@dataclass
class Sample:
    latencies: list[float]
    wall_s: float = 0.0
    skylb_cpu_s: float = 0.0
    errors: int = 0


async def run_batch(
    session: aiohttp.ClientSession, url: str, n: int, concurrency: int, start: int
) -> tuple[list[float], float, int]:
    """n requests, `concurrency` at a time: (latencies s, wall s, non-200 count)."""
    latencies: list[float] = []
    errors, counter = 0, iter(range(start, start + n))

    async def worker() -> None:
        nonlocal errors
        for i in counter:
            data, t0 = body(i), time.perf_counter()
            async with session.post(url, data=data, headers=JSON) as r:
                await r.read()
                errors += r.status != 200
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - t0, errors


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(
    urls: dict[str, str], skylb_pid: int, n: int, concurrency: int
) -> dict[str, Sample]:
    samples = {s: Sample([]) for s in SETUPS}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        for setup in SETUPS:  # warm-up: connections, Envoy workers, skylb's imports and caches
            await run_batch(session, urls[setup], max(20, min(n // 5, 500)), concurrency, 0)
        for rnd in range(ROUNDS):
            per_round = n // ROUNDS + (rnd < n % ROUNDS)
            for k in range(len(SETUPS)):
                setup = SETUPS[(rnd + k) % len(SETUPS)]
                cpu0 = cpu_s(skylb_pid)
                lat, wall, errors = await run_batch(
                    session, urls[setup], per_round, concurrency, rnd * n
                )
                s = samples[setup]
                s.latencies, s.wall_s = s.latencies + lat, s.wall_s + wall
                s.skylb_cpu_s += cpu_s(skylb_pid) - cpu0
                s.errors += errors
    return samples


def table(results: dict[int, dict[str, Sample]]) -> str:
    rows = [
        "| setup | clients | p50 ms | p90 ms | req/s | added p50 ms | req/s ratio "
        "| skylb CPU µs/req | non-200 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for conc, samples in results.items():
        base = samples[SETUPS[0]]
        base_p50, base_rps = pct(base.latencies, 0.5), len(base.latencies) / base.wall_s
        idle_rate = base.skylb_cpu_s / base.wall_s  # skylb's scraping, no requests through it
        for setup, s in samples.items():
            p50, rps = pct(s.latencies, 0.5), len(s.latencies) / s.wall_s
            net_cpu = max(0.0, s.skylb_cpu_s - idle_rate * s.wall_s) / len(s.latencies)
            added, cpu = ("—", "—") if s is base else (
                f"+{(p50 - base_p50) * 1e3:.2f}", f"{net_cpu * 1e6:.0f}")  # fmt: skip
            rows.append(
                f"| {setup} | {conc} | {p50 * 1e3:.2f} | {pct(s.latencies, 0.9) * 1e3:.2f} "
                f"| {rps:.0f} | {added} | {rps / base_rps:.2f} | {cpu} | {s.errors} |"
            )
    return "\n".join(rows) + "\n"


def run(n: int, concurrencies: list[int], workdir: Path) -> str:
    with Supervisor(workdir / "logs") as sup:
        argv = [sys.executable, "-m", "skylb_extproc.bench.overhead", "--serve-upstream"]
        port = sup.start("upstream", argv, env=child_env()).read_json_line(60)["port"]
        upstream = f"127.0.0.1:{port}"
        config = Config(
            region="bench",
            replicas=(ReplicaSpec("r0", upstream, f"http://{upstream}/metrics"),),
            listen=ListenConfig(grpc="127.0.0.1:0", admin="127.0.0.1:0"),
            policy=PolicyConfig(name="skylb"),
            scrape=ScrapeConfig(max_pending=1_000_000),
        )
        skylb = launch_skylb(sup, config, workdir, "WARNING")
        grpc, _ = collect_skylb(skylb, config, workdir, 60)
        urls = {
            s: start_envoy(sup, workdir, s, grpc, upstream) + "/v1/chat/completions" for s in SETUPS
        }
        results = {c: asyncio.run(measure(urls, skylb.pid, n, c)) for c in concurrencies}
    return table(results)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m skylb_extproc.bench.overhead", description=__doc__)
    p.add_argument("--requests", type=int, default=2000, help="measured requests per setup")
    p.add_argument("--concurrency", default="1,32", help="comma-separated client counts")
    p.add_argument("--out", type=Path, help="also write the markdown table here")
    p.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_upstream:
        asyncio.run(_serve_upstream())
        return 0
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    if args.requests < ROUNDS or min(concurrencies) < 1:
        p.error(f"--requests must be >= {ROUNDS} and every concurrency >= 1")
    with tempfile.TemporaryDirectory(prefix="skylb-overhead-") as tmp:
        text = run(args.requests, concurrencies, Path(tmp))
    print(text, end="")
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
