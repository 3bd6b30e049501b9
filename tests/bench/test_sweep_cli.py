"""`bench --rate-scale 1,2`, heterogeneous fleets and their flag errors, end to end."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from test_cli import _trace

from skylb_extproc.bench import workloads
from skylb_extproc.bench.cli import add_bench_arguments, main_bench
from skylb_extproc.bench.regions import RttMatrix
from skylb_extproc.bench.topology import build_system
from skylb_extproc.bench.workloads import WorkloadSpec, build_workload
from skylb_extproc.sim.profiles import PROFILES

H100 = "h100-llama3.1-8b"
POL = "skylb,sglang,round-robin"


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_bench_arguments(p)
    return p.parse_args([*argv, "--quiet"])


def _run(tmp_path: Path, out: str, *argv: str) -> dict:
    base = ("--trace", _trace(tmp_path), "--regions", "2", "--replicas-per-region", "1",
            "--policies", POL, "--jobs", "1", "--out", str(tmp_path / out))  # fmt: skip
    assert main_bench(_args(*base, *argv)) == 0
    return json.loads((tmp_path / out / "report.json").read_text())


def test_sweep_writes_levels_goodput_and_records_per_level(tmp_path: Path) -> None:
    report = _run(tmp_path, "sw", "--profile", H100, "--rate-scale", "1,2")
    assert list(report) == [
        "workload", "oracle_prefix_hit_rate", "floor", "levels", "default_vs_best_baseline",
        "goodput",
    ]  # fmt: skip
    assert report["workload"]["rate_scale"] == [1.0, 2.0]
    x1, x2 = report["levels"]
    assert (x1["rate_scale"], x2["rate_scale"]) == (1.0, 2.0)
    assert x1["offered_rate_req_s"] == pytest.approx(24 / 1.15)  # 24 requests over 1.15 s
    assert x2["offered_rate_req_s"] == pytest.approx(2 * x1["offered_rate_req_s"])
    assert list(x1["policies"]) == POL.split(",")
    assert report["goodput"]["slo_ttft_p90_s"] == 5.0  # the sweep's default SLO
    # A light trace: every system meets 5 s at both levels, so goodput is x2's rate.
    assert report["goodput"]["req_s"] == dict.fromkeys(POL.split(","), x2["offered_rate_req_s"])
    cmp = report["default_vs_best_baseline"]
    assert [c["rate_scale"] for c in cmp] == [1.0, 2.0]
    assert cmp[0]["best_baseline"] in ("sglang", "round-robin") and cmp[0]["goodput_ratio"] == 1
    assert cmp[0]["local"]["completed"] + cmp[0]["forwarded"]["completed"] == 24
    for level in ("x1", "x2"):
        for name in POL.split(","):
            assert len((tmp_path / "sw" / "records" / level / f"{name}.jsonl").read_text()
                       .splitlines()) == 24  # fmt: skip
    md = (tmp_path / "sw" / "report.md").read_text()
    for part in ("## Results at x1 (", "## Results at x2 (", "| **floor** (idle replica",
                 "## Default (`skylb`) vs best baseline per level", "| x2 | ",
                 "## Goodput (TTFT P90 <= 5.0 s", "## Diagnostics at x2"):  # fmt: skip
        assert part in md, part
    assert (tmp_path / "sw" / "ttft_vs_load.png").stat().st_size > 0


def test_a_sweep_level_equals_the_single_run_byte_for_byte(tmp_path: Path) -> None:
    _run(tmp_path, "sw", "--profile", H100, "--rate-scale", "1,2")
    single = _run(tmp_path, "one", "--profile", H100, "--rate-scale", "2")
    assert single["workload"]["rate_scale"] == 2.0 and "levels" not in single
    assert single["floor"]["requests"] == 24
    for name in POL.split(","):
        one = (tmp_path / "one" / "records" / f"{name}.jsonl").read_bytes()
        assert one == (tmp_path / "sw" / "records" / "x2" / f"{name}.jsonl").read_bytes()
    md = (tmp_path / "one" / "report.md").read_text()
    assert "| **floor** (idle replica" in md and "vs best baseline per level" in md
    assert "Goodput" not in md  # no SLO given for one level


def test_single_level_with_an_slo_reports_goodput(tmp_path: Path) -> None:
    report = _run(tmp_path, "o", "--profile", H100, "--slo-ttft-p90", "0.001")
    assert report["goodput"] == {"slo_ttft_p90_s": 0.001, "req_s": dict.fromkeys(POL.split(","))}


def test_heterogeneous_fleet(tmp_path: Path) -> None:
    report = _run(
        tmp_path, "h", "--profile", f"us={H100},eu=l4-llama3.1-8b", "--replicas-per-region", "2,1"
    )
    assert report["workload"]["profile"] == [H100, "l4-llama3.1-8b"]
    assert report["workload"]["replicas_per_region"] == [2, 1]
    served = set()
    for name in POL.split(","):
        for line in (tmp_path / "h" / "records" / f"{name}.jsonl").read_text().splitlines():
            served.add(json.loads(line)["replica"])
    assert served <= {"us-0", "us-1", "eu-0"} and "us-1" in served


def test_build_system_per_region_profiles_and_counts() -> None:
    l4, h100 = PROFILES["l4-llama3.1-8b"], PROFILES[H100]
    system = build_system(
        "skylb-cost", ["us", "eu"], {"us": 2, "eu": 1}, {"us": h100, "eu": l4},
        RttMatrix(0.1, {}), 0,
    )  # fmt: skip
    assert {n: e.profile.name for n, e in system.replicas.items()} == {
        "us-0": H100, "us-1": H100, "eu-0": "l4-llama3.1-8b",
    }  # fmt: skip
    speed = {
        r: b._spill.cost.settings.prefill_tokens_per_s  # type: ignore[union-attr]
        for r, b in system.balancers.items()
    }
    assert speed == {"us": 1000.0 / h100.prefill_k_ms, "eu": 1000.0 / l4.prefill_k_ms}
    with pytest.raises(ValueError, match="different models"):
        build_system("skylb", ["us", "eu"], 1, {"us": h100, "eu": PROFILES["tiny"]},
                     RttMatrix(0.1, {}), 0)  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--rate-scale", "1,0"), "--rate-scale"),
        (("--rate-scale", "1,x"), "--rate-scale"),
        (("--rate-scale", "2,2"), "--rate-scale"),
        (("--replicas-per-region", "1,1,1"), "--replicas-per-region"),
        (("--replicas-per-region", "0"), "--replicas-per-region"),
        (("--replicas-per-region", "two"), "--replicas-per-region"),
        (("--profile", "a100"), "--profile: unknown profile"),
        (("--profile", "us=tiny"), "--profile: every region needs a profile: missing ['eu']"),
        (("--profile", "us=tiny,eu=cpu-tiny-llama"), "--profile: the regions' profiles serve"),
        (("--slo-ttft-p90", "0"), "--slo-ttft-p90"),
        (
            ("--replicas-per-region", "2,1", "--find-min-replicas", "--slo-ttft-p90", "5"),
            "--find-min-replicas: give one --replicas-per-region count",
        ),
        (
            ("--rate-scale", "1,2", "--find-min-replicas", "--slo-ttft-p90", "5"),
            "one --rate-scale level",
        ),
        (("--rate-scale", "1,2", "--live"), "bench --live: one --rate-scale level"),
        (("--profile", "us=tiny,eu=tiny", "--live"), "heterogeneous fleets are virtual-time"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], message: str
) -> None:
    args = _args("--trace", _trace(tmp_path, 6), "--regions", "us,eu", "--out",
                 str(tmp_path / "o"), *argv)  # fmt: skip
    assert main_bench(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "report.json").exists()


def test_the_trace_is_parsed_once_per_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = workloads.load_mooncake

    def counting(path: str, limit: int | None = None) -> list:
        calls.append(path)
        return real(path, limit=limit)

    monkeypatch.setattr(workloads, "load_mooncake", counting)
    trace = _trace(tmp_path)
    for scale in (1.0, 2.0, 4.0):
        build_workload(WorkloadSpec(trace, rate_scale=scale))
    assert len(calls) == 1
    Path(trace).write_text(Path(trace).read_text() + "\n")  # an edited file is read again
    build_workload(WorkloadSpec(trace, rate_scale=8.0))
    assert len(calls) == 2
