"""The virtual-time engine: hand-computed TTFTs on the tiny profile, determinism, spill."""

from __future__ import annotations

from pathlib import Path

import pytest

from skylb_extproc.bench.engine import Simulation
from skylb_extproc.bench.records import RequestRecord, write_jsonl
from skylb_extproc.bench.regions import RttMatrix
from skylb_extproc.bench.runner import RunSpec, run_all
from skylb_extproc.bench.topology import POLICIES, build_system
from skylb_extproc.bench.trace import TraceRequest
from skylb_extproc.bench.workloads import OpenLoop, WorkloadSpec
from skylb_extproc.sim.profiles import PROFILES

MOONCAKE = Path(__file__).parents[3] / "shared" / "data" / "traces" / "mooncake_synthetic.jsonl"


def _req(
    rid: str, at: float, segs: tuple[tuple[int, int], ...], out: int, region: str = "x"
) -> TraceRequest:
    tokens = sum(n for _, n in segs) // 4
    return TraceRequest(rid, at, f"g-{rid}", segs, tokens, out, region)


def _run_tiny(policy: str) -> dict[str, RequestRecord]:
    # A: 16 tokens, 2 outputs at t=0. B: 32 tokens starting with A's 16, 1 output, at 5 ms.
    reqs = [_req("A", 0.0, ((1, 64),), 2), _req("B", 0.005, ((1, 64), (2, 64)), 1)]
    system = build_system(policy, ["x"], 1, PROFILES["tiny"], RttMatrix(0.0, {}), 0)
    result = Simulation(system, OpenLoop(reqs)).run()
    return {r.id: r for r in result.records}


def test_tiny_selective_pushing_exact_ttfts() -> None:
    """tiny: step = max(10 ms + 1 ms per decode, 1 ms per token); 16-token blocks.

    A prefills 16 tokens [0, 16 ms] -> TTFT 16 ms; decodes [16, 27] -> E2E 27 ms.
    B reaches the balancer at 5 ms; the replica has A pending (dispatched after the last
    scrape began, not started), so skylb holds B until A's first token (16 ms). B then waits in
    the engine for A's decode step; at 27 ms it hits A's cached block (16 of 32 tokens; vLLM caps
    the hit at (32-1)//16 blocks) and prefills 16 tokens [27, 43] -> TTFT 43 - 5 = 38 ms.
    """
    recs = _run_tiny("skylb")
    a, b = recs["A"], recs["B"]
    assert (a.ttft, a.e2e, a.cached_tokens, a.output_tokens) == (
        pytest.approx(0.016, abs=1e-9),
        pytest.approx(0.027, abs=1e-9),
        0,
        2,
    )
    assert b.dispatch == pytest.approx(0.016, abs=1e-9)
    assert (b.ttft, b.e2e, b.cached_tokens) == (
        pytest.approx(0.038, abs=1e-9),
        pytest.approx(0.038, abs=1e-9),
        16,
    )


def test_tiny_blind_pushing_exact_ttfts() -> None:
    """region-local pushes B at 5 ms; at 16 ms one step runs A's decode and B's 16 uncached
    tokens (A's block is cached while A runs): max(10 + 1, 1 + 16) = 17 ms -> both end at 33 ms.
    """
    recs = _run_tiny("region-local")
    a, b = recs["A"], recs["B"]
    assert a.ttft == pytest.approx(0.016, abs=1e-9)
    assert a.e2e == pytest.approx(0.033, abs=1e-9)
    assert b.dispatch == pytest.approx(0.005, abs=1e-9)
    assert (b.ttft, b.cached_tokens) == (pytest.approx(0.028, abs=1e-9), 16)


def test_rtt_is_paid_by_single_balancer_baselines() -> None:
    """A client in region y of a 2-region system talks to the balancer in x (first region)."""
    reqs = [_req("A", 0.0, ((1, 64),), 1, region="y")]
    system = build_system("least-load", ["x", "y"], 1, PROFILES["tiny"], RttMatrix(0.1, {}), 0)
    (rec,) = Simulation(system, OpenLoop(reqs)).run().records
    # least-load ties go to config order: x-0, local to the balancer. 0.1 s to the balancer,
    # 16 ms prefill, 0.1 s back.
    assert (rec.balancer, rec.replica) == ("x", "x-0")
    assert rec.ttft == pytest.approx(0.216, abs=1e-9)


def test_skylb_spills_when_home_is_full() -> None:
    """Region x has a 1-seq-at-a-time backlog; y is idle: x's queue head goes to y."""
    reqs = [_req(f"r{i}", 0.001 * i, ((i, 256),), 20) for i in range(6)]
    system = build_system("skylb", ["x", "y"], 1, PROFILES["tiny"], RttMatrix(0.01, {}), 0)
    recs = Simulation(system, OpenLoop(reqs)).run().records
    spilled = [r for r in recs if r.forwarded_to]
    assert spilled and all(r.forwarded_to == "y" and r.replica_region == "y" for r in spilled)
    assert all(r.outcome == "ok" for r in recs)


def _records_bytes(tmp: Path, name: str, records: list[RequestRecord]) -> bytes:
    path = tmp / name
    write_jsonl(path, records)
    return path.read_bytes()


@pytest.mark.skipif(not MOONCAKE.exists(), reason="shared traces not present")
def test_determinism_byte_identical_records(tmp_path: Path) -> None:
    wl = WorkloadSpec(str(MOONCAKE), limit=60, rate_scale=8.0)
    specs = [RunSpec(wl, p, 1, "h100-llama3.1-8b", "100") for p in POLICIES]
    first = run_all(specs, jobs=1, progress=False)
    second = run_all(specs, jobs=2, progress=False)  # other processes, other order of work
    for spec, a, b in zip(specs, first, second, strict=True):
        assert _records_bytes(tmp_path, "a", a.records) == _records_bytes(tmp_path, "b", b.records)
        assert len(a.records) == 60, spec.policy
