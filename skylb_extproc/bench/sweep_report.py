"""The report parts a load sweep and the workload's floor add (report.json and report.md).

One level (`--rate-scale 4`) keeps the single report's layout and adds beside its systems:
`floor` (bench/floor.py), `default_vs_best_baseline` (bench/sweep.py) and, with an SLO,
`goodput`. Several levels (`--rate-scale 1,2,4`) give `levels`: per level its offered rate and
the per-system block of the single report, plus `goodput` over the levels; report.md then has a
results table per level, each with the floor as a row, and one table of the default system
against the best baseline per level.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from skylb_extproc.bench.engine import RunResult
from skylb_extproc.bench.fleet import level_name
from skylb_extproc.bench.records import summarize_policy
from skylb_extproc.bench.sweep import (
    DEFAULT_SYSTEM,
    compare_default,
    goodput,
    local_and_forwarded,
    offered_rate,
)

__all__ = ["comparison_md", "floor_row", "level_blocks", "sweep_additions"]


def _duration(results: Mapping[str, RunResult]) -> float:
    spans = [
        max(r.arrival for r in res.records) - min(r.arrival for r in res.records)
        for res in results.values()
        if res.records
    ]
    return max(spans, default=0.0)


def level_blocks(by_level: Mapping[float, Mapping[str, RunResult]]) -> list[dict[str, object]]:
    """Per level: rate_scale, requests, duration_s, offered_rate_req_s, policies."""
    out: list[dict[str, object]] = []
    for level, results in by_level.items():
        first = next(iter(results.values()), None)
        n = len(first.records) if first else 0
        duration = _duration(results)
        out.append({
            "rate_scale": level, "requests": n, "duration_s": duration,
            "offered_rate_req_s": offered_rate(n, duration),
            "policies": {name: summarize_policy(res.records) for name, res in results.items()},
        })  # fmt: skip
    return out


def sweep_additions(
    blocks: Sequence[dict[str, object]],
    by_level: Mapping[float, Mapping[str, RunResult]],
    slo_s: float | None,
    unservable: int,
) -> dict[str, object]:
    """`goodput` (with an SLO) and, per level, the default vs the best baseline
    (`unservable`: requests no replica accepts, allowed to fail; see bench/sweep.py)."""
    points = [(_rate(b), _policies(b)) for b in blocks]
    rates = goodput(points, slo_s, unservable) if slo_s is not None else {}
    comparisons: list[dict[str, object]] = []
    for b, results in zip(blocks, by_level.values(), strict=True):
        head: dict[str, object] = {"rate_scale": b["rate_scale"], "offered_rate_req_s": _rate(b)}
        cmp = compare_default(_policies(b), rates, unservable=unservable)
        if cmp is None:
            comparisons.append({**head, "best_baseline": None})
            continue
        split = local_and_forwarded(results[DEFAULT_SYSTEM].records)
        comparisons.append({**head, **cmp, **split})
    extra: dict[str, object] = {"default_vs_best_baseline": comparisons}
    if slo_s is not None:
        extra["goodput"] = {"slo_ttft_p90_s": slo_s, "req_s": rates}
    return extra


def _rate(block: Mapping[str, object]) -> float | None:
    rate = block["offered_rate_req_s"]
    return float(rate) if isinstance(rate, int | float) else None


def _policies(block: Mapping[str, object]) -> Mapping[str, Mapping[str, object]]:
    pol = block["policies"]
    assert isinstance(pol, Mapping)
    return pol


def _f(x: object, digits: int = 3) -> str:
    return "—" if not isinstance(x, int | float) else f"{x:.{digits}f}"


def _pct(x: object) -> str:
    return "—" if not isinstance(x, int | float) else f"{100 * x:.1f}%"


def floor_row(floor: Mapping[str, object], columns: int) -> str:
    """The floor as a row of the results table (TTFT columns only)."""
    t = floor["ttft_s"]
    assert isinstance(t, Mapping)
    cells = ["**floor** (idle replica, infinite cache, unavoidable RTT)",
             f"{floor['requests']} with a floor", "—",
             _f(t["mean"]), _f(t["p50"]), _f(t["p90"]), _f(t["p99"])]  # fmt: skip
    cells += ["—"] * (columns - len(cells))
    return "| " + " | ".join(cells) + " |"


def _side(split: object) -> str:
    assert isinstance(split, Mapping)
    return (
        f"{split['completed']}, {_pct(split['prefix_hit_rate'])}, "
        f"{_f(split['ttft_p50_s'])} / {_f(split['ttft_p90_s'])}"
    )


def comparison_md(report: Mapping[str, object]) -> list[str]:
    """The 'default vs best baseline per level' table (and goodput, when computed)."""
    lines = [f"## Default (`{DEFAULT_SYSTEM}`) vs best baseline per level", ""]
    lines += [
        "Best baseline: lowest TTFT P90 among systems not named skylb* that completed every "
        "request (but those no replica accepts). Ratios are default / best (TTFT: < 1 the "
        "default is faster; goodput: > 1 it sustains more). Local / forwarded: the default's "
        "completed requests served in their home region / in another (count, hit rate, "
        "TTFT P50 / P90 s).",
        "",
        "| level | offered req/s | best baseline | TTFT P50 ratio | TTFT P90 ratio "
        "| hit default / best | goodput ratio | default local | default forwarded |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    cmps = report.get("default_vs_best_baseline")
    assert isinstance(cmps, list)
    for c in cmps:
        if c["best_baseline"] is None:
            lines.append(f"| {level_name(c['rate_scale'])} | {_f(c['offered_rate_req_s'], 2)} "
                         "| none (no default system, or no baseline completed every request) "
                         "| — | — | — | — | — | — |")  # fmt: skip
            continue
        lines.append(
            f"| {level_name(c['rate_scale'])} | {_f(c['offered_rate_req_s'], 2)} "
            f"| {c['best_baseline']} | {_f(c['ttft_p50_ratio'], 2)} "
            f"| {_f(c['ttft_p90_ratio'], 2)} | {_pct(c['prefix_hit_rate'])} / "
            f"{_pct(c['best_baseline_prefix_hit_rate'])} | {_f(c['goodput_ratio'], 2)} "
            f"| {_side(c['local'])} | {_side(c['forwarded'])} |"
        )
    good = report.get("goodput")
    if isinstance(good, Mapping):
        lines += ["", f"## Goodput (TTFT P90 <= {good['slo_ttft_p90_s']} s, every request "
                  "completed but those no replica accepts; highest offered rate among the levels "
                  "run)", "",
                  "| policy | goodput req/s |", "|---|---|"]  # fmt: skip
        rates = good["req_s"]
        assert isinstance(rates, Mapping)
        lines += [f"| {n} | {'not met' if r is None else _f(r, 2)} |" for n, r in rates.items()]
    return lines
