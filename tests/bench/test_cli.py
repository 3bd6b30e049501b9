"""`main_bench` end to end: report.json's exact schema, records, report.md, errors, --live."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from skylb_extproc.bench.cli import add_bench_arguments, main_bench
from skylb_extproc.bench.topology import POLICIES

STATS = {"mean", "p50", "p90", "p99"}
POLICY_KEYS = {
    "requests",
    "completed",
    "rejected",
    "throughput_tokens_per_s",
    "ttft_s",
    "e2e_s",
    "prefix_hit_rate",
    "cross_region_fraction",
}


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_bench_arguments(p)
    return p.parse_args([*argv, "--quiet"])


def _trace(tmp_path: Path, n: int = 24) -> str:
    lines = []
    for i in range(n):
        conv = i % 6  # six conversations, each growing by one block per turn
        ids = [1000 * conv + j for j in range(i // 6 + 1)]
        lines.append(
            json.dumps(
                {
                    "timestamp": 50 * i,
                    "input_length": 512 * len(ids) - 100,
                    "output_length": 20,
                    "hash_ids": ids,
                }
            )
        )
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_bench_writes_report_with_the_schema(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = _args(
        "--trace", _trace(tmp_path), "--profile", "h100-llama3.1-8b", "--replicas-per-region",
        "1", "--regions", "2", "--region-weights", "0.7,0.3", "--out", str(out), "--jobs", "1",
    )  # fmt: skip
    assert main_bench(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {
        "workload", "oracle_prefix_hit_rate", "policies", "floor", "default_vs_best_baseline",
    }  # fmt: skip
    wl = report["workload"]
    assert wl["requests"] == 24 and wl["duration_s"] == pytest.approx(1.15)
    assert wl["regions"] == ["us", "eu"] and wl["format"] == "mooncake"
    assert 0.0 < report["oracle_prefix_hit_rate"] < 1.0
    assert list(report["policies"]) == list(POLICIES)
    for name, p in report["policies"].items():
        assert set(p) == POLICY_KEYS, name
        assert set(p["ttft_s"]) == STATS and set(p["e2e_s"]) == STATS
        assert p["requests"] == 24 and p["completed"] + p["rejected"] == 24
        assert p["prefix_hit_rate"] <= report["oracle_prefix_hit_rate"] + 1e-9
        lines = (out / "records" / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) == 24
    md = (out / "report.md").read_text()
    assert "Regions are a construction" in md and "## The paper's orderings" in md


def test_bad_trace_exit_2_names_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1]}\n{oops\n'
    )
    assert main_bench(_args("--trace", str(bad), "--out", str(tmp_path / "o"))) == 2
    assert "bad.jsonl:2: invalid JSON" in capsys.readouterr().err


def test_flags_are_validated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = _trace(tmp_path, 6)
    out = str(tmp_path / "o")
    assert main_bench(_args("--trace", trace, "--out", out, "--policies", "skylb,nope")) == 2
    assert main_bench(_args("--trace", trace, "--out", out, "--region-weights", "1,2")) == 2
    assert main_bench(_args("--trace", trace, "--out", out, "--find-min-replicas")) == 2
    live = ("--live", "--format", "closed-loop")
    assert main_bench(_args("--trace", trace, "--out", out, *live)) == 2
    assert "open-loop traces only" in capsys.readouterr().err
    vllm = ("--backend", "vllm")
    assert main_bench(_args("--trace", trace, "--out", out, *vllm)) == 2  # live only
    assert main_bench(_args("--trace", trace, "--out", out, "--live", *vllm)) == 2  # scale 10
    assert "real vLLM runs in real time" in capsys.readouterr().err


def test_find_min_replicas(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = _args(
        "--trace", _trace(tmp_path, 12), "--profile", "h100-llama3.1-8b", "--regions", "1",
        "--replicas-per-region", "3", "--policies", "skylb,round-robin", "--out", str(out),
        "--find-min-replicas", "--slo-ttft-p90", "100", "--jobs", "1",
    )  # fmt: skip
    assert main_bench(args) == 0
    found = json.loads((out / "report.json").read_text())["min_replicas_per_region"]
    # A generous SLO is met by one replica; the search tried 3 (the main run), then 2, then 1.
    assert found["policies"] == {"skylb": 1, "round-robin": 1}
    assert list(found["tried"]["skylb"]) == ["1", "2", "3"]
