"""`skylb-extproc bench`: replay a trace through every compared system and write the report.

`add_bench_arguments` declares the flags (the issue's, exactly, plus a few documented extras);
`main_bench` runs them and returns the exit code: 0 done, 2 bad input (the message names the
file and line, or the flag).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from skylb_extproc.bench.engine import RunResult
from skylb_extproc.bench.fleet import (
    level_name,
    parse_counts,
    parse_levels,
    parse_profiles,
    per_region,
)
from skylb_extproc.bench.floor import workload_floor
from skylb_extproc.bench.oracle import hit_rate, oracle_matches
from skylb_extproc.bench.plots import write_plots, write_sweep_plots
from skylb_extproc.bench.records import summarize_policy, write_jsonl
from skylb_extproc.bench.regions import RttMatrix, parse_regions, parse_weights
from skylb_extproc.bench.report import (
    build_report,
    diagnostics,
    render_markdown,
    render_sweep_markdown,
    write_json,
)
from skylb_extproc.bench.runner import RunSpec, run_all
from skylb_extproc.bench.search import find_min_replicas, one_count
from skylb_extproc.bench.sweep import SWEEP_SLO_TTFT_P90_S
from skylb_extproc.bench.sweep_report import level_blocks, sweep_additions
from skylb_extproc.bench.topology import POLICIES, SYSTEMS
from skylb_extproc.bench.trace import TraceRequest, detect_format
from skylb_extproc.bench.workloads import FORMATS, WorkloadSpec, build_workload
from skylb_extproc.sim.profiles import PROFILES

__all__ = ["add_bench_arguments", "main_bench"]

LIVE_DEFAULT_LIMIT = 200


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """The `bench` subcommand's flags."""
    p.add_argument("--trace", required=True, help="Mooncake JSONL or Azure CSV trace")
    p.add_argument("--format", default="auto", choices=FORMATS)
    p.add_argument("--regions", default="us,eu,asia", help="a count or comma-separated names")
    p.add_argument("--region-weights", default=None, help="e.g. 0.5,0.3,0.2 (default: equal)")
    p.add_argument(
        "--replicas-per-region", default="4", help="N, or N1,N2,.. per region (region order)"
    )
    p.add_argument("--rtt-ms", default="100", help="one-way ms: 100, or 100,us-eu=40,...")
    p.add_argument(
        "--profile",
        default="l4-llama3.1-8b",
        help=f"one of {', '.join(sorted(PROFILES))}, or per region: us=NAME,eu=NAME,..",
    )
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated names")
    p.add_argument("--rate-scale", default="1", help="X, or X1,X2,.. for a load sweep")
    p.add_argument("--limit", type=int, default=None, help="use the first N requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="directory for report.json, report.md, plots")
    p.add_argument("--find-min-replicas", action="store_true")
    p.add_argument(
        "--slo-ttft-p90",
        type=float,
        default=None,
        metavar="S",
        help=f"SLO for --find-min-replicas and goodput (sweeps: {SWEEP_SLO_TTFT_P90_S} s)",
    )
    p.add_argument("--live", action="store_true", help="replay through the real stack")
    p.add_argument(
        "--clients-per-region", default="20", help="closed-loop clients: N, or N1,N2,.. per region"
    )
    p.add_argument("--think-time-s", type=float, default=1.0, help="closed-loop mean think time")
    p.add_argument("--daily-curve", default=None, help="servegen series, e.g. language/m-large")
    p.add_argument("--daily-csv", default=None, help="servegen_daily_rates.csv path")
    p.add_argument("--jobs", type=int, default=None, help="processes (default: CPU count)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--time-scale", type=float, default=10.0, help="--live: replica speed-up")
    p.add_argument(
        "--backend",
        choices=("sim", "vllm"),
        default="sim",
        help="--live: simulated replicas, or real vLLM (after skylb-extproc vllm-setup; "
        "real time: --time-scale 1, e.g. --profile cpu-tiny-llama)",
    )


class _Usage(ValueError):
    pass


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise _Usage(f"--clients-per-region: not integers: {text!r}") from None


@dataclass(frozen=True)
class _Setup:
    """The parsed flags the runs share: workload (first level), levels, fleet, runs."""

    wl: WorkloadSpec
    levels: tuple[float, ...]
    counts: int | tuple[int, ...]
    profile: str | tuple[str, ...]
    runs: list[RunSpec]  # level-major: every policy at the first level, then the next


def _specs(args: argparse.Namespace) -> _Setup:
    regions = parse_regions(args.regions)
    weights = parse_weights(args.region_weights, regions)
    RttMatrix.parse(args.rtt_ms, regions)  # validate early
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in SYSTEMS]
    if unknown or not policies:
        raise _Usage(f"--policies: unknown {unknown}; choose from {', '.join(SYSTEMS)}")
    counts = parse_counts(args.replicas_per_region, regions)
    profile = parse_profiles(args.profile, regions)
    levels = parse_levels(args.rate_scale)
    if args.limit is not None and args.limit < 1:
        raise _Usage("--limit must be >= 1")
    wl = WorkloadSpec(
        trace=args.trace, format=args.format, regions=tuple(regions), weights=tuple(weights),
        rate_scale=levels[0], limit=args.limit, seed=args.seed,
        daily_curve=args.daily_curve, daily_csv=args.daily_csv,
        clients_per_region=_ints(args.clients_per_region), think_time_s=args.think_time_s,
    )  # fmt: skip
    runs = [
        RunSpec(replace(wl, rate_scale=level), p, counts, profile, args.rtt_ms)
        for level in levels
        for p in policies
    ]
    return _Setup(wl, levels, counts, profile, runs)


