"""`skylb-extproc demo`: regions on loopback — simulated replicas, skylb and a real Envoy each.

Starts everything under a Supervisor, prints ONE JSON line once every region answers:

    {"regions": [{"name": "us", "listener": "http://127.0.0.1:P", "admin": "http://127.0.0.1:P",
                  "replicas": [{"name": "us-r0", "address": "127.0.0.1:P"}, ...]}, ...]}

(`admin` is skylb's admin: /readyz, /state, /metrics), then either waits for SIGINT/SIGTERM
or, with `--traffic N`, plays N requests of the multi-turn chat workload through Envoy and
prints a summary. Every child is stopped before returning.

Without `--regions` (or with a count of 1) it is the one-region demo: one region named `local`.
`--regions 3` names the regions us, eu, asia (more: r0, r1, ...; the bench names them the same
way), `--regions us,eu` names them; they are peered with each other (mesh.py), forwarded requests
pay `--rtt-ms` on the way (Envoy's fault filter), and `--traffic` starts most conversations in
the first region (`--region-weights`, default 70/20/10) so that it overflows into the others.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any

from skylb_extproc.bench.regions import parse_regions, parse_weights
from skylb_extproc.config import SpillConfig
from skylb_extproc.mesh import Mesh, MeshOptions, start_mesh
from skylb_extproc.mesh_traffic import (
    assign_homes,
    default_weights,
    format_mesh_summary,
    play_skewed,
    region_counters,
    split_concurrency,
)
from skylb_extproc.procs import ChildError, Supervisor
from skylb_extproc.stack import (
    BACKENDS,
    ENVOY_START_ATTEMPTS,
    RegionStack,
    StackOptions,
    model_of,
    skylb_config,
    start_envoy,
    start_region,
    start_replicas,
    start_skylb,
)
from skylb_extproc.workload import chat_workload, format_summary, play_conversations

__all__ = [
    "ENVOY_START_ATTEMPTS",
    "RegionStack",
    "StackOptions",
    "add_demo_arguments",
    "main_demo",
    "model_of",
    "options_from_args",
    "skylb_config",
    "start_envoy",
    "start_region",
    "start_replicas",
    "start_skylb",
]

ONE_REGION_CONCURRENCY = 8
VLLM_STARTUP_TIMEOUT_S = 300.0
# Concurrent clients in all regions, per replica of a region: the first region's 70% of them keep
# more requests in flight than its simulated L4s hold in KV cache with the chat workload's
# prompts (measured: 24 per replica never spilled, 64 does), so it runs out of available
# replicas and spills.
MESH_CONCURRENCY_PER_REPLICA = 64


class _Stopped(Exception):
    """SIGINT/SIGTERM arrived: unwind to the cleanup."""


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise _Stopped(signum)


@contextmanager
def _stop_on_signals() -> Iterator[None]:
    """Turn SIGINT/SIGTERM into _Stopped while the body runs; ignore them during cleanup."""
    previous = {s: signal.signal(s, _raise_stopped) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)


def _arg(args: argparse.Namespace, *names: str, default: Any) -> Any:
    """The first of `names` the parser defined and set, else `default`."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            return value
    return default


def options_from_args(args: argparse.Namespace) -> StackOptions:
    """Read the demo's options, tolerating a parser that defines only some of them."""
    backend = str(_arg(args, "backend", default="sim"))
    return StackOptions(
        replicas=int(_arg(args, "replicas_per_region", "replicas", default=3)),
        profile=str(_arg(args, "profile", default=StackOptions.profile)),
        time_scale=float(_arg(args, "time_scale", default=1.0)),
        body_mode=str(_arg(args, "body_mode", default="buffered")),
        policy=str(_arg(args, "policy", default="skylb")),
        log_level=str(_arg(args, "log_level", default="INFO")),
        backend=backend,
        # Real vLLM servers start in ~20 s alone, longer side by side on 2 cores.
        startup_timeout_s=VLLM_STARTUP_TIMEOUT_S if backend == "vllm" else 60.0,
    )


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's flags, for a CLI that wants all of them (cli.py mirrors them)."""
    parser.add_argument("--regions", default=None, help="a count (3 = us,eu,asia) or names")
    parser.add_argument("--replicas-per-region", type=int, default=3)
    parser.add_argument("--rtt-ms", type=float, default=50.0, help="round trip between regions")
    parser.add_argument("--region-weights", default=None, help="share of the traffic per region")
    parser.add_argument("--residency", action="append", default=[], help="REGION=R1[+R2...]")
    parser.add_argument("--spill-mode", choices=("prefix", "hash", "cost"), default="prefix")
    parser.add_argument("--profile", default=StackOptions.profile)
    parser.add_argument("--backend", choices=BACKENDS, default="sim", help="replicas: sim | vllm")
    parser.add_argument("--time-scale", type=float, default=1.0)
    parser.add_argument("--body-mode", choices=("buffered", "duplex"), default="buffered")
    parser.add_argument("--policy", default="skylb")
    parser.add_argument("--traffic", type=int, default=0, help="send N requests, then exit")
    parser.add_argument("--concurrency", type=int, default=None, help="concurrent clients")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="keep configs and logs here")


