"""Fidelity: the same live workload through the same stack, simulated replicas vs real vLLM.

`python -m skylb_extproc.backends.fidelity [--requests 60]` starts one region (Envoy + skylb,
policy skylb) over three simulated replicas of the `cpu-tiny-llama` profile, replays the chat
workload, stops it, does the same over three real vLLM replicas (`vllm-setup` first) and prints
a markdown table: prefix hit rate, queueing at the balancer and in the replicas, latency.

Both sides get the same replica configuration: 32-token blocks, 1,024 blocks of KV, at most
`--max-num-seqs` (2) running requests, and the sim profile's step times were measured on the
real CPU server (sim/profiles.py). Every request carries `ignore_eos` so that random weights
answer the full max_tokens, as the simulator does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from skylb_extproc.procs import Supervisor
from skylb_extproc.stack import RegionStack, StackOptions, model_of, start_region
from skylb_extproc.workload import chat_workload, play_conversations, summarize

OPTIONS = StackOptions(
    replicas=3,
    profile="cpu-tiny-llama",
    max_num_seqs=2,
    startup_timeout_s=300.0,
    log_level="WARNING",
)
SAMPLE_EVERY_S = 0.05
WAITED_S = 0.01  # a request "waited at the balancer" when its queue wait passed 10 ms


@dataclass
class Sampled:
    """Maxima seen while the workload ran (polled every SAMPLE_EVERY_S)."""

    balancer_queue: int = 0
    replica_waiting: float = 0.0
    samples: int = 0


@dataclass
class Result:
    backend: str
    requests: int
    errors: int
    hit_rate: float
    prompt_tokens: int
    cached_tokens: int
    waited: int  # requests held at the balancer longer than WAITED_S
    mean_wait_s: float
    p50_s: float
    p90_s: float
    elapsed_s: float
    sampled: Sampled = field(default_factory=Sampled)
    per_replica: dict[str, int] = field(default_factory=dict)


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5.0) as resp:
        body: bytes = resp.read()
        return body


def _waiting(metrics_url: str) -> float:
    text = _get(metrics_url).decode()
    for family in text_string_to_metric_families(text):
        if family.name == "vllm:num_requests_waiting":
            return sum(s.value for s in family.samples)
    return 0.0


def _sample(stack: RegionStack, out: Sampled, stop: threading.Event) -> None:
    while not stop.wait(SAMPLE_EVERY_S):
        try:
            state = json.loads(_get(f"{stack.admin}/state"))
            waiting = max(_waiting(r.metrics_url) for r in stack.replicas)
        except OSError:
            continue  # a replica being killed, or the stack stopping: skip this sample
        out.balancer_queue = max(out.balancer_queue, int(state.get("queue_length", 0)))
        out.replica_waiting = max(out.replica_waiting, waiting)
        out.samples += 1


def _queue_waits(admin: str) -> tuple[int, int, float]:
    """(requests, of which waited > WAITED_S, total wait seconds) from skylb's histogram."""
    text = _get(f"{admin}/metrics").decode()
    count = under = 0
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != "skylb_queue_wait_seconds":
            continue
        for s in family.samples:
            if s.name.endswith("_count"):
                count = int(s.value)
            elif s.name.endswith("_sum"):
                total = s.value
            elif s.name.endswith("_bucket") and float(s.labels["le"]) == WAITED_S:
                under = int(s.value)
    return count, count - under, total


@dataclass(frozen=True)
class Scenario:
    name: str
    concurrency: int
    replay_answers: bool  # False: every turn resends the same synthetic answers on both sides
    seed: int


# 3 replicas x 2 running requests = 6 slots. 2 clients can never fill a replica, so every turn
# goes to the replica holding its conversation and the hit rate measures the caches alone;
# 12 clients overload the pool, and the balancer's queueing shows.
SCENARIOS = (
    Scenario("under capacity, answers replayed", 2, True, 7),
    Scenario("under capacity, fixed answers", 2, False, 8),
    Scenario("overloaded, answers replayed", 12, True, 9),
)
AGREEMENT = SCENARIOS[1]  # the one tests hold to 10%: identical prompts on both sides


