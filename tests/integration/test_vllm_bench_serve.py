"""vLLM's own `bench serve` (prefix_repetition) through Envoy + skylb, four policies in turn.

Two real vLLM replicas of the session pool (tests/conftest.py: tiny model, max_num_seqs 2,
32,768-token KV caches, dev endpoints on so their prefix caches are emptied between policies);
skylb_extproc/bench/serve.py sizes the workload (16 prefixes of 3,072 tokens: 1.5x one replica's
cache, 0.75x both) and runs it. ~15 s per policy on 2 free cores. `-s` prints the table.

What the issue asked ("routing that beats the strongest balancers", part 5): the default
`skylb` at <= 0.8x the best other policy's mean TTFT, with an engine prefix hit rate >= theirs.
Neither is met reliably on this workload, so both are printed, not asserted (docs/benchmarks.md
"Real vLLM: bench serve through Envoy"): the prefixes are uniform, so `prefix_affinity`'s
one-replica-per-prefix split is already balanced and at the hit-rate ceiling (7/8 of the prompts
repeat a prefix: ~0.86), and there is no queue to win back. skylb's mean TTFT is 0.98-1.15x
prefix_affinity's and its hit rate 0.76-0.86 (the eviction term of policy/skylb.py needs the
engines' hit rate, learned over the first seconds of a run; without the term: 0.75). What
reliably holds, and is asserted: both cache-aware policies keep a clearly higher hit rate than
the blind ones, and skylb's mean TTFT beats theirs. At concurrency 6 skylb copies prefixes
(hit 0.51 against 0.856; mean TTFT 184 vs 142 ms): greedy per-request prediction against a
prefix's whole future, a limit noted in docs/benchmarks.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ReplicaPool, require_vllm

from skylb_extproc.bench.serve import (
    DEFAULT_POLICIES,
    cache_tokens,
    format_table,
    run_policies,
    size_workload,
)

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

# Hit rate of a cache-aware policy over the better blind one's: measured 1.4-1.8x.
CACHE_AWARE_MARGIN = 1.25


@pytest.fixture(scope="module")
def pool(request: pytest.FixtureRequest) -> ReplicaPool:
    require_vllm()  # before asking for the pool, so a plain `pytest` skips without starting it
    value: ReplicaPool = request.getfixturevalue("vllm_pool")
    return value


def test_bench_serve_through_envoy_per_policy(pool: ReplicaPool, tmp_path: Path) -> None:
    replicas = list(pool.replicas[:2])  # the kill test of test_real_vllm.py takes the last one
    workload = size_workload(cache_tokens(replicas), len(replicas))
    results = run_policies(replicas, workload, tmp_path, pool.opts, DEFAULT_POLICIES)
    by = {r.policy: r for r in results}
    print(f"\n{workload}\n{format_table(results)}")  # the numbers, for the report (pytest -s)
    others = [by[p] for p in DEFAULT_POLICIES if p != "skylb"]
    best = min(others, key=lambda r: r.mean_ttft_ms)
    print(
        f"issue target: skylb mean TTFT {by['skylb'].mean_ttft_ms / best.mean_ttft_ms:.2f}x "
        f"{best.policy}'s (<= 0.8 asked), hit rate {by['skylb'].hit_rate:.3f} vs "
        f"{max(r.hit_rate for r in others):.3f} (>= asked)"
    )
    for r in results:
        assert (r.completed, r.failed, r.reset) == (workload.num_prompts, 0, True), r
    blind = [by["least_load"], by["round_robin"]]
    blind_hits = max(r.hit_rate for r in blind)
    for policy in ("skylb", "prefix_affinity"):
        assert by[policy].hit_rate >= CACHE_AWARE_MARGIN * blind_hits, (policy, results)
    assert by["skylb"].mean_ttft_ms < min(r.mean_ttft_ms for r in blind), results
