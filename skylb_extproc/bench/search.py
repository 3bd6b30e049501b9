"""`--find-min-replicas`: the fewest replicas per region that meet a TTFT P90 SLO, per policy.

The paper's cost result (SkyLB with 9 replicas serves like region-local with 12) read the other
way: for each policy, binary search over replicas per region in [1, max] for the smallest count
whose TTFT P90 is at most the SLO with every request completed. It assumes more replicas never
hurt (true of these policies up to simulation noise); every count it ran is reported, so a
non-monotone case is visible. Each round runs all unresolved policies in parallel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from skylb_extproc.bench.records import summarize_policy
from skylb_extproc.bench.runner import RunSpec, run_all

__all__ = ["find_min_replicas", "meets_slo", "one_count"]


def meets_slo(summary: dict[str, object], slo_s: float) -> bool:
    ttft = summary["ttft_s"]
    assert isinstance(ttft, dict)
    p90 = ttft["p90"]
    return summary["rejected"] == 0 and p90 is not None and p90 <= slo_s


def find_min_replicas(
    base: Sequence[RunSpec],
    slo_s: float,
    *,
    known: dict[tuple[str, int], dict[str, object]],
    jobs: int | None,
    progress: bool,
) -> dict[str, object]:
    """{"slo_ttft_p90_s", "max_replicas_per_region", "policies": {name: n or None}, "tried"}."""
    hi0 = max(one_count(s) for s in base)
    bounds = {s.policy: [1, hi0] for s in base}  # answer in [lo, hi], hi0 may fail too
    by_name = {s.policy: s for s in base}
    while True:
        todo: list[RunSpec] = []
        for name, (lo, hi) in bounds.items():
            n = hi if (name, hi) not in known else (lo + hi) // 2
            if lo <= hi and (name, n) not in known and not (lo == hi and (name, lo) in known):
                todo.append(replace(by_name[name], replicas_per_region=n))
        if not todo:
            break
        for spec, res in zip(todo, run_all(todo, jobs=jobs, progress=progress), strict=True):
            known[(spec.policy, one_count(spec))] = summarize_policy(res.records)
        for name, b in bounds.items():
            _narrow(name, b, known, slo_s)
    answer = {
        name: (lo if (name, lo) in known and meets_slo(known[(name, lo)], slo_s) else None)
        for name, (lo, _) in bounds.items()
    }
    tried = {
        name: {str(n): _p90(s) for (p, n), s in sorted(known.items()) if p == name}
        for name in bounds
    }
    return {
        "slo_ttft_p90_s": slo_s,
        "max_replicas_per_region": hi0,
        "policies": answer,
        "tried": tried,
    }


def one_count(spec: RunSpec) -> int:
    """The one replica count of a searched run (the CLI refuses per-region lists here)."""
    n = spec.replicas_per_region
    if not isinstance(n, int):
        raise ValueError("--find-min-replicas: one --replicas-per-region count, not a list")
    return n


def _p90(summary: dict[str, object]) -> float | None:
    ttft = summary["ttft_s"]
    assert isinstance(ttft, dict)
    value = ttft["p90"]
    return None if summary["rejected"] else value


def _narrow(
    name: str, b: list[int], known: dict[tuple[str, int], dict[str, object]], slo: float
) -> None:
    """Shrink [lo, hi] with every result known for `name`."""
    lo, hi = b
    if (name, hi) in known and not meets_slo(known[(name, hi)], slo):
        b[0], b[1] = hi, hi  # even the most replicas fail: stop, answer None
        return
    while lo < hi:
        mid = (lo + hi) // 2
        if (name, mid) not in known:
            break
        if meets_slo(known[(name, mid)], slo):
            hi = mid
        else:
            lo = mid + 1
    b[0], b[1] = lo, hi