def replay(
    stack: RegionStack,
    backend: str,
    *,
    requests: int,
    seed: int = 7,
    concurrency: int = 8,
    replay_answers: bool = True,
    model: str | None = None,
) -> Result:
    """Play chat_workload(requests, seed) through `stack` and measure it."""
    conversations = chat_workload(requests, seed=seed)
    before = _queue_waits(stack.admin)
    sampled, stop = Sampled(), threading.Event()
    sampler = threading.Thread(target=_sample, args=(stack, sampled, stop), daemon=True)
    sampler.start()
    started = time.monotonic()
    try:
        results = asyncio.run(
            play_conversations(
                stack.listener,
                conversations,
                concurrency=concurrency,
                model=model or model_of(OPTIONS.profile),
                extra={"ignore_eos": True},
                replay_answers=replay_answers,
            )
        )
    finally:
        stop.set()
        sampler.join()
    elapsed = time.monotonic() - started
    after = _queue_waits(stack.admin)
    s = summarize(results)
    routed = after[0] - before[0]
    return Result(
        backend=backend,
        requests=len(results),
        errors=len(s["errors"]),
        hit_rate=float(s["hit_rate"]),
        prompt_tokens=int(s["prompt_tokens"]),
        cached_tokens=int(s["cached_tokens"]),
        waited=after[1] - before[1],
        mean_wait_s=(after[2] - before[2]) / routed if routed else 0.0,
        p50_s=float(s["p50_s"]),
        p90_s=float(s["p90_s"]),
        elapsed_s=elapsed,
        sampled=sampled,
        per_replica=dict(s["per_replica"]),
    )


def run_backend(backend: str, workdir: Path, *, requests: int) -> list[Result]:
    """Start a region over `backend` replicas, play every scenario, stop everything."""
    sup = Supervisor(workdir / "logs")
    try:
        stack = start_region(sup, workdir, replace(OPTIONS, backend=backend, region=backend))
        return [
            replay(
                stack,
                backend,
                requests=requests,
                seed=sc.seed,
                concurrency=sc.concurrency,
                replay_answers=sc.replay_answers,
            )
            for sc in SCENARIOS
        ]
    finally:
        sup.stop_all(grace_s=10.0)


def table(results: list[Result]) -> str:
    """The markdown table of docs/benchmarks.md's "Sim vs real vLLM" section."""
    rows: list[tuple[str, Callable[[Result], str]]] = [
        ("requests (errors)", lambda r: f"{r.requests} ({r.errors})"),
        ("prompt tokens", lambda r: str(r.prompt_tokens)),
        ("prefix hit rate (cached / prompt tokens)", lambda r: f"{r.hit_rate:.1%}"),
        ("held at the balancer > 10 ms", lambda r: f"{r.waited} of {r.requests}"),
        ("mean wait at the balancer", lambda r: f"{r.mean_wait_s * 1000:.1f} ms"),
        ("max balancer queue (sampled)", lambda r: str(r.sampled.balancer_queue)),
        ("max vllm:num_requests_waiting (sampled)", lambda r: f"{r.sampled.replica_waiting:g}"),
        ("latency p50 / p90", lambda r: f"{r.p50_s * 1000:.0f} / {r.p90_s * 1000:.0f} ms"),
        ("requests per replica", lambda r: " ".join(f"{k}={v}" for k, v in r.per_replica.items())),
        ("wall time", lambda r: f"{r.elapsed_s:.1f} s"),
    ]
    head = "| | " + " | ".join(r.backend for r in results) + " |"
    lines = [head, "|---" * (len(results) + 1) + "|"]
    lines += ["| " + name + " | " + " | ".join(f(r) for r in results) + " |" for name, f in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=120, help="per scenario")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="skylb-fidelity-") as tmp:
        by_backend = {
            b: run_backend(b, Path(tmp) / b, requests=args.requests) for b in ("sim", "vllm")
        }
    for i, scenario in enumerate(SCENARIOS):
        print(f"\n{scenario.name} ({scenario.concurrency} clients, seed {scenario.seed}):\n")
        print(table([by_backend["sim"][i], by_backend["vllm"][i]]))
    errors = sum(r.errors for rs in by_backend.values() for r in rs)
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
