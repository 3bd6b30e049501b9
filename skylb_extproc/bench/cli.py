"""`skylb-extproc bench`: replay a trace through every compared system and write the report.

`add_bench_arguments` declares the flags (the issue's, exactly, plus a few documented extras);
`main_bench` runs them and returns the exit code: 0 done, 2 bad input (the message names the
file and line, or the flag).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from skylb_extproc.bench.engine import RunResult
from skylb_extproc.bench.oracle import oracle_hit_rate
from skylb_extproc.bench.plots import write_plots
from skylb_extproc.bench.records import summarize_policy, write_jsonl
from skylb_extproc.bench.regions import RttMatrix, parse_regions, parse_weights
from skylb_extproc.bench.report import build_report, diagnostics, render_markdown, write_json
from skylb_extproc.bench.runner import RunSpec, run_all
from skylb_extproc.bench.search import find_min_replicas
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
    p.add_argument("--replicas-per-region", type=int, default=4)
    p.add_argument("--rtt-ms", default="100", help="one-way ms: 100, or 100,us-eu=40,...")
    p.add_argument("--profile", default="l4-llama3.1-8b", choices=sorted(PROFILES))
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated names")
    p.add_argument("--rate-scale", type=float, default=1.0)
    p.add_argument("--limit", type=int, default=None, help="use the first N requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="directory for report.json, report.md, plots")
    p.add_argument("--find-min-replicas", action="store_true")
    p.add_argument("--slo-ttft-p90", type=float, default=None, metavar="S")
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


def _specs(args: argparse.Namespace) -> tuple[WorkloadSpec, list[RunSpec]]:
    regions = parse_regions(args.regions)
    weights = parse_weights(args.region_weights, regions)
    RttMatrix.parse(args.rtt_ms, regions)  # validate early
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in SYSTEMS]
    if unknown or not policies:
        raise _Usage(f"--policies: unknown {unknown}; choose from {', '.join(SYSTEMS)}")
    if args.replicas_per_region < 1:
        raise _Usage("--replicas-per-region must be >= 1")
    if args.limit is not None and args.limit < 1:
        raise _Usage("--limit must be >= 1")
    wl = WorkloadSpec(
        trace=args.trace, format=args.format, regions=tuple(regions), weights=tuple(weights),
        rate_scale=args.rate_scale, limit=args.limit, seed=args.seed,
        daily_curve=args.daily_curve, daily_csv=args.daily_csv,
        clients_per_region=_ints(args.clients_per_region), think_time_s=args.think_time_s,
    )  # fmt: skip
    runs = [RunSpec(wl, p, args.replicas_per_region, args.profile, args.rtt_ms) for p in policies]
    return wl, runs


def _params(args: argparse.Namespace, wl: WorkloadSpec, fmt: str) -> dict[str, object]:
    params: dict[str, object] = {
        "trace": wl.trace, "format": fmt, "regions": list(wl.regions),
        "region_weights": [round(w, 6) for w in wl.weights],
        "replicas_per_region": args.replicas_per_region, "rtt_ms": args.rtt_ms,
        "profile": args.profile, "rate_scale": wl.rate_scale, "limit": wl.limit, "seed": wl.seed,
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


def main_bench(args: argparse.Namespace) -> int:
    """Run the benchmark `args` describe; 0 on success, 2 on bad input."""
    if args.live and (args.find_min_replicas or args.format == "closed-loop"):
        print("bench --live: open-loop traces only, without --find-min-replicas", file=sys.stderr)
        return 2
    if args.backend == "vllm" and (not args.live or args.time_scale != 1.0):
        print("bench --backend vllm: live only, and real vLLM runs in real time: "
              "add --live --time-scale 1", file=sys.stderr)  # fmt: skip
        return 2
    if args.live and args.limit is None:
        args.limit = LIVE_DEFAULT_LIMIT  # live runs take real time: capped unless asked
    if args.find_min_replicas and args.slo_ttft_p90 is None:
        print("bench: --find-min-replicas needs --slo-ttft-p90 S", file=sys.stderr)
        return 2
    try:
        wl, runs = _specs(args)
        workload = build_workload(wl)  # parse errors surface here, before any run
    except (ValueError, OSError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    fmt = wl.format if wl.format == "closed-loop" else _file_format(wl)
    out = Path(args.out)
    (out / "records").mkdir(parents=True, exist_ok=True)
    extra: list[str] = []
    if args.live:
        results = _run_live(args, wl, runs, workload.requests())
        missing = [r.policy for r in runs if r.policy not in results]
        if missing:
            extra = [f"Not run live: {', '.join(missing)} (no live topology for them)."]
    else:
        done = run_all(runs, jobs=args.jobs, progress=not args.quiet)
        results = dict(zip([r.policy for r in runs], done, strict=True))
    report = build_report(_params(args, wl, fmt), oracle_hit_rate(workload.requests()), results)
    if args.find_min_replicas:
        report["min_replicas_per_region"] = _search(args, runs, results)
        extra = _search_md(report["min_replicas_per_region"])
    _write(out, report, results, extra)
    print(f"bench: wrote {out / 'report.json'} and {out / 'report.md'}")
    return 0


def _run_live(
    args: argparse.Namespace, wl: WorkloadSpec, runs: list[RunSpec], reqs: list[TraceRequest]
) -> dict[str, RunResult]:
    from skylb_extproc.bench.live import LiveOptions, run_live

    opts = LiveOptions(
        regions=wl.regions, replicas_per_region=args.replicas_per_region, profile=args.profile,
        rtt=RttMatrix.parse(args.rtt_ms, wl.regions), time_scale=args.time_scale,
        backend=args.backend,
    )  # fmt: skip
    return dict(run_live([r.policy for r in runs], reqs, opts))


def _file_format(wl: WorkloadSpec) -> str:
    return detect_format(wl.trace) if wl.format == "auto" else wl.format


def _search(
    args: argparse.Namespace, runs: list[RunSpec], results: dict[str, RunResult]
) -> dict[str, object]:
    known = {
        (r.policy, r.replicas_per_region): summarize_policy(res.records)
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
