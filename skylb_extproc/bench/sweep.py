"""Load sweeps: goodput per system, and the default policy against the best baseline.

Offered rate of a level = its requests / the span of their arrivals (report.json's
`duration_s`: for an open-loop trace the same for every system; for closed-loop clients, which
send as fast as they are served, the longest span among the systems).

Goodput of a system = the highest offered rate among the levels run at which its TTFT P90 is at
most the SLO and every request completed; None when no level met it. "Every request" means
every one the fleet can serve: a request no replica accepts (prompt + output over every
profile's context, the floor's `without_floor`) is rejected by every system alike, so it is
allowed (`unservable`); one more rejection fails the level. Levels
are not assumed monotone: a system that fails at x2 and passes at x4 has goodput x4's rate,
and the per-level tables show both.

Best baseline at a level = among systems whose name does not start with `skylb` and that
completed every request (as above), the lowest TTFT P90 (ties: the first in run order). The default
(`skylb`) is compared with it by ratios default / best: TTFT P50 and P90 (< 1: the default is
faster), goodput (> 1: the default sustains more load); hit rates side by side.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from skylb_extproc.bench.records import OK, RequestRecord, percentiles

__all__ = [
    "DEFAULT_SYSTEM",
    "SWEEP_SLO_TTFT_P90_S",
    "best_baseline",
    "compare_default",
    "completed_all",
    "goodput",
    "local_and_forwarded",
    "offered_rate",
]

DEFAULT_SYSTEM = "skylb"
SWEEP_SLO_TTFT_P90_S = 5.0  # --slo-ttft-p90 when sweeping and none is given

Summary = Mapping[str, object]


def offered_rate(requests: int, duration_s: float) -> float | None:
    """Requests per second over the arrivals' span; None for a single instant."""
    return requests / duration_s if duration_s > 0 else None


def completed_all(summary: Summary, unservable: int = 0) -> bool:
    """Every request completed but at most the `unservable` ones no replica accepts."""
    rejected = summary.get("rejected")
    return isinstance(rejected, int) and rejected <= unservable


def goodput(
    levels: Sequence[tuple[float | None, Mapping[str, Summary]]],
    slo_s: float,
    unservable: int = 0,
) -> dict[str, float | None]:
    """System -> highest offered rate (of `levels`: (rate, summaries)) meeting the SLO."""
    out: dict[str, float | None] = {}
    for rate, summaries in levels:
        for name, summary in summaries.items():
            best = out.setdefault(name, None)
            p90 = _p(summary, "p90")
            ok = completed_all(summary, unservable) and p90 is not None and p90 <= slo_s
            if rate is not None and ok:
                out[name] = rate if best is None else max(best, rate)
    return out


def _p(summary: Summary, stat: str) -> float | None:
    ttft = summary.get("ttft_s")
    value = ttft.get(stat) if isinstance(ttft, Mapping) else None
    return float(value) if isinstance(value, int | float) else None


def best_baseline(summaries: Mapping[str, Summary], unservable: int = 0) -> str | None:
    """The baseline with the lowest TTFT P90 among those that completed every request."""
    best: tuple[float, str] | None = None
    for name, s in summaries.items():
        p90 = _p(s, "p90")
        if name.startswith("skylb") or p90 is None or not completed_all(s, unservable):
            continue
        if best is None or p90 < best[0]:
            best = (p90, name)
    return None if best is None else best[1]


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def compare_default(
    summaries: Mapping[str, Summary],
    goodputs: Mapping[str, float | None],
    default: str = DEFAULT_SYSTEM,
    unservable: int = 0,
) -> dict[str, object] | None:
    """Ratios default / best baseline at one level; None without the default or a baseline."""
    best = best_baseline(summaries, unservable)
    if default not in summaries or best is None:
        return None
    d, b = summaries[default], summaries[best]
    return {
        "default": default,
        "best_baseline": best,
        "ttft_p50_ratio": _ratio(_p(d, "p50"), _p(b, "p50")),
        "ttft_p90_ratio": _ratio(_p(d, "p90"), _p(b, "p90")),
        "prefix_hit_rate": d.get("prefix_hit_rate"),
        "best_baseline_prefix_hit_rate": b.get("prefix_hit_rate"),
        "goodput_ratio": _ratio(goodputs.get(default), goodputs.get(best)),
    }


def local_and_forwarded(records: Sequence[RequestRecord]) -> dict[str, dict[str, object]]:
    """Completed requests served in their home region vs in another: count, hit rate, TTFT."""
    groups: dict[str, list[RequestRecord]] = {"local": [], "forwarded": []}
    for r in records:
        if r.outcome == OK:
            groups["local" if r.replica_region == r.region else "forwarded"].append(r)
    out: dict[str, dict[str, object]] = {}
    for key, recs in groups.items():
        prompt = sum(r.prompt_tokens for r in recs)
        ttft = percentiles([r.ttft for r in recs if r.ttft is not None])
        out[key] = {
            "completed": len(recs),
            "prefix_hit_rate": sum(r.cached_tokens for r in recs) / prompt if prompt else None,
            "ttft_p50_s": ttft["p50"],
            "ttft_p90_s": ttft["p90"],
        }
    return out