def _refusal(args: argparse.Namespace) -> str | None:
    """Flag combinations that are refused before anything is parsed or run."""
    sweep = "," in args.rate_scale
    hetero = "," in args.replicas_per_region or "=" in args.profile
    if args.find_min_replicas and ("," in args.replicas_per_region or sweep):
        return ("bench --find-min-replicas: give one --replicas-per-region count (the most "
                "to try in every region) and one --rate-scale level")  # fmt: skip
    if args.live and (sweep or hetero):
        return ("bench --live: one --rate-scale level, one --profile and one "
                "--replicas-per-region count (sweeps and heterogeneous fleets are virtual-time "
                "only)")  # fmt: skip
    return None


def _jsonable(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


def _params(args: argparse.Namespace, setup: _Setup, fmt: str) -> dict[str, object]:
    wl = setup.wl
    params: dict[str, object] = {
        "trace": wl.trace, "format": fmt, "regions": list(wl.regions),
        "region_weights": [round(w, 6) for w in wl.weights],
        "replicas_per_region": _jsonable(setup.counts), "rtt_ms": args.rtt_ms,
        "profile": _jsonable(setup.profile),
        "rate_scale": wl.rate_scale if len(setup.levels) == 1 else list(setup.levels),
        "limit": wl.limit, "seed": wl.seed,
        "daily_curve": wl.daily_curve, "regions_note": "constructed: no public trace has regions",
    }  # fmt: skip
    if args.live:
        params |= {"live": True, "time_scale": args.time_scale}
    if wl.format == "closed-loop":
        params |= {
            "clients_per_region": list(wl.clients_per_region),
            "think_time_s": wl.think_time_s,
        }
    return params


def _early_refusal(args: argparse.Namespace) -> str | None:
    if args.live and (args.find_min_replicas or args.format == "closed-loop"):
        return "bench --live: open-loop traces only, without --find-min-replicas"
    if args.backend == "vllm" and (not args.live or args.time_scale != 1.0):
        return ("bench --backend vllm: live only, and real vLLM runs in real time: "
                "add --live --time-scale 1")  # fmt: skip
    if args.find_min_replicas and args.slo_ttft_p90 is None:
        return "bench: --find-min-replicas needs --slo-ttft-p90 S"
    if args.slo_ttft_p90 is not None and not args.slo_ttft_p90 > 0:
        return "bench: --slo-ttft-p90 must be > 0"
    return _refusal(args)


def main_bench(args: argparse.Namespace) -> int:
    """Run the benchmark `args` describe; 0 on success, 2 on bad input."""
    refused = _early_refusal(args)
    if refused:
        print(refused, file=sys.stderr)
        return 2
    if args.live and args.limit is None:
        args.limit = LIVE_DEFAULT_LIMIT  # live runs take real time: capped unless asked
    try:
        setup = _specs(args)
        workload = build_workload(setup.wl)  # parse errors surface here, before any run
    except (ValueError, OSError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    wl = setup.wl
    fmt = wl.format if wl.format == "closed-loop" else _file_format(wl)
    out = Path(args.out)
    (out / "records").mkdir(parents=True, exist_ok=True)
    by_level, extra = _run(args, setup, workload.requests())
    reqs = workload.requests()  # the floor and the oracle do not depend on the rate
    matches = oracle_matches(reqs)
    regions = list(wl.regions)
    floor = workload_floor(
        reqs, matches, per_region(setup.profile, regions), RttMatrix.parse(args.rtt_ms, regions)
    )
    params = _params(args, setup, fmt)
    blocks = level_blocks(by_level)
    if len(setup.levels) > 1:
        report: dict[str, object] = {
            "workload": {**params, "requests": blocks[0]["requests"]},
            "oracle_prefix_hit_rate": hit_rate(reqs, matches), "floor": floor, "levels": blocks,
        }  # fmt: skip
        slo = SWEEP_SLO_TTFT_P90_S if args.slo_ttft_p90 is None else args.slo_ttft_p90
        report |= sweep_additions(blocks, by_level, slo, _unservable(floor))
        _write_sweep(out, report, by_level, extra)
    else:
        results = by_level[setup.levels[0]]
        report = build_report(params, hit_rate(reqs, matches), results)
        report["floor"] = floor
        report |= sweep_additions(blocks, by_level, args.slo_ttft_p90, _unservable(floor))
        if args.find_min_replicas:
            report["min_replicas_per_region"] = _search(args, setup.runs, results)
            extra = _search_md(report["min_replicas_per_region"])
        _write(out, report, results, extra)
    print(f"bench: wrote {out / 'report.json'} and {out / 'report.md'}")
    return 0


def _unservable(floor: dict[str, object]) -> int:
    n = floor["without_floor"]
    assert isinstance(n, int)
    return n


def _run(
    args: argparse.Namespace, setup: _Setup, reqs: list[TraceRequest]
) -> tuple[dict[float, dict[str, RunResult]], list[str]]:
    """Results by level and system (one process pool for every run of every level)."""
    runs = setup.runs
    if args.live:
        results = _run_live(args, setup, reqs)
        missing = [r.policy for r in runs if r.policy not in results]
        extra = [f"Not run live: {', '.join(missing)} (no live topology for them)."]
        return {setup.levels[0]: results}, extra if missing else []
    done = run_all(runs, jobs=args.jobs, progress=not args.quiet)
    by_level: dict[float, dict[str, RunResult]] = {level: {} for level in setup.levels}
    for spec, res in zip(runs, done, strict=True):
        by_level[spec.workload.rate_scale][spec.policy] = res
    return by_level, []


def _run_live(
    args: argparse.Namespace, setup: _Setup, reqs: list[TraceRequest]
) -> dict[str, RunResult]:
    from skylb_extproc.bench.live import LiveOptions, run_live

    assert isinstance(setup.counts, int) and isinstance(setup.profile, str)  # _refusal
    wl = setup.wl
    opts = LiveOptions(
        regions=wl.regions, replicas_per_region=setup.counts, profile=setup.profile,
        rtt=RttMatrix.parse(args.rtt_ms, wl.regions), time_scale=args.time_scale,
        backend=args.backend,
    )  # fmt: skip
    return dict(run_live([r.policy for r in setup.runs], reqs, opts))


def _file_format(wl: WorkloadSpec) -> str:
    return detect_format(wl.trace) if wl.format == "auto" else wl.format


def _search(
    args: argparse.Namespace, runs: list[RunSpec], results: dict[str, RunResult]
) -> dict[str, object]:
    known = {
        (r.policy, one_count(r)): summarize_policy(res.records)
        for r, res in zip(runs, results.values(), strict=True)
    }
    return find_min_replicas(
        runs, args.slo_ttft_p90, known=known, jobs=args.jobs, progress=not args.quiet
    )


def _search_md(found: object) -> list[str]:
    assert isinstance(found, dict)
    lines = [
        f"## Fewest replicas per region with TTFT P90 <= {found['slo_ttft_p90_s']} s "
        f"(searched 1..{found['max_replicas_per_region']}, every request completed)",
        "",
        "| policy | replicas per region | TTFT P90 by count tried |",
        "|---|---|---|",
    ]
    for name, n in found["policies"].items():
        tried = ", ".join(
            f"{k}: {'—' if v is None else f'{v:.3f}'}" for k, v in found["tried"][name].items()
        )
        lines.append(f"| {name} | {'not met' if n is None else n} | {tried} |")
    return lines


def _write(
    out: Path, report: dict[str, object], runs: dict[str, RunResult], extra: list[str]
) -> None:
    for name, res in runs.items():
        write_jsonl(out / "records" / f"{name}.jsonl", res.records)
    write_json(out / "report.json", report)
    spills = {name: sum(1 for r in res.records if r.forwarded_to) for name, res in runs.items()}
    pngs = write_plots(out, runs)
    plots = [f"![{p}]({p})" for p in pngs] or ["(plots skipped: matplotlib is not installed)"]
    extra = [*extra, "", *diagnostics({k: v.records for k, v in runs.items()})]
    extra += ["", f"Code: `{_code_version()}`."]
    (out / "report.md").write_text(
        render_markdown(report, spills, [*extra, "", "## Plots", "", *plots]), encoding="utf-8"
    )


def _write_sweep(
    out: Path,
    report: dict[str, object],
    by_level: dict[float, dict[str, RunResult]],
    extra: list[str],
) -> None:
    """records/x<level>/<system>.jsonl, report.json, the sweep's plots and report.md."""
    spills: list[dict[str, int]] = []
    diags: list[str] = []
    for level, runs in by_level.items():
        folder = out / "records" / level_name(level)
        folder.mkdir(parents=True, exist_ok=True)
        for name, res in runs.items():
            write_jsonl(folder / f"{name}.jsonl", res.records)
        spills.append({n: sum(1 for r in res.records if r.forwarded_to) for n, res in runs.items()})
        lines = diagnostics({k: v.records for k, v in runs.items()})
        diags += ["", f"## Diagnostics at {level_name(level)}", *lines[1:]]
    write_json(out / "report.json", report)
    levels = report["levels"]
    assert isinstance(levels, list)
    named = {level_name(k): v for k, v in by_level.items()}
    pngs = write_sweep_plots(out, levels, named)
    plots = [f"![{p}]({p})" for p in pngs] or ["(plots skipped: matplotlib is not installed)"]
    extra = [*extra, *diags, "", f"Code: `{_code_version()}`.", "", "## Plots", "", *plots]
    (out / "report.md").write_text(render_sweep_markdown(report, spills, extra), encoding="utf-8")


def _code_version() -> str:
    """The git commit of this checkout (+dirty), so a report says which code produced it."""
    try:
        sha = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return sha + (" with uncommitted changes" if dirty else "")


def _git(*args: str) -> str:
    here = Path(__file__).resolve().parent
    done = subprocess.run(
        ["git", *args], cwd=here, capture_output=True, text=True, timeout=5, check=True
    )
    return done.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    """Standalone entry for `python -m skylb_extproc.bench.cli` until the main CLI wires it."""
    parser = argparse.ArgumentParser(prog="skylb-extproc bench")
    add_bench_arguments(parser)
    return main_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
