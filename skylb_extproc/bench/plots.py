"""PNG plots of a benchmark: TTFT CDF, throughput over time, per-region load and spills; for a
load sweep, TTFT P50 and P90 against the offered rate (one line per system) and a TTFT CDF per
level (the time series of every level would be many large pictures nobody compares).

matplotlib is imported lazily (the balancer never needs it), with the non-interactive Agg
backend. It is a dependency; should it still be missing, the report is written without plots and
says so.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from skylb_extproc.bench.engine import RunResult
from skylb_extproc.bench.records import OK

__all__ = ["write_plots", "write_sweep_plots"]

_SMOOTH_S = 10  # throughput is averaged over this many one-second samples


def _pyplot() -> Any | None:
    try:
        mpl = importlib.import_module("matplotlib")
    except ImportError:
        return None
    mpl.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def _ttft_cdf(plt: Any, results: Mapping[str, RunResult], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, res in results.items():
        ttft = sorted(r.ttft for r in res.records if r.outcome == OK and r.ttft is not None)
        if ttft:
            ax.plot(ttft, [(i + 1) / len(ttft) for i in range(len(ttft))], label=name)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT at the client (s, log scale)")
    ax.set_ylabel("fraction of completed requests")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _smooth(values: list[int]) -> list[float]:
    out: list[float] = []
    acc = 0
    for i, v in enumerate(values):
        acc += v
        if i >= _SMOOTH_S:
            acc -= values[i - _SMOOTH_S]
        out.append(acc / min(i + 1, _SMOOTH_S))
    return out


def _throughput(plt: Any, results: Mapping[str, RunResult], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, res in results.items():
        tl = res.timeline
        ax.plot(tl.times, _smooth(tl.tokens), label=name)
    ax.set_xlabel("virtual time (s)")
    ax.set_ylabel(f"completed tokens/s ({_SMOOTH_S} s average)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _regions(plt: Any, results: Mapping[str, RunResult], path: Path) -> None:
    n = len(results)
    fig, axes = plt.subplots(n, 1, figsize=(8, 2.2 * n + 0.6), sharex=True, squeeze=False)
    for ax, (name, res) in zip(axes[:, 0], results.items(), strict=True):
        tl = res.timeline
        for region in tl.regions:
            load = [b + q for b, q in zip(tl.busy[region], tl.queue[region], strict=True)]
            (line,) = ax.plot(tl.times, load, label=f"{region} load")
            spills = tl.spills[region]
            if any(spills):
                ax.bar(tl.times, spills, width=1.0, color=line.get_color(), alpha=0.35)
        ax.set_title(f"{name}: requests at region (replicas + balancer queue); bars = spills out")
        ax.set_ylabel("requests")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small", loc="upper right")
    axes[-1, 0].set_xlabel("virtual time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(out: Path, results: Mapping[str, RunResult]) -> list[str]:
    """Write the PNGs into `out`; returns their file names ([] when matplotlib is missing)."""
    plt = _pyplot()
    if plt is None or not results:
        return []
    _ttft_cdf(plt, results, out / "ttft_cdf.png")
    if not all(res.timeline.times for res in results.values()):
        return ["ttft_cdf.png"]  # live runs have no virtual-time series
    _throughput(plt, results, out / "throughput.png")
    _regions(plt, results, out / "regions.png")
    return ["ttft_cdf.png", "throughput.png", "regions.png"]


def _ttft_vs_load(plt: Any, levels: Sequence[Mapping[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(dict.fromkeys(n for b in levels for n in b["policies"]))
    for i, name in enumerate(names):
        color = f"C{i % 10}"
        for stat, style in (("p50", "-"), ("p90", "--")):
            pts = [
                (b["offered_rate_req_s"], b["policies"][name]["ttft_s"][stat])
                for b in levels
                if b["offered_rate_req_s"] is not None
                and b["policies"].get(name, {}).get("ttft_s", {}).get(stat) is not None
            ]
            if pts:
                xs, ys = zip(*sorted(pts), strict=True)
                label = f"{name} {stat.upper()}"
                ax.plot(xs, ys, style, marker="o", color=color, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("offered rate (requests/s)")
    ax.set_ylabel("TTFT at the client (s, log scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_sweep_plots(
    out: Path,
    levels: Sequence[Mapping[str, Any]],
    results: Mapping[str, Mapping[str, RunResult]],
) -> list[str]:
    """ttft_vs_load.png from report.json's `levels`, and ttft_cdf_<level>.png per level
    (`results`: level name -> system -> result); [] when matplotlib is missing."""
    plt = _pyplot()
    if plt is None or not levels:
        return []
    _ttft_vs_load(plt, levels, out / "ttft_vs_load.png")
    names = ["ttft_vs_load.png"]
    for level, runs in results.items():
        _ttft_cdf(plt, runs, out / f"ttft_cdf_{level}.png")
        names.append(f"ttft_cdf_{level}.png")
    return names