def regions_from_args(args: argparse.Namespace) -> list[str]:
    """The region names; one region (the demo as it always was) when --regions is absent/1."""
    spec = _arg(args, "regions", default=None)
    if spec is None or str(spec).strip() == "1":
        return ["local"]
    return parse_regions(str(spec))


def _wait_for_signal(sup: Supervisor) -> int:
    """Until a signal (raised as _Stopped); a child dying on its own ends the demo with 1."""
    while True:
        time.sleep(0.2)
        for child in sup.children:
            if not child.alive():
                print(child.describe_failure("exited unexpectedly"), file=sys.stderr)
                return 1


def _run_traffic(
    stack: RegionStack, opts: StackOptions, args: argparse.Namespace, requests: int
) -> int:
    conversations = chat_workload(requests, seed=int(_arg(args, "seed", default=0)))
    started = time.monotonic()
    results = asyncio.run(
        play_conversations(
            stack.listener,
            conversations,
            concurrency=int(_arg(args, "concurrency", default=ONE_REGION_CONCURRENCY)),
            model=model_of(opts.profile),
        )
    )
    print(format_summary(results, elapsed_s=time.monotonic() - started), flush=True)
    return 0 if all(r.ok for r in results) else 1


def _one_region(sup: Supervisor, workdir: Path, args: argparse.Namespace, name: str) -> int:
    opts = replace(options_from_args(args), region=name)
    stack = start_region(sup, workdir, opts)
    print(json.dumps({"regions": [stack.ready_json()]}), flush=True)
    requests = int(_arg(args, "traffic", default=0))
    return _run_traffic(stack, opts, args, requests) if requests > 0 else _wait_for_signal(sup)


def _residency(specs: list[str]) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for spec in specs:
        region, eq, allowed = spec.partition("=")
        if not eq or not region or not allowed:
            raise ValueError(f"--residency: expected REGION=R1[+R2...], got {spec!r}")
        out[region] = tuple(allowed.split("+"))
    return out


def _mesh(sup: Supervisor, workdir: Path, args: argparse.Namespace, regions: list[str]) -> int:
    opts = MeshOptions(
        regions=tuple(regions),
        stack=options_from_args(args),
        rtt_ms=float(_arg(args, "rtt_ms", default=50.0)),
        residency=_residency(list(_arg(args, "residency", default=[]))),
        spill=SpillConfig(mode=str(_arg(args, "spill_mode", default="prefix"))),
    )
    weights_spec = _arg(args, "region_weights", default=None)
    weights = (
        parse_weights(weights_spec, regions) if weights_spec else default_weights(len(regions))
    )
    mesh = start_mesh(sup, workdir, opts)
    print(json.dumps(mesh.ready_json()), flush=True)
    requests = int(_arg(args, "traffic", default=0))
    if requests <= 0:
        return _wait_for_signal(sup)
    return _mesh_traffic(mesh, opts, args, requests, weights)


def _mesh_traffic(
    mesh: Mesh, opts: MeshOptions, args: argparse.Namespace, requests: int, weights: list[float]
) -> int:
    regions = list(opts.regions)
    homes = assign_homes(
        chat_workload(requests, seed=int(_arg(args, "seed", default=0))), regions, weights
    )
    default_total = MESH_CONCURRENCY_PER_REPLICA * opts.stack.replicas
    total = int(_arg(args, "concurrency", default=default_total))
    concurrency = dict(zip(regions, split_concurrency(total, weights), strict=True))
    listeners = {r.name: r.listener for r in mesh.regions}
    started = time.monotonic()
    results = asyncio.run(
        play_skewed(listeners, homes, concurrency, model=model_of(opts.stack.profile))
    )
    elapsed = time.monotonic() - started
    counters = {r.name: region_counters(r.admin) for r in mesh.regions}
    print(
        format_mesh_summary(results, mesh.region_of_replica(), counters, elapsed_s=elapsed),
        flush=True,
    )
    return 0 if all(t.ok for rs in results.values() for t in rs) else 1


def main_demo(args: argparse.Namespace) -> int:
    try:
        regions = regions_from_args(args)
        _residency(list(_arg(args, "residency", default=[])))
    except ValueError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    keep = _arg(args, "workdir", default=None)
    workdir = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="skylb-demo-"))
    sup = Supervisor(workdir / "logs")
    code = 1
    try:
        with _stop_on_signals():
            try:
                if len(regions) == 1:
                    code = _one_region(sup, workdir, args, regions[0])
                else:
                    code = _mesh(sup, workdir, args, regions)
            except _Stopped:
                code = 0
            except ChildError as exc:
                print(f"demo: {exc}\n(logs kept in {workdir})", file=sys.stderr)
                keep = str(workdir)
            finally:
                sup.stop_all()
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return code
