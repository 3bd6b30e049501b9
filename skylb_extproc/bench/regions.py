"""Regions of a benchmark: names, home-region assignment, RTTs and daily load curves.

No public trace records where its clients were, so regions are a construction, and every report
says so. Whole prefix groups (conversations: requests sharing their first block) get a home
region by a stable hash of the group key, so a conversation never changes region and the
assignment does not depend on the seed or on which requests `--limit` keeps.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import xxhash

__all__ = [
    "DEFAULT_NAMES",
    "DailyCurve",
    "RttMatrix",
    "assign_region",
    "parse_regions",
    "parse_weights",
    "tz_offsets",
]

DEFAULT_NAMES = ("us", "eu", "asia")
_TZ_HOURS = {"us": -5.0, "eu": 1.0, "asia": 8.0}


def parse_regions(spec: str) -> list[str]:
    """A count ("3") or a comma-separated list of names ("us,eu,asia")."""
    spec = spec.strip()
    if spec.isdigit():
        n = int(spec)
        if n < 1:
            raise ValueError("--regions: need at least one region")
        return list(DEFAULT_NAMES[:n]) if n <= len(DEFAULT_NAMES) else [f"r{i}" for i in range(n)]
    names = [s.strip() for s in spec.split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise ValueError(f"--regions: expected a count or distinct comma-separated names: {spec!r}")
    return names


def parse_weights(spec: str | None, regions: Sequence[str]) -> list[float]:
    """Comma-separated non-negative weights, one per region, normalised; None = equal weights."""
    if spec is None:
        return [1.0 / len(regions)] * len(regions)
    try:
        values = [float(s) for s in spec.split(",")]
    except ValueError:
        raise ValueError(f"--region-weights: not numbers: {spec!r}") from None
    if len(values) != len(regions):
        raise ValueError(f"--region-weights: {len(values)} weights for {len(regions)} regions")
    if any(v < 0 or not math.isfinite(v) for v in values) or sum(values) <= 0:
        raise ValueError("--region-weights: weights must be >= 0 with a positive sum")
    total = sum(values)
    return [v / total for v in values]


def assign_region(group: str, regions: Sequence[str], weights: Sequence[float]) -> str:
    """The home region of a prefix group: a stable hash of its key mapped onto the weights."""
    u = xxhash.xxh64_intdigest(group.encode()) / 2.0**64
    acc = 0.0
    for name, w in zip(regions, weights, strict=True):
        acc += w
        if u < acc:
            return name
    return regions[-1]


def tz_offsets(regions: Sequence[str]) -> list[float]:
    """Hours east of UTC: us -5, eu +1, asia +8; other names spread evenly around the day."""
    return [_TZ_HOURS.get(name, 24.0 * i / len(regions)) for i, name in enumerate(regions)]


@dataclass(frozen=True)
class RttMatrix:
    """One-way latency in seconds between regions; the same in both directions, 0 within one."""

    default_s: float
    pairs: dict[frozenset[str], float]

    def one_way(self, a: str, b: str) -> float:
        if a == b:
            return 0.0
        return self.pairs.get(frozenset((a, b)), self.default_s)

    @classmethod
    def parse(cls, spec: str, regions: Sequence[str]) -> RttMatrix:
        """ "100" (every pair) or "100,us-eu=40,eu-asia=120": one-way milliseconds."""
        default = 100.0
        pairs: dict[frozenset[str], float] = {}
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            key, eq, value = part.partition("=")
            ms = _ms(value if eq else key)
            if not eq:
                default = ms
                continue
            a, dash, b = key.partition("-")
            if not dash or a not in regions or b not in regions or a == b:
                raise ValueError(f"--rtt-ms: {key!r} is not a pair of distinct known regions")
            pairs[frozenset((a, b))] = ms / 1000.0
        return cls(default / 1000.0, pairs)


def _ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--rtt-ms: not a number of milliseconds: {text!r}") from None
    if value < 0 or not math.isfinite(value):
        raise ValueError(f"--rtt-ms: must be >= 0: {text!r}")
    return value


@dataclass(frozen=True)
class DailyCurve:
    """A 24 h request-rate shape (relative, max 1.0) sampled in equal windows from midnight."""

    name: str
    levels: tuple[float, ...]

    def level(self, hour: float) -> float:
        """Relative rate at local `hour` (any real number; wraps around the day)."""
        i = int((hour % 24.0) / 24.0 * len(self.levels)) % len(self.levels)
        return self.levels[i]

    @classmethod
    def load(cls, path: str | Path, series: str) -> DailyCurve:
        """The first day of `series` ("category/model", e.g. "language/m-large") in the CSV."""
        cat, _, model = series.partition("/")
        rates: list[float] = []
        with open(path, encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                if row.get("category") == cat and row.get("model") == model:
                    if float(row["window_start_s"]) >= 86400.0:
                        break
                    rates.append(float(row["total_rate_rps"]))
        if not rates or max(rates) <= 0:
            raise ValueError(f"{path}: no daily rates for series {series!r}")
        peak = max(rates)
        return cls(series, tuple(r / peak for r in rates))
